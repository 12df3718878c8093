"""The transform stage: decode -> op chain -> encode, run in the pool's worker processes.

``transform_bytes`` is the pure part (bytes in, bytes out) and is what the unit tests exercise.
``init_worker`` and ``process`` are the worker's side (workers.py): the config is sent once per
process, each image is one Fetched body in and a small Outcome back, and the worker writes the
output file itself, so the lane never touches image bytes twice. What each op does, and
the size it makes, is ``ops``.

When the chain only shrinks (its first geometric op is ``thumbnail`` or ``resize``, with only
``exif_transpose``/``grayscale`` before it), a JPEG is decoded with ``draft``: libjpeg scales by
1/2, 1/4 or 1/8 while decoding (the smallest scale that still covers the first shrink's result),
so a 1600 px photo bound for 256 px is decoded at 400 px and resampled from there: a third of the
CPU of decoding it whole.

Before any pixel is decoded, the header is enough to refuse a bomb, to leave out an image the
filters reject (``min_width``, ``min_height``, ``max_aspect_ratio``: a ``filtered`` row), and, with
``reencode = false``, to keep the downloaded bytes as they are when no op would change them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from .atomic import write_atomic
from .config import (
    ExifTranspose,
    Grayscale,
    Op,
    Resize,
    Rotate,
    Thumbnail,
    TransformConfig,
)
from .errors import Filtered, ItemError, TransformError
from .layout import OutputLayout, caption_file
from .logs import LogSetup, configure_worker
from .ops import ORIENTATION, apply_op, background, leaves_alone, op_name, output_size, scaled_size
from .records import Fetched, Job, Outcome, caption

log = logging.getLogger(__name__)

EXTENSIONS = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_SAME_FORMAT = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}  # a decoder's name: its output
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that turn the image by 90 degrees


@dataclass(frozen=True, slots=True)
class Encoded:
    data: bytes
    size_in: tuple[int, int]
    size_out: tuple[int, int]


def transform_bytes(body: bytes, config: TransformConfig) -> Encoded:
    """Decode ``body``, apply ``config.ops``, encode to ``config.format``; raises TransformError
    (or Filtered). With ``reencode = false``, a body that no op changes is returned as it came."""
    image = open_image(body, config)
    size_in = image.size
    if not config.reencode and ends_whole(body, image.format) and keeps_original(image, config):
        return Encoded(body, size_in, size_in)
    image = load(image, config)
    for op in config.ops:
        _check_output(op, image.size, config.max_pixels)
        try:
            image = apply_op(image, op, config)
        except (OSError, ValueError) as exc:
            raise TransformError("transform_error", f"{op_name(op)} failed: {exc}") from exc
    return Encoded(encode(image, config), size_in, image.size)


def _check_output(op: Op, size: tuple[int, int], max_pixels: int) -> None:
    """An op that would make more than ``max_pixels`` pixels is refused before it runs: an
    image that grows past the limit costs the memory a bomb would."""
    w, h = size
    if isinstance(op, Resize):
        w, h = output_size(op, size)
    elif isinstance(op, Rotate) and op.degrees % 90:
        turn = math.radians(op.degrees)
        cos, sin = abs(math.cos(turn)), abs(math.sin(turn))
        w, h = math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos)
    if w * h > max_pixels:
        raise TransformError(
            "decompression_bomb",
            f"{op_name(op)} would make {w}x{h} pixels > transform.max_pixels {max_pixels}",
        )


def decode(body: bytes, config: TransformConfig) -> tuple[Image.Image, tuple[int, int]]:
    """Open and fully decode ``body`` (drafted where the chain allows), in a normal mode.

    Only the decoders of ``transform.input_formats`` are tried, and Pillow's own size check stays
    on at ``transform.max_pixels`` while the header is read and while the pixels are: a container
    (ICO, TIFF) can hold an image far larger than its directory says, opened only at load time.
    """
    image = open_image(body, config)
    size_in = image.size
    return load(image, config), size_in


def open_image(body: bytes, config: TransformConfig) -> Image.Image:
    """Read the header of ``body``; refuse a bomb, or an image a filter leaves out."""
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
    screen(size_in, config)
    return image


def load(image: Image.Image, config: TransformConfig) -> Image.Image:
    """Decode the pixels of an opened image (drafted where the chain allows), in a normal mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        need = (
            draft_size(config, image.size, _swaps_axes(image)) if image.format == "JPEG" else None
        )
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
    return normalize_mode(image)


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


def screen(size: tuple[int, int], config: TransformConfig) -> None:
    """The filters, on the size the header gives (as stored: before any EXIF rotation). The
    shape is judged first: a 2000x20 banner is ``aspect_ratio``, even when it is too low too."""
    w, h = size
    ratio = max(w, h) / max(1, min(w, h))
    if config.max_aspect_ratio and ratio > config.max_aspect_ratio:
        raise Filtered(
            "aspect_ratio",
            f"{w}x{h}: aspect ratio {ratio:.3g} > transform.max_aspect_ratio "
            f"{config.max_aspect_ratio:g}",
        )
    if w < config.min_width or h < config.min_height:
        raise Filtered(
            "too_small",
            f"{w}x{h} is smaller than transform.min_width x min_height "
            f"({config.min_width}x{config.min_height})",
        )


def ends_whole(body: bytes, fmt: str | None) -> bool:
    """A look at the end of a body to be kept without decoding it: a file cut short at its
    source is decoded instead, and fails as decode_error, rather than kept broken."""
    if fmt == "JPEG":
        return body.rstrip(b"\0").endswith(b"\xff\xd9")  # the end-of-image marker
    if fmt == "PNG":
        return body.endswith(b"IEND\xaeB`\x82")  # the IEND chunk and its CRC
    if fmt == "WEBP":
        return len(body) >= 8 + int.from_bytes(body[4:8], "little")  # the RIFF size
    return False


def keeps_original(image: Image.Image, config: TransformConfig) -> bool:
    """True if the downloaded bytes may be written as they are: they are in the output format
    already, a single frame, and no op changes a pixel of this image (decided from the header)."""
    if _SAME_FORMAT.get(image.format or "") != config.format:
        return False
    if getattr(image, "is_animated", False):  # an encoder would keep the first frame only
        return False
    try:
        return all(leaves_alone(op, image) for op in config.ops)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a PNG's EXIF may follow its
        raise TransformError("decode_error", f"{image.format} image: {exc}") from None  # pixels


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
            need = scaled_size(op, upright)
            return (need[1], need[0]) if swaps_axes else need
        if not isinstance(op, ExifTranspose | Grayscale):
            return None
    return None


def _swaps_axes(image: Image.Image) -> bool:
    return image.format == "JPEG" and image.getexif().get(ORIENTATION) in _SWAPS_AXES


def normalize_mode(image: Image.Image) -> Image.Image:
    """Bring any decoded mode to one of L, LA, RGB, RGBA, which every op and encoder accepts."""
    mode = image.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    has_alpha = mode in ("PA", "La", "RGBa") or "transparency" in image.info
    if mode.startswith("I;16") or mode == "I":  # 16-bit levels: scaled to 8, not clipped at 255
        image = image.convert("I").point(lambda v: v / 256)
    if mode in ("1", "I", "I;16", "I;16B", "I;16L", "F") and not has_alpha:
        return image.convert("L")
    if mode == "P" and has_alpha:
        return image.convert("RGBA")
    return image.convert("RGBA" if has_alpha else "RGB")


def flatten(image: Image.Image, config: TransformConfig) -> Image.Image:
    """Paste an LA/RGBA image onto the opaque ``background`` colour (for formats without alpha)."""
    mode = image.mode[:-1]  # LA -> L, RGBA -> RGB
    flat = Image.new(mode, image.size, background(config, mode))
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
    """What every transform process needs, sent once when it starts instead of with each task:
    built once by the coordinator (lanes.py) and handed to each lane, whose owner uses its
    transform section too (its timeouts, retries and start method)."""

    config: TransformConfig
    out_dir: str
    log_setup: LogSetup | None = None  # None: leave this process's logging as it is
    layout: OutputLayout = OutputLayout(webdataset=False)  # noqa: RUF009 (frozen: shared safely)
    hash_column: str = ""  # input.hash_column: the input column with each body's sha256
    caption_column: str = ""  # output.caption_column: written beside each file as .txt


_setup: WorkerSetup | None = None


def init_worker(setup: WorkerSetup) -> None:
    """Keep the setup; leave Ctrl-C to the parent, which coordinates shutdown. (A worker watches
    its lane by its tasks pipe, workers.py: it needs no thread for that.)"""
    global _setup
    _setup = setup
    if setup.log_setup is not None:
        configure_worker(setup.log_setup)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_logged: set[str] = set()  # exception types whose traceback this process has logged


def internal_error(key: str, exc: BaseException) -> TransformError:
    """The row's error for a bug; its traceback is logged once per exception type a process."""
    name = type(exc).__name__
    message = " ".join(f"{name}: {exc}".split())  # one line
    if name in _logged:
        log.debug("%s: the transform raised %s", key, message)
    else:
        _logged.add(name)
        log.warning("%s: the transform raised %s", key, message, exc_info=exc)
    return TransformError("internal_error", message)


def verify(job: Job, digest: str, column: str) -> None:
    """Raise ``hash_mismatch`` if the input's ``column`` gives another sha256 than ``digest``
    (an empty cell, or no such column on this line, has nothing to check)."""
    expected = (job.columns or {}).get(column) if column else None
    if expected is None or expected == "":
        return
    if str(expected).strip().lower() != digest:
        raise TransformError("hash_mismatch", f"sha256 {digest}, but {column} is {expected!r}")


def _write_caption(job: Job, out_dir: Path, stored: str) -> None:
    """The files layout's caption: ``<image name>.txt`` beside the image (the webdataset
    layout's is packed from the row's columns)."""
    assert _setup is not None
    if not _setup.layout.captions_beside:
        return
    text = caption(job.columns, _setup.caption_column)
    if text is not None:
        write_atomic(out_dir / caption_file(stored), text, root=out_dir)


def process(fetched: Fetched) -> Outcome:
    """Transform one downloaded body and write its output file: runs in a pool process."""
    assert _setup is not None, "init_worker was not run in this process"
    started, cpu_started = time.perf_counter(), time.process_time()
    job = fetched.job
    original = hashlib.sha256(fetched.body).hexdigest()
    common: dict[str, Any] = {
        "http_status": fetched.http_status,
        "bytes_in": len(fetched.body),
        "original_sha256": original,
    }
    try:
        verify(job, original, _setup.hash_column)
        encoded = transform_bytes(fetched.body, _setup.config)
        ext = EXTENSIONS[_setup.config.format]
        layout = _setup.layout  # webdataset: staged; the row names the sample's member
        stored = layout.stored(job.file, job.line, job.url, ext)
        path = layout.row_path(job.key, stored)
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
    kept = encoded.data is fetched.body  # reencode = false, and no op changed the image
    return Outcome.of(
        job,
        "ok",
        bytes_out=len(encoded.data),
        width_in=encoded.size_in[0],
        height_in=encoded.size_in[1],
        width_out=encoded.size_out[0],
        height_out=encoded.size_out[1],
        path=path,
        sha256=original if kept else hashlib.sha256(encoded.data).hexdigest(),
        download_ms=fetched.download_ms,
        transform_ms=round((time.perf_counter() - started) * 1000, 2),
        cpu_ms=round((time.process_time() - cpu_started) * 1000, 2),
        **common,
    )
