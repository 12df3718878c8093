"""Two ops for tests only, registered on import: ``_crash`` and ``_sleep``.

A config file names them as any op (``[[transform.ops]] op = "_sleep"``) in a process that
imported this module: the tests, and the real command run through ``run_with_testops.py``
(``helpers.command``). A transform process that unpickles one imports this module, which
registers its apply function there too. The product itself does not know them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline.config import TransformConfig
from pipeline.errors import ConfigError
from pipeline.ops import register

log = logging.getLogger("pipeline.testops")  # under pipeline: -vv shows it, from every process


@dataclass(frozen=True, slots=True)
class Crash:
    """The worker process exits at once on an image of exactly width x height."""

    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Sleep:
    """The worker sleeps ``seconds`` per image (an artificially slow transform)."""

    seconds: float

    def __post_init__(self) -> None:
        if not 0 <= self.seconds <= 60:
            raise ConfigError("seconds", f"must be in [0, 60] (got {self.seconds})")


def _crash(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    if image.size == (op.width, op.height):
        os._exit(70)  # as a segfaulting decoder or the OOM killer would: no cleanup, no result
    return image


def _sleep(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    log.debug("_sleep: %g s", op.seconds)  # a test knows a transform is under way
    time.sleep(op.seconds)
    return image


register("_crash", Crash, _crash)
register("_sleep", Sleep, _sleep)
