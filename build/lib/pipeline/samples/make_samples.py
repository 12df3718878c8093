"""Make the demo's sample images, deterministically: ``python data/make_samples.py [OUTDIR]``.

Writes into ``data/images`` beside this script unless OUTDIR is given, overwriting only its own
files. Each image comes from its own seeded generator, so a rerun rewrites the same bytes (with the
same Pillow and libjpeg).

- ``photo-NNN.jpg``: 36 photo-like JPEGs, 480 to 1600 px a side, landscape, portrait and square:
  a sky-to-ground gradient, soft blurred shapes, low-frequency colour variation and a fine grain,
  so they compress like real photos. Among them:
  ``photo-030-exif6.jpg`` and ``photo-031-exif8.jpg`` carry an EXIF Orientation (6 and 8), so
  ``exif_transpose`` matters; ``photo-032-gray.jpg`` is greyscale (L); ``photo-033-cmyk.jpg``
  is CMYK.
- ``alpha-NNN.png``: 6 RGBA PNGs, 300 to 900 px, a soft logo-like shape on transparency.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from pipeline.bench.workload import photo  # the photo generator is shared with the benchmarks

PHOTOS = 36
ALPHAS = 6
VARIANTS = {30: ("exif6", "RGB"), 31: ("exif8", "RGB"), 32: ("gray", "L"), 33: ("cmyk", "CMYK")}
ORIENTATION = 0x0112


def alpha_logo(seed: int) -> Image.Image:
    rng = random.Random(seed)
    side = rng.randrange(300, 901)
    image = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    colour = tuple(rng.randrange(256) for _ in range(3))
    margin = side // 8
    draw.rounded_rectangle(
        (margin, margin, side - margin, side - margin), side // 6, fill=(*colour, 255)
    )
    inner = side // 3
    draw.ellipse((inner, inner, side - inner, side - inner), fill=(0, 0, 0, 0))
    return image.filter(ImageFilter.GaussianBlur(2))


def save_photo(index: int, out: Path) -> Path:
    image = photo(1000 + index)
    suffix, mode = VARIANTS.get(index, ("", "RGB"))
    path = out / f"photo-{index:03d}{'-' + suffix if suffix else ''}.jpg"
    exif = Image.Exif()
    if suffix.startswith("exif"):
        exif[ORIENTATION] = int(suffix[-1])
    image.convert(mode).save(path, "JPEG", quality=85, exif=exif.tobytes())
    return path


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent / "images"
    out.mkdir(parents=True, exist_ok=True)
    paths = [save_photo(i, out) for i in range(PHOTOS)]
    for i in range(ALPHAS):
        path = out / f"alpha-{i:03d}.png"
        alpha_logo(2000 + i).save(path, "PNG")
        paths.append(path)
    total = sum(p.stat().st_size for p in paths)
    print(f"{len(paths)} images, {total / 1e6:.1f} MB in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
