"""Post-processing on synthetic discs and one-to-one instance matching on crafted label images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cellspot.ml.postprocess import (
    SHAPE_MIN_AREA, PostprocessError, counts_to_scores, match_instances, postprocess, shape_prior,
)
from cellspot.ml.targets import render_targets


def _disc_probs(shape, centres, radius):
    """Probability maps as a perfect network would give them: the rendered targets."""
    cells = pd.DataFrame({"x": [c[0] for c in centres], "y": [c[1] for c in centres]})
    return render_targets(shape, cells, radius, "disk")


@pytest.mark.parametrize(
    "centres, radius",
    [
        ([(10, 10), (30, 12), (50, 40)], 5.0),
        ([(20, 20), (29, 20)], 5.0),             # touching discs (distance 9 < 2r)
        ([(15.5, 20.5), (23.0, 26.0), (40, 8)], 6.0),  # off-grid centres, two overlap
        ([(0, 0), (63, 47)], 4.0),               # on the image corners
    ],
)
def test_every_disc_centre_is_found_and_touching_discs_are_separated(centres, radius) -> None:
    prob = _disc_probs((48, 64), centres, radius)
    det = postprocess(prob, threshold=0.5, min_distance=3, peak_threshold=0.3)
    assert len(det) == len(centres)
    d = np.hypot(det.xy[:, None, 0] - np.array(centres)[None, :, 0], det.xy[:, None, 1] - np.array(centres)[None, :, 1])
    assert d.min(axis=0).max() <= 1.0
    assert det.labels.dtype == np.int32 and det.labels.shape == (48, 64)
    ids = [det.labels[int(round(y)), int(round(x))] for x, y in det.xy]
    assert len(set(ids)) == len(centres) and 0 not in ids
    assert np.all((det.labels > 0) == (prob[0] > 0.5))
    assert np.all((det.scores > 0.9) & (det.scores <= 1.0))


def test_min_distance_merges_close_peaks_and_peak_threshold_drops_faint_ones() -> None:
    prob = _disc_probs((40, 40), [(10, 10), (14, 10), (30, 30)], 3.0)
    prob[1, 25:35, 25:35] *= 0.2
    det = postprocess(prob, min_distance=6, peak_threshold=0.3)
    assert len(det) == 1


def test_foreground_without_a_peak_becomes_a_cell_when_large_enough() -> None:
    prob = np.zeros((2, 30, 30), np.float32)
    prob[0, 5:15, 5:15] = 0.9  # no centre response at all
    prob[0, 20:22, 20:22] = 0.9
    assert len(postprocess(prob, min_area=0)) == 0
    det = postprocess(prob, min_area=10)
    assert len(det) == 1 and det.xy[0] == pytest.approx([9.5, 9.5])
    assert (det.labels == 1).sum() == 100


def test_min_area_drops_small_seeded_instances() -> None:
    prob = _disc_probs((40, 40), [(10, 10), (30, 30)], 4.0)
    prob[0, 26:35, 26:35] = 0.0  # the second cell has a peak but almost no foreground
    assert len(postprocess(prob, min_area=0)) == 2
    det = postprocess(prob, min_area=10)
    assert len(det) == 1 and det.xy[0] == pytest.approx([10, 10], abs=0.5)
    assert set(np.unique(det.labels)) == {0, 1}


def test_border_margin_drops_cells_centred_on_the_border_with_their_instance() -> None:
    prob = _disc_probs((40, 50), [(0.5, 20), (25, 20), (48, 2)], 4.0)
    assert len(postprocess(prob)) == 3
    det = postprocess(prob, border_margin=3.0)
    assert len(det) == 1 and det.xy[0] == pytest.approx([25, 20], abs=0.5)
    assert set(np.unique(det.labels)) == {0, 1}
    assert (det.labels == 1).sum() == ((prob[0] > 0.5)[:, 10:40]).sum()  # the kept cell's pixels only


def _blob_and_arc_probs() -> np.ndarray:
    """A round cell, a thin curved arc (like a cell border in brightfield) and a straight thin
    bar, each with one centre peak."""
    prob = _disc_probs((60, 90), [(12, 12)], 6.0)
    yy, xx = np.mgrid[:60, :90]
    ring = np.abs(np.hypot(xx - 45, yy - 45) - 15) <= 1.5
    arc = ring & (yy < 45)  # the upper half of a ring: thin, curved, low solidity
    bar = (np.abs(yy - 10) <= 1) & (xx >= 65) & (xx <= 85)  # thin and straight: eccentricity near 1
    prob[0][arc | bar] = 0.9
    prob[1][30, 45] = 0.9  # top of the arc
    prob[1][10, 75] = 0.9
    return prob


def test_shape_prior_drops_thin_curved_and_elongated_instances_with_their_cells() -> None:
    prob = _blob_and_arc_probs()
    assert len(postprocess(prob, min_distance=3)) == 3
    det = postprocess(prob, min_distance=3, min_solidity=0.8)
    assert det.xy[:, 0] == pytest.approx([12, 75], abs=0.6)  # the arc is gone; the bar is solid
    assert set(np.unique(det.labels)) == {0, 1, 2}
    det = postprocess(prob, min_distance=3, min_solidity=0.8, max_eccentricity=0.95)
    assert len(det) == 1 and det.xy[0] == pytest.approx([12, 12], abs=0.5)
    assert np.array_equal(det.labels > 0, (prob[0] > 0.5) & (np.arange(90)[None, :] < 22))  # the disc's pixels only


def test_shape_prior_spares_instances_too_small_to_judge() -> None:
    prob = np.zeros((2, 20, 20), np.float32)
    prob[0, 5, 5:5 + SHAPE_MIN_AREA - 1] = 0.9  # a line: eccentricity 1, solidity 1, but too few pixels
    prob[1, 5, 8] = 0.9
    assert len(postprocess(prob, max_eccentricity=0.5, min_solidity=1.0)) == 1


def test_shape_prior_of_true_masks_is_their_quantile() -> None:
    discs = _disc_probs((60, 90), [(12, 12), (40, 40), (70, 20)], 6.0)[0] > 0.5
    masks = [ndimage.label(discs)[0].astype(np.int32)]
    solidity, eccentricity = shape_prior(masks, 0.0)
    assert 0.9 < solidity <= 1.0 and 0.0 <= eccentricity < 0.3  # round discs
    bar = np.zeros((20, 40), np.int32)
    bar[5:7, 5:35] = 1
    low, high = shape_prior(masks + [bar], 0.0)
    assert low == pytest.approx(solidity) and high > 0.99  # the bar sets the eccentricity bound
    assert shape_prior([np.zeros((5, 5), np.int32)]) == (0.0, 1.0)
    with pytest.raises(PostprocessError, match="quantile"):
        shape_prior(masks, 0.5)


def test_min_instance_prob_drops_instances_the_network_doubts_with_their_pixels() -> None:
    prob = _disc_probs((40, 60), [(10, 10), (30, 20), (50, 30)], 4.0)
    faint = prob[0] > 0.5
    faint[:, :40] = False
    prob[0][faint] = 0.6  # the third cell passes the threshold, but only just
    prob[0][(prob[0] > 0.5) & (np.arange(60)[None, :] >= 20) & (np.arange(60)[None, :] < 40)] = 0.85
    assert len(postprocess(prob, min_instance_prob=0.0)) == 3
    det = postprocess(prob, min_instance_prob=0.7)
    assert det.xy[:, 0] == pytest.approx([10, 30], abs=0.5)
    assert set(np.unique(det.labels)) == {0, 1, 2} and not det.labels[:, 40:].any()
    assert len(postprocess(prob, min_instance_prob=0.9)) == 1  # only the certain first cell


def test_a_cell_seeded_outside_the_foreground_is_judged_by_its_seed_pixel() -> None:
    prob = np.zeros((2, 20, 20), np.float32)
    prob[1, 10, 10] = 0.9  # a centre peak outside the foreground: its instance is the seed pixel
    prob[0, 10, 10] = 0.3
    assert len(postprocess(prob, min_instance_prob=0.25)) == 1
    assert len(postprocess(prob, min_instance_prob=0.35)) == 0


def test_bad_input_raises() -> None:
    with pytest.raises(PostprocessError, match="C>=2"):
        postprocess(np.zeros((1, 5, 5), np.float32))
    with pytest.raises(PostprocessError, match="min_distance"):
        postprocess(np.zeros((2, 5, 5), np.float32), min_distance=0)
    with pytest.raises(PostprocessError, match="border_margin"):
        postprocess(np.zeros((2, 5, 5), np.float32), border_margin=-1)
    with pytest.raises(PostprocessError, match="min_solidity"):
        postprocess(np.zeros((2, 5, 5), np.float32), min_solidity=1.5)
    with pytest.raises(PostprocessError, match="max_eccentricity"):
        postprocess(np.zeros((2, 5, 5), np.float32), max_eccentricity=0.0)
    with pytest.raises(PostprocessError, match="min_instance_prob"):
        postprocess(np.zeros((2, 5, 5), np.float32), min_instance_prob=-0.1)


def _labels(*boxes):
    out = np.zeros((20, 20), np.int32)
    for value, (r0, r1, c0, c1) in boxes:
        out[r0:r1, c0:c1] = value
    return out


@pytest.mark.parametrize(
    "truth, pred, tp, fp, fn, mean_iou",
    [
        (_labels((1, (0, 4, 0, 4))), _labels((9, (0, 4, 0, 4))), 1, 0, 0, 1.0),   # ids need not agree
        (_labels((1, (0, 4, 0, 4))), _labels((1, (0, 4, 0, 2))), 1, 0, 0, 0.5),   # IoU exactly 0.5 counts
        (_labels((1, (0, 4, 0, 4))), _labels((1, (0, 4, 0, 1))), 0, 1, 1, 0.0),   # IoU 0.25
        (_labels((1, (0, 4, 0, 4)), (2, (0, 4, 4, 8))), _labels((5, (0, 4, 0, 8))), 1, 0, 1, 0.5),  # merged: IoU 0.5 with one
        (_labels((1, (0, 4, 0, 8))), _labels((1, (0, 4, 0, 5)), (2, (0, 4, 5, 8))), 1, 1, 0, 0.625),  # split
        (_labels(), _labels((3, (5, 9, 5, 9))), 0, 1, 0, 0.0),
        (_labels(), _labels(), 0, 0, 0, 0.0),
    ],
)
def test_match_instances(truth, pred, tp, fp, fn, mean_iou) -> None:
    m = match_instances(truth, pred, iou=0.5)
    assert (m["tp"], m["fp"], m["fn"]) == (tp, fp, fn)
    assert m["mean_iou"] == pytest.approx(mean_iou)
    assert m["f1"] == pytest.approx(counts_to_scores(tp, fp, fn)["f1"])


def test_match_instances_is_one_to_one_and_optimal() -> None:
    truth = _labels((1, (0, 10, 0, 10)), (2, (10, 20, 0, 10)))
    pred = _labels((1, (0, 11, 0, 10)), (2, (11, 20, 0, 10)))
    m = match_instances(truth, pred, iou=0.5)
    assert m["tp"] == 2 and m["mean_iou"] == pytest.approx((100 / 110 + 90 / 100) / 2)
    with pytest.raises(PostprocessError, match="shape"):
        match_instances(truth, pred[:5])


def _mask_probs(mask: np.ndarray) -> np.ndarray:
    """Maps as a perfect network trained on ``mask`` would give them (normalised-distance centre)."""
    return render_targets(mask.shape, pd.DataFrame({"x": [], "y": []}), 1.0, "mask", mask, centre="distance")


def test_cores_find_cells_of_very_different_sizes_that_one_peak_distance_cannot() -> None:
    yy, xx = np.mgrid[:64, :96]
    mask = np.zeros((64, 96), np.int32)
    mask[np.hypot(xx - 22, yy - 30) <= 16] = 1                 # a big nucleus
    for k, (x, y) in enumerate([(60, 10), (68, 10), (76, 10), (84, 10), (60, 50), (70, 50)], start=2):
        mask[np.hypot(xx - x, yy - y) <= 3.5] = k              # small ones, some touching
    prob = _mask_probs(mask)
    cores = postprocess(prob, threshold=0.5, peak_threshold=0.5, seeds="cores")
    assert len(cores) == 7
    scores = match_instances(mask, cores.labels, 0.5)
    assert scores["tp"] == 7 and scores["fp"] == 0
    assert cores.scores == pytest.approx(np.ones(7), abs=1e-6)
    # peaks far enough apart for the big nucleus merge the touching small ones
    assert len(postprocess(prob, threshold=0.5, peak_threshold=0.5, min_distance=12, seeds="peaks")) < 7


def test_core_centres_are_the_weighted_centres_of_the_cores() -> None:
    mask = np.zeros((30, 30), np.int32)
    mask[5:16, 8:19] = 1  # an 11x11 square centred on (13, 10)
    det = postprocess(_mask_probs(mask), peak_threshold=0.3, seeds="cores")
    assert len(det) == 1 and det.xy[0] == pytest.approx([13.0, 10.0])


def test_unknown_seed_kind_raises() -> None:
    with pytest.raises(PostprocessError, match="seeds must be one of"):
        postprocess(np.zeros((2, 8, 8), np.float32), seeds="blobs")
