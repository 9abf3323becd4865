"""Exact image size and a V7-style thumbnail for read-only registration.

V7 cannot write into a read-only bucket, so the engine must tell it each image's exact
``width``/``height`` and provide a thumbnail object (``storage_thumbnail_key``). V7's recipe
(``docs/v7-contract.md``): fit inside 356x200, only ever shrink, JPEG quality 50, never the
original bytes. This module does that in pure CPU code (:func:`make_thumbnail`,
:func:`make_thumbnail_from_path`) and in a bounded pool of worker processes
(:class:`ThumbnailPool`) so the event loop never decodes an image.

EXIF orientation (JPEG/TIFF/WebP/PNG ``Orientation`` tag) -- the rule
----------------------------------------------------------------------
``width``/``height`` are the size of the image *as displayed*, i.e. after the EXIF orientation is
applied: for orientations 5-8 (the 90-degree ones) the stored ``W x H`` is reported as
``H x W``. The thumbnail is transposed the same way, so it looks the right way up and has the
same aspect as the reported size. ``Thumbnail.orientation`` keeps the raw tag value (1 when
absent or invalid) so a caller can tell.

Evidence and reasoning (no V7 page states the rule; this is a decision, not a quotation):

- For a read-only item V7 does not process the file: its viewer loads the original object
  straight from the bucket into the browser (that is why the contract warns about CORS and forbids
  using the original as the thumbnail). Browsers apply EXIF orientation when they draw an image
  (CSS Images 3 ``image-orientation: from-image`` is the default since Chrome 81, Firefox 77 and
  Safari 13.1, 2020), so an annotator sees the rotated image, whose pixel size is the
  transposed one. Reporting the stored size would give V7 a 4000x3000 frame for a picture shown as
  3000x4000, and annotations would be scaled wrongly.
- darwin-py never computes a size for read-only registration: ``register_existing_readonly``
  payloads carry caller-supplied ``height``/``width`` (the contract's example). darwin-py's own
  image loader (``darwin/dataset/utils.py``, ``load_pil_image``: ``Image.open`` +
  ``convert_to_rgb``, no ``exif_transpose``) reads stored pixels, so it gives no guidance for the
  displayed frame and would disagree with this rule for EXIF-rotated files; it is used only for
  local training datasets, not by V7's viewer. Searches of darwin-py and V7's docs found no
  statement about EXIF orientation.
- If V7 is ever found to use stored pixels, the change is one line (``_displayed_size``); the
  raw orientation is returned so the pipeline could even decide per item.

Speed
-----
JPEG (and MPO, which is what many cameras' JPEGs open as) is decoded with ``Image.draft``: libjpeg
scales by 1/2, 1/4 or 1/8 in the DCT domain to the smallest size still >= the thumbnail, which is
the bulk of the win over a plain ``Image.thumbnail`` (that asks draft for twice the box). The size
reported is always read from the header *before* ``draft``. Other formats are decoded in full and
shrunk with ``resize(reducing_gap=2.0)`` (integer ``reduce`` first, then bicubic). The output
size is computed from the full size, so it is identical whichever decoding path is used.

Safety
------
- ``max_pixels`` (default 2x Pillow's own limit, ~179 MP): larger images fail with
  ``MediaError("image too large: W x H")`` before any pixel is decoded. Pillow's own guard still
  fires first for images above ``2 * PIL.Image.MAX_IMAGE_PIXELS`` in a process that did not raise
  it (reason ``"image too large: N pixels"``); the pool's workers disable Pillow's guard so
  ``max_pixels`` alone applies there.
- Only JPEG/MPO, PNG, TIFF, BMP, WebP and GIF are opened (``formats=``): PostScript/EPS (which
  would run Ghostscript) and other exotic decoders are never reached.
- Truncated files are *rejected* (``"truncated image file"``): Pillow's
  ``LOAD_TRUNCATED_IMAGES`` is never set, because a thumbnail with a grey bottom half would hide a
  broken object that V7 cannot display either. Honest failure is the default.
- Every Pillow exception and warning is turned into ``MediaError(reason)`` with a short reason
  for the report; nothing else escapes, except ``OSError`` from opening the *path* itself in
  :func:`make_thumbnail_from_path` (a file-system problem is not a media problem).
- Whole-slide formats (``.svs``, ``.ndpi``) are TIFF-like pyramids Pillow cannot read fully:
  they fail with ``"image too large: ..."`` or a decode reason; they need OpenSlide, not this.

Pixel modes: multi-frame files (animated GIF/WebP, multi-page TIFF) use the first frame;
16-bit grey (``I;16*``, ``I``) is scaled 65535 -> 255, float (``F``) 0..1 -> 0..255 (other
ranges are stretched min..max); palette with transparency, ``LA``/``RGBA``/``PA`` are composited
on white; ``1``, ``L``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX`` become RGB. ICC profiles
are not applied (the thumbnail is a preview).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import multiprocessing
import os
import re
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, TypeVar

from PIL import (  # the plugins are imported so that ``formats=`` can name them
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from ingest.cpus import available_cpus
from ingest.media import MediaError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "THUMBNAIL_BOX",
    "THUMBNAIL_QUALITY",
    "Thumbnail",
    "ThumbnailPool",
    "make_thumbnail",
    "make_thumbnail_from_path",
    "thumbnail_key",
    "thumbnail_size",
]

THUMBNAIL_BOX: Final = (356, 200)
THUMBNAIL_QUALITY: Final = 50
#: Twice Pillow's default ``MAX_IMAGE_PIXELS`` (the point where Pillow itself refuses).
DEFAULT_MAX_PIXELS: Final = 2 * 89_478_485

_PLUGINS: Final = (
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    BmpImagePlugin,
    WebPImagePlugin,
    GifImagePlugin,
)
assert all(Image.OPEN.get(name) for name in ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF"))
# JPEG's opener also returns MPO (multi-picture JPEG, common from cameras) files.
_FORMATS: Final = ("JPEG", "PNG", "TIFF", "BMP", "WEBP", "GIF")
_DRAFT_FORMATS: Final = frozenset({"JPEG", "MPO"})
_ORIENTATION_TAG: Final = 0x0112
# EXIF orientation -> the transpose that shows the image the right way up (EXIF 2.3, 4.6.4).
_TRANSPOSE: Final[dict[int, Image.Transpose]] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_WHITE: Final = (255, 255, 255)


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """Result for one image. ``width``/``height`` are what V7 must be told (displayed size)."""

    width: int
    height: int
    jpeg: bytes
    thumb_width: int
    thumb_height: int
    orientation: int = 1  # raw EXIF orientation tag (1 = none); 5-8 swapped width/height


def thumbnail_size(
    width: int, height: int, box: tuple[int, int] = THUMBNAIL_BOX
) -> tuple[int, int]:
    """Largest size with the image's aspect that fits in ``box``; never enlarges, never 0."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    bw, bh = box
    if width <= bw and height <= bh:
        return width, height
    if width * bh >= height * bw:  # width-bound
        return bw, min(bh, max(1, round(height * bw / width)))
    return min(bw, max(1, round(width * bh / height))), bh


# --- decoding ------------------------------------------------------------------------------


def make_thumbnail(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Thumbnail:
    """Exact size and thumbnail of an image held in memory. Pure CPU; raises ``MediaError``."""
    if not data:
        raise MediaError("empty file")
    return _guarded(io.BytesIO(data), max_pixels)


def make_thumbnail_from_path(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Thumbnail:
    """Same as :func:`make_thumbnail`, reading ``path`` (large images need not be in memory).

    ``OSError`` from opening/reading the file itself propagates unchanged.
    """
    with open(path, "rb") as fp:
        if os.fstat(fp.fileno()).st_size == 0:
            raise MediaError("empty file")
        return _guarded(fp, max_pixels)


def _guarded(fp: IO[bytes], max_pixels: int) -> Thumbnail:
    with warnings.catch_warnings():
        # Pillow warns about odd EXIF, palette transparency, bombs...: none may escape.
        warnings.simplefilter("ignore")
        try:
            return _make(fp, max_pixels)
        except MediaError:
            raise
        except Image.DecompressionBombError as exc:
            raise MediaError(_bomb_reason(exc)) from None
        except UnidentifiedImageError:
            raise MediaError("not an image (cannot identify format)") from None
        except MemoryError:
            raise MediaError("image too large: out of memory") from None
        except (OSError, SyntaxError, EOFError) as exc:
            raise MediaError(_decode_reason(exc)) from None
        except Exception as exc:  # malformed headers surface as ValueError, struct.error, ...
            raise MediaError(f"corrupt image data ({type(exc).__name__})") from None


def _bomb_reason(exc: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return f"image too large: {match.group(1)} pixels" if match else "image too large"


def _decode_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    if "truncated" in text or isinstance(exc, EOFError) or "premature end" in text:
        return "truncated image file"
    if "cannot identify" in text:
        return "not an image (cannot identify format)"
    return "corrupt image data"


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: treat as upright, never fail the image for it
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _displayed_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """The size V7 is told: EXIF orientations 5-8 swap width and height (see module doc)."""
    return (size[1], size[0]) if orientation >= 5 else size


def _target(raw_w: int, raw_h: int, orientation: int) -> tuple[int, int]:
    """Thumbnail size in the *stored* orientation (transposed after resizing)."""
    tw, th = thumbnail_size(*_displayed_size((raw_w, raw_h), orientation))
    return (th, tw) if orientation >= 5 else (tw, th)


def _make(fp: IO[bytes], max_pixels: int) -> Thumbnail:
    with Image.open(fp, formats=_FORMATS) as im:
        raw_w, raw_h = im.size  # full size, read from the header before any draft
        if raw_w <= 0 or raw_h <= 0:
            raise MediaError("corrupt image data (zero size)")
        if raw_w * raw_h > max_pixels:
            raise MediaError(f"image too large: {raw_w} x {raw_h}")
        box: tuple[float, float, float, float] | None = None
        # Pillow's TIFF plugin applies the orientation tag itself: the size it reports at open
        # is already the displayed one and load() transposes the pixels and drops the tag.
        tag = _orientation(im) if im.format == "TIFF" else 1
        if im.format in _DRAFT_FORMATS:
            orientation = _orientation(im)  # JPEG: EXIF was parsed from APP1 by open()
            target = _target(raw_w, raw_h, orientation)
            drafted = im.draft("RGB", target)
            if drafted is not None:
                box = drafted[1]
            im.load()  # raises on truncated / corrupt data
        else:
            # Load first: PNG's getexif() loads the image itself (eXIf may follow IDAT), and a
            # decode error must not be mistaken for unreadable EXIF.
            im.load()
            orientation = _orientation(im)
            target = _target(raw_w, raw_h, orientation)
        width, height = _displayed_size((raw_w, raw_h), orientation)
        small = _shrink(_normalise(im), target, box)
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        small = small.transpose(method)
    rgb = _to_rgb(small)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return Thumbnail(
        width=width,
        height=height,
        jpeg=out.getvalue(),
        thumb_width=rgb.width,
        thumb_height=rgb.height,
        orientation=tag if tag != 1 else orientation,
    )


def _normalise(im: Image.Image) -> Image.Image:
    """Bring any mode to one of L, LA, RGB, RGBA (resize-friendly, 8-bit)."""
    mode = im.mode
    if mode in ("L", "LA", "RGB", "RGBA"):
        return im
    if mode == "P":
        return im.convert("RGBA" if "transparency" in im.info else "RGB")
    if mode in ("PA", "RGBa", "La"):
        return im.convert("RGBA" if mode != "La" else "LA")
    if mode == "1":
        return im.convert("L")
    if mode.startswith("I;16") or mode == "I":
        i32 = im if mode == "I" else im.convert("I")
        lo, hi = i32.getextrema()
        assert isinstance(lo, int | float) and isinstance(hi, int | float)
        if lo >= 0 and hi <= 65535:
            return i32.point(lambda v: v / 257).convert("L")
        return _stretch(i32.convert("F"), float(lo), float(hi))
    if mode == "F":
        lo, hi = im.getextrema()
        assert isinstance(lo, int | float) and isinstance(hi, int | float)
        if lo >= 0 and hi <= 1:
            return im.point(lambda v: v * 255).convert("L")
        return _stretch(im, float(lo), float(hi))
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...


def _stretch(im: Image.Image, lo: float, hi: float) -> Image.Image:
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return im.point(lambda v: (v - lo) * scale).convert("L")


def _shrink(
    im: Image.Image, target: tuple[int, int], box: tuple[float, float, float, float] | None
) -> Image.Image:
    if im.size == target and box is None:
        return im.copy()
    return im.resize(target, Image.Resampling.BICUBIC, box=box, reducing_gap=2.0)


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, _WHITE)
        background.paste(im.convert("RGBA"), mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def thumbnail_jpeg(im: Image.Image) -> bytes:
    """V7's thumbnail of an image already decoded (e.g. a converted DICOM slice): fitted
    inside 356x200, never enlarged, JPEG quality 50."""
    small = _shrink(_normalise(im), thumbnail_size(im.width, im.height), None)
    out = io.BytesIO()
    _to_rgb(small).save(out, "JPEG", quality=THUMBNAIL_QUALITY)
    return out.getvalue()


# --- keys ----------------------------------------------------------------------------------

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_KEY_BYTES: Final = 1024


def thumbnail_key(source_key: str, prefix: str) -> str:
    """Where the thumbnail of ``source_key`` goes: ``{prefix}/{digest}_{name}.jpg``.

    ``digest`` is 32 hex characters (128 bits) of SHA-256 over the full source key, so distinct
    keys (``a/b.jpg`` vs ``a_b.jpg``) never share a thumbnail key and the same key always maps to
    the same one. ``name`` is the key's base name, ASCII-sanitised and cut to 80 characters, for
    humans only. The result is at most ``len(prefix) + 120`` bytes; ``ValueError`` if the prefix
    would push it past 1024 bytes (the S3/GCS/Azure key limit).
    """
    digest = hashlib.sha256(source_key.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    base = source_key.rsplit("/", 1)[-1]
    stem = base.rsplit(".", 1)[0] if "." in base[1:] else base
    name = _UNSAFE.sub("_", stem).strip("._")[:80]
    leaf = f"{digest}_{name}.jpg" if name else f"{digest}.jpg"
    prefix = prefix.strip("/")
    key = f"{prefix}/{leaf}" if prefix else leaf
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES:
        raise ValueError(f"thumbnail prefix too long ({len(prefix)} characters)")
    return key


# --- pool ----------------------------------------------------------------------------------

T = TypeVar("T")


def _worker_init() -> None:
    # The worker only runs our guarded code, which checks ``max_pixels`` itself.
    Image.MAX_IMAGE_PIXELS = None


def _work_bytes(data: bytes, max_pixels: int) -> Thumbnail:
    return make_thumbnail(data, max_pixels=max_pixels)


def _work_path(path: str, max_pixels: int) -> Thumbnail:
    return make_thumbnail_from_path(Path(path), max_pixels=max_pixels)


class ThumbnailPool:
    """Thumbnails in worker processes, with at most ``max_pending`` submissions in flight.

    ``workers=0`` means one per usable CPU (``ingest.cpus``: cgroup quota, affinity);
    ``max_pending=0`` means ``2 * workers`` (enough to keep every worker busy while results
    travel back). Callers beyond that wait on a semaphore, so memory held in submitted
    ``bytes`` stays bounded.

    Workers are started with ``spawn`` (safe with the engine's threads and event loop). If a
    worker dies (segfault, OOM kill), the pool is recreated; every item that was in flight is
    retried once, alone, in a one-worker quarantine pool, so only the item that crashes again is
    reported as ``MediaError("decoder crashed")``.
    """

    def __init__(
        self,
        workers: int = 0,
        max_pending: int = 0,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mp_context: multiprocessing.context.BaseContext | None = None,
    ) -> None:
        if workers < 0 or max_pending < 0:
            raise ValueError("workers and max_pending must be >= 0")
        self.workers = workers or available_cpus()
        self.max_pending = max_pending or 2 * self.workers
        self.max_pixels = max_pixels
        self._context = mp_context or multiprocessing.get_context("spawn")
        self._sem = asyncio.Semaphore(self.max_pending)
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = self._new_executor(self.workers)
        self._quarantine: ProcessPoolExecutor | None = None
        self._quarantine_lock = asyncio.Lock()
        self._in_flight = 0
        self._closed = False
        self.crashes = 0  # times a worker process died

    @property
    def in_flight(self) -> int:
        """Submissions currently handed to worker processes (<= ``max_pending``)."""
        return self._in_flight

    async def make(self, data: bytes) -> Thumbnail:
        return await self._call(_work_bytes, data, self.max_pixels)

    async def make_from_path(self, path: Path) -> Thumbnail:
        return await self._call(_work_path, os.fspath(path), self.max_pixels)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Any other decoding job (e.g. DICOM) in the same bounded, crash-safe workers:
        ``fn`` must be a module-level function, its arguments and result picklable."""
        return await self._call(fn, *args)

    async def call_within(self, limit_s: float | None, fn: Callable[..., T], *args: Any) -> T:
        """``call`` with a time limit: past ``limit_s`` the job is ``MediaError`` (not final)
        and its worker process is killed, not left running (the pool is replaced; the other
        jobs in flight are retried in the quarantine worker, as after a crash)."""
        return await self._call(fn, *args, limit_s=limit_s)

    def worker_pids(self) -> list[int]:
        """The worker processes now running (for tests and diagnostics)."""
        executors = [e for e in (self._executor, self._quarantine) if e is not None]
        procs = [p for e in executors for p in (getattr(e, "_processes", None) or {}).values()]
        return [p.pid for p in procs if p.pid is not None]

    async def _submit(
        self, executor: ProcessPoolExecutor, limit_s: float | None, fn: Callable[..., T], *args: Any
    ) -> T:
        future = executor.submit(fn, *args)
        try:
            async with asyncio.timeout(limit_s):
                return await asyncio.wrap_future(future)
        except TimeoutError:
            if not future.cancel():  # running: its worker must not go on
                self._terminate(executor)
            raise MediaError(
                f"time limit: decoding took longer than {limit_s:g} s", final=False
            ) from None

    def _terminate(self, executor: ProcessPoolExecutor) -> None:
        """Kill every worker of ``executor`` (which one runs a job is not known) and replace
        it; its other jobs see a broken pool and are retried alone in the quarantine."""
        for proc in list((getattr(executor, "_processes", None) or {}).values()):
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
        if executor is self._quarantine:
            self._quarantine = None
            executor.shutdown(wait=False, cancel_futures=True)
        else:
            self._replace(executor)

    async def _call(self, fn: Callable[..., T], *args: Any, limit_s: float | None = None) -> T:
        """Run a module-level ``fn(*args)`` in a worker; the crash-handling core."""
        async with self._sem:
            if self._closed:
                raise RuntimeError("ThumbnailPool is closed")
            executor = self._executor
            assert executor is not None
            self._in_flight += 1
            try:
                return await self._submit(executor, limit_s, fn, *args)
            except BrokenProcessPool:
                self._replace(executor)
            finally:
                self._in_flight -= 1
            # A worker died while this item was in flight, maybe not because of it.
            async with self._quarantine_lock:
                if self._closed:
                    raise MediaError("decoder crashed", final=False)
                if self._quarantine is None:
                    self._quarantine = self._new_executor(1)
                quarantine = self._quarantine
                self._in_flight += 1
                try:
                    return await self._submit(quarantine, limit_s, fn, *args)
                except BrokenProcessPool:
                    self.crashes += 1
                    self._quarantine = None
                    quarantine.shutdown(wait=False, cancel_futures=True)
                    raise MediaError("decoder crashed") from None  # alone: its own fault
                finally:
                    self._in_flight -= 1

    def _new_executor(self, workers: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=workers, mp_context=self._context, initializer=_worker_init
        )

    def _replace(self, broken: Executor) -> None:
        with self._lock:
            if self._executor is not broken or self._closed:
                return  # another caller already replaced it
            self.crashes += 1
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._new_executor(self.workers)

    async def close(self) -> None:
        """Stop accepting work and shut the workers down (waits for running jobs)."""
        if self._closed:
            return
        self._closed = True
        executors = [e for e in (self._executor, self._quarantine) if e is not None]
        self._executor = self._quarantine = None
        for executor in executors:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)

    async def __aenter__(self) -> ThumbnailPool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
