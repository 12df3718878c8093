"""The op chain: each op's effect on size and mode, formats, draft decoding, errors, the worker."""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import pytest
from helpers import encode, photo
from PIL import Image

from pipeline.bench.faults import bomb_png
from pipeline.config import (
    Blur,
    CenterCrop,
    ExifTranspose,
    Grayscale,
    Resize,
    Rotate,
    Sharpen,
    Thumbnail,
    TransformConfig,
)
from pipeline.errors import OutputError, TransformError
from pipeline.records import Fetched, Job
from pipeline.transform import (
    WorkerSetup,
    decode,
    draft_size,
    init_worker,
    process,
    process_many,
    transform_bytes,
)


def out(body: bytes, *ops, **options) -> Image.Image:
    encoded = transform_bytes(body, TransformConfig(ops=tuple(ops), **options))
    image = Image.open(io.BytesIO(encoded.data))
    image.load()
    assert image.size == encoded.size_out
    return image


JPEG = encode(photo(800, 600, seed=1), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("op", "size"),
    [
        (Thumbnail(200, 200), (200, 150)),
        (Thumbnail(2000, 2000), (800, 600)),  # never enlarges
        (Resize(200, 200, "fit"), (200, 150)),
        (Resize(1600, 1600, "fit"), (1600, 1200)),  # fit may enlarge
        (Resize(200, 200, "fill"), (200, 200)),
        (Resize(300, 100, "stretch"), (300, 100)),
        (CenterCrop(100, 50), (100, 50)),
        (CenterCrop(1000, 50), (800, 50)),  # never larger than the image
        (Rotate(90), (600, 800)),
        (Rotate(180), (800, 600)),
        (Sharpen(), (800, 600)),
        (Blur(3), (800, 600)),
    ],
)
def test_each_op_gives_its_size(op, size):
    assert out(JPEG, op).size == size


def test_rotate_90_is_counter_clockwise():
    image = Image.new("RGB", (40, 20), "black")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    rotated = out(encode(image, "PNG"), Rotate(90), format="png")
    assert rotated.getpixel((10, 35))[0] > 200  # the left edge is now at the bottom
    assert rotated.getpixel((10, 5))[0] < 50


def test_rotate_by_an_odd_angle_grows_the_canvas_and_fills_with_the_background():
    rotated = out(JPEG, Rotate(30), background="#00ff00")
    assert rotated.width > 800 and rotated.height > 600
    r, g, b = rotated.getpixel((2, 2))
    assert g > 200 and r < 60 and b < 60


def test_sharpen_and_blur_change_pixels():
    original = out(JPEG, format="png")
    for op in (Sharpen(), Blur(3)):
        changed = out(JPEG, op, format="png")
        assert changed.tobytes() != original.tobytes()


def test_grayscale_keeps_alpha_where_the_format_can():
    rgba = photo(64, 64)
    rgba.putalpha(128)
    assert out(encode(rgba, "PNG"), Grayscale(), format="png").mode == "LA"
    assert out(encode(rgba, "PNG"), Grayscale(), format="jpeg").mode == "L"
    assert out(JPEG, Grayscale()).mode == "L"


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    body = encode(photo(300, 200), "JPEG", exif=exif.tobytes())
    assert out(body, ExifTranspose(), format="png").size == (200, 300)
    assert out(body, format="png").size == (300, 200)


@pytest.mark.parametrize(("fmt", "pil"), [("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
def test_output_format(fmt, pil):
    assert out(JPEG, Thumbnail(100, 100), format=fmt).format == pil


def test_quality_changes_the_size():
    config = {"ops": (Thumbnail(400, 400),)}
    low = transform_bytes(JPEG, TransformConfig(quality=30, **config)).data
    high = transform_bytes(JPEG, TransformConfig(quality=95, **config)).data
    assert len(low) < len(high) * 0.7


def test_alpha_is_flattened_onto_the_background_for_jpeg_and_kept_for_png():
    clear = Image.new("RGBA", (32, 32), (0, 0, 255, 0))
    flat = out(encode(clear, "PNG"), background="#ff0000")
    assert flat.mode == "RGB"
    r, g, b = flat.getpixel((16, 16))
    assert r > 240 and g < 20 and b < 20
    kept = out(encode(clear, "PNG"), format="png")
    assert kept.mode == "RGBA" and kept.getpixel((16, 16))[3] == 0


@pytest.mark.parametrize(
    "image",
    [
        Image.new("P", (40, 30)),
        Image.new("CMYK", (40, 30), (10, 20, 30, 40)),
        Image.new("I;16", (40, 30), 30000),
        Image.new("1", (40, 30), 1),
        Image.new("LA", (40, 30), (10, 100)),
    ],
    ids=lambda image: image.mode,
)
def test_every_mode_is_normalised_and_encoded(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    if image.mode == "P":
        image.info["transparency"] = 0
    for target in ("jpeg", "png", "webp"):
        assert out(encode(image, fmt), Thumbnail(20, 20), format=target).size[0] == 20


def test_a_shrinking_chain_decodes_a_jpeg_at_reduced_size():
    big = encode(photo(2000, 1500), "JPEG")
    image, size_in = decode(big, TransformConfig(ops=(Thumbnail(256, 256),)))
    assert size_in == (2000, 1500)
    assert image.size == (500, 375)  # 1/4: the smallest libjpeg scale that still covers 256x256
    full, _ = decode(big, TransformConfig(ops=(CenterCrop(256, 256),)))
    assert full.size == (2000, 1500)


def test_draft_size_is_the_first_shrinks_result():
    thumb = TransformConfig(ops=(ExifTranspose(), Thumbnail(100, 50)))
    assert draft_size(thumb, (400, 400)) == (50, 50)  # fit in 100x50: the height decides
    assert draft_size(thumb, (400, 400), True) == (50, 50)
    assert draft_size(thumb, (800, 200)) == (100, 25)
    assert draft_size(thumb, (800, 200), True) == (50, 13)  # upright 200x800 fits as 13x50
    fill = TransformConfig(ops=(Resize(100, 50, "fill"),))
    assert draft_size(fill, (400, 400)) == (100, 100)  # cover 100x50
    stretch = TransformConfig(ops=(Grayscale(), Resize(100, 50, "stretch")))
    assert draft_size(stretch, (400, 400)) == (100, 50)
    assert draft_size(TransformConfig(ops=(Blur(), Thumbnail(100, 50))), (400, 400)) is None
    assert draft_size(TransformConfig(ops=(CenterCrop(10, 10), Thumbnail(5, 5))), (9, 9)) is None
    assert draft_size(TransformConfig(ops=()), (400, 400)) is None


def test_drafting_to_the_fitted_size_decodes_a_landscape_photo_smaller():
    # the 256x256 box would need 1/2 (677x508); the fitted 256x193 is covered by 1/4
    image, _ = decode(
        encode(photo(1354, 1016), "JPEG"), TransformConfig(ops=(Thumbnail(256, 256),))
    )
    assert image.size == (339, 254)


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"\x00\x01 random bytes, no image at all" * 50, "not_image"),
        (b"<!doctype html><html></html>", "not_image"),
        (JPEG[: len(JPEG) // 2], "decode_error"),
        (bomb_png(50_000, 50_000), "decompression_bomb"),
    ],
    ids=["random", "html", "truncated", "bomb"],
)
def test_bad_bodies_fail_with_their_kind(body, kind):
    started = time.perf_counter()
    with pytest.raises(TransformError) as caught:
        transform_bytes(body, TransformConfig(ops=(Thumbnail(64, 64),)))
    assert caught.value.kind == kind
    assert time.perf_counter() - started < 1.0  # a bomb is refused from its header


def test_max_pixels_is_the_configured_limit():
    with pytest.raises(TransformError, match=r"transform\.max_pixels 1000") as caught:
        transform_bytes(encode(photo(100, 100), "PNG"), TransformConfig(max_pixels=1000))
    assert caught.value.kind == "decompression_bomb"


@pytest.fixture
def worker(tmp_path):
    """Set this process up as a pool worker would be, and put Ctrl-C back afterwards."""
    previous = signal.getsignal(signal.SIGINT)
    config = TransformConfig(ops=(Thumbnail(64, 64),))
    init_worker(WorkerSetup(config, str(tmp_path), 1000, main_pid=1))
    yield tmp_path
    signal.signal(signal.SIGINT, previous)


def fetched(body: bytes, url: str = "http://x/a.jpg") -> Fetched:
    return Fetched(Job(2, 17, url, "00002-000000001"), body, 200, "image/jpeg", 5.0)


def test_the_worker_writes_its_file_atomically_and_reports_it(worker: Path):
    outcome = process(fetched(JPEG))
    assert outcome.status == "ok" and outcome.key == "00002-000000017"
    written = worker / str(outcome.path)
    assert written.stat().st_size == outcome.bytes_out
    assert (outcome.width_in, outcome.height_in) == (800, 600)
    assert (outcome.width_out, outcome.height_out) == Image.open(written).size == (64, 48)
    assert not list(worker.rglob("*.tmp"))


def test_the_worker_returns_failures_as_rows(worker: Path):
    outcome = process(fetched(b"not an image"))
    assert (outcome.status, outcome.error_kind, outcome.path) == ("failed", "not_image", None)
    assert not list((worker / "images").rglob("*")) if (worker / "images").exists() else True


def test_an_unwritable_output_stops_the_run_instead_of_failing_the_image(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    blocker = tmp_path / "file"
    blocker.write_text("")
    try:
        init_worker(WorkerSetup(TransformConfig(), str(blocker), 1000, main_pid=1))
        with pytest.raises(OutputError, match=rf"^{blocker}: Not a directory$"):
            process(fetched(JPEG))
        with pytest.raises(OutputError):  # several images a task: raised, not a row
            process_many([fetched(JPEG)])
    finally:
        signal.signal(signal.SIGINT, previous)
