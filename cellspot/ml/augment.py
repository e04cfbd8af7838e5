"""albumentations pipelines for crops (classifier) and tiles (detector), and tensor helpers.

Training pipelines: flips, 90-degree rotations, a small affine (scale, shift, rotation),
brightness / contrast / gamma, blur and noise. Evaluation pipelines do nothing (the pixels
are already normalised by :func:`cellspot.imaging.to_model_rgb8`). Randomness comes in
through ``seed`` (``albumentations.Compose(seed=...)``): the same seed gives the same
sequence of augmentations.

Geometric transforms of a tile move the image, its target maps (rendered disks / Gaussians,
instance masks) and keypoints together; photometric ones touch the image only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import albumentations as A
import cv2
import numpy as np
import torch

#: border modes for the affine of tiles: "reflect" (natural-looking, the default) or "constant" (zeros)
BORDERS = {"reflect": cv2.BORDER_REFLECT_101, "constant": cv2.BORDER_CONSTANT}


def _photometric() -> list[A.BasicTransform]:
    return [
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.7),
        A.RandomGamma(gamma_limit=(80, 120), p=0.3),
        A.GaussianBlur(blur_limit=(3, 3), sigma_limit=(0.3, 1.0), p=0.2),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.3),
    ]


def _geometric(border: int, rotate: float) -> list[A.BasicTransform]:
    return [
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomRotate90(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(-0.05, 0.05), rotate=(-rotate, rotate),
                 border_mode=border, p=0.5),
    ]


def crop_transforms(train: bool, size: int, *, seed: int | None = None) -> A.Compose:
    """Pipeline for ``(size, size, 3)`` ``uint8`` crops: ``pipeline(image=crop)["image"]``.

    ``train``: random augmentations (borders reflected); else a no-op pipeline. The crop
    centre stays the cell: shifts are at most 5 % of ``size``.
    """
    if size < 1:
        raise ValueError(f"crop size must be a positive number of pixels; got {size!r}")
    if not train:
        return A.Compose([], seed=seed)
    return A.Compose([*_geometric(cv2.BORDER_REFLECT_101, 15.0), *_photometric()], seed=seed)


class TileSample(NamedTuple):
    """A transformed tile: ``image`` ``(H, W, 3)`` uint8, ``targets`` list of ``(H, W)`` arrays
    (dtypes kept), ``keypoints`` ``(K, 2)`` float32 x, y of the keypoints still inside the tile."""

    image: np.ndarray
    targets: list[np.ndarray]
    keypoints: np.ndarray


class TileTransform:
    """Applies one random transform to a tile, its target maps and keypoints together.

    ``transform(image, targets=[...], keypoints=None) -> TileSample``. Target maps are moved
    with nearest-neighbour interpolation (labels stay labels, Gaussians stay close enough at
    these small scales). With ``border="reflect"`` the image and the target maps are
    reflected at the border together, but reflected copies of cells get no keypoint, so
    use rendered target maps (not keypoints) with the reflect border, or ``border="constant"``.
    """

    def __init__(self, pipeline: A.Compose) -> None:
        self.pipeline = pipeline

    def __call__(
        self,
        image: np.ndarray,
        targets: Sequence[np.ndarray] = (),
        keypoints: np.ndarray | None = None,
    ) -> TileSample:
        h, w = image.shape[:2]
        for t in targets:
            if t.shape[:2] != (h, w):
                raise ValueError(f"target of shape {t.shape} does not match the image's {(h, w)}")
        kp = np.zeros((0, 2), np.float32) if keypoints is None else np.asarray(keypoints, np.float32).reshape(-1, 2)
        if not self.pipeline.transforms:
            return TileSample(image.copy(), [t.copy() for t in targets], kp.copy())
        out = self.pipeline(image=image, masks=list(targets), keypoints=kp)
        moved = [np.ascontiguousarray(m, dtype=t.dtype) for m, t in zip(out["masks"], targets)]
        return TileSample(out["image"], moved, np.asarray(out["keypoints"], np.float32).reshape(-1, 2))


def tile_transforms(train: bool, *, seed: int | None = None, border: str = "reflect") -> TileTransform:
    """Pipeline for detector tiles (see :class:`TileTransform`); ``train=False`` changes nothing.

    Tiles should be square: a 90-degree rotation swaps height and width of the tile and its targets.
    """
    if border not in BORDERS:
        raise ValueError(f"unknown border {border!r}; allowed: {', '.join(BORDERS)}")
    if not train:
        return TileTransform(A.Compose([], seed=seed))
    transforms = [*_geometric(BORDERS[border], 10.0), *_photometric()]
    keypoints = A.KeypointParams(format="xy", remove_invisible=True)
    return TileTransform(A.Compose(transforms, keypoint_params=keypoints, seed=seed))


def augment_crops(pipeline: A.Compose, crops: np.ndarray) -> np.ndarray:
    """Apply ``pipeline`` to every crop of ``crops`` ``(N, S, S, 3)`` uint8; returns a new array."""
    return np.stack([pipeline(image=c)["image"] for c in crops]) if len(crops) else crops.copy()


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float32 in [0, 1]."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images; got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, 3)`` uint8 -> ``(3, H, W)`` float32 in [0, 1]."""
    return images_to_tensor(image[None])[0]
