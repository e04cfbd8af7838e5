"""albumentations pipelines: evaluation does nothing, training moves targets with the image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellspot.ml.augment import augment_crops, crop_transforms, image_to_tensor, images_to_tensor, tile_transforms

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _targets() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    instances = np.zeros((64, 64), np.int32)
    instances[10:20, 30:42] = 7
    instances[30:40, 5:15] = 300
    point = np.zeros((64, 64), np.float32)
    point[15, 35] = 1.0
    return instances, point, np.array([[35.5, 15.5]], np.float32)


def test_evaluation_pipelines_change_nothing():
    crops = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(augment_crops(crop_transforms(False, 32), crops), crops)
    instances, point, kp = _targets()
    out = tile_transforms(False)(IMAGE, [instances, point], keypoints=kp)
    np.testing.assert_array_equal(out.image, IMAGE)
    np.testing.assert_array_equal(out.targets[0], instances)
    np.testing.assert_array_equal(out.keypoints, kp)


@pytest.mark.parametrize("seed", range(8))
def test_training_tiles_move_targets_and_keypoints_together(seed):
    instances, point, kp = _targets()
    out = tile_transforms(True, seed=seed, border="constant")(IMAGE, [instances, point], keypoints=kp)
    assert out.image.shape == IMAGE.shape and out.image.dtype == np.uint8
    moved_instances, moved_point = out.targets
    assert moved_instances.dtype == np.int32 and moved_point.dtype == np.float32
    assert set(np.unique(moved_instances)) <= {0, 7, 300}  # labels stay labels
    peak = np.argwhere(moved_point > 0)
    if len(out.keypoints):  # the point may be pushed out of the tile
        (row, col), (x, y) = peak[0], out.keypoints[0]
        assert abs(col + 0.5 - x) <= 1.5 and abs(row + 0.5 - y) <= 1.5
        assert moved_instances[int(y), int(x)] in (7, 0)


def test_seed_makes_augmentation_reproducible():
    crops = RNG.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    a = augment_crops(crop_transforms(True, 32, seed=5), crops)
    b = augment_crops(crop_transforms(True, 32, seed=5), crops)
    c = augment_crops(crop_transforms(True, 32, seed=6), crops)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, crops)
    assert a.shape == crops.shape and a.dtype == np.uint8


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: tile_transforms(True, border="wrap"), "allowed: reflect, constant"),
        (lambda: tile_transforms(True)(IMAGE, [np.zeros((4, 4))]), "does not match"),
        (lambda: crop_transforms(True, 0), "positive"),
        (lambda: images_to_tensor(IMAGE), r"\(N, H, W, 3\)"),
    ],
)
def test_bad_arguments_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_tensors_are_channels_first_in_unit_range():
    batch = images_to_tensor(np.stack([IMAGE, 255 - IMAGE]))
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() <= 1
    assert torch.equal(image_to_tensor(IMAGE), batch[0])
    assert batch[0, 1, 3, 4] == pytest.approx(IMAGE[3, 4, 1] / 255)
