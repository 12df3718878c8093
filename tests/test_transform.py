"""The op chain: each op's effect on size and mode, formats, draft decoding, errors, the worker."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import signal
import struct
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import encode, photo
from PIL import Image

from pipeline import ops, transform, workers
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
from pipeline.errors import Filtered, OutputError, TransformError, is_final
from pipeline.records import Fetched, Job
from pipeline.transform import (
    WorkerSetup,
    decode,
    draft_size,
    init_worker,
    process,
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
    init_worker(WorkerSetup(config, str(tmp_path)))
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
        init_worker(WorkerSetup(TransformConfig(), str(blocker)))
        with pytest.raises(OutputError, match=rf"^{blocker}: Not a directory$"):
            process(fetched(JPEG))
        lost = workers._answer(fetched(JPEG))  # in a worker: no row, the lane stops the run
        assert isinstance(lost, workers.Lost) and lost.message == f"{blocker}: Not a directory"
    finally:
        signal.signal(signal.SIGINT, previous)


# --- resize modes, enlarge ----------------------------------------------------------------------

PORTRAIT = encode(photo(600, 800, seed=2), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("body", "op", "size"),
    [
        (JPEG, Resize(200, 200, "cover"), (267, 200)),  # the shortest side is the box's
        (PORTRAIT, Resize(200, 200, "cover"), (200, 267)),
        (JPEG, Resize(1000, 1000, "cover"), (1333, 1000)),  # cover enlarges by default
        (JPEG, Resize(1000, 1000, "cover", enlarge=False), (800, 600)),
        (JPEG, Resize(1000, 300, "cover", enlarge=False), (800, 600)),  # covered already
        (JPEG, Resize(200, 200, "pad"), (200, 200)),
        (PORTRAIT, Resize(300, 200, "pad"), (300, 200)),
        (JPEG, Resize(1000, 1000, "pad", enlarge=False), (1000, 1000)),  # padded, not enlarged
        (JPEG, Resize(1000, 1000, "fit", enlarge=False), (800, 600)),
        (JPEG, Resize(1000, 500, "fit", enlarge=False), (667, 500)),  # shrinking is allowed
        (PORTRAIT, Resize(1000, 500, "fit", enlarge=False), (375, 500)),
        (JPEG, Resize(1000, 400, "fill", enlarge=False), (800, 400)),  # the part it covers
        (JPEG, Resize(400, 300, "fill", enlarge=False), (400, 300)),
        (JPEG, Resize(1000, 400, "stretch", enlarge=False), (800, 400)),
    ],
)
def test_resize_modes_give_their_size(body, op, size):
    assert out(body, op).size == size


def test_fill_survives_a_rounding_error_at_the_edge():
    # drafted to 679x509, the crop box's height comes out as 509.00000000000006
    assert out(encode(photo(1358, 1018), "JPEG"), Resize(256, 256, "fill")).size == (256, 256)


def test_pad_fills_the_borders_with_the_background_or_keeps_them_transparent():
    padded = out(JPEG, Resize(200, 200, "pad"), format="png", background="#ff0000")
    assert padded.getpixel((100, 5)) == padded.getpixel((100, 194)) == (255, 0, 0)  # 200x150
    assert padded.getpixel((100, 100)) != (255, 0, 0)
    alpha = photo(200, 100)
    alpha.putalpha(255)
    body = encode(alpha, "PNG")
    kept = out(body, Resize(100, 100, "pad"), format="png", background="#ff0000")
    assert kept.mode == "RGBA" and kept.getpixel((50, 5))[3] == 0 and kept.getpixel((50, 50))[3]
    flat = out(body, Resize(100, 100, "pad"), format="jpeg", background="#ff0000")
    red, green, blue = flat.getpixel((50, 5))
    assert red > 240 and green < 15 and blue < 15  # JPEG has no alpha: the background shows


def test_cover_drafts_no_smaller_than_it_needs():
    assert draft_size(TransformConfig(ops=(Resize(100, 100, "cover"),)), (400, 200)) == (200, 100)
    assert draft_size(TransformConfig(ops=(Resize(100, 100, "pad"),)), (400, 200)) == (100, 50)
    small = TransformConfig(ops=(Resize(100, 100, "cover", enlarge=False),))
    assert draft_size(small, (50, 40)) == (50, 40)
    wide = encode(photo(2000, 1000), "JPEG")
    cover = TransformConfig(ops=(Resize(256, 256, "cover"),))
    image, _ = decode(wide, cover)
    assert image.size == (1000, 500)  # 1/4 (500x250) would be lower than 256
    assert decode(wide, TransformConfig(ops=(Resize(256, 256, "fit"),)))[0].size == (500, 250)
    assert out(wide, Resize(256, 256, "cover")).size == (512, 256)


def test_cover_of_a_strip_is_refused_past_max_pixels():
    strip = encode(photo(1000, 2), "PNG")
    with pytest.raises(TransformError, match=r"resize would make 50000x100 pixels") as caught:
        transform_bytes(strip, TransformConfig(ops=(Resize(100, 100, "cover"),), max_pixels=10**6))
    assert caught.value.kind == "decompression_bomb"


# --- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kind"),
    [
        ({"min_width": 801}, "too_small"),
        ({"min_height": 601}, "too_small"),
        ({"max_aspect_ratio": 1.3}, "aspect_ratio"),  # 800 / 600 = 1.33
    ],
)
def test_filters_refuse_from_the_header_before_any_pixel_is_decoded(options, kind):
    truncated = JPEG[: len(JPEG) // 2]  # its pixels cannot be decoded: its header is read
    with pytest.raises(Filtered) as caught:
        transform_bytes(truncated, TransformConfig(**options))
    assert caught.value.kind == kind and is_final(kind)
    assert pickle.loads(pickle.dumps(caught.value)).kind == kind
    passing = {"min_width": 800, "min_height": 600, "max_aspect_ratio": 1.34}
    assert out(JPEG, Thumbnail(64, 64), **passing).size == (64, 48)


def test_a_filtered_image_is_a_filtered_row_without_output(worker: Path):
    tiny = fetched(encode(photo(16, 16), "PNG"))
    with_filter = replace(transform._setup, config=TransformConfig(min_width=64))
    init_worker(with_filter)
    outcome = process(tiny)
    assert (outcome.status, outcome.error_kind, outcome.path) == ("filtered", "too_small", None)
    assert "16x16" in str(outcome.error)
    assert not (worker / "images").exists()


# --- reencode = false, original_sha256, input.hash_column ----------------------------------------


def test_the_original_bytes_are_kept_when_no_op_changes_the_image():
    kept = TransformConfig(
        ops=(ExifTranspose(), Resize(1000, 1000, enlarge=False), Thumbnail(900, 900)),
        reencode=False,
    )
    assert transform_bytes(JPEG, kept).data == JPEG
    png = encode(photo(80, 60), "PNG")
    assert transform_bytes(png, replace(kept, format="png")).data == png
    shrink = replace(kept, ops=(Thumbnail(200, 200),))
    assert Image.open(io.BytesIO(transform_bytes(JPEG, shrink).data)).size == (200, 150)
    assert transform_bytes(png, kept).data[:3] == b"\xff\xd8\xff"  # PNG in, JPEG out: encoded
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = encode(photo(80, 60), "JPEG", exif=exif)
    assert Image.open(io.BytesIO(transform_bytes(turned, kept).data)).size == (60, 80)
    assert transform_bytes(JPEG, replace(kept, reencode=True)).data != JPEG
    for body, fmt in ((png, "png"), (JPEG, "jpeg")):  # cut short: decoded, not kept broken
        with pytest.raises(TransformError) as caught:
            transform_bytes(body[: len(body) // 2], replace(kept, format=fmt))
        assert caught.value.kind == "decode_error"
    webp = encode(photo(80, 60), "WEBP")
    assert transform_bytes(webp, replace(kept, format="webp")).data == webp


def test_rows_carry_the_downloaded_bytes_hash_and_a_mismatch_fails(worker: Path):
    setup = replace(transform._setup, config=TransformConfig(ops=(), reencode=False))
    init_worker(replace(setup, hash_column="sha"))
    digest = hashlib.sha256(JPEG).hexdigest()
    job = Job(2, 17, "http://x/a.jpg", "00002-000000001", columns={"sha": digest.upper()})
    ok = process(Fetched(job, JPEG, 200, "image/jpeg", 5.0))
    assert ok.status == "ok" and ok.original_sha256 == ok.sha256 == digest
    assert (worker / str(ok.path)).read_bytes() == JPEG
    wrong = replace(job, line=18, columns={"sha": "0" * 64})
    failed = process(Fetched(wrong, JPEG, 200, "image/jpeg", 5.0))
    assert (failed.status, failed.error_kind, failed.path) == ("failed", "hash_mismatch", None)
    assert failed.original_sha256 == digest and is_final("hash_mismatch")


# --- 16-bit images, bugs ------------------------------------------------------------------------


def png16_rgb(value: tuple[int, int, int], size: int = 4) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    raw = b"".join(b"\x00" + struct.pack(">HHH", *value) * size for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))  # fmt: skip


def test_16_bit_levels_are_scaled_to_8_bits_not_clipped():
    grey = encode(Image.new("I;16", (4, 4), 40000), "PNG")
    assert Image.open(io.BytesIO(grey)).mode == "I;16"
    assert out(grey, format="png").getpixel((0, 0)) == 156  # 40000 / 256, not 255
    assert out(png16_rgb((40000, 20000, 65535)), format="png").getpixel((0, 0)) == (156, 78, 255)


def test_a_bug_in_an_op_is_a_retryable_internal_error(worker: Path, monkeypatch, caplog):
    def broken(image, op, config):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setitem(ops._APPLY, Thumbnail, broken)
    monkeypatch.setattr(transform, "_logged", set())
    with caplog.at_level(logging.DEBUG, logger="pipeline.transform"):
        outcomes = [
            workers._answer(fetched(JPEG)),
            workers._answer(fetched(JPEG, "http://x/b.jpg")),
        ]
    assert {(o.status, o.error_kind, o.error) for o in outcomes} == {
        ("failed", "internal_error", "RuntimeError: a bug over two lines")
    }
    assert not is_final("internal_error")
    tracebacks = [r for r in caplog.records if r.exc_info and r.levelno == logging.WARNING]
    assert len(tracebacks) == 1  # once, not once an image


def test_an_op_name_is_registered_once_and_a_built_in_never_replaced():
    import testops  # registers _crash and _sleep on import

    ops.register("_sleep", testops.Sleep, testops._sleep)  # again, as a re-import would: kept
    with pytest.raises(ValueError, match="'thumbnail' is taken by Thumbnail"):
        ops.register("thumbnail", testops.Sleep, testops._sleep)
    with pytest.raises(ValueError, match="'_sleep' is taken by Sleep"):
        ops.register("_sleep", testops.Crash, testops._crash)
    image = Image.new("RGB", (100, 80))
    assert ops.apply_op(image, testops.Sleep(0), TransformConfig()) is image
