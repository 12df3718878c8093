"""The ops of the transform chain: what each does to an image, and the size it makes of one.

The sizes are computed without touching a pixel, from the size alone: ``transform`` uses them to
draft-decode a JPEG no smaller than the first op needs, to refuse an op whose output would pass
``transform.max_pixels``, and to tell from the header that an image would come out unchanged.
Images reach an op in L, LA, RGB or RGBA mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from .config import (
    BUILTIN_OPS,
    OPS,
    Blur,
    CenterCrop,
    ExifTranspose,
    Grayscale,
    Op,
    Resize,
    Rotate,
    Sharpen,
    Thumbnail,
    TransformConfig,
)

ORIENTATION = 0x0112  # the EXIF tag


def output_size(op: Thumbnail | Resize, size: tuple[int, int]) -> tuple[int, int]:
    """The size ``op`` makes of an image of ``size``."""
    w, h = size
    if isinstance(op, Thumbnail):  # Pillow's own rounding may differ by a pixel: not drawn on
        return size if w <= op.width and h <= op.height else _kept_ratio(op, size, round)
    box = (op.width, op.height)
    if op.mode == "pad":
        return box
    if op.mode in ("fill", "stretch"):  # not enlarged: the box, cut to the image
        grows = op.width > w or op.height > h
        return (min(op.width, w), min(op.height, h)) if grows and not op.enlarge else box
    return _kept_ratio(op, size, round)  # fit, cover


def scaled_size(op: Thumbnail | Resize, size: tuple[int, int]) -> tuple[int, int]:
    """The size ``op`` scales an image of ``size`` to, before a crop or a pad: the least a
    draft must decode (fill and cover scale to cover the box, fit and pad to fit in it)."""
    if isinstance(op, Resize) and op.mode == "stretch":
        return output_size(op, size)
    return _kept_ratio(op, size, math.ceil)


def _kept_ratio(
    op: Thumbnail | Resize, size: tuple[int, int], rounding: Callable[[float], int]
) -> tuple[int, int]:
    w, h = size
    covers = isinstance(op, Resize) and op.mode in ("fill", "cover")
    scale = max(op.width / w, op.height / h) if covers else min(op.width / w, op.height / h)
    if not (isinstance(op, Resize) and op.enlarge):
        scale = min(scale, 1.0)
    return (max(1, rounding(w * scale)), max(1, rounding(h * scale)))


def leaves_alone(op: Op, image: Image.Image) -> bool:
    """True if ``op`` changes no pixel of ``image``, an opened image not yet decoded."""
    size = image.size
    if isinstance(op, ExifTranspose):  # read from the header, but a PNG's after its pixels
        return bool(image.getexif().get(ORIENTATION, 1) == 1)
    if isinstance(op, Thumbnail | Resize):
        return output_size(op, size) == size
    if isinstance(op, CenterCrop):
        return size[0] <= op.width and size[1] <= op.height
    if isinstance(op, Rotate):
        return op.degrees % 360 == 0
    if isinstance(op, Grayscale):
        return image.mode in ("L", "LA")
    return False  # sharpen, blur, and any registered op


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
    if op.mode == "fill":
        return _fill(image, op, config)
    size = output_size(op, image.size) if op.mode != "pad" else _kept_ratio(op, image.size, round)
    if size != image.size:
        image = image.resize(size, _resample(config), reducing_gap=_gap(config))
    return _pad(image, op, config) if op.mode == "pad" else image


def _pad(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    """Centre the image on a width x height canvas: transparent where it has alpha (JPEG then
    flattens it onto the background), the background colour where it has none."""
    if image.size == (op.width, op.height):
        return image
    fill = (0,) * len(image.mode) if "A" in image.mode else background(config, image.mode)
    canvas = Image.new(image.mode, (op.width, op.height), fill)
    canvas.paste(image, ((op.width - image.width) // 2, (op.height - image.height) // 2))
    return canvas


def _fill(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    """Crop the source to the box's aspect ratio around the centre, then scale."""
    w, h = image.size
    scale = max(op.width / w, op.height / h)
    if scale > 1 and not op.enlarge:  # the part of the box the image covers, at its own size
        return _center_crop(image, op, config)
    cw, ch = op.width / scale, op.height / scale
    # clamped: 256 / (256 / 509) is 509.00000000000006, and Pillow refuses a box past the image
    left, top = max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2)
    box = (left, top, min(w, left + cw), min(h, top + ch))
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
    fill = (0,) * len(image.mode) if "A" in image.mode else background(config, image.mode)
    return image.rotate(degrees, Image.Resampling.BICUBIC, expand=True, fillcolor=fill)


def _sharpen(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return image.filter(ImageFilter.UnsharpMask(op.radius, op.percent, op.threshold))


def _blur(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(op.radius))


def _exif_transpose(image: Image.Image, op: Any, config: TransformConfig) -> Image.Image:
    return ImageOps.exif_transpose(image) or image


Apply = Callable[[Image.Image, Any, TransformConfig], Image.Image]

_APPLY: dict[type[Any], Apply] = {
    ExifTranspose: _exif_transpose,
    Thumbnail: _thumbnail,
    Resize: _resize,
    CenterCrop: _center_crop,
    Grayscale: _grayscale,
    Rotate: _rotate,
    Sharpen: _sharpen,
    Blur: _blur,
}


def register(name: str, op_class: type[Any], apply: Apply) -> None:
    """Add an op: ``[[transform.ops]] op = name`` then builds an ``op_class`` (a frozen dataclass,
    validated in its ``__post_init__``) from the table's keys, and ``apply(image, op, config)``
    runs it. A worker process that unpickles an ``op_class`` imports its module: register at the
    import of that module, and every process that meets the op knows it. A built-in op, or a name
    taken by another class, is not replaced."""
    if name in BUILTIN_OPS or OPS.get(name, op_class) is not op_class:
        raise ValueError(f"the op name {name!r} is taken by {OPS[name].__name__}")
    OPS[name] = op_class
    _APPLY[op_class] = apply


def op_name(op: Op) -> str:
    return next(name for name, cls in OPS.items() if isinstance(op, cls))


def background(config: TransformConfig, mode: str) -> Any:
    rgb = Image.new("RGB", (1, 1), config.background)
    return rgb.convert(mode).getpixel((0, 0))
