"""Reading microscopy images of any common kind, and the one place they are normalised.

Pure module: PIL, numpy and tifffile only (OpenCV is used lazily, when installed, for
16-bit colour PNGs that Pillow would truncate to 8 bit).

* :func:`read_image` decodes PNG, JPEG and TIFF (8/16 bit, grayscale, RGB, RGBA, palette,
  ``I;16``; multi-page TIFF: first page, the count in ``pages``) into a :class:`LoadedImage` whose ``array`` keeps
  the stored values: shape ``(H, W)`` for one channel or ``(H, W, C)`` for ``C`` in 2..4,
  dtype ``uint8`` / ``uint16`` (other TIFF dtypes are kept as they are).
  Palette images are expanded to RGB (or RGBA when the palette has transparency), since
  palette indices are not intensities. The pixel count is checked against ``max_pixels``
  from the header, **before** any decoding, so decompression bombs cost nothing.
* :func:`to_model_rgb8` turns any such array into ``uint8`` ``(H, W, 3)`` for models and
  training crops (one linear rule for every bit depth: the same picture at 8 or 16 bits gives
  the same input); :func:`to_display_rgb8` does it for the app's pages (a contrast stretch of
  images over 8 bits, for people to see dim cells).

Coordinates everywhere in cellspot are in the pixels of ``array``: x = column, y = row.
EXIF orientation is not applied (microscopes do not write it; pixels stay as stored).
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000
"""Default limit on width x height (100 megapixels); larger images are refused as bombs."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
"""File name endings that folder and zip imports treat as images (lower case)."""

FORMAT_SUFFIX = {"PNG": ".png", "JPEG": ".jpg", "TIFF": ".tif"}
"""Canonical file ending for each decoded format (:attr:`LoadedImage.format`)."""

_PIL_FORMATS = ("PNG", "JPEG", "TIFF")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLES = 1_000_000
#: an 8-bit image whose 99.5th percentile is below this (a quarter of the range) is stretched for display
DIM_8BIT_TOP = 64


class ImageReadError(Exception):
    """A file could not be read as an image: corrupt, not an image, unsupported, or too large."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image.

    ``array``: ``(H, W)`` or ``(H, W, C)`` (C = 2 gray+alpha, 3 RGB, 4 RGBA), stored values.
    ``channels``: C (1 for ``(H, W)``). ``bit_depth``: bits per sample of ``array`` (8, 16, 32).
    ``mode``: the source mode (PIL mode such as ``"P"``, ``"I;16"``, or ``"tiff:uint16"``).
    ``format``: ``"PNG"``, ``"JPEG"`` or ``"TIFF"``. ``pages``: the pages (frames) in the file;
    ``array`` is the first (a z-stack or time series is not merged).
    """

    array: np.ndarray
    width: int
    height: int
    channels: int
    bit_depth: int
    mode: str
    format: str
    pages: int = 1


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def read_image(
    source: str | Path | bytes,
    name: str | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode ``source`` (a path, or the file's bytes) into a :class:`LoadedImage`.

    ``name`` labels the image in error messages (default: the path; required to be
    meaningful for bytes). Raises :class:`ImageReadError` for unreadable, corrupt, non-image
    or unsupported files and for images with more than ``max_pixels`` pixels (checked from
    the header before decoding). Pillow itself refuses images above twice its own
    ``Image.MAX_IMAGE_PIXELS`` (about 179 megapixels) whatever ``max_pixels`` says; cellspot
    never changes that global.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageReadError(label, f"cannot read the file: {exc.strerror or exc}") from exc
    if not data:
        raise ImageReadError(label, "the file is empty")
    if data[:4] in _TIFF_MAGIC:
        try:
            return _read_tiff(data, label, max_pixels)
        except ImageReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile may not decode every codec; PIL may
            log.debug("tifffile could not decode %s (%s); trying Pillow", label, exc)
    return _read_with_pil(data, label, max_pixels)


def _check_size(label: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(label, f"the header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageReadError(
            label,
            f"the header declares {width}x{height} = {width * height:,} pixels, more than the "
            f"limit of {max_pixels:,} (possible decompression bomb)",
        )


def _read_tiff(data: bytes, label: str, max_pixels: int) -> LoadedImage:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.pages:
            raise ImageReadError(label, "the TIFF file has no pages")
        page = tif.pages.first
        axes, shape = page.axes, tuple(page.shape)
        height, width = shape[axes.index("Y")], shape[axes.index("X")]
        _check_size(label, width, height, max_pixels)
        pages = len(tif.pages)
        if pages > 1:
            log.info("%s has %d pages; reading the first", label, pages)
        array = page.asarray()
    if axes == "SYX":
        array = np.moveaxis(array, 0, -1)
    elif axes not in ("YX", "YXS"):
        raise ImageReadError(label, f"unsupported TIFF page layout {axes!r}; allowed: YX, YXS, SYX")
    return _loaded(array, mode=f"tiff:{array.dtype.name}", fmt="TIFF", label=label, pages=pages)


def _read_with_pil(data: bytes, label: str, max_pixels: int) -> LoadedImage:
    with warnings.catch_warnings():
        # our own limit is checked below; PIL's warnings about corrupt metadata are noise here
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)
        return _decode_with_pil(data, label, max_pixels)


def _decode_with_pil(data: bytes, label: str, max_pixels: int) -> LoadedImage:
    try:
        image = Image.open(io.BytesIO(data), formats=_PIL_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(label, f"possible decompression bomb: {exc}") from exc
    except Image.UnidentifiedImageError as exc:
        claimed = _claimed_format(data)
        reason = f"corrupt or truncated {claimed} file" if claimed else "not a PNG, JPEG or TIFF image"
        raise ImageReadError(label, reason) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(label, f"cannot decode the header: {exc}") from exc
    with image:
        width, height = image.size
        _check_size(label, width, height, max_pixels)
        if image.format == "PNG" and _png_is_16bit_colour(data):
            array = _decode_png16_colour(data)
            if array is not None:
                return _loaded(array, mode=f"{image.mode};16", fmt="PNG", label=label)
            log.warning("%s is a 16-bit colour PNG; without OpenCV it is read as 8 bit", label)
        try:
            array = _pil_array(image)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageReadError(label, f"corrupt or truncated {image.format} data: {exc}") from exc
        return _loaded(array, mode=image.mode, fmt=str(image.format), label=label,
                       pages=int(getattr(image, "n_frames", 1) or 1))


def claimed_format(path: str | Path) -> str | None:
    """``"PNG"``, ``"JPEG"`` or ``"TIFF"`` as the file's first bytes claim, else None (not a
    decoded check: cheap enough to run over a whole folder before any work)."""
    with open(path, "rb") as fh:
        return _claimed_format(fh.read(8))


def header_size(path: str | Path) -> tuple[int, int] | None:
    """``(width, height)`` from the image file's header (no pixels decoded), or None when the
    header cannot be read (the full read then says why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path, formats=_PIL_FORMATS) as image:
                return int(image.size[0]), int(image.size[1])
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        pass
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            return int(page.shape[page.axes.index("X")]), int(page.shape[page.axes.index("Y")])
    except Exception:  # noqa: BLE001 - any failure: no size from the header
        return None


def _claimed_format(data: bytes) -> str | None:
    """The format the file's magic bytes claim, if any."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] in _TIFF_MAGIC:
        return "TIFF"
    return None


def _pil_array(image: Image.Image) -> np.ndarray:
    """Pixels of an open PIL image as stored values (palette expanded, 1-bit -> 0/255)."""
    mode = image.mode
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB"))
    if mode == "1":
        return np.asarray(image.convert("L"))
    if mode in ("L", "LA", "RGB", "RGBA", "F"):
        return np.asarray(image)
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # native byte order
    if mode == "I":
        array = np.asarray(image)
        if array.size and array.min() >= 0 and array.max() <= 0xFFFF:
            return array.astype(np.uint16)
        return array
    return np.asarray(image.convert("RGB"))  # CMYK, YCbCr, LAB, HSV, ...


def _png_is_16bit_colour(data: bytes) -> bool:
    """IHDR says 16 bits per sample and colour type RGB (2) or RGBA (6)."""
    return data[:8] == _PNG_MAGIC and len(data) > 25 and data[24] == 16 and data[25] in (2, 6)


def _decode_png16_colour(data: bytes) -> np.ndarray | None:
    """Decode a 16-bit RGB(A) PNG with OpenCV; ``None`` when OpenCV is absent or fails."""
    try:
        import cv2
    except ImportError:
        return None
    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.ndim != 3:
        return None
    order = [2, 1, 0, 3][: array.shape[2]]
    return np.ascontiguousarray(array[..., order])


def _loaded(array: np.ndarray, *, mode: str, fmt: str, label: str, pages: int = 1) -> LoadedImage:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] > 4):
        raise ImageReadError(label, f"unsupported pixel layout {array.shape}; allowed: HxW or HxWxC, C<=4")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    height, width = array.shape[:2]
    return LoadedImage(
        array=array,
        width=int(width),
        height=int(height),
        channels=1 if array.ndim == 2 else int(array.shape[2]),
        bit_depth=int(array.dtype.itemsize * 8),
        mode=mode,
        format=fmt,
        pages=pages,
    )


#: the bit depths an integer image's values are read in (cameras write 10, 12, 14 or 16 bits
#: into 16-bit files): :func:`to_model_rgb8` scales by the smallest that holds the largest value
MODEL_BIT_DEPTHS = (8, 10, 12, 14, 16, 24, 32)


def to_model_rgb8(array: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Normalise any image array to ``uint8`` RGB for models and training crops: the one rule
    every model input goes through, the same for every bit depth.

    Channels as :func:`to_display_rgb8`. ``uint8`` input is kept as it is. Other integer
    arrays are scaled linearly from ``0..2**b - 1`` to ``0..255``, with ``b`` the smallest of
    :data:`MODEL_BIT_DEPTHS` that holds the image's largest value, so a picture gives the same
    input whether it was saved as 8 bit, as 16 bit (values x 257) or as 12-bit camera values,
    and its contrast is left as the microscope recorded it (a per-image contrast stretch would
    give a model trained on 8-bit images other inputs for the same cells). With ``bit_depth <=
    8`` the values are clipped to 0..255. Floating-point images, which have no natural range,
    are stretched as :func:`to_display_rgb8` does. Returns a new ``(H, W, 3)`` ``uint8`` array.
    """
    return _to_rgb8(array, bit_depth, _linear_by_bit_depth)


def to_display_rgb8(array: np.ndarray, bit_depth: int = 8) -> np.ndarray:
    """Normalise any image array to ``uint8`` RGB for display (the app's pages, overlays).

    ``array``: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 2)`` (gray + alpha), ``(H, W, 3)`` or
    ``(H, W, 4)`` (RGBA). Alpha is dropped (not composited); gray is repeated to three
    channels. ``uint8`` input is kept as it is (unless dim, below). Anything else: with ``bit_depth <= 8`` the
    values are clipped to 0..255; otherwise they are scaled linearly so the 0.5th..99.5th
    percentiles (over all colour samples together, which keeps the colour balance) span
    0..255, falling back to min..max, and to zeros for a constant image: a dim 16-bit
    fluorescence image is shown with the contrast a person needs to click its cells. A dim
    8-bit image (its 99.5th percentile below :data:`DIM_8BIT_TOP`) is stretched the same way:
    shown as stored it was near black, cells invisible and no brightness control on the page.
    Models see :func:`to_model_rgb8` instead. Returns a new ``(H, W, 3)`` ``uint8`` array.
    """
    rgb8 = _to_rgb8(array, bit_depth, _stretch_to_uint8)
    if rgb8.size and _top_percentile(rgb8) < DIM_8BIT_TOP:
        rgb8 = np.ascontiguousarray(_stretch_to_uint8(rgb8))
    return rgb8


def _top_percentile(rgb8: np.ndarray) -> float:
    """The 99.5th percentile of ``rgb8``'s samples (a subsample of a large image)."""
    flat = rgb8.reshape(-1)
    return float(np.percentile(flat[::max(1, flat.size // _PERCENTILE_SAMPLES)], _PERCENTILES[1]))


def _to_rgb8(array: np.ndarray, bit_depth: int, wide: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The steps both rules share: channels, ``uint8`` kept, ``bit_depth <= 8`` clipped; ``wide``
    maps anything else to ``uint8``. A new contiguous ``(H, W, 3)`` array."""
    array = _three_or_one_channel(array)
    if array.dtype == np.uint8:
        rgb8 = array
    elif bit_depth <= 8:
        rgb8 = np.clip(np.nan_to_num(array), 0, 255).astype(np.uint8)
    else:
        rgb8 = wide(array)
    if rgb8.ndim == 2:
        rgb8 = np.repeat(rgb8[..., None], 3, axis=2)
    return np.ascontiguousarray(rgb8)


def _linear_by_bit_depth(array: np.ndarray) -> np.ndarray:
    """Integers scaled from ``0..2**b - 1`` (``b`` from :data:`MODEL_BIT_DEPTHS`); floats stretched."""
    if not np.issubdtype(array.dtype, np.integer):
        return _stretch_to_uint8(array)
    top = int(array.max()) if array.size else 0
    bits = next((b for b in MODEL_BIT_DEPTHS if top < 2 ** b), MODEL_BIT_DEPTHS[-1])
    scaled = np.clip(array, 0, None).astype(np.float32) * np.float32(255.0 / (2 ** bits - 1))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _three_or_one_channel(array: np.ndarray) -> np.ndarray:
    """``array`` as ``(H, W)`` or ``(H, W, 3)``: gray + alpha -> gray, RGBA -> RGB (alpha dropped)."""
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] in (1, 2):
        return array[..., 0]
    if array.ndim == 3 and array.shape[2] == 4:
        return array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)):
        raise ValueError(f"expected an (H, W) or (H, W, C<=4) image array, got shape {array.shape}")
    return array


def _stretch_to_uint8(array: np.ndarray) -> np.ndarray:
    values = array.astype(np.float32, copy=False)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros(array.shape, np.uint8)
    step = max(1, finite.size // _PERCENTILE_SAMPLES)
    lo, hi = np.percentile(finite[::step], _PERCENTILES)
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(array.shape, np.uint8)
    scaled = (np.nan_to_num(values, nan=lo) - lo) * (255.0 / (hi - lo))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)
