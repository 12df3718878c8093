"""Fixtures: a folder of test images, served by a real HTTP server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import write_images

from pipeline.bench.server import StaticServer


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    write_images(folder, 50)
    return folder


@pytest.fixture(scope="session")
def server(image_dir: Path) -> Iterator[StaticServer]:
    with StaticServer(image_dir) as srv:
        yield srv
