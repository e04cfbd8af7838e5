"""``cluster_em`` (the default consensus method): behaviour on tiny synthetic click tables.

Every case is built here from a few lines of numbers; the quality smoke test at the end
uses the crowd simulator on generated truth (no real data needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pytest

from cellspot.consensus import ANNOTATOR_COLUMNS, CELL_COLUMNS, prepare_clicks, run_consensus
from cellspot.consensus.clustering import cluster_clicks, estimate_scale
from cellspot.consensus.common import encode_clicks

COLUMNS = ["image", "annotator", "task_run", "x", "y", "label"]
# six cells well apart (spacing >= 140 px) in a 524x391 frame, away from the spam corner
GRID = [(60.0, 60.0), (200.0, 60.0), (340.0, 60.0), (60.0, 200.0), (200.0, 200.0), (340.0, 200.0)]
GRID_LABELS = ["alive", "dead", "alive", "dead", "alive", "alive"]
FLIP = {"alive": "dead", "dead": "alive"}


def frame(rows: Sequence[tuple]) -> pd.DataFrame:
    """Click table from ``(image, annotator, task_run, x, y, label)`` tuples."""
    return pd.DataFrame(list(rows), columns=COLUMNS)


def class_rows(n_students: int, image: str = "img", cells: Sequence[tuple[float, float]] = GRID,
               labels: Sequence[str] = GRID_LABELS, jitter: float = 3.0, seed: int = 0,
               first_student: int = 0) -> list[tuple]:
    """Every student clicks every cell once, Gaussian jitter (px per axis), true labels."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(first_student, first_student + n_students):
        for (x, y), label in zip(cells, labels):
            dx, dy = rng.normal(0.0, jitter, 2)
            rows.append((image, f"s{s}", f"{image}/s{s}", x + dx, y + dy, label))
    return rows


def near(cells: pd.DataFrame, x: float, y: float, r: float, image: str | None = None) -> pd.DataFrame:
    """Cells within ``r`` px of ``(x, y)`` (on ``image`` if given)."""
    d = np.hypot(cells["x"].to_numpy(float) - x, cells["y"].to_numpy(float) - y)
    keep = d <= r
    if image is not None:
        keep &= (cells["image"] == image).to_numpy()
    return cells[keep]


def clusters_of(clicks: pd.DataFrame, cell_radius: float | None = None):
    arr = encode_clicks(prepare_clicks(clicks))
    return arr, cluster_clicks(arr, estimate_scale(arr, cell_radius))


# --------------------------------------------------------------------------- empty input


@pytest.mark.parametrize(
    "columns",
    [["image", "annotator", "x", "y", "label"], COLUMNS],
    ids=["without-task_run", "with-task_run"],
)
def test_empty_input_gives_empty_cells_with_standard_columns(columns: list[str]) -> None:
    result = run_consensus(pd.DataFrame(columns=columns))
    assert list(result.cells.columns) == CELL_COLUMNS
    assert result.cells.empty
    assert list(result.annotators.columns) == ANNOTATOR_COLUMNS
    assert result.annotators.empty
    assert result.params["method"] == "cluster_em"


# --------------------------------------------------------------------------- one student

ONE_STUDENT_CASES = {
    # name: rows (image, x, y, label) of a single student
    "two-clicks": [("a", 10.0, 10.0, "alive"), ("a", 100.0, 100.0, "dead")],
    "three-images": [("a", 10.0, 10.0, "alive"), ("b", 10.0, 10.0, "dead"), ("c", 400.0, 300.0, "alive")],
    "own-clicks-3px-apart": [("a", 100.0, 100.0, "alive"), ("a", 103.0, 100.0, "alive"),
                             ("a", 300.0, 200.0, "dead")],
    "twenty-clicks": [("a", 20.0 * i, 15.0 * (i % 5), "alive" if i % 3 else "dead") for i in range(20)],
}


@pytest.mark.parametrize("rows", ONE_STUDENT_CASES.values(), ids=ONE_STUDENT_CASES.keys())
def test_one_student_every_click_is_a_cell(rows: list[tuple]) -> None:
    clicks = frame([(img, "solo", f"{img}/solo", x, y, lab) for img, x, y, lab in rows])
    cells = run_consensus(clicks).cells
    assert len(cells) == len(rows)
    got = cells.sort_values(["image", "x", "y"]).reset_index(drop=True)
    want = clicks.sort_values(["image", "x", "y"]).reset_index(drop=True)
    np.testing.assert_allclose(got[["x", "y"]].to_numpy(float), want[["x", "y"]].to_numpy(float))
    assert (got["image"] == want["image"]).all()
    assert (got["label"] == want["label"]).all()  # a lone vote decides the label
    assert (got["n_runs"] == 1).all() and (got["support"] == 1).all()
    # one run cannot confirm a cell: the posterior is at least a coin flip but never certainty
    assert ((got["p_cell"] >= 0.5) & (got["p_cell"] < 1.0)).all()
    assert (got["confidence"] < 1.0).all()


def test_single_click_table_is_one_cell() -> None:
    cells = run_consensus(frame([("a", "solo", "r1", 10.0, 20.0, "alive")])).cells
    assert len(cells) == 1
    assert cells.iloc[0]["support"] == 1 and cells.iloc[0]["n_runs"] == 1


@pytest.mark.parametrize("separation", [1.0, 6.0])
def test_two_students_one_click_each_on_the_only_cell(separation: float) -> None:
    rows = [("img", "s0", "r0", 100.0, 100.0, "dead"), ("img", "s1", "r1", 100.0 + separation, 100.0, "dead")]
    cells = run_consensus(frame(rows)).cells
    assert len(cells) == 1 and cells.iloc[0]["support"] == 2


# --------------------------------------------------------------------------- same-run constraint


def _double_click_rows(n_students: int, seed: int) -> list[tuple]:
    """A class on GRID where s0 clicks the first cell a second time, 3 px from its first click."""
    rows = class_rows(n_students, jitter=2.0, seed=seed)
    first = next(r for r in rows if r[1] == "s0")
    rows.append(("img", "s0", first[2], first[3] + 3.0, first[4], "alive"))
    return rows


@pytest.mark.parametrize("n_students", [1, 3, 5, 10])
def test_a_students_double_click_is_never_one_cluster(n_students: int) -> None:
    arr, cluster = clusters_of(frame(_double_click_rows(n_students, seed=0)))
    s0 = np.flatnonzero(arr.run_names[arr.run] == "img/s0")
    assert len(s0) == len(GRID) + 1
    assert len(np.unique(cluster[s0])) == len(s0)


def test_a_double_click_leaves_one_cell_when_it_does_not_split_the_class() -> None:
    cells = run_consensus(frame(_double_click_rows(5, seed=1))).cells
    there = near(cells, *GRID[0], r=20)
    assert len(there) == 1 and there.iloc[0]["support"] == 5  # the duplicate click is dropped
    assert len(cells) == len(GRID)


@pytest.mark.parametrize("n_students", [5, 10])
def test_a_double_click_never_loses_the_cell(n_students: int) -> None:
    found = []
    for seed in range(10):
        cells = run_consensus(frame(_double_click_rows(n_students, seed))).cells
        found.append(near(cells, *GRID[0], r=20)["support"].tolist())
    assert all(len(f) == 1 for f in found), f"support of the cells found there, per seed: {found}"


def _one_cell_images(n_images: int) -> list[tuple]:
    """Sparse images: one cell each, two students one click each (nobody clicks two cells)."""
    return [row for i in range(n_images) for row in (
        (f"img{i}", "a", f"img{i}/a", 40.0 + 10 * i, 40.0, "alive"),
        (f"img{i}", "b", f"img{i}/b", 42.0 + 10 * i, 38.0, "alive"))]


@pytest.mark.parametrize("offset", [0.0, 0.5, 3.0])
def test_one_repeated_click_does_not_wipe_the_cells_of_other_images(offset: float) -> None:
    # a single double click used to be the only "spacing between cells" of the whole file: a
    # pooled spacing of 0 px shrank every image's merge radius to 1 px and no cell was kept
    rows = _one_cell_images(4)
    rows.append(("img0", "a", "img0/a", 40.0 + offset, 40.0, "alive"))
    result = run_consensus(frame(rows))
    assert sorted(result.cells["image"]) == ["img0", "img1", "img2", "img3"]
    assert set(result.cells["support"]) == {2}


def test_an_exact_repeat_is_one_cell_not_two() -> None:
    rows = class_rows(5, jitter=2.0, seed=3)
    first = next(r for r in rows if r[1] == "s0")
    rows.append(first)  # the same click again (seven in the real Cell Spotting export)
    result = run_consensus(frame(rows))
    assert len(result.cells) == len(GRID)
    assert not result.cells.duplicated(["x", "y"]).any()
    assert result.params["repeated_clicks_set_aside"] == 1


def _random_clicks(seed: int) -> pd.DataFrame:
    """Random images, 1-12 runs each, clicks around random cells with random jitter; integer
    pixel positions clipped to the frame (so exact duplicates and border clicks happen)."""
    rng = np.random.default_rng(seed)
    rows = []
    for img in range(int(rng.integers(1, 4))):
        cells = rng.uniform(0, 200, (int(rng.integers(1, 15)), 2))
        for r in range(int(rng.integers(1, 13))):
            k = int(rng.integers(0, len(cells) + 3))
            xy = cells[rng.integers(0, len(cells), k)] + rng.normal(0, rng.uniform(1, 15), (k, 2))
            for x, y in np.clip(np.round(xy), 0, 199):
                rows.append((f"i{img}", f"a{r}", f"i{img}/r{r}", x, y, "alive"))
    return frame(rows)


@pytest.mark.parametrize("cell_radius", [None, 60.0, 500.0], ids=["estimated", "hint-60", "hint-500"])
def test_no_cluster_ever_holds_two_clicks_of_one_run(cell_radius: float | None) -> None:
    """Property over 25 random click sets; a huge radius forces the conflict-splitting path."""
    checked = 0
    for seed in range(25):
        clicks = _random_clicks(seed)
        if len(clicks) < 2:
            continue
        arr, cluster = clusters_of(clicks, cell_radius)
        assert len(cluster) == len(clicks)
        pairs = pd.DataFrame({"cluster": cluster, "run": arr.run})
        assert not pairs.duplicated().any(), f"seed {seed}: a cluster holds two clicks of one run"
        assert (pd.Series(arr.image).groupby(cluster).nunique() == 1).all(), f"seed {seed}: cluster spans images"
        assert set(np.unique(cluster)) == set(range(cluster.max() + 1)), f"seed {seed}: ids not consecutive"
        checked += 1
    assert checked >= 20


# --------------------------------------------------------------------------- close cells


def test_two_cells_closer_than_the_merge_radius_stay_two_cells() -> None:
    """Students disagree by ~10 px on the isolated cells (so the merge radius is ~27 px), but
    mark two touching cells 7 px apart: the same-run constraint keeps them apart."""
    offsets = [(-6.0, 3.0), (5.0, -4.0), (2.0, 7.0), (-3.0, -6.0), (6.0, 5.0)]
    rows = []
    for s, (dx, dy) in enumerate(offsets):
        for x, y in GRID:
            rows.append(("img", f"s{s}", f"r{s}", x + dx, y + dy, "alive"))
        rows.append(("img", f"s{s}", f"r{s}", 400.0 + dx / 6, 300.0 + dy / 6, "alive"))
        rows.append(("img", f"s{s}", f"r{s}", 407.0 + dx / 6, 300.0 + dy / 6, "dead"))
    result = run_consensus(frame(rows))
    assert result.params["median_radius_px"] > 7.0  # the pair is inside the merge radius
    pair = near(result.cells, 403.5, 300.0, r=15).sort_values("x")
    assert len(pair) == 2
    assert pair["label"].tolist() == ["alive", "dead"]
    assert pair["support"].tolist() == [5, 5]
    np.testing.assert_allclose(pair["x"].to_numpy(float), [400.0, 407.0], atol=1.0)


@pytest.mark.parametrize("separation", [4.0, 8.0], ids=["4px-below-jitter", "8px-above-jitter"])
def test_two_cells_closer_than_the_click_jitter_are_two_cells(separation: float) -> None:
    """Random jitter 3 px per axis: two students' clicks on one cell are a median 5 px apart.
    Every student clicks both cells of a pair ``separation`` px apart, over ten seeds."""
    counts = []
    for seed in range(10):
        rows = class_rows(5, jitter=3.0, seed=seed)
        rng = np.random.default_rng(100 + seed)
        for s in range(5):
            for cx, label in ((400.0, "alive"), (400.0 + separation, "dead")):
                dx, dy = rng.normal(0.0, 3.0, 2)
                rows.append(("img", f"s{s}", f"img/s{s}", cx + dx, 300.0 + dy, label))
        counts.append(len(near(run_consensus(frame(rows)).cells, 400.0 + separation / 2, 300.0, r=20)))
    assert counts == [2] * 10, f"cells found at the pair, per seed: {counts}"


# --------------------------------------------------------------------------- spam


SPAM_BOX = (348.0, 254.0, 516.0, 389.0)  # bottom-right corner of the 524x391 frame (real spam)


@pytest.mark.parametrize("n_spammers", [1, 2])
def test_corner_spam_runs_are_not_cells_and_spammers_get_low_weight(n_spammers: int) -> None:
    rng = np.random.default_rng(n_spammers)
    rows = []
    for i in range(20):
        image = f"img{i:02d}"
        rows += class_rows(5 - n_spammers, image=image, jitter=3.0, seed=i)
        for s in range(5 - n_spammers, 5):
            x0, y0, x1, y1 = SPAM_BOX
            rows.append((image, f"s{s}", f"{image}/s{s}", rng.uniform(x0, x1), rng.uniform(y0, y1), "alive"))
    result = run_consensus(frame(rows))
    cells, annot = result.cells, result.annotators.set_index("annotator")
    in_corner = (cells["x"] >= SPAM_BOX[0] - 10) & (cells["y"] >= SPAM_BOX[1] - 10)
    assert not in_corner.any(), f"{int(in_corner.sum())} spam clicks became cells"
    assert len(cells) == 20 * len(GRID)
    assert (cells.groupby("image")["support"].min() == 5 - n_spammers).all()
    spammers = [f"s{s}" for s in range(5 - n_spammers, 5)]
    honest = [f"s{s}" for s in range(5 - n_spammers)]
    assert (annot.loc[spammers, "sensitivity"] < 0.2).all()
    assert (annot.loc[spammers, "weight"] < 0.2).all()
    assert (annot.loc[honest, "sensitivity"] > 0.8).all()
    assert annot.loc[spammers, "weight"].max() < annot.loc[honest, "weight"].min()
    assert (annot.loc[spammers, "n_clicks"] == 20).all()


# --------------------------------------------------------------------------- not sure


def test_not_sure_only_cell_exists_with_prior_p_alive_and_low_confidence() -> None:
    rows = class_rows(5, jitter=1.0)
    for s in range(5):  # every student marks (300, 300) and every one says not sure
        rows.append(("img", f"s{s}", f"img/s{s}", 300.0 + s, 300.0, "not_sure"))
    result = run_consensus(frame(rows))
    unsure = near(result.cells, 302.0, 300.0, r=10)
    assert len(unsure) == 1
    cell = unsure.iloc[0]
    assert cell["support"] == 5
    # not sure is an abstention, not a half vote: p_alive falls back to the label prior
    assert cell["p_alive"] == pytest.approx(result.params["prior_alive"], abs=0.02)
    agreeing = near(result.cells, *GRID[0], r=10).iloc[0]  # five "alive" votes
    assert agreeing["label"] == "alive"
    assert cell["confidence"] < agreeing["confidence"] - 0.1
    assert abs(cell["p_alive"] - 0.5) < abs(agreeing["p_alive"] - 0.5)


# --------------------------------------------------------------------------- border

BORDER_CASES = {
    # name: the three students' clicks on one cell (distinct positions)
    "top-left-corner": [(0.0, 0.0), (1.0, 0.0), (0.0, 2.0)],
    "left-edge": [(0.0, 150.0), (2.0, 151.0), (0.0, 148.0)],
    "top-edge": [(250.0, 0.0), (251.0, 1.0), (248.0, 0.0)],
    "bottom-right-corner": [(523.0, 390.0), (521.0, 390.0), (523.0, 388.0)],
}


@pytest.mark.parametrize("positions", BORDER_CASES.values(), ids=BORDER_CASES.keys())
def test_clicks_at_the_image_border(positions: list[tuple[float, float]]) -> None:
    rows = class_rows(3, jitter=2.0)
    rows += [("img", f"s{s}", f"img/s{s}", x, y, "dead") for s, (x, y) in enumerate(positions)]
    cells = run_consensus(frame(rows)).cells
    cx, cy = np.mean(positions, axis=0)
    there = near(cells, cx, cy, r=5)
    assert len(there) == 1
    assert there.iloc[0]["support"] == 3 and there.iloc[0]["label"] == "dead"
    assert there.iloc[0]["x"] >= 0 and there.iloc[0]["y"] >= 0
    assert len(cells) == len(GRID) + 1


IDENTICAL_CASES = {
    # name: the one pixel every student clicked for one cell
    "interior": (100.0, 100.0),
    "clipped-to-corner": (0.0, 0.0),
}


@pytest.mark.parametrize("xy", IDENTICAL_CASES.values(), ids=IDENTICAL_CASES.keys())
def test_identical_clicks_of_different_runs_make_one_full_support_cell(xy: tuple[float, float]) -> None:
    rows = class_rows(3, jitter=2.0)
    rows += [("img", f"s{s}", f"img/s{s}", xy[0], xy[1], "alive") for s in range(3)]
    cells = run_consensus(frame(rows)).cells
    there = near(cells, *xy, r=3)
    assert len(there) == 1
    assert there.iloc[0]["support"] == 3


# --------------------------------------------------------------------------- determinism


def _sorted_cells(cells: pd.DataFrame) -> pd.DataFrame:
    return cells.sort_values(["image", "x", "y"]).reset_index(drop=True)


def _mixed_clicks() -> pd.DataFrame:
    rows = []
    for i in range(4):
        rows += class_rows(4, image=f"img{i}", jitter=4.0, seed=i)
        rows.append((f"img{i}", "s0", f"img{i}/s0", 450.0, 40.0 + 10 * i, "dead"))  # a stray
        rows.append((f"img{i}", "s3", f"img{i}/s3", 500.0, 380.0, "alive"))         # spam-like
    return frame(rows)


def test_same_input_twice_gives_identical_output() -> None:
    clicks = _mixed_clicks()
    a, b = run_consensus(clicks), run_consensus(clicks.copy())
    pd.testing.assert_frame_equal(a.cells, b.cells)
    pd.testing.assert_frame_equal(a.annotators, b.annotators)
    assert a.params == b.params


@pytest.mark.parametrize("shuffle_seed", [1, 2, 3])
def test_row_order_does_not_change_the_cells(shuffle_seed: int) -> None:
    clicks = _mixed_clicks()
    a = run_consensus(clicks)
    b = run_consensus(clicks.sample(frac=1.0, random_state=shuffle_seed).reset_index(drop=True))
    pd.testing.assert_frame_equal(_sorted_cells(a.cells), _sorted_cells(b.cells), check_exact=False, atol=1e-9)
    pd.testing.assert_frame_equal(a.annotators.sort_values("annotator").reset_index(drop=True),
                                  b.annotators.sort_values("annotator").reset_index(drop=True),
                                  check_exact=False, atol=1e-9)


# --------------------------------------------------------------------------- adaptivity


@pytest.mark.parametrize(
    ("n_students", "stray_kept"),
    [(1, True), (3, False), (10, False)],
)
def test_a_lone_stray_click_is_kept_only_when_nobody_else_saw_the_image(n_students: int, stray_kept: bool) -> None:
    rows = class_rows(n_students, jitter=3.0, seed=n_students)
    rows.append(("img", "s0", "img/s0", 450.0, 330.0, "alive"))
    cells = run_consensus(frame(rows)).cells
    assert (len(near(cells, 450.0, 330.0, r=5)) == 1) is stray_kept
    for x, y in GRID:  # the real cells are kept whatever the class size
        there = near(cells, x, y, r=10)
        assert len(there) == 1 and there.iloc[0]["support"] == n_students
    assert (cells["n_runs"] == n_students).all()


# --------------------------------------------------------------------------- cell radius hint


@pytest.mark.parametrize(
    ("cell_radius", "max_support"),
    [(None, 3), (5.0, 1), (30.0, 3)],
    ids=["estimated", "hint-below-offset", "hint-above-offset"],
)
def test_cell_radius_hint_is_honoured(cell_radius: float | None, max_support: int) -> None:
    """Three students, each 10 px right of the previous one on every cell."""
    rows = [("img", f"s{s}", f"r{s}", x + 10.0 * s, y, "alive") for s in range(3) for x, y in GRID]
    clicks = frame(rows)
    result = run_consensus(clicks, cell_radius=cell_radius)
    assert result.params["cell_radius_hint"] == cell_radius
    if cell_radius is not None:
        assert result.params["median_radius_px"] == pytest.approx(cell_radius)
    arr, cluster = clusters_of(clicks, cell_radius)
    assert np.bincount(cluster).max() == max_support
    if max_support == 3:
        assert len(result.cells) == len(GRID) and (result.cells["support"] == 3).all()
    else:
        assert (result.cells["support"] <= max_support).all()


# --------------------------------------------------------------------------- gold


def _flipper_class(n_images: int = 10) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two students: s0 always right, s1 always flips alive/dead. Gold on the first 3 images."""
    rows, gold = [], []
    for i in range(n_images):
        image = f"img{i:02d}"
        rows += class_rows(1, image=image, seed=i)
        rows += class_rows(1, image=image, labels=[FLIP[l] for l in GRID_LABELS], seed=50 + i, first_student=1)
        if i < 3:
            gold += [(image, x, y, lab) for (x, y), lab in zip(GRID, GRID_LABELS)]
    return frame(rows), pd.DataFrame(gold, columns=["image", "x", "y", "label"])


def test_without_gold_a_right_and_a_wrong_student_cannot_be_told_apart() -> None:
    clicks, _ = _flipper_class()
    result = run_consensus(clicks)
    np.testing.assert_allclose(result.cells["p_alive"], 0.5, atol=0.05)
    weight = result.annotators.set_index("annotator")["weight"]
    assert weight["s0"] == pytest.approx(weight["s1"])


def _gold_subset(gold: pd.DataFrame, n_images: int) -> pd.DataFrame:
    return gold[gold["image"].isin([f"img{i:02d}" for i in range(n_images)])]


@pytest.mark.parametrize("gold_images", [3, 1], ids=["gold-on-3-images", "gold-on-1-image"])
def test_gold_cells_fix_the_labels_on_every_image(gold_images: int) -> None:
    clicks, gold = _flipper_class()
    gold = _gold_subset(gold, gold_images)
    cells = _sorted_cells(run_consensus(clicks, gold=gold).cells)
    assert len(cells) == 10 * len(GRID)
    truth = dict(zip(GRID, GRID_LABELS))
    expected = [truth[min(GRID, key=lambda g: np.hypot(g[0] - x, g[1] - y))]
                for x, y in zip(cells["x"], cells["y"])]
    assert cells["label"].tolist() == expected  # on every image, not only the gold ones
    on_gold = cells[cells["image"].isin(gold["image"])]
    assert (on_gold["p_cell"] == 1.0).all() and on_gold["p_alive"].isin([0.0, 1.0]).all()


@pytest.mark.parametrize("gold_images", [3, 1], ids=["gold-on-3-images", "gold-on-1-image"])
def test_gold_cells_reveal_a_consistently_wrong_student(gold_images: int) -> None:
    clicks, gold = _flipper_class()
    result = run_consensus(clicks, gold=_gold_subset(gold, gold_images))
    annot = result.annotators.set_index("annotator")
    accuracy = ["accuracy_alive", "accuracy_dead"]
    assert annot.loc["s1", accuracy].max() < 0.2, annot
    assert annot.loc["s0", accuracy].min() > 0.8, annot
    assert annot.loc["s1", "weight"] < 0.1 < annot.loc["s0", "weight"]


def test_gold_overrides_a_cell_the_whole_crowd_mislabels() -> None:
    rows = []
    for i in range(3):
        image = f"img{i}"
        labels = list(GRID_LABELS)
        if i == 0:
            labels[0] = "dead"  # everybody calls the first cell of img0 dead; the expert says alive
        rows += class_rows(3, image=image, labels=labels, seed=i)
    gold = pd.DataFrame([("img0", x, y, lab) for (x, y), lab in zip(GRID, GRID_LABELS)],
                        columns=["image", "x", "y", "label"])
    plain = near(run_consensus(frame(rows)).cells, *GRID[0], r=10, image="img0").iloc[0]
    anchored = near(run_consensus(frame(rows), gold=gold).cells, *GRID[0], r=10, image="img0").iloc[0]
    assert plain["label"] == "dead"
    assert anchored["label"] == "alive" and anchored["p_alive"] == 1.0


# --------------------------------------------------------------------------- zero-click runs


@pytest.mark.parametrize(
    ("n_empty_runs", "kept"),
    [(None, True), (0, True), (5, False)],
    ids=["no-runs-table", "1-of-1-runs", "1-of-6-runs"],
)
def test_zero_click_runs_lower_the_support_fraction(n_empty_runs: int | None, kept: bool) -> None:
    clicks = frame([("img", "s0", "r0", x, y, lab) for (x, y), lab in zip(GRID, GRID_LABELS)])
    runs = None
    if n_empty_runs is not None:
        runs = pd.DataFrame([("img", "r0", "s0")] + [("img", f"e{k}", f"t{k}") for k in range(n_empty_runs)],
                            columns=["image", "task_run", "annotator"])
    result = run_consensus(clicks, runs=runs)
    if kept:
        assert len(result.cells) == len(GRID)
        assert (result.cells["n_runs"] == 1).all() and (result.cells["support"] == 1).all()
    else:
        assert result.cells.empty  # five of six runs saw the image and marked none of it
    n_runs = 1 + (n_empty_runs or 0)
    annot = result.annotators.set_index("annotator")
    assert annot["n_runs"].sum() == n_runs
    if n_empty_runs:
        assert (annot.loc[[f"t{k}" for k in range(n_empty_runs)], "n_clicks"] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) on the image left without runs
def test_task_run_ids_reused_across_images_do_not_move_clicks() -> None:
    from cellspot.consensus.types import ConsensusInputError

    rows = [("a", "s1", "1", 10.0, 10.0, "alive"), ("a", "s2", "2", 11.0, 10.0, "alive"),
            ("b", "s1", "1", 300.0, 300.0, "dead"), ("b", "s2", "2", 301.0, 300.0, "dead")]
    try:
        cells = run_consensus(frame(rows)).cells
    except ConsensusInputError:
        return  # refusing the table is acceptable too
    assert sorted(cells["image"]) == ["a", "b"]


# --------------------------------------------------------------------------- quality smoke test


@pytest.mark.parametrize("seed", [0, 2])
def test_quality_on_a_simulated_class_beats_the_baselines(seed: int) -> None:
    from cellspot.evaluation import point_metrics
    from cellspot.simulate import class_runs, get_profile, simulate_crowd
    from cellspot.truth import load_generated

    truth = load_generated(n_images=30, seed=0)
    sim = simulate_crowd(truth.cells, truth.images, class_runs(truth.images, 5), get_profile("realistic"),
                         np.random.default_rng(seed))
    oracle_radius = 0.5 * float(truth.cells["diameter"].median())
    scores = {
        "cluster_em": point_metrics(truth.cells, run_consensus(sim.clicks, runs=sim.runs).cells),
        "seed_r35": point_metrics(truth.cells, run_consensus(sim.clicks, "seed_r35").cells),
        "dbscan_vote": point_metrics(
            truth.cells, run_consensus(sim.clicks, "dbscan_vote", cell_radius=oracle_radius).cells),
    }
    ours = scores["cluster_em"]
    assert ours["f1"] >= 0.9, scores
    assert ours["label_accuracy"] >= 0.97, scores
    for name in ("seed_r35", "dbscan_vote"):
        assert ours["f1"] > scores[name]["f1"], f"cluster_em F1 {ours['f1']:.3f} <= {name} {scores[name]['f1']:.3f}"
