"""ingest.media.thumbnail: exact sizes, V7-style thumbnails, failures, keys and the pool.

Every image is generated here with Pillow; nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import io
import multiprocessing
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ingest.media import MediaError
from ingest.media.thumbnail import (
    THUMBNAIL_BOX,
    Thumbnail,
    ThumbnailPool,
    make_thumbnail,
    make_thumbnail_from_path,
    thumbnail_key,
    thumbnail_size,
)

RED = (255, 0, 0)
BLUE = (0, 0, 255)


# --- helpers -------------------------------------------------------------------------------


def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **params)
    return out.getvalue()


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Photographic-ish content: gradients plus noise, so JPEG sizes are realistic."""
    gx = Image.linear_gradient("L").rotate(90).resize(size)
    gy = Image.linear_gradient("L").resize(size)
    noise = Image.effect_noise(size, 40 + seed)
    return Image.merge("RGB", (gx, gy, noise))


def decoded(t: Thumbnail) -> Image.Image:
    im = Image.open(io.BytesIO(t.jpeg))
    assert im.format == "JPEG"
    assert im.mode == "RGB"
    assert im.size == (t.thumb_width, t.thumb_height)
    return im


def close_to(pixel: Any, expected: tuple[int, ...], tol: int = 40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected, strict=True))


def png_with_header(width: int, height: int) -> bytes:
    """A valid-looking PNG header (IHDR with a correct CRC) claiming a huge size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", quality=95, exif=exif)


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "thumb"),
    [
        ((4000, 3000), (267, 200)),
        ((3000, 4000), (150, 200)),
        ((100, 50), (100, 50)),
        ((5000, 10), (356, 1)),
        ((10, 5000), (1, 200)),
        ((356, 200), (356, 200)),
        ((357, 200), (356, 199)),
        ((1, 1), (1, 1)),
    ],
)
def test_thumbnail_pixel_sizes(size: tuple[int, int], thumb: tuple[int, int]) -> None:
    assert thumbnail_size(*size) == thumb
    t = make_thumbnail(encode(Image.new("RGB", size, RED), "PNG"))
    assert (t.width, t.height) == size
    assert (t.thumb_width, t.thumb_height) == thumb
    assert decoded(t).size == thumb


def test_fits_box_and_keeps_aspect_for_many_sizes() -> None:
    rng = random.Random(7)
    for _ in range(300):
        w, h = rng.randint(1, 20000), rng.randint(1, 20000)
        tw, th = thumbnail_size(w, h)
        assert 1 <= tw <= min(w, THUMBNAIL_BOX[0])
        assert 1 <= th <= min(h, THUMBNAIL_BOX[1])
        assert tw == THUMBNAIL_BOX[0] or th == THUMBNAIL_BOX[1] or (tw, th) == (w, h)
        # aspect preserved up to rounding of the smaller side
        if (tw, th) != (w, h):
            assert abs(tw / th - w / h) <= w / h * (1 / th) + 1 / th + 1e-9


def test_jpeg_quality_50_and_never_the_original_bytes() -> None:
    small = encode(photo((100, 50)), "JPEG", quality=50)
    t = make_thumbnail(small)
    assert t.jpeg != small
    assert not t.jpeg.startswith(small[:200]) or len(t.jpeg) != len(small)
    reference = Image.open(io.BytesIO(encode(photo((100, 50)), "JPEG", quality=50)))
    got = Image.open(io.BytesIO(t.jpeg))
    assert got.quantization == reference.quantization  # type: ignore[attr-defined]
    q90 = Image.open(io.BytesIO(encode(photo((100, 50)), "JPEG", quality=90)))
    assert got.quantization != q90.quantization  # type: ignore[attr-defined]
    assert "exif" not in got.info


@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {"quality": 90}),
        ("JPEG", {"quality": 90, "progressive": True}),
        ("PNG", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
        ("BMP", {}),
        ("WEBP", {"quality": 80}),
        ("GIF", {}),
    ],
)
def test_exact_size_for_each_format(fmt: str, params: dict[str, Any]) -> None:
    for size in [(641, 479), (1999, 3001), (7, 3)]:
        data = encode(photo(size), fmt, **params)
        t = make_thumbnail(data)
        assert (t.width, t.height) == size, fmt
        assert (t.thumb_width, t.thumb_height) == thumbnail_size(*size)
        decoded(t)


@pytest.mark.parametrize("size", [(4000, 3000), (3001, 2001), (2848, 4288), (1000, 563)])
def test_draft_gives_same_size_and_content_as_full_decode(size: tuple[int, int]) -> None:
    data = encode(photo(size), "JPEG", quality=90)
    full = Image.open(io.BytesIO(data))
    full.load()
    assert full.size == size
    t = make_thumbnail(data)
    assert (t.width, t.height) == full.size
    reference = full.resize((t.thumb_width, t.thumb_height), Image.Resampling.BICUBIC)
    ours = decoded(t)
    # Same picture: mean colour per channel within a few levels (JPEG q50 + DCT scaling).
    a, b = ours.resize((8, 8)).tobytes(), reference.resize((8, 8)).tobytes()
    assert close_to(a, tuple(b), tol=12)


# --- EXIF orientation ----------------------------------------------------------------------


def left_red_right_blue(size: tuple[int, int]) -> Image.Image:
    im = Image.new("RGB", size, BLUE)
    im.paste(RED, (0, 0, size[0] // 2, size[1]))
    return im


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, RED, BLUE), (8, BLUE, RED), (5, RED, BLUE), (7, BLUE, RED)],
)
def test_exif_rotation_reports_displayed_size_and_thumbnail_is_upright(
    orientation: int, top: tuple[int, int, int], bottom: tuple[int, int, int]
) -> None:
    # Stored 800x400, left half red. Orientation 6 = show rotated 90 degrees clockwise, so the
    # displayed picture is 400x800 with red on top (8: counter-clockwise, red at the bottom).
    t = make_thumbnail(with_orientation(left_red_right_blue((800, 400)), orientation))
    assert (t.width, t.height) == (400, 800)
    assert t.orientation == orientation
    assert (t.thumb_width, t.thumb_height) == (100, 200)
    im = decoded(t)
    assert close_to(im.getpixel((50, 20)), top)
    assert close_to(im.getpixel((50, 180)), bottom)


@pytest.mark.parametrize("orientation", [1, 2, 3, 4])
def test_exif_orientation_without_rotation_keeps_size(orientation: int) -> None:
    t = make_thumbnail(with_orientation(left_red_right_blue((800, 400)), orientation))
    assert (t.width, t.height) == (800, 400)
    assert (t.thumb_width, t.thumb_height) == (356, 178)
    left = RED if orientation in (1, 4) else BLUE
    assert close_to(decoded(t).getpixel((20, 89)), left)


def test_exif_orientation_on_large_drafted_jpeg() -> None:
    t = make_thumbnail(with_orientation(photo((4000, 3000)), 6))
    assert (t.width, t.height) == (3000, 4000)
    assert (t.thumb_width, t.thumb_height) == (150, 200)


# --- pixel modes ---------------------------------------------------------------------------


def test_16_bit_png_is_scaled_not_clipped() -> None:
    im = Image.new("I;16", (400, 200), 32768)
    im.paste(65535, (0, 0, 200, 200))
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    t = decoded(make_thumbnail(data))
    assert close_to(t.getpixel((40, 89)), (255, 255, 255), tol=3)
    assert close_to(t.getpixel((300, 89)), (128, 128, 128), tol=4)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (600, 300), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    t = make_thumbnail(data)
    assert (t.width, t.height) == (600, 300)
    assert close_to(decoded(t).getpixel((100, 50)), RED, tol=30)


def test_palette_with_transparency_is_composited_on_white() -> None:
    im = Image.new("P", (400, 200), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(0, (0, 0, 200, 200))  # left half: index 0 = transparent
    for fmt in ("PNG", "GIF"):
        t = decoded(make_thumbnail(encode(im, fmt, transparency=0)))
        assert close_to(t.getpixel((40, 89)), (255, 255, 255), tol=10), fmt
        assert close_to(t.getpixel((300, 89)), RED), fmt


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    im = Image.new("RGBA", (400, 200), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, 200, 200))
    im = im.convert(mode) if mode != "PA" else im.convert("RGBA")
    fmt = "PNG" if mode != "PA" else "WEBP"
    params: dict[str, Any] = {"lossless": True} if fmt == "WEBP" else {}
    t = decoded(make_thumbnail(encode(im, fmt, **params)))
    assert close_to(t.getpixel((40, 89)), (255, 255, 255), tol=10)
    assert close_to(t.getpixel((300, 89)), (0, 0, 0), tol=10)


def test_one_bit_and_grey() -> None:
    im = Image.new("1", (400, 200), 0)
    im.paste(1, (0, 0, 200, 200))
    for fmt in ("PNG", "TIFF", "BMP"):
        t = decoded(make_thumbnail(encode(im, fmt)))
        assert close_to(t.getpixel((40, 89)), (255, 255, 255), tol=10)
        assert close_to(t.getpixel((300, 89)), (0, 0, 0), tol=10)
    t = decoded(make_thumbnail(encode(Image.new("L", (50, 50), 77), "JPEG")))
    assert close_to(t.getpixel((25, 25)), (77, 77, 77), tol=4)


def test_float_tiff() -> None:
    im = Image.new("F", (400, 200), 0.5)
    im.paste(1.0, (0, 0, 200, 200))
    t = make_thumbnail(encode(im, "TIFF"))
    assert (t.width, t.height) == (400, 200)
    px = decoded(t)
    assert close_to(px.getpixel((40, 89)), (255, 255, 255), tol=4)
    assert close_to(px.getpixel((300, 89)), (128, 128, 128), tol=4)
    wide = Image.new("F", (40, 20), -1000.0)
    wide.paste(3000.0, (20, 0, 40, 20))
    px = decoded(make_thumbnail(encode(wide, "TIFF")))
    assert close_to(px.getpixel((5, 10)), (0, 0, 0), tol=4)
    assert close_to(px.getpixel((35, 10)), (255, 255, 255), tol=4)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF"])
def test_first_frame_of_multi_frame_files(fmt: str) -> None:
    frames = [Image.new("RGB", (400, 300), RED), Image.new("RGB", (400, 300), BLUE)]
    params: dict[str, Any] = {"save_all": True, "append_images": frames[1:]}
    if fmt != "TIFF":
        params |= {"duration": 100, "loop": 0}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    t = make_thumbnail(data)
    assert (t.width, t.height) == (400, 300)
    assert close_to(decoded(t).getpixel((133, 100)), RED)


# --- failures ------------------------------------------------------------------------------


def reason(data: bytes, **kwargs: Any) -> str:
    with pytest.raises(MediaError) as info:
        make_thumbnail(data, **kwargs)
    assert info.value.reason == str(info.value)
    assert not info.value.retryable
    return info.value.reason


def test_zero_bytes() -> None:
    assert reason(b"") == "empty file"


def test_random_bytes_and_text() -> None:
    assert reason(random.Random(1).randbytes(5000)) == "not an image (cannot identify format)"
    assert reason(b"%PDF-1.4 not an image") == "not an image (cannot identify format)"


def test_unsupported_format_is_not_opened() -> None:
    # EPS would run Ghostscript; ICO/PPM are not in the supported list.
    assert reason(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n") == (
        "not an image (cannot identify format)"
    )
    assert reason(encode(Image.new("RGB", (8, 8)), "PPM")) == (
        "not an image (cannot identify format)"
    )


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_fail(fmt: str) -> None:
    data = encode(photo((800, 600)), fmt)
    assert reason(data[: len(data) * 6 // 10]) == "truncated image file"


def test_header_only_jpeg_fails() -> None:
    data = encode(photo((800, 600)), "JPEG")
    assert reason(data[:400]) in ("truncated image file", "corrupt image data")


def test_corrupt_png_crc() -> None:
    data = bytearray(encode(photo((64, 64)), "PNG"))
    data[43:243] = b"\xff" * 200  # the deflate stream of the first IDAT
    assert reason(bytes(data)) == "corrupt image data"
    data[40] ^= 0xFF  # the IDAT chunk type itself: Pillow can no longer identify the file
    assert reason(bytes(data)) == "not an image (cannot identify format)"


def test_decompression_bomb_is_refused_before_decoding() -> None:
    assert reason(png_with_header(5000, 4000), max_pixels=1_000_000) == (
        "image too large: 5000 x 4000"
    )
    data = encode(photo((1200, 1000)), "JPEG")
    assert reason(data, max_pixels=1_000_000) == "image too large: 1200 x 1000"
    assert make_thumbnail(data, max_pixels=1_200_000).width == 1200
    # Above Pillow's own hard limit (2 x MAX_IMAGE_PIXELS): still a MediaError, not a crash.
    assert reason(png_with_header(100_000, 100_000)).startswith("image too large")


def test_whole_slide_sized_tiff_header_is_refused() -> None:
    assert reason(png_with_header(120_000, 80_000), max_pixels=10**9).startswith("image too large")


def test_from_path(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(encode(photo((1024, 768)), "JPEG"))
    t = make_thumbnail_from_path(path)
    assert (t.width, t.height, t.thumb_width, t.thumb_height) == (1024, 768, 267, 200)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        make_thumbnail_from_path(empty)
    with pytest.raises(FileNotFoundError):
        make_thumbnail_from_path(tmp_path / "missing.jpg")


# --- keys ----------------------------------------------------------------------------------


def test_thumbnail_key_deterministic_and_collision_free() -> None:
    key = thumbnail_key("car_folder/car_1.png", "thumbnails")
    assert key == thumbnail_key("car_folder/car_1.png", "thumbnails")
    assert key.startswith("thumbnails/") and key.endswith("_car_1.jpg")
    assert thumbnail_key("car_folder/car_1.png", "/thumbnails/") == key
    sources = [
        "a/b.jpg",
        "a_b.jpg",
        "a/b.JPG",
        "a/b.jpeg",
        "a//b.jpg",
        "/a/b.jpg",
        "a/b.jpg ",
        "ä/b.jpg",
        "a/b",
        "b.jpg",
    ] + [f"dir/{i}/img.jpg" for i in range(2000)]
    keys = {thumbnail_key(s, "t") for s in sources}
    assert len(keys) == len(sources)


@pytest.mark.parametrize(
    "source",
    [
        "folder with spaces/my photo (1).jpg",
        "日本語/写真.jpg",
        "emoji/🚗.png",
        "x" * 1000,
        "é" * 1000 + ".jpg",
        "a/" * 500 + "z.tif",
        ".hidden",
        "trailing/",
        "",
        "bad\udcffsurrogate.jpg",
    ],
)
def test_thumbnail_key_valid_for_odd_keys(source: str) -> None:
    key = thumbnail_key(source, "thumbnails/v1")
    assert key.startswith("thumbnails/v1/") and key.endswith(".jpg")
    assert len(key.encode("utf-8")) < 1024
    assert key.isascii() and " " not in key and "//" not in key


def test_thumbnail_key_prefix_too_long() -> None:
    with pytest.raises(ValueError, match="prefix too long"):
        thumbnail_key("a.jpg", "p" * 1000)
    assert thumbnail_key("a.jpg", "").endswith("_a.jpg")


# --- pool ----------------------------------------------------------------------------------
# Module-level functions so spawned workers can import them (they are run via ``_call``).


def _die_in_worker() -> None:
    os._exit(7)


def _wait_at_barrier(barrier: Any) -> int:
    barrier.wait(timeout=60)
    return os.getpid()


def _block_until(started: Any, release: Any) -> int:
    started.put(os.getpid())
    release.wait(timeout=60)
    return os.getpid()


async def test_pool_makes_thumbnails_and_reports_failures(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(encode(photo((2000, 1000)), "PNG"))
    async with ThumbnailPool(workers=2, max_pixels=50_000_000) as pool:
        jpeg = encode(photo((4000, 3000)), "JPEG")
        results = await asyncio.gather(
            pool.make(jpeg),
            pool.make_from_path(path),
            pool.make(b""),
            pool.make(png_with_header(100_000, 100_000)),
            return_exceptions=True,
        )
        assert isinstance(results[0], Thumbnail) and results[0].thumb_width == 267
        assert isinstance(results[1], Thumbnail) and results[1].thumb_width == 356
        assert isinstance(results[2], MediaError) and results[2].reason == "empty file"
        # Workers disable Pillow's own guard: our max_pixels check reports W x H.
        assert isinstance(results[3], MediaError)
        assert results[3].reason == "image too large: 100000 x 100000"
        assert pool.in_flight == 0
    with pytest.raises(RuntimeError, match="closed"):
        await pool.make(jpeg)


async def test_pool_runs_jobs_concurrently() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)  # passes only if two jobs run at the same time
        async with ThumbnailPool(workers=2) as pool:
            pids = await asyncio.gather(*(pool._call(_wait_at_barrier, barrier) for _ in range(4)))
    assert len(set(pids)) == 2
    assert os.getpid() not in pids


async def test_pool_bounds_in_flight_submissions() -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        started = manager.Queue()
        release = manager.Event()
        async with ThumbnailPool(workers=2, max_pending=3) as pool:
            assert pool.max_pending == 3
            tasks = [
                asyncio.create_task(pool._call(_block_until, started, release)) for _ in range(8)
            ]
            running = {await asyncio.to_thread(started.get, True, 60) for _ in range(2)}
            assert len(running) == 2
            # Both workers busy, one job queued in the executor, five held back by the semaphore.
            assert pool.in_flight == 3
            assert not any(t.done() for t in tasks)
            release.set()
            pids = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert pool.in_flight == 0
    assert len(pids) == 8
    assert set(pids) <= running | set(pids) and len(set(pids)) <= 2


async def test_pool_survives_a_worker_crash() -> None:
    good = encode(photo((1600, 1200)), "JPEG")
    async with ThumbnailPool(workers=2) as pool:
        results = await asyncio.gather(
            pool._call(_die_in_worker),
            *(pool.make(good) for _ in range(5)),
            return_exceptions=True,
        )
        crash, rest = results[0], results[1:]
        assert isinstance(crash, MediaError) and crash.reason == "decoder crashed"
        # Innocent items in flight with the crash were retried alone and succeeded.
        assert all(isinstance(r, Thumbnail) and r.thumb_width == 267 for r in rest), rest
        assert pool.crashes >= 2
        after = await pool.make(good)
        assert after.thumb_height == 200


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_rotation_in_other_formats(fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    params: dict[str, Any] = {"exif": exif} | ({"lossless": True} if fmt == "WEBP" else {})
    t = make_thumbnail(encode(left_red_right_blue((800, 400)), fmt, **params))
    assert (t.width, t.height, t.orientation) == (400, 800, 6)
    assert close_to(decoded(t).getpixel((50, 20)), RED)
