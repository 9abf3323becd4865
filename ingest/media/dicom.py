"""Read-only DICOM made displayable: headers, series order, display-correct 8-bit pixels.

V7 takes no DICOM from read-only storage, so the engine converts it: a slice becomes a PNG (an
``image`` item), a series or a multi-frame file a video (``ingest.media.convert``). This module
holds the pure parts (:func:`series_order`, :func:`window`, :func:`to_display`) and the
functions the decoder processes run (:func:`read_header`, :func:`convert_frame`,
:func:`convert_slice`); they take paths, so a slice is read from the temp dir by the worker and
only its header or its 8-bit frame crosses the process boundary.

Pixels, in DICOM's own order (PS3.3 C.11 / C.7.6.3):

1. decode (pydicom; JPEG baseline/extended/lossless, JPEG-LS and JPEG 2000 through pylibjpeg's
   libjpeg and openjpeg plugins, RLE and uncompressed through pydicom + numpy); YBR colour
   is converted to RGB by the decoder (pydicom's ``as_rgb``), planar configuration undone;
2. grey: the modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT Sequence), then the
   VOI: the VOI LUT Sequence when present, else the first WindowCenter/WindowWidth pair (with
   VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID), else **min/max** (documented fallback),
   PixelPaddingValue excluded: one range for a whole series from its headers'
   Smallest/LargestImagePixelValue when every slice states them, else each slice's own
   min/max (a first pass over a series would read every slice twice); an enhanced multi-frame file's
   per-frame / shared functional groups stand in for the top-level attributes
   (:func:`frame_dataset`); MONOCHROME1 is inverted last;
3. colour: RGB kept, PALETTE COLOR through its palette, samples above 8 bits scaled down.

The size is always Columns x Rows: nothing is resized, rotated or padded.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ingest.media import MediaError

# Tags the header read needs (sort keys, size, frames, colour, frame rate).
HEADER_TAGS: Final = (
    "SeriesNumber",
    "InstanceNumber",
    "SliceLocation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "PixelRepresentation",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "CineRate",
    "RecommendedDisplayFrameRate",
    "FrameTime",
)
MAX_FRAMES: Final = 10_000  # frames per file or series, as the planner's MAX_DICOM_SLICES
PNG_COMPRESS_LEVEL: Final = 1  # measured: level 6 is no smaller on CT noise, and slower

T = TypeVar("T")


class DicomRejected(MediaError):
    """A header that says the file must not be decoded (too large, too many frames, more
    pixels than bytes): final, and no longer read of the same header can change it."""


@dataclass(frozen=True, slots=True)
class SliceHeader:
    """What the header of one .dcm says (read without its pixels)."""

    series_number: int | None
    instance_number: int | None
    slice_location: float | None
    position: tuple[float, ...] | None  # ImagePositionPatient
    rows: int
    columns: int
    frames: int
    color: bool  # more than one sample per pixel, or a palette
    fps: float = 0.0  # stated by the file (CineRate, RecommendedDisplayFrameRate, FrameTime)
    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient (row, column cosines)
    series_uid: str = ""  # SeriesInstanceUID
    stored_range: tuple[float, float] | None = None  # Smallest/LargestImagePixelValue


@dataclass(frozen=True, slots=True)
class SliceImage:
    """One slice converted: its PNG and a V7-style thumbnail (356x200, JPEG q50)."""

    width: int
    height: int
    png: bytes
    thumbnail: bytes


# --- pure: order ---------------------------------------------------------------------------


def slice_normal(orientation: tuple[float, ...] | None) -> tuple[float, float, float] | None:
    """The slice normal (row cosines x column cosines) of an ImageOrientationPatient, or None
    when it is missing or degenerate."""
    if orientation is None or len(orientation) != 6:
        return None
    r, c = orientation[:3], orientation[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    return n if any(abs(v) > 1e-6 for v in n) else None


def _position_key(
    position: tuple[float, ...] | None, normal: tuple[float, float, float] | None
) -> tuple[float, ...] | None:
    """Where a slice lies along the series: its position projected on the slice normal (so an
    oblique or sagittal series sorts by depth, not by x); the raw position when the series has
    no orientation (the best there is)."""
    if position is None or normal is None or len(position) != 3:
        return position
    return (sum(p * n for p, n in zip(position, normal, strict=True)),)


def _sort_key(
    h: SliceHeader, name: str, normal: tuple[float, float, float] | None = None
) -> tuple[Any, ...]:
    """V7's order (SeriesNumber, InstanceNumber, SliceLocation, ImagePositionPatient, file
    name); a missing value sorts after every present one."""

    def opt(v: Any) -> tuple[int, Any]:
        return (1, 0) if v is None else (0, v)

    return (
        opt(h.series_number),
        opt(h.instance_number),
        opt(h.slice_location),
        opt(_position_key(h.position, normal)),
        name,
    )


def series_order(
    headers: Sequence[SliceHeader], names: Sequence[str], *, ignore_layout: bool = False
) -> list[int]:
    """Indices of ``headers`` in the order V7 shows slices; the listing's order when
    ``ignore_layout`` (``options.ignore_dicom_layout``). Positions are compared along the
    normal of the series' first valid orientation. Stable, pure."""
    if ignore_layout:
        return list(range(len(headers)))
    normal = next(
        (n for n in (slice_normal(h.orientation) for h in headers) if n is not None), None
    )
    return sorted(range(len(headers)), key=lambda i: _sort_key(headers[i], names[i], normal))


def size_problem(headers: Sequence[SliceHeader], names: Sequence[str]) -> str:
    """ "" when every slice has one size, else the reason the series cannot be one video
    (its frames must share one size): the sizes found and a file of each."""
    sizes: dict[tuple[int, int], list[str]] = {}
    for h, n in zip(headers, names, strict=True):
        sizes.setdefault((h.columns, h.rows), []).append(n)
    if len(sizes) <= 1:
        return ""
    parts = [f"{w}x{h} ({len(ns)}, e.g. {ns[0]})" for (w, h), ns in sorted(sizes.items())]
    return ("slices of differing sizes in one series: " + ", ".join(parts))[:300]


@dataclass(frozen=True, slots=True)
class Members:
    """Which files of a slot make its video (``kept``, object indices), which are left out
    and why, and ``problem`` ("" or why no video can be made)."""

    kept: list[int]
    left_out: list[tuple[int, str]]
    problem: str = ""


def series_members(
    headers: Sequence[SliceHeader], names: Sequence[str], *, ignore_layout: bool = False
) -> Members:
    """Pure: the files of a multi-file slot that form one video. A video has one frame size,
    and a folder often holds a localizer (scout) of another size or a second series beside
    the series, so the largest group of one SeriesInstanceUID and one size is the series and
    the rest are left out, each with its reason (a tie: no video, ``problem`` names the sizes).
    A multi-frame file is left out too (V7 gives it a slot of its own, never splices it)
    unless ``ignore_layout`` (V7's ``ignore_dicom_layout``: every file is a slice of the
    series; the series UID is then not looked at either)."""
    left: list[tuple[int, str]] = []
    rest: list[int] = []
    for i, h in enumerate(headers):
        if h.frames > 1 and not ignore_layout and len(headers) > 1:
            left.append(
                (
                    i,
                    f"a multi-frame file ({h.frames} frames) is not spliced into the series: "
                    "V7 gives it a slot of its own (plan.dicom_series = false registers it alone)",
                )
            )
        else:
            rest.append(i)
    groups: dict[tuple[str, int, int], list[int]] = {}
    for i in rest:
        h = headers[i]
        groups.setdefault(("" if ignore_layout else h.series_uid, h.columns, h.rows), []).append(i)
    if not groups:
        return Members([], left, "every file is multi-frame: no series to convert")
    ranked = sorted(groups.items(), key=lambda g: -len(g[1]))
    if len(ranked) > 1 and len(ranked[0][1]) == len(ranked[1][1]):
        tied = [i for _k, ids in ranked for i in ids]
        return Members(
            [],
            left,
            size_problem([headers[i] for i in tied], [names[i] for i in tied])
            or "two series of as many slices in one folder: no majority series",
        )
    (_uid, width, height), kept = ranked[0]
    for (other_uid, gw, gh), ids in ranked[1:]:
        if (gw, gh) != (width, height):
            why = f"{gw}x{gh} slice in a {width}x{height} series (a localizer?): left out"
        else:
            why = (
                f"another series (SeriesInstanceUID {other_uid[:64]}) than the "
                f"{len(kept)} slices converted"
            )
        left += [(i, why[:300]) for i in ids]
    return Members(kept, sorted(left))


# --- pure: pixels --------------------------------------------------------------------------


def window(values: Any, center: float, width: float, function: str = "LINEAR") -> Any:
    """The VOI window of PS3.3 C.11.2.1.2 onto 0..255 (a float array in, uint8 out)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    fn = (function or "LINEAR").upper()
    if fn == "SIGMOID":
        if width <= 0:
            raise ValueError("window width must be > 0")
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif fn == "LINEAR_EXACT":
        if width <= 0:
            raise ValueError("window width must be > 0")
        y = np.clip((x - center) / width + 0.5, 0.0, 1.0)
    else:
        if width < 1:
            raise ValueError("window width must be >= 1")
        if width == 1:
            y = (x > center - 0.5).astype(np.float64)
        else:
            y = np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return np.rint(y * 255.0).astype(np.uint8)


def stretch(values: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """``lo..hi`` (default: the array's min..max) onto 0..255; a flat image is all 0."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    lo = float(x.min()) if lo is None else lo
    hi = float(x.max()) if hi is None else hi
    if not hi > lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.rint(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        try:
            return float(value)
        except (TypeError, ValueError):
            return None
    return _first(value[0]) if len(value) else None


def to_display(arr: Any, ds: Any, stored_range: tuple[float, float] | None = None) -> Any:
    """Decoded pixels of one frame (rows x columns [x samples]) to display-correct 8-bit:
    uint8 rows x columns (grey) or rows x columns x 3 (RGB). See the module docstring.

    Grey integer pixels go through a lookup table built over the frame's value range (the
    same functions applied to each distinct stored value once, then one gather): the output is
    identical to applying them to every pixel, and several times faster for CT."""
    import numpy as np
    from pydicom.pixels.processing import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)
        return _eight_bit_rgb(rgb, 16 if rgb.dtype.itemsize > 1 else 8)
    if arr.ndim == 3:
        return _eight_bit_rgb(arr, int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8))
    fallback = stored_range or _unpadded_range(arr, ds)
    if arr.dtype.kind in "iu" and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo < arr.size:
            lut = _grey_display(np.arange(lo, hi + 1, dtype=np.int64), ds, photometric, fallback)
            return lut[np.subtract(arr, lo, dtype=np.int64)]
    return _grey_display(arr, ds, photometric, fallback)


def _unpadded_range(arr: Any, ds: Any) -> tuple[float, float] | None:
    """min..max of the stored values that are not PixelPaddingValue (the air outside a CT
    scan would else take the black end of the min/max fallback); None: no such values."""
    import numpy as np

    if not arr.size:
        return None
    pad = _float(_first(ds.get("PixelPaddingValue")))
    values = arr if pad is None else arr[arr != pad]
    if not values.size:
        return None
    return float(np.min(values)), float(np.max(values))


def _grey_display(
    values: Any, ds: Any, photometric: str, fallback: tuple[float, float] | None = None
) -> Any:
    """Modality LUT, VOI (LUT, window, or ``fallback``: a stored-value range stretched onto
    0..255, default the values' min/max), MONOCHROME1 inversion: stored -> 0..255."""
    import numpy as np
    from pydicom.pixels.processing import apply_modality_lut, apply_voi

    values = apply_modality_lut(values, ds)
    voi = ds.get("VOILUTSequence")
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if voi:
        bits = int(voi[0].LUTDescriptor[2]) or 16
        out = stretch(apply_voi(values, ds, index=0), 0.0, float(2**bits - 1))
    elif center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR"))
        if function.upper() == "LINEAR" and width < 1:
            function = "LINEAR_EXACT"
        out = window(values, center, width, function)
    elif fallback is not None:  # the series' range, or this frame's without padding
        ends = np.asarray(apply_modality_lut(np.array(fallback), ds), dtype=np.float64)
        out = stretch(values, float(ends.min()), float(ends.max()))
    else:
        out = stretch(values)
    if photometric == "MONOCHROME1":
        out = np.subtract(255, out, dtype=np.uint8)
    return out


def _eight_bit_rgb(arr: Any, bits: int) -> Any:
    import numpy as np

    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype.kind == "f":
        return stretch(arr)
    top = float(2 ** min(max(bits, 8), 32) - 1)
    return stretch(arr, 0.0, top)


def as_rgb(gray_or_rgb: Any) -> Any:
    import numpy as np

    if gray_or_rgb.ndim == 3:
        return gray_or_rgb
    return np.repeat(gray_or_rgb[:, :, None], 3, axis=2)


# --- worker side (runs in the decoder processes) -----------------------------------------


def _guard(fn: Callable[[], T]) -> T:
    """Every pydicom / decoder failure as ``MediaError(reason)``, a short reason."""
    from pydicom.errors import InvalidDicomError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn()
        except MediaError:
            raise
        except InvalidDicomError:
            raise MediaError("not a DICOM file (no DICM preamble / file meta)") from None
        except MemoryError:
            raise MediaError("DICOM image too large: out of memory") from None
        except (NotImplementedError, RuntimeError) as e:  # no plugin / every plugin failed
            raise MediaError(f"cannot decode the pixel data: {_short(e)}") from None
        except (EOFError, OSError) as e:
            raise MediaError(f"truncated or unreadable DICOM file: {_short(e)}") from None
        except ValueError as e:
            if "reshape" in str(e):
                raise MediaError("truncated pixel data (fewer bytes than Rows x Columns)") from None
            raise MediaError(f"corrupt DICOM data (ValueError: {_short(e)})") from None
        except Exception as e:  # malformed elements surface as KeyError, TypeError, ...
            raise MediaError(f"corrupt DICOM data ({type(e).__name__}: {_short(e)})") from None


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:160] or type(e).__name__


def _int(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        v = float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
    return v if v is not None and math.isfinite(v) else None


def _position(value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        pos = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return pos or None


def _stored_range(ds: Any) -> tuple[float, float] | None:
    lo = _float(_first(ds.get("SmallestImagePixelValue")))
    hi = _float(_first(ds.get("LargestImagePixelValue")))
    return (lo, hi) if lo is not None and hi is not None and hi > lo else None


def series_range(headers: Sequence[SliceHeader]) -> tuple[float, float] | None:
    """One stored-value range for every slice of a series without a window, so the min/max
    fallback does not stretch each slice on its own (the series would flicker): from the
    headers' Smallest/LargestImagePixelValue when every slice states them, else None."""
    ranges = [h.stored_range for h in headers]
    if not ranges or any(r is None for r in ranges):
        return None
    return min(r[0] for r in ranges if r), max(r[1] for r in ranges if r)


def _stated_fps(ds: Any) -> float:
    for tag in ("CineRate", "RecommendedDisplayFrameRate"):
        v = _float(ds.get(tag))
        if v and v > 0:
            return v
    ms = _float(ds.get("FrameTime"))
    return 1000.0 / ms if ms and ms > 0 else 0.0


def _check_decodable(ds: Any) -> None:
    from pydicom.pixels.decoders.base import get_decoder

    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        raise MediaError("not a DICOM file: no transfer syntax in its file meta")
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        name = getattr(uid, "name", str(uid))
        raise MediaError(f"unsupported transfer syntax: {name}") from None
    if not decoder.is_available:
        raise MediaError(f"no decoder installed for transfer syntax: {uid.name}")


def read_header(path: str, object_bytes: int = 0, max_pixels: int = 0) -> SliceHeader:
    """The header of ``path`` without its pixel data (``stop_before_pixels``). Raises
    MediaError: not DICOM, no image (e.g. a structured report), a syntax we cannot decode,
    more than ``max_pixels`` per frame (0: no limit) or more than ``MAX_FRAMES`` frames, or
    (uncompressed syntaxes, when ``object_bytes`` > 0 is the object's size) more pixel data
    than the object holds. The header is untrusted: nothing is sized from it unchecked."""
    return _guard(lambda: _read_header(path, object_bytes, max_pixels))


def _read_header(path: str, object_bytes: int = 0, max_pixels: int = 0) -> SliceHeader:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    rows, columns = _int(ds.get("Rows")), _int(ds.get("Columns"))
    if not rows or not columns or rows < 0 or columns < 0:
        raise MediaError("no pixel data (a DICOM file without an image)")
    _check_decodable(ds)
    if max_pixels and rows * columns > max_pixels:
        raise DicomRejected(
            f"image too large: {columns} x {rows} (more than {max_pixels:,} pixels)"
        )
    frames = max(1, _int(ds.get("NumberOfFrames")) or 1)
    if frames > MAX_FRAMES:
        raise DicomRejected(f"too many frames: NumberOfFrames {frames:,} (at most {MAX_FRAMES:,})")
    samples = _int(ds.get("SamplesPerPixel")) or 1
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    per_pixel = 2 if photometric == "YBR_FULL_422" else max(1, samples)  # 4:2:2: Y Y Cb Cr
    need = native_pixel_bytes(ds, rows * columns * frames * per_pixel)
    if object_bytes and need > object_bytes:
        raise DicomRejected(
            f"truncated pixel data: {columns} x {rows} x {frames} frames need {need:,} bytes, "
            f"the object has {object_bytes:,}"
        )
    return SliceHeader(
        series_number=_int(ds.get("SeriesNumber")),
        instance_number=_int(ds.get("InstanceNumber")),
        slice_location=_float(ds.get("SliceLocation")),
        position=_position(ds.get("ImagePositionPatient")),
        orientation=_position(ds.get("ImageOrientationPatient")),
        series_uid=str(ds.get("SeriesInstanceUID") or ""),
        stored_range=_stored_range(ds),
        rows=rows,
        columns=columns,
        frames=frames,
        color=samples > 1 or photometric == "PALETTE COLOR",
        fps=_stated_fps(ds),
    )


def native_pixel_bytes(ds: Any, samples: int) -> int:
    """The pixel data an uncompressed (native, not deflated) syntax needs for ``samples``
    samples; 0 for an encapsulated or deflated one (no size can be derived)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    uid = ds.file_meta.TransferSyntaxUID
    if uid.is_encapsulated or uid == DeflatedExplicitVRLittleEndian:
        return 0
    bits = _int(ds.get("BitsAllocated")) or 8
    if bits == 1:
        return (samples + 7) // 8
    return samples * ((bits + 7) // 8)


def _decode(path: str, index: int | None) -> tuple[Any, Any]:
    import pydicom
    from pydicom import Dataset
    from pydicom.pixels.utils import pixel_array

    ds = Dataset()
    try:
        # A path: pydicom reads only the frame asked for, never the whole multi-frame file.
        # It copies only the image pixel module (0028) to ``ds``; the functional groups an
        # enhanced file keeps its rescale and window in must be asked for.
        arr = pixel_array(path, ds_out=ds, index=index, specific_tags=list(_GROUP_TAGS))
    except AttributeError:
        # A deflated file cannot be read that way (the whole dataset is compressed).
        ds = pydicom.dcmread(path)
        arr = pixel_array(ds, index=index)
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]  # one frame asked, one frame kept
    return arr, frame_dataset(ds, index or 0)


# (functional group sequence, its item's attributes) an enhanced multi-frame file may carry
# instead of top-level rescale and window attributes (PS3.3 C.7.6.16).
_FUNCTIONAL_GROUPS: Final = (
    ("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept")),
    ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction")),
)


# SharedFunctionalGroupsSequence, PerFrameFunctionalGroupsSequence
_GROUP_TAGS: Final = (0x52009229, 0x52009230)


def frame_dataset(ds: Any, index: int) -> Any:
    """``ds`` with the rescale and window of frame ``index`` at the top level, as the
    single-frame rules read them: from the frame's own functional groups
    (PerFrameFunctionalGroupsSequence), else the shared ones; top-level attributes stay when
    neither has them. Enhanced CT/MR keep them only there."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    sources = []
    if per_frame and index < len(per_frame):
        sources.append(per_frame[index])
    if shared:
        sources.append(shared[0])
    for group, names in _FUNCTIONAL_GROUPS:
        for source in sources:
            seq = source.get(group)
            if seq:
                for name in names:
                    if name in seq[0]:
                        setattr(ds, name, seq[0][name].value)
                break
    return ds


def convert_frame(
    path: str, index: int, rgb: bool, stored_range: tuple[float, float] | None = None
) -> bytes:
    """Frame ``index`` of ``path`` as raw 8-bit pixels (grey, or RGB24 when ``rgb``), rows x
    columns: what the video encoder reads from its stdin. ``stored_range``: the series'
    range for the min/max fallback (``series_range``)."""

    def work() -> bytes:
        arr, ds = _decode(path, index)
        out = to_display(arr, ds, stored_range)
        return bytes((as_rgb(out) if rgb else _grey(out)).tobytes())

    return _guard(work)


def _grey(out: Any) -> Any:
    if out.ndim == 2:
        return out
    from PIL import Image

    return Image.fromarray(out).convert("L")


def convert_slice(path: str, max_pixels: int) -> SliceImage:
    """One single-frame slice to PNG + thumbnail (in a decoder process)."""

    def work() -> SliceImage:
        from PIL import Image

        from ingest.media.thumbnail import thumbnail_jpeg

        header = _read_header(path)
        if header.rows * header.columns > max_pixels:
            raise MediaError(f"image too large: {header.columns} x {header.rows}")
        arr, ds = _decode(path, 0 if header.frames > 1 else None)
        im = Image.fromarray(to_display(arr, ds))
        buf = io.BytesIO()
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        return SliceImage(im.width, im.height, buf.getvalue(), thumbnail_jpeg(im))

    return _guard(work)
