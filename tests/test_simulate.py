"""Crowd simulator: behaviour on tiny truths, determinism, and calibration on the real crowd."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from cellspot.simulate import (
    CLICK_COLUMNS,
    PROFILES,
    RUN_COLUMNS,
    CrowdProfile,
    UnknownProfileError,
    class_runs,
    crowd_statistics,
    draw_students,
    get_profile,
    random_runs,
    simulate_class,
    simulate_crowd,
    simulate_runs,
)
from cellspot.synth import generate_layout

# A student who clicks every cell exactly, never strays, flips, hesitates or spams.
PERFECT = CrowdProfile(
    name="perfect", recall_mean=1.0, recall_concentration=10.0, jitter_frac=0.0, jitter_spread=0.0,
    dead_jitter_factor=1.0, stray_rate=0.0, stray_dead_prob=0.0, flip_mean=0.0, flip_concentration=10.0,
    not_sure_prob=0.0, lazy_mean=0.0, lazy_recall=0.3, spam_mean=0.0, spam_concentration=4.0,
    double_click_prob=0.0,
)


def _tiny_truth():
    cells = pd.DataFrame({
        "image": ["a", "a", "a", "b", "b"],
        "x": [10.0, 50.0, 90.0, 0.0, 119.0],
        "y": [10.0, 40.0, 70.0, 0.0, 79.0],
        "label": ["alive", "dead", "alive", "dead", "alive"],
        "diameter": [20.0, 15.0, 25.0, 20.0, 20.0],
    })
    images = pd.DataFrame({"image": ["a", "b", "empty"], "width": [100, 120, 60], "height": [80, 80, 40]})
    return cells, images


def _layout_truth(seed: int, n_images: int, width: int = 524, height: int = 391, scale: float = 55.0):
    """Generated truth in the real click frame: ~50 px cells, 4-20 cells per image."""
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n_images):
        layout = generate_layout(rng, width, height, n_cells=int(rng.integers(4, 21)), diameter_scale=scale)
        frames.append(layout[["x", "y", "label", "diameter"]].assign(image=f"im{i:04d}"))
    cells = pd.concat(frames, ignore_index=True)
    images = pd.DataFrame({"image": [f"im{i:04d}" for i in range(n_images)], "width": width, "height": height})
    return cells, images


# --------------------------------------------------------------------------- profiles


@pytest.mark.parametrize("name", ["easy", "realistic", "hard"])
def test_registered_profiles(name):
    assert get_profile(name) is PROFILES[name]
    assert get_profile(name).name == name


def test_unknown_profile_lists_names():
    with pytest.raises(UnknownProfileError) as err:
        get_profile("expert")
    assert "easy, hard, realistic" in str(err.value)


@pytest.mark.parametrize("field, value, message", [
    ("recall_mean", 1.2, "recall_mean must be in"),
    ("not_sure_prob", -0.1, "not_sure_prob must be in"),
    ("spam_concentration", 0.0, "spam_concentration must be > 0"),
    ("jitter_frac", -1.0, "jitter_frac must be >= 0"),
    ("spam_region", (0.9, 0.5, 0.8, 1.0), "spam_region"),
])
def test_profile_validation(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(PERFECT, **{field: value})


def test_profiles_are_ordered_by_difficulty():
    easy, real, hard = (get_profile(n) for n in ("easy", "realistic", "hard"))
    assert easy.recall_mean > real.recall_mean > hard.recall_mean
    assert easy.jitter_frac < real.jitter_frac < hard.jitter_frac
    assert easy.flip_mean < real.flip_mean < hard.flip_mean
    assert easy.spam_mean < real.spam_mean < hard.spam_mean


def test_draw_students_stratified_and_named():
    students = draw_students(5, get_profile("realistic"), np.random.default_rng(0))
    assert students["annotator"].tolist() == ["s01", "s02", "s03", "s04", "s05"]
    # a stratified class of 5 has one student per fifth of the spam distribution
    assert 0.1 < students["spam"].mean() < 0.4
    assert draw_students(120, PERFECT, np.random.default_rng(0))["annotator"].iloc[-1] == "s120"
    with pytest.raises(ValueError, match="n_students"):
        draw_students(0, PERFECT, np.random.default_rng(0))


# --------------------------------------------------------------------------- behaviour


def test_perfect_class_clicks_every_cell_exactly():
    cells, images = _tiny_truth()
    clicks = simulate_class(cells, images, 3, PERFECT, np.random.default_rng(0))
    assert list(clicks.columns) == CLICK_COLUMNS
    assert len(clicks) == 3 * len(cells)
    for _, run in clicks.groupby("task_run"):
        got = run.sort_values(["x", "y"])[["image", "x", "y", "label"]].reset_index(drop=True)
        want = cells[cells["image"] == run["image"].iloc[0]].sort_values(["x", "y"])
        pd.testing.assert_frame_equal(got, want[["image", "x", "y", "label"]].reset_index(drop=True),
                                      check_dtype=False)


@pytest.mark.parametrize("change, check", [
    ({"flip_mean": 1.0}, lambda c, t: (c["label"].to_numpy() != t["label"].to_numpy()).all()),
    ({"not_sure_prob": 1.0}, lambda c, t: (c["label"] == "not_sure").all()),
    ({"recall_mean": 0.0}, lambda c, t: len(c) == 0),
    ({"spam_mean": 1.0}, lambda c, t: (c.groupby("task_run").size() == 1).all() and (c["label"] == "alive").all()),
    ({"lazy_mean": 1.0, "lazy_recall": 0.0}, lambda c, t: len(c) == 0),
    ({"stray_rate": 5.0, "recall_mean": 0.0}, lambda c, t: len(c) > 0 and c["image"].isin(["a", "b", "empty"]).all()),
    ({"double_click_prob": 1.0}, lambda c, t: len(c) == 2 * len(t)),
])
def test_profile_knobs(change, check):
    cells, images = _tiny_truth()
    profile = dataclasses.replace(PERFECT, **change)
    clicks = simulate_class(cells, images, 1, profile, np.random.default_rng(1))
    ordered = clicks.sort_values(["image", "x", "y"]).reset_index(drop=True)
    truth = cells.sort_values(["image", "x", "y"]).reset_index(drop=True)
    assert check(ordered, truth)


def test_spam_clicks_land_in_the_bottom_right_corner():
    cells, images = _tiny_truth()
    clicks = simulate_class(cells, images, 20, dataclasses.replace(PERFECT, spam_mean=1.0), np.random.default_rng(2))
    sizes = images.set_index("image").loc[clicks["image"]]
    fx = clicks["x"].to_numpy() / sizes["width"].to_numpy()
    fy = clicks["y"].to_numpy() / sizes["height"].to_numpy()
    assert (fx >= 0.66).all() and (fx <= 0.99).all() and (fy >= 0.64).all() and (fy <= 1.0).all()
    assert len(clicks) == 20 * len(images)        # one click per run, empty image included


@pytest.mark.parametrize("profile_name", ["easy", "realistic", "hard"])
def test_clicks_stay_inside_the_image(profile_name):
    cells, images = _tiny_truth()
    clicks = simulate_class(cells, images, 30, get_profile(profile_name), np.random.default_rng(3))
    sizes = images.set_index("image").loc[clicks["image"]]
    assert (clicks["x"] >= 0).all() and (clicks["y"] >= 0).all()
    assert (clicks["x"].to_numpy() <= sizes["width"].to_numpy() - 1).all()
    assert (clicks["y"].to_numpy() <= sizes["height"].to_numpy() - 1).all()
    assert set(clicks["label"]) <= {"alive", "dead", "not_sure"}


def test_task_runs_match_class_runs():
    cells, images = _tiny_truth()
    clicks = simulate_class(cells, images, 4, get_profile("easy"), np.random.default_rng(4))
    runs = class_runs(images, 4)
    assert list(runs.columns) == RUN_COLUMNS and len(runs) == 12
    merged = clicks.merge(runs, on="task_run", suffixes=("", "_run"))
    assert len(merged) == len(clicks)
    assert (merged["image"] == merged["image_run"]).all()
    assert (merged["annotator"] == merged["annotator_run"]).all()
    # runs come in order, image-major
    assert clicks["task_run"].is_monotonic_increasing


@pytest.mark.parametrize("seed_a, seed_b, same", [(7, 7, True), (7, 8, False)])
def test_determinism(seed_a, seed_b, same):
    cells, images = _layout_truth(0, 5)
    a = simulate_class(cells, images, 5, get_profile("realistic"), np.random.default_rng(seed_a))
    b = simulate_class(cells, images, 5, get_profile("realistic"), np.random.default_rng(seed_b))
    assert a.equals(b) is same


def test_students_keep_their_skill_across_images():
    cells, images = _layout_truth(1, 60)
    profile = dataclasses.replace(get_profile("realistic"), spam_mean=0.0, lazy_mean=0.0, stray_rate=0.0,
                                  recall_concentration=2.0)
    crowd = simulate_crowd(cells, images, class_runs(images, 8), profile, np.random.default_rng(5),
                           students=draw_students(8, profile, np.random.default_rng(6)))
    marked = crowd.clicks.groupby("annotator").size() / len(cells)
    true_recall = crowd.students.set_index("annotator")["recall"]
    assert np.corrcoef(marked.loc[true_recall.index], true_recall)[0, 1] > 0.95


def test_random_runs_use_distinct_students():
    images = pd.DataFrame({"image": [f"i{k}" for k in range(50)], "width": 10, "height": 10})
    runs = random_runs(images, np.arange(50) % 4, 6, np.random.default_rng(0))
    per_image = runs.groupby("image")["annotator"].agg(["size", "nunique"])
    assert (per_image["size"] == per_image["nunique"]).all()
    assert per_image["size"].reindex(images["image"], fill_value=0).tolist() == (np.arange(50) % 4).tolist()
    with pytest.raises(ValueError, match="runs_per_image"):
        random_runs(images, 7, 6, np.random.default_rng(0))


def test_simulate_runs_returns_all_runs():
    cells, images = _tiny_truth()
    crowd = simulate_runs(cells, images, 2, 5, get_profile("realistic"), np.random.default_rng(0))
    assert len(crowd.runs) == 2 * len(images)
    assert crowd.clicks["task_run"].isin(crowd.runs["task_run"]).all()
    assert len(crowd.students) == 5


@pytest.mark.parametrize("mutate, message", [
    (lambda c, i: (c.assign(image="zzz"), i), "not in the images table"),
    (lambda c, i: (c.assign(label="maybe"), i), "alive|dead"),
    (lambda c, i: (c.assign(diameter=0.0), i), "diameters"),
])
def test_bad_truth_is_rejected(mutate, message):
    cells, images = mutate(*_tiny_truth())
    with pytest.raises(ValueError, match=message):
        simulate_class(cells, images, 2, PERFECT, np.random.default_rng(0))


def test_empty_truth_gives_empty_clicks():
    cells = pd.DataFrame({"image": [], "x": [], "y": [], "label": [], "diameter": []})
    images = pd.DataFrame({"image": ["a"], "width": [10], "height": [10]})
    clicks = simulate_class(cells, images, 3, PERFECT, np.random.default_rng(0))
    assert list(clicks.columns) == CLICK_COLUMNS and len(clicks) == 0


# --------------------------------------------------------------------------- statistics


def test_crowd_statistics_on_a_hand_made_table():
    clicks = pd.DataFrame({
        "image": ["a"] * 5 + ["b"],
        "task_run": [1, 1, 2, 2, 2, 3],
        "x": [0.0, 100.0, 3.0, 100.0, 300.0, 5.0],
        "y": [0.0, 0.0, 4.0, 40.0, 0.0, 5.0],
        "label": ["alive", "dead", "alive", "alive", "dead", "alive"],
    })
    s = crowd_statistics(clicks)
    assert (s["n_runs"], s["n_clicks"], s["n_images"]) == (3, 6, 2)
    assert s["single_click_run_share"] == pytest.approx(1 / 3)
    m = s["matched"]
    assert (m["n_run_pairs"], m["n_matched"]) == (1, 1)           # (0,0)-(3,4); 40 px is beyond 35
    assert m["distance_median"] == pytest.approx(5.0)
    assert m["frac_clicks_matched"] == pytest.approx(2 / 5)
    assert m["label_agreement"] == 1.0


@pytest.mark.shared_data
def test_crowd_statistics_reproduce_the_real_numbers(shared_data):
    folder = shared_data / "cellspotting_clicks"
    real = pd.read_csv(folder / "clicks.csv").rename(columns={"image_name": "image", "annotator_run": "task_run"})
    ref = json.loads((folder / "crowd_stats.json").read_text())
    s = crowd_statistics(real)
    assert s["n_runs"] == ref["n_task_runs"] and s["n_clicks"] == ref["n_clicks"]
    m, r = s["matched"], ref["matched_pairs_35px"]
    assert m["n_matched"] == r["n_pairs"]
    assert m["label_agreement"] == pytest.approx(r["label_agreement"], abs=1e-4)
    assert m["distance_median"] == pytest.approx(r["matched_distance_median"], abs=0.01)
    assert m["distance_p90"] == pytest.approx(r["matched_distance_p90"], abs=0.01)
    w = ref["excluding_single_click_runs"]["matched_35px"]
    assert s["matched_without_single"]["frac_clicks_matched"] == pytest.approx(w["frac_clicks_matched"], abs=1e-4)
    assert s["within_run_nn"]["median"] == pytest.approx(ref["within_run_nn_distance_px_524frame"]["median"], abs=0.01)


# Real numbers (README 1a) and the tolerances the realistic profile must meet.
CALIBRATION = [
    # (path in the statistics, real value, tolerance)
    (("matched_without_single", "distance_median"), 14.4, 3.0),
    (("matched_without_single", "distance_p90"), 27.6, 4.0),
    (("matched_without_single", "unmatched_frac"), 0.178, 0.05),
    (("matched", "label_agreement"), 0.9575, 0.02),
    (("single_click_run_share",), 0.234, 0.05),
    (("label_frac", "not_sure"), 0.0042, 0.003),
    (("clicks_per_run", "median"), 7.0, 2.5),
]


@pytest.mark.parametrize("seed", [0, 1])
def test_realistic_profile_reproduces_the_real_crowd(seed):
    # 524x391 frame, ~50 px cells; a pool of 40 students, 3 runs per image (real images had 1-3)
    cells, images = _layout_truth(seed, 300)
    assert 45 < cells["diameter"].mean() < 55
    crowd = simulate_runs(cells, images, 3, 40, get_profile("realistic"), np.random.default_rng(seed))
    stats = crowd_statistics(crowd.clicks, match_radius=35.0)
    for path, real, tol in CALIBRATION:
        value = stats
        for key in path:
            value = value[key]
        assert abs(value - real) <= tol, f"{'.'.join(path)} = {value:.4f}, real {real} +- {tol}"
    # Overall unmatched share (real 23.4 %): in the real export only 32 of 218 run pairs
    # contain a single-click run (spam went mostly to images nobody else saw), while here
    # spam runs pair with everyone. Re-weighted to the real pair mix, it must match.
    alls, clean = stats["matched"], stats["matched_without_single"]
    spam_pairs = alls["n_run_pairs"] - clean["n_run_pairs"]
    spam_clicks = (alls["n_clicks_in_pairs"] - clean["n_clicks_in_pairs"]) / spam_pairs
    spam_matched = 2 * (alls["n_matched"] - clean["n_matched"]) / spam_pairs
    clean_clicks = clean["n_clicks_in_pairs"] / clean["n_run_pairs"]
    clean_matched = 2 * clean["n_matched"] / clean["n_run_pairs"]
    reweighted = 1 - (186 * clean_matched + 32 * spam_matched) / (186 * clean_clicks + 32 * spam_clicks)
    assert abs(reweighted - 0.234) <= 0.05, f"re-weighted overall unmatched share {reweighted:.3f}"


@pytest.mark.parametrize("module", ["cellspot.simulate", "cellspot.synth", "cellspot.truth"])
def test_pure_modules_import_neither_torch_nor_sqlalchemy(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; "
            "print(','.join(m for m in ('torch', 'sqlalchemy', 'streamlit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
