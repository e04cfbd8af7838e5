"""Fake models and tiny disc images for the prediction tests (test_predict, test_predict_cli).

The fakes have the methods of the real loaded models (a threshold detector and a colour
classifier), so the tests check the prediction plumbing exactly; the ``fake_loaders`` fixture
(tests/ml/conftest.py) makes model loading return them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image as PILImage

W, H, RADIUS = 64, 48, 4
ALIVE_RGB, DEAD_RGB = (40, 160, 40), (160, 40, 40)  # the fake classifier says p_alive 0.8 / 0.2
# image name -> cells (x, y, label)
CELLS = {
    "well_a.png": [(12, 10, "alive"), (40, 20, "dead"), (20, 36, "alive")],
    "well_b.png": [(50, 10, "dead")],
    "well_c.png": [],
}


# --------------------------------------------------------------------------- fakes


@dataclass(frozen=True)
class FakeDetections:
    xy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


@dataclass
class FakeDetector:
    """Bright blobs (any channel > 50) are cells; centres are the blob centroids."""

    version: str = "detector-fake"
    config: dict = field(default_factory=lambda: {"radius": 5.0})
    calls: int = 0

    def detect(self, pixels: np.ndarray) -> FakeDetections:
        from skimage.measure import label, regionprops

        self.calls += 1
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        labels = label(pixels.max(axis=2) > 50).astype(np.int32)
        xy = np.array([[r.centroid[1], r.centroid[0]] for r in regionprops(labels)], float).reshape(-1, 2)
        return FakeDetections(xy, np.full(len(xy), 0.9), labels)


@dataclass
class FakeClassifier:
    """p_alive = green / (green + red) at the cell centre; one call per image (batched)."""

    version: str = "classifier-fake"
    calls: list[int] = field(default_factory=list)

    def predict_cells(self, pixels: np.ndarray, xy: np.ndarray) -> np.ndarray:
        self.calls.append(len(xy))
        px = pixels[np.rint(xy[:, 1]).astype(int), np.rint(xy[:, 0]).astype(int)].astype(float)
        return px[:, 1] / np.maximum(px[:, 0] + px[:, 1], 1.0)


def disc_pixels(cells: list[tuple[float, float, str]], width: int = W, height: int = H) -> np.ndarray:
    """(H, W, 3) uint8: dark background, a disc of RADIUS px per cell in its label's colour."""
    yy, xx = np.mgrid[:height, :width]
    rgb = np.full((height, width, 3), 10, np.uint8)
    for x, y, label in cells:
        rgb[(xx - x) ** 2 + (yy - y) ** 2 <= RADIUS**2] = ALIVE_RGB if label == "alive" else DEAD_RGB
    return rgb


def write_images(folder: Path, images: dict[str, list] = CELLS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, cells in images.items():
        PILImage.fromarray(disc_pixels(cells)).save(folder / name)
    return folder


def noisy_image_bytes(fmt: str = "PNG") -> bytes:
    """A W x H RGB noise image encoded as ``fmt`` (``"PNG"``, ``"JPEG"``, ``"TIFF"``): some kB, so
    that cutting it short leaves a file whose header still reads but whose pixels do not."""
    import io

    buffer = io.BytesIO()
    PILImage.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()
