"""cellspot.imaging: every mode and bit depth, bad files, bombs, display normalisation."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellspot.imaging import (
    ImageReadError,
    header_size,
    read_image,
    sha256_bytes,
    sha256_file,
    to_display_rgb8,
    to_model_rgb8,
)

H, W = 6, 8
RAMP8 = (np.arange(H * W).reshape(H, W) * 5).astype(np.uint8)
RAMP16 = (np.arange(H * W).reshape(H, W) * 1000).astype(np.uint16)
RGB8 = np.stack([RAMP8, RAMP8[::-1], np.full((H, W), 7, np.uint8)], axis=2)


def _pil(array: np.ndarray, mode: str | None = None, fmt: str = "PNG", **kw: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _palette() -> bytes:
    return _pil(RGB8, "P")


def _tiff(array: np.ndarray, **kw: object) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kw)
    return buffer.getvalue()


def _png16_rgb() -> bytes:
    cv2 = pytest.importorskip("cv2")
    array = np.stack([RAMP16, RAMP16 // 2, RAMP16 // 4], axis=2)
    ok, encoded = cv2.imencode(".png", array[..., ::-1])
    assert ok
    return encoded.tobytes()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid-looking PNG header that claims a huge size, with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


# name, file bytes, expected (dtype, channels, bit_depth, format, mode), expected array or None
GOOD_CASES: list[tuple[str, Callable[[], bytes], tuple[str, int, int, str, str], np.ndarray | None]] = [
    ("png L 8-bit", lambda: _pil(RAMP8), ("uint8", 1, 8, "PNG", "L"), RAMP8),
    ("png I;16", lambda: _pil(RAMP16), ("uint16", 1, 16, "PNG", "I;16"), RAMP16),
    ("png RGB", lambda: _pil(RGB8), ("uint8", 3, 8, "PNG", "RGB"), RGB8),
    ("png RGBA", lambda: _pil(np.dstack([RGB8, np.full((H, W), 200, np.uint8)])), ("uint8", 4, 8, "PNG", "RGBA"), None),
    ("png palette", _palette, ("uint8", 3, 8, "PNG", "P"), None),
    ("png 1-bit", lambda: _pil(RAMP8 > 100, None), ("uint8", 1, 8, "PNG", "1"), (RAMP8 > 100).astype(np.uint8) * 255),
    ("png LA", lambda: _pil(np.dstack([RAMP8, RAMP8]), None), ("uint8", 2, 8, "PNG", "LA"), None),
    ("png 16-bit RGB", _png16_rgb, ("uint16", 3, 16, "PNG", "RGB;16"), np.stack([RAMP16, RAMP16 // 2, RAMP16 // 4], axis=2)),
    ("jpeg RGB", lambda: _pil(RGB8, fmt="JPEG", quality=95), ("uint8", 3, 8, "JPEG", "RGB"), None),
    ("jpeg L", lambda: _pil(RAMP8, fmt="JPEG"), ("uint8", 1, 8, "JPEG", "L"), None),
    ("tiff uint16", lambda: _tiff(RAMP16), ("uint16", 1, 16, "TIFF", "tiff:uint16"), RAMP16),
    ("tiff uint8 RGB", lambda: _tiff(RGB8), ("uint8", 3, 8, "TIFF", "tiff:uint8"), RGB8),
    ("tiff planar RGB", lambda: _tiff(np.moveaxis(RGB8, 2, 0), planarconfig="separate", photometric="rgb"),
     ("uint8", 3, 8, "TIFF", "tiff:uint8"), RGB8),
    ("tiff multi-page", lambda: _tiff(np.stack([RAMP16, RAMP16 + 1])), ("uint16", 1, 16, "TIFF", "tiff:uint16"), RAMP16),
    ("tiff float32", lambda: _tiff(RAMP16.astype(np.float32) / 7), ("float32", 1, 32, "TIFF", "tiff:float32"), None),
]


@pytest.mark.parametrize(("name", "make", "expected", "array"), GOOD_CASES, ids=[c[0] for c in GOOD_CASES])
def test_read_image_modes(name: str, make: Callable[[], bytes], expected: tuple, array: np.ndarray | None,
                          tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(make())
    loaded = read_image(path)
    dtype, channels, bit_depth, fmt, mode = expected
    assert (loaded.array.dtype.name, loaded.channels, loaded.bit_depth, loaded.format, loaded.mode) == expected
    assert (loaded.width, loaded.height) == (W, H)
    assert loaded.array.shape[:2] == (H, W)
    assert (loaded.array.ndim == 2) == (channels == 1)
    if array is not None:
        np.testing.assert_array_equal(loaded.array, array)
    display = to_display_rgb8(loaded.array, loaded.bit_depth)
    assert display.shape == (H, W, 3) and display.dtype == np.uint8
    assert read_image(path.read_bytes(), "same.bytes").array.tobytes() == loaded.array.tobytes()
    assert loaded.pages == (2 if name == "tiff multi-page" else 1)
    assert header_size(path) == (W, H)  # from the header alone


def test_palette_expanded_to_its_colours(tmp_path: Path) -> None:
    image = Image.fromarray(RGB8).convert("P")
    expected = np.asarray(image.convert("RGB"))
    path = tmp_path / "p.png"
    image.save(path)
    np.testing.assert_array_equal(read_image(path).array, expected)


def _truncated_png() -> bytes:
    data = _pil(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    return data[: len(data) // 2]


BAD_CASES: list[tuple[str, Callable[[], bytes], dict, str]] = [
    ("text file", lambda: b"image,x,y\nhello,1,2\n", {}, "not a PNG, JPEG or TIFF"),
    ("empty file", lambda: b"", {}, "empty"),
    ("truncated png", _truncated_png, {}, "corrupt or truncated"),
    ("garbage after png magic", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, {}, ""),
    ("png bomb header", _png_bomb, {}, "decompression bomb"),
    ("png header over the default limit", lambda: _png_bomb(11_000, 10_000), {}, "more than the limit of 100,000,000"),
    ("png over our limit", lambda: _pil(RAMP8), {"max_pixels": 10}, "more than the limit of 10"),
    ("tiff over our limit", lambda: _tiff(RAMP16), {"max_pixels": 10}, "decompression bomb"),
    ("broken tiff", lambda: _tiff(RAMP16)[:20], {}, ""),
    ("gif is not allowed", lambda: _pil(RAMP8, fmt="GIF"), {}, "not a PNG, JPEG or TIFF"),
]


@pytest.mark.parametrize(("name", "make", "kwargs", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_read_image_rejects(name: str, make: Callable[[], bytes], kwargs: dict, message: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(make())
    with pytest.raises(ImageReadError) as info:
        read_image(path, **kwargs)
    assert info.value.path == str(path)
    assert message in info.value.reason
    assert str(path) in str(info.value)


def test_missing_file_is_an_image_read_error(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="cannot read"):
        read_image(tmp_path / "nope.png")


def test_bomb_check_uses_no_global_state(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageReadError):
        read_image(_pil(RAMP8), "x.png", max_pixels=1)
    assert Image.MAX_IMAGE_PIXELS == before
    assert read_image(_pil(RAMP8), "x.png").width == W


DISPLAY_CASES = [
    # name, array, bit_depth, expected RGB of pixel (0, 0) and of the last pixel
    ("uint8 gray kept", RAMP8, 8, (0, 0, 0), (235, 235, 235)),
    ("uint8 rgb kept", RGB8, 8, (0, 200, 7), (235, 35, 7)),
    ("rgba drops alpha", np.dstack([RGB8, np.zeros((H, W), np.uint8)]), 8, (0, 200, 7), (235, 35, 7)),
    ("gray+alpha", np.dstack([RAMP8, np.zeros((H, W), np.uint8)]), 8, (0, 0, 0), (235, 235, 235)),
    ("16-bit stretched", RAMP16, 16, (0, 0, 0), (255, 255, 255)),
    ("constant 16-bit", np.full((H, W), 1234, np.uint16), 16, (0, 0, 0), (0, 0, 0)),
    ("int values, 8-bit depth, clipped", np.full((H, W), 300, np.int32), 8, (255, 255, 255), (255, 255, 255)),
    ("float with NaN", np.where(RAMP16 > 0, RAMP16, np.nan).astype(np.float32), 32, (0, 0, 0), (255, 255, 255)),
]


@pytest.mark.parametrize(("name", "array", "bit_depth", "first", "last"), DISPLAY_CASES, ids=[c[0] for c in DISPLAY_CASES])
def test_to_display_rgb8(name: str, array: np.ndarray, bit_depth: int, first: tuple, last: tuple) -> None:
    out = to_display_rgb8(array, bit_depth)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == first
    assert tuple(out[-1, -1]) == last


def test_16bit_percentile_stretch_ignores_outliers() -> None:
    rng = np.random.default_rng(0)
    array = rng.integers(1000, 2000, (100, 100)).astype(np.uint16)
    array[0, 0] = 65535  # one hot pixel must not squash the rest into a few grey levels
    out = to_display_rgb8(array, 16)
    assert out[0, 0, 0] == 255
    assert out[1:, 1:, 0].std() > 50


def test_16bit_colour_keeps_colour_balance() -> None:
    array = np.stack([RAMP16, RAMP16 // 2, RAMP16 // 4], axis=2)
    out = to_display_rgb8(array, 16).astype(int)
    assert (out[..., 0] >= out[..., 1]).all() and (out[..., 1] >= out[..., 2]).all()


def test_a_dim_8bit_image_is_stretched_for_display_only() -> None:
    """A real image scaled x0.08 showed near black on the label page: cells invisible."""
    from cellspot.imaging import to_model_rgb8

    dim = (RAMP8.astype(np.float32) * 0.08).astype(np.uint8)  # 0..18
    shown = to_display_rgb8(dim)
    assert shown.max() == 255 and np.all(np.diff(shown[-1, :, 0].astype(int)) >= 0)  # order kept
    assert np.array_equal(to_model_rgb8(dim)[..., 0], dim)  # models see the stored values
    assert not to_display_rgb8(np.zeros((H, W), np.uint8)).any()  # a black image stays black
    bright = to_display_rgb8(RAMP8)
    assert np.array_equal(bright[..., 0], RAMP8)  # a normal 8-bit image is shown as stored


def test_to_display_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="expected an"):
        to_display_rgb8(np.zeros((2, 2, 5), np.uint8))


def test_sha256(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == sha256_bytes(b"abc") == digest


@pytest.mark.shared_data
def test_real_ldc_images_all_load(shared_data: Path) -> None:
    folder = shared_data / "ldc_living_dead_cells" / "images"
    modes: set[str] = set()
    for path in sorted(folder.glob("*.png")):
        loaded = read_image(path)
        modes.add(loaded.mode)
        assert (loaded.width, loaded.height) in {(225, 219), (220, 220), (200, 200)}
        display = to_display_rgb8(loaded.array, loaded.bit_depth)
        assert display.shape == (loaded.height, loaded.width, 3)
        assert display.max() > display.min(), f"{path.name} displays as a flat image"
    assert modes == {"RGB", "L", "RGBA", "P", "I;16"}


@pytest.mark.shared_data
def test_real_stardist_tiff_loads(shared_data: Path) -> None:
    loaded = read_image(shared_data / "stardist_nuclei2d" / "img2d.tif")
    assert (loaded.width, loaded.height, loaded.bit_depth, loaded.channels) == (512, 512, 16, 1)


def test_header_size_of_a_file_that_is_no_image_is_none(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_bytes(b"not an image")
    assert header_size(path) is None


def test_models_get_the_same_input_from_a_picture_at_8_or_16_bits() -> None:
    """The display stretches a 16-bit image's contrast; a model must not see that: trained on
    8-bit images, it called every cell of a 16-bit copy dead."""
    rng = np.random.default_rng(1)
    picture = rng.integers(60, 140, (40, 50, 3)).astype(np.uint8)  # low contrast, as brightfield
    as_16bit = picture.astype(np.uint16) * 257
    assert np.array_equal(to_model_rgb8(as_16bit, 16), picture)
    assert not np.array_equal(to_display_rgb8(as_16bit, 16), picture)  # stretched for people
    twelve_bit = picture.astype(np.uint16) * 16  # 12-bit camera values in a 16-bit file
    assert np.abs(to_model_rgb8(twelve_bit, 16).astype(int) - picture).max() <= 1
    # the largest value picks the depth: the same picture's brighter 16-bit copy is brighter
    dim = to_model_rgb8(np.array([[100, 20000]], np.uint16), 16)
    assert dim[0, 1, 0] == round(20000 * 255 / 65535) and dim.shape == (1, 2, 3)
    small = to_model_rgb8(np.array([[3, 200]], np.uint16), 16)  # 8-bit values in a 16-bit file
    assert small[0, :, 0].tolist() == [3, 200]
    floats = to_model_rgb8(np.array([[0.1, 0.5, 0.9]], np.float32), 32)  # no natural range: stretched
    assert floats[0, 0, 0] == 0 and floats[0, 2, 0] == 255
