"""The transform stage: decode -> op chain -> encode, run in the pool's worker processes.

``transform_bytes`` is the pure part (bytes in, bytes out) and is what the unit tests exercise.
``init_worker`` and ``process`` are the pool's side: the config is sent once per process by the
initializer, each task sends one Fetched body and gets back a small Outcome, and the worker writes
the output file itself, so the parent never touches image bytes twice.

When the chain only shrinks (its first geometric op is ``thumbnail`` or ``resize``, with only
``exif_transpose``/``grayscale`` before it), a JPEG is decoded with ``draft``: libjpeg scales by
1/2, 1/4 or 1/8 while decoding (the smallest scale that still covers the first shrink's result),
so a 1600 px photo bound for 256 px is decoded at 400 px and resampled from there: a third of the
CPU of decoding it whole.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import select
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .atomic import write_atomic
from .config import (
    OPS,
    Blur,
    CenterCrop,
    Crash,
    ExifTranspose,
    Grayscale,
    Op,
    Resize,
    Rotate,
    Sharpen,
    Sleep,
    Thumbnail,
    TransformConfig,
)
from .errors import ItemError, PipelineError, TransformError
from .logs import LogSetup, configure_worker
from .records import STAGING_DIR, Fetched, Job, Outcome, caption

log = logging.getLogger(__name__)

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees
_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class Encoded:
    data: bytes
    size_in: tuple[int, int]
    size_out: tuple[int, int]


def transform_bytes(body: bytes, config: TransformConfig) -> Encoded:
    """Decode ``body``, apply ``config.ops``, encode to ``config.format``; raises TransformError."""
    image, size_in = decode(body, config)
    for op in config.ops:
        _check_output(op, image.size, config.max_pixels)
        try:
            image = apply_op(image, op, config)
        except (OSError, ValueError) as exc:
            raise TransformError("transform_error", f"{_op_name(op)} failed: {exc}") from exc
    return Encoded(encode(image, config), size_in, image.size)


def _check_output(op: Op, size: tuple[int, int], max_pixels: int) -> None:
    """An op that would make more than ``max_pixels`` pixels is refused before it runs: an
    image that grows past the limit costs the memory a bomb would."""
    w, h = size
    if isinstance(op, Resize):
        w, h = (op.width, op.height) if op.mode != "fit" else _shrunk_size(op, size)
    elif isinstance(op, Rotate) and op.degrees % 90:
        turn = math.radians(op.degrees)
        cos, sin = abs(math.cos(turn)), abs(math.sin(turn))
        w, h = math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos)
    if w * h > max_pixels:
        raise TransformError(
            "decompression_bomb",
            f"{_op_name(op)} would make {w}x{h} pixels > transform.max_pixels {max_pixels}",
        )


def decode(body: bytes, config: TransformConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode ``body`` (drafted where the chain allows), in a normal mode.

    Only the decoders of ``transform.input_formats`` are tried, and Pillow's own size check stays
    on at ``transform.max_pixels`` while the header is read and while the pixels are: a container
    (ICO, TIFF) can hold an image far larger than its directory says, opened only at load time.
    """
    Image.MAX_IMAGE_PIXELS = config.max_pixels  # a worker runs one image at a time
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = _open(body, config)
        size_in = image.size
        if size_in[0] * size_in[1] > config.max_pixels:
            raise TransformError(
                "decompression_bomb",
                f"{size_in[0]}x{size_in[1]} pixels > transform.max_pixels {config.max_pixels}",
            )
        need = draft_size(config, size_in, _swaps_axes(image)) if image.format == "JPEG" else None
        if need is not None:
            image.draft(None, need)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise _bomb(exc, config) from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise TransformError("decode_error", f"{image.format} image: {exc}") from None
    if image.size[0] * image.size[1] > config.max_pixels:  # what was decoded, not what was said
        raise TransformError(
            "decompression_bomb", f"{image.format} holds {image.size[0]}x{image.size[1]} pixels"
        )
    return normalize_mode(image), size_in


def _open(body: bytes, config: TransformConfig) -> Image.Image:
    """Read the header with the allowed decoders only; raises TransformError."""
    try:
        return Image.open(io.BytesIO(body), formats=config.input_formats)
    except UnidentifiedImageError:
        raise TransformError("not_image", _unidentified(body, config)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(exc, config) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise TransformError("decode_error", f"cannot read the image header: {exc}") from None


def _bomb(exc: Exception, config: TransformConfig) -> TransformError:
    """Pillow's words (``Image size (N pixels) exceeds limit ...``), naming our key."""
    text = str(exc).split(", could be")[0]
    return TransformError(
        "decompression_bomb", f"{text} (transform.max_pixels {config.max_pixels})"
    )


def _unidentified(body: bytes, config: TransformConfig) -> str:
    """Why no allowed decoder took ``body``: another format's signature, or none at all. Only
    the formats' signature checks run here (a prefix test each), never a decoder."""
    Image.init()  # every format's signature, not only those open() loaded
    head, allowed = body[:16], {name.upper() for name in config.input_formats}
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        if name not in allowed and accept is not None and accept(head):
            listed = ", ".join(config.input_formats)
            return f"{name} is not in transform.input_formats ({listed})"
    return f"not a recognised image (starts with {body[:12]!r})"


def draft_size(
    config: TransformConfig, size: tuple[int, int], swaps_axes: bool = False
) -> tuple[int, int] | None:
    """The smallest size an image of ``size`` may be decoded at for the chain, or None (full).

    That is the size of the first shrink's result: libjpeg then decodes at the smallest 1/2, 1/4
    or 1/8 scale that still covers it, and the resampler does the last, small step.
    """
    upright = (size[1], size[0]) if swaps_axes else size  # as the ops will see it
    for op in config.ops:
        if isinstance(op, Thumbnail | Resize):
            need = _shrunk_size(op, upright)
            return (need[1], need[0]) if swaps_axes else need
        if not isinstance(op, ExifTranspose | Grayscale | Sleep):
            return None
    return None


def _shrunk_size(op: Thumbnail | Resize, size: tuple[int, int]) -> tuple[int, int]:
    if isinstance(op, Resize) and op.mode == "stretch":
        return (op.width, op.height)
    w, h = size
    fill = isinstance(op, Resize) and op.mode == "fill"
    scale = max(op.width / w, op.height / h) if fill else min(op.width / w, op.height / h)
    return (max(1, math.ceil(w * scale)), max(1, math.ceil(h * scale)))


def _swaps_axes(image: Image.Image) -> bool:
    return image.format == "JPEG" and image.getexif().get(_ORIENTATION) in _SWAPS_AXES


def normalize_mode(image: Image.Image) -> Image.Image:
    """Bring any decoded mode to one of L, LA, RGB, RGBA, which every op and encoder accepts."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    has_alpha = mode in ("PA", "La", "RGBa") or "transparency" in image.info
    if mode in ("1", "I", "I;16", "I;16B", "I;16L", "F") and not has_alpha:
        return image.convert("L")
    if mode == "P" and has_alpha:
        return image.convert("RGBA")
    return image.convert("RGBA" if has_alpha else "RGB")


def apply_op(image: Image.Image, op: Op, config: TransformConfig) -> Image.Image:
    """Apply one op; images are always in L, LA, RGB or RGBA mode here."""
    return _APPLY[type(op)](image, op, config)


def _resample(config: TransformConfig) -> Image.Resampling:
    return Image.Resampling[config.resample.upper()]


def _gap(config: TransformConfig) -> float | None:
    return config.reducing_gap or None


def _thumbnail(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    image.thumbnail((op.width, op.height), _resample(config), reducing_gap=_gap(config))
    return image


def _resize(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    w, h = image.size
    if op.mode == "stretch":
        return image.resize((op.width, op.height), _resample(config), reducing_gap=_gap(config))
    if op.mode == "fit":
        scale = min(op.width / w, op.height / h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return image.resize(size, _resample(config), reducing_gap=_gap(config))
    # fill: crop the source to the box's aspect ratio around the centre, then scale
    scale = max(op.width / w, op.height / h)
    cw, ch = op.width / scale, op.height / scale
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    return image.resize(
        (op.width, op.height), _resample(config), box=box, reducing_gap=_gap(config)
    )


def _center_crop(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    w, h = image.size
    cw, ch = min(op.width, w), min(op.height, h)
    left, top = (w - cw) // 2, (h - ch) // 2
    return image.crop((left, top, left + cw, top + ch))


def _grayscale(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return image.convert("LA" if image.mode in ("LA", "RGBA") else "L")


def _rotate(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    turns = {
        90: Image.Transpose.ROTATE_90,
        180: Image.Transpose.ROTATE_180,
        270: Image.Transpose.ROTATE_270,
    }
    degrees = op.degrees % 360
    if degrees == 0:
        return image
    if degrees in turns:  # lossless and exact
        return image.transpose(turns[int(degrees)])
    fill = (0,) * len(image.mode) if "A" in image.mode else _background(config, image.mode)
    return image.rotate(degrees, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)


def _sharpen(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return image.filter(ImageFilter.UnsharpMask(op.radius, op.percent, op.threshold))


def _blur(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(op.radius))


def _crash(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    if image.size == (op.width, op.height):
        os._exit(70)  # as a segfaulting decoder or the OOM killer would: no cleanup, no result
    return image


def _sleep(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    log.debug("_sleep: %g s", op.seconds)  # a test knows a transform is under way
    time.sleep(op.seconds)
    return image


def _exif_transpose(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return ImageOps.exif_transpose(image) or image


_APPLY: dict[type[Any], Callable[[Image.Image, Any, TransformConfig], Image.Image]] = {
    ExifTranspose: _exif_transpose,
    Thumbnail: _thumbnail,
    Resize: _resize,
    CenterCrop: _center_crop,
    Grayscale: _grayscale,
    Rotate: _rotate,
    Sharpen: _sharpen,
    Blur: _blur,
    Crash: _crash,
    Sleep: _sleep,
}


def _op_name(op: Op) -> str:
    return next(name for name, cls in OPS.items() if isinstance(op, cls))


def _background(config: TransformConfig, mode: str) -> Any:
    rgb = Image.new("RGB", (1, 1), config.background)
    return rgb.convert(mode).getpixel((0, 0))


def flatten(image: Image.Image, config: TransformConfig) -> Image.Image:
    """Paste an LA/RGBA image onto the opaque ``background`` colour (for formats without alpha)."""
    mode = image.mode[:-1]  # LA -> L, RGBA -> RGB
    flat = Image.new(mode, image.size, _background(config, mode))
    flat.paste(image.convert(mode), mask=image.getchannel("A"))
    return flat


def encode(image: Image.Image, config: TransformConfig) -> bytes:
    """Encode to the configured format; alpha is flattened onto ``background`` for JPEG."""
    if config.format == "jpeg" and image.mode in ("LA", "RGBA"):
        image = flatten(image, config)
    out = io.BytesIO()
    try:
        if config.format == "jpeg":
            image.save(out, "JPEG", quality=config.quality)
        elif config.format == "webp":
            image.save(out, "WEBP", quality=config.quality)
        else:
            image.save(out, "PNG")
    except (OSError, ValueError) as exc:
        raise TransformError("transform_error", f"cannot encode {config.format}: {exc}") from exc
    return out.getvalue()


# --- the pool side ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSetup:
    """What every pool process needs, sent once by the initializer instead of with each task."""

    config: TransformConfig
    out_dir: str
    folder_size: int
    main_pid: int  # the process that owns the run; a worker must not outlive it
    log_setup: LogSetup | None = None  # None: leave this process's logging as it is
    layout: str = "files"  # output.format
    caption_column: str = ""  # output.caption_column: written beside each file as .txt


_setup: WorkerSetup | None = None


def init_worker(setup: WorkerSetup) -> None:
    """Pool initializer: keep the setup; leave Ctrl-C to the parent, which coordinates shutdown."""
    global _setup
    _setup = setup
    if setup.log_setup is not None:
        configure_worker(setup.log_setup)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with(setup.main_pid)


def exit_with(pid: int) -> None:
    """End this worker when process ``pid`` ends, even by SIGKILL.

    A worker of a killed run would wait forever: it holds both ends of the pool's task pipe, so
    it never sees an end of file, and it keeps the forkserver alive too. A pidfd becomes readable
    when its process exits; one thread blocks on it. It is a daemon thread on purpose: it must
    never hold up the worker's own exit.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (not Linux >= 5.3): the old behaviour
        return

    def wait() -> None:
        select.select([pidfd], [], [])
        os._exit(1)

    threading.Thread(target=wait, name="main-process-watch", daemon=True).start()


def process_many(items: list[Fetched]) -> list[Outcome]:
    """Several images in one pool task: the hand-off to the pool is paid once for them all.

    Whatever one image raises is that image's row, and the others go on; but an OutputError
    (the disk is full) is raised: it is not the image's fault.
    """
    outcomes = []
    for item in items:
        try:
            outcomes.append(process(item))
        except PipelineError:  # the output folder, not the image: the lane stops the run
            raise
        except Exception as exc:  # not an ItemError: a bug, but still only this image's row
            log.warning("%s: the transform raised %s: %s", item.job.key, type(exc).__name__, exc)
            error = TransformError("transform_error", f"{type(exc).__name__}: {exc}")
            outcomes.append(Outcome.failed(item.job, error, download_ms=item.download_ms))
    return outcomes


def _write_caption(job: Job, out_dir: Path, stored: str) -> None:
    """The files layout's caption: ``<image name>.txt`` beside the image (the webdataset
    layout's is packed from the row's columns)."""
    assert _setup is not None
    if _setup.layout != "files":
        return
    text = caption(job.columns, _setup.caption_column)
    if text is not None:
        write_atomic(out_dir / f"{stored.rsplit('.', 1)[0]}.txt", text, root=out_dir)


def process(fetched: Fetched) -> Outcome:
    """Transform one downloaded body and write its output file: runs in a pool process."""
    assert _setup is not None, "init_worker was not run in this process"
    started, cpu_started = time.perf_counter(), time.process_time()
    job = fetched.job
    common: dict[str, Any] = {"http_status": fetched.http_status, "bytes_in": len(fetched.body)}
    try:
        encoded = transform_bytes(fetched.body, _setup.config)
        ext = EXTENSIONS[_setup.config.format]
        if _setup.layout == "webdataset":  # staged; the row names the sample's member
            stored, path = job.output_path(ext, _setup.folder_size, STAGING_DIR), f"{job.key}.{ext}"
        else:
            stored = path = job.output_path(ext, _setup.folder_size)
        out_dir = Path(_setup.out_dir)
        write_atomic(out_dir / stored, encoded.data, root=out_dir)  # OutputError: stops the run
        _write_caption(job, out_dir, stored)
    except ItemError as err:
        log.debug("%s: %s: %s", job.key, err.kind, err.message)
        elapsed = round((time.perf_counter() - started) * 1000, 2)
        cpu = round((time.process_time() - cpu_started) * 1000, 2)
        return Outcome.failed(
            job, err, download_ms=fetched.download_ms, transform_ms=elapsed, cpu_ms=cpu, **common
        )
    return Outcome.of(
        job,
        "ok",
        bytes_out=len(encoded.data),
        width_in=encoded.size_in[0],
        height_in=encoded.size_in[1],
        width_out=encoded.size_out[0],
        height_out=encoded.size_out[1],
        path=path,
        sha256=hashlib.sha256(encoded.data).hexdigest(),
        download_ms=fetched.download_ms,
        transform_ms=round((time.perf_counter() - started) * 1000, 2),
        cpu_ms=round((time.process_time() - cpu_started) * 1000, 2),
        **common,
    )
