"""The pure parts of the active-learning benchmark: the click bank, candidates, batch choice,
learning-curve summaries (cellspot.active.simulation) and the helpers of bench/active_learning.py."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from cellspot.active import build_signals
from cellspot.active.simulation import (
    ClickBank,
    SimulationError,
    build_click_bank,
    candidates,
    choose_batch,
    compare_strategies,
    mean_curves,
    runs_to_stay,
    runs_to_target,
)


def assert_nan_or_approx(got: float, expected: float) -> None:
    """``got`` is NaN where ``expected`` is, else approximately equal."""
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


@pytest.fixture(scope="module")
def al(bench_script):
    """bench/active_learning.py, loaded by path."""
    return bench_script("active_learning")


def truth(n_images: int = 4, n_cells: int = 5) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    names = [f"im{i}" for i in range(n_images)]
    cells = pd.DataFrame({
        "image": np.repeat(names, n_cells), "x": rng.uniform(20, 180, n_images * n_cells),
        "y": rng.uniform(20, 180, n_images * n_cells), "label": np.where(rng.random(n_images * n_cells) < 0.3,
                                                                         "dead", "alive"),
        "diameter": 20.0})
    images = pd.DataFrame({"image": names, "width": 200, "height": 200})
    return cells, images


@pytest.fixture(scope="module")
def bank() -> ClickBank:
    cells, images = truth()
    return build_click_bank(cells, images, depth=6, n_students=8, profile="realistic",
                            rng=np.random.default_rng(1))


# --------------------------------------------------------------------------- runs_to_target


@pytest.mark.parametrize("x, y, target, expected", [
    ([10, 20, 30], [0.5, 0.8, 0.9], 0.7, 10 + (0.7 - 0.5) / 0.3 * 10),  # interpolated
    ([10, 20, 30], [0.96, 0.97, 0.99], 0.95, 10.0),  # reached at the seed
    ([10, 20, 30], [0.5, 0.6, 0.7], 0.95, math.nan),  # never
    ([10, 20, 30], [0.5, math.nan, 1.0], 0.75, 20.0),  # NaN point skipped: 10 -> 30 halfway
    ([10, 20, 30], [0.5, 0.95, 0.9], 0.95, 20.0),  # exactly at a point, dips after
])
def test_runs_to_target(x, y, target, expected) -> None:
    assert_nan_or_approx(runs_to_target(x, y, target), expected)


@pytest.mark.parametrize("x, y", [([10, 10, 20], [0.1, 0.2, 0.3]), ([10, 20], [0.1])])
def test_runs_to_target_rejects_bad_curves(x, y) -> None:
    with pytest.raises(SimulationError):
        runs_to_target(x, y, 0.5)
    with pytest.raises(SimulationError):
        runs_to_stay(x, y, 0.5)


@pytest.mark.parametrize("x, y, target, expected", [
    ([10, 20, 30], [0.5, 0.8, 0.9], 0.7, 10 + (0.7 - 0.5) / 0.3 * 10),  # one crossing: as runs_to_target
    ([10, 20, 30, 40], [0.5, 0.96, 0.8, 1.0], 0.95, 30 + (0.95 - 0.8) / 0.2 * 10),  # a lucky round does not count
    ([10, 20, 30], [0.96, 0.97, 0.99], 0.95, 10.0),  # above from the seed on
    ([10, 20, 30], [0.5, 0.96, 0.9], 0.95, math.nan),  # falls back below at the end
    ([10, 20, 30], [0.5, math.nan, 1.0], 0.75, 20.0),  # NaN point skipped
])
def test_runs_to_stay(x, y, target, expected) -> None:
    got = runs_to_stay(x, y, target)
    assert_nan_or_approx(got, expected)
    first = runs_to_target(x, y, target)
    assert math.isnan(got) or got >= first  # never earlier than the first crossing


# --------------------------------------------------------------------------- curves and verdict


def curve_rows(strategy: str, metrics_by_seed: dict[int, list[float]], budgets=(30, 60, 90, 120)) -> list[dict]:
    return [{"dataset": "ldc", "strategy": strategy, "seed": s, "round": r, "task_runs": budgets[r], "metric": m}
            for s, ms in metrics_by_seed.items() for r, m in enumerate(ms)]


def test_mean_curves_average_relative_to_each_seed() -> None:
    curves = pd.DataFrame(curve_rows("random", {0: [0.4, 0.8], 1: [0.9, 0.9]}))
    refs = pd.DataFrame({"dataset": ["ldc", "ldc"], "seed": [0, 1], "metric": [0.8, 0.9]})
    mean = mean_curves(curves, refs)
    assert mean["relative"].tolist() == pytest.approx([(0.5 + 1.0) / 2, 1.0])
    assert mean["metric"].tolist() == pytest.approx([0.65, 0.85])
    assert mean["n_seeds"].tolist() == [2, 2]
    with pytest.raises(SimulationError, match="reference"):
        mean_curves(curves, refs.iloc[:1])


@pytest.mark.parametrize("random_curve, combined_curve, ratio, bound, met", [
    # both reach 0.95 (ref 1.0): random at 120, combined at 60 -> 0.5 <= 0.6
    ([0.5, 0.7, 0.9, 0.95], [0.8, 0.95, 0.97, 0.98], 0.5, math.nan, True),
    # combined at 90 of random's 120 -> 0.75: not met
    ([0.5, 0.7, 0.9, 0.95], [0.5, 0.8, 0.95, 0.96], 0.75, math.nan, False),
    # random never: only a bound, 60 / 120
    ([0.5, 0.6, 0.7, 0.8], [0.8, 0.95, 0.97, 0.98], math.nan, 0.5, True),
    # combined never: no verdict
    ([0.5, 0.7, 0.9, 0.95], [0.5, 0.6, 0.7, 0.8], math.nan, math.nan, None),
])
def test_compare_strategies_ratio_bound_and_verdict(random_curve, combined_curve, ratio, bound, met) -> None:
    curves = pd.DataFrame(curve_rows("random", {0: random_curve}) + curve_rows("combined", {0: combined_curve}))
    refs = pd.DataFrame({"dataset": ["ldc"], "seed": [0], "metric": [1.0]})
    table = compare_strategies(mean_curves(curves, refs), quantile=0.95, max_ratio=0.6).set_index("strategy")
    row = table.loc["combined"]
    for got, want in ((row["ratio_to_random"], ratio), (row["ratio_bound"], bound)):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)
    assert row["target_met"] is met
    assert row["censored"] == (not math.isnan(bound))
    assert table.loc["random", "target_met"] is None


def test_compare_strategies_robust_summaries() -> None:
    # random dips after a lucky round 2; combined rises steadily
    random_curve, combined_curve = [0.5, 0.96, 0.8, 0.97], [0.5, 0.9, 0.95, 0.97]
    curves = pd.DataFrame(curve_rows("random", {0: random_curve}) + curve_rows("combined", {0: combined_curve}))
    refs = pd.DataFrame({"dataset": ["ldc"], "seed": [0], "metric": [1.0]})
    table = compare_strategies(mean_curves(curves, refs), quantile=0.95, max_ratio=0.6).set_index("strategy")
    assert table.loc["random", "runs_to_target"] == pytest.approx(30 + 0.45 / 0.46 * 30)  # the lucky round
    assert table.loc["random", "runs_to_stay"] == pytest.approx(90 + 0.15 / 0.17 * 30)
    assert table.loc["combined", "runs_to_stay"] == pytest.approx(90.0)
    assert table.loc["combined", "stay_ratio_to_random"] == pytest.approx(90.0 / (90 + 0.15 / 0.17 * 30))
    assert math.isnan(table.loc["random", "stay_ratio_to_random"])
    assert table.loc["random", "mean_relative"] == pytest.approx((0.96 + 0.8 + 0.97) / 3)  # the seed left out
    assert table.loc["combined", "mean_relative"] == pytest.approx((0.9 + 0.95 + 0.97) / 3)


def test_verdict_needs_every_dataset(al) -> None:
    compare = pd.DataFrame({"dataset": ["ldc", "dsb"], "strategy": ["combined", "combined"],
                            "target_met": [True, False]})
    assert al.verdict(compare, ["ldc", "dsb"], 0.6)["met"] is False
    assert al.verdict(compare, ["ldc"], 0.6)["met"] is True
    assert al.verdict(compare.iloc[:0], ["ldc"], 0.6)["met"] is False


def test_summarise_drops_seeds_without_reference(al) -> None:
    records = curve_rows("random", {0: [0.5, 0.9, 0.95, 0.96], 1: [0.1, 0.1, 0.1, 0.1]})
    references = [{"dataset": "ldc", "seed": 0, "metric": 1.0}, {"dataset": "ldc", "seed": 1, "metric": None}]
    curves, mean, compare = al.summarise(records, references, 0.95, 0.6)
    assert set(curves["seed"]) == {0}
    assert mean["relative"].tolist() == pytest.approx([0.5, 0.9, 0.95, 0.96])
    assert compare.loc[0, "runs_to_target"] == pytest.approx(90.0)


# --------------------------------------------------------------------------- click bank


def test_click_bank_reveals_prefixes_by_distinct_students(bank: ClickBank) -> None:
    assert bank.depth == 6 and len(bank.runs) == 4 * 6 and bank.runs["task_run"].is_unique
    assert (bank.runs.groupby("image")["annotator"].nunique() == 6).all()
    two, clicks2 = bank.reveal({"im0": 2, "im1": 3})
    three, clicks3 = bank.reveal({"im0": 3, "im1": 3, "im2": 0})
    assert two.groupby("image").size().to_dict() == {"im0": 2, "im1": 3}
    assert three.groupby("image").size().to_dict() == {"im0": 3, "im1": 3}
    assert set(two["task_run"]) < set(three["task_run"])  # the first runs stay the same
    assert set(clicks2["task_run"]) <= set(two["task_run"])
    assert set(clicks3["task_run"]) <= set(three["task_run"]) and len(clicks3) >= len(clicks2)
    same = clicks3[clicks3["task_run"].isin(set(two["task_run"]))].reset_index(drop=True)
    pd.testing.assert_frame_equal(same, clicks2.reset_index(drop=True))


@pytest.mark.parametrize("counts, match", [({"im0": 7}, "0..6"), ({"im0": -1}, "0..6"), ({"nope": 1}, "not in")])
def test_click_bank_rejects_bad_counts(bank: ClickBank, counts, match) -> None:
    with pytest.raises(SimulationError, match=match):
        bank.reveal(counts)


def test_click_bank_needs_enough_students() -> None:
    cells, images = truth(1)
    with pytest.raises(SimulationError, match="distinct students"):
        build_click_bank(cells, images, depth=5, n_students=3, profile="realistic", rng=np.random.default_rng(0))


# --------------------------------------------------------------------------- candidates and batches


@pytest.mark.parametrize("n_runs, kwargs, expected", [
    ({"a": 0, "b": 3, "c": 9}, dict(k=3, depth=10), ["a", "b"]),  # c: 9 + 3 > 10
    ({"a": 0, "b": 3, "c": 0}, dict(k=3, depth=10, retired={"b"}), ["a", "c"]),
    ({"a": 0, "b": 3, "c": 0}, dict(k=3, depth=10, unlabelled_only=True), ["a", "c"]),
    ({"a": 3, "b": 6}, dict(k=3, depth=10, unlabelled_only=True), ["a", "b"]),  # none unlabelled: fall back
    ({"a": 3, "b": 6}, dict(k=3, depth=10, retired={"a", "b"}), []),
])
def test_candidates(n_runs, kwargs, expected) -> None:
    assert candidates(n_runs, **kwargs) == expected


def test_candidates_need_positive_k() -> None:
    with pytest.raises(SimulationError):
        candidates({"a": 0}, k=0, depth=3)


def crowd_signals() -> pd.DataFrame:
    """Pool of 4: 'sure' (confident crowd), 'split' (split votes), 'u1', 'u2' unlabelled."""
    crowd = pd.DataFrame({"image": ["sure", "split"], "x": [5.0, 5.0], "y": [5.0, 5.0], "p_alive": [0.99, 0.5],
                          "confidence": [0.99, 0.5], "support": [3, 2], "n_runs": [3, 3], "p_cell": [1.0, 0.6]})
    images = pd.DataFrame({"image": ["sure", "split", "u1", "u2"], "n_runs": [3, 3, 0, 0]})
    return build_signals(images, crowd, None, radius=5.0)


def test_choose_batch_crowd_prefers_disagreement_and_respects_allowed() -> None:
    signals = crowd_signals()
    batch = choose_batch("crowd", signals, ["sure", "split", "u1"], 2)
    assert batch["image"].tolist()[0] == "split"
    assert set(batch["image"]) <= {"sure", "split", "u1"} and len(batch) == 2
    assert choose_batch("crowd", signals, [], 2).empty


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_batch_random_stays_within_allowed(seed) -> None:
    batch = choose_batch("random", crowd_signals(), ["u1", "u2"], 5, seed=seed)
    assert sorted(batch["image"]) == ["u1", "u2"]
    assert batch["batch_rank"].tolist() == [1, 2]


# --------------------------------------------------------------------------- bench helpers


def test_cells_by_image_uses_confidence_as_weight(al) -> None:
    cells = pd.DataFrame({"image": ["a", "a"], "x": [1.0, 2.0], "y": [3.0, 4.0], "label": ["alive", "dead"],
                          "p_alive": [0.9, 0.2], "confidence": [0.8, 0.6]})
    out = al.cells_by_image(cells, ["a", "b"])
    assert out["a"]["weight"].tolist() == [0.8, 0.6] and out["a"]["label"].tolist() == ["alive", "dead"]
    assert out["a"]["diameter"].isna().all()
    assert out["b"].empty and list(out["b"].columns) == list(out["a"].columns)


@pytest.mark.parametrize("n_crops, batch, steps, expected", [
    (34, 64, 48, 24),  # one step an epoch: capped at 24 epochs
    (100, 64, 48, 24),  # 2 steps an epoch
    (385, 64, 48, 7),  # 7 steps an epoch -> 49 steps
    (1100, 64, 48, 3),  # 18 steps an epoch: at least 3 epochs
    (0, 64, 48, 24),
])
def test_classifier_epochs_keep_the_step_budget(al, n_crops, batch, steps, expected) -> None:
    assert al.classifier_epochs(n_crops, batch, steps) == expected


def test_detector_config_negates_dark_nuclei_on_dsb_only(al) -> None:
    args = al.parse_args([])
    configs = {name: al.detector_config(SimpleNamespace(ds=SimpleNamespace(name=name), radius=7.0, seed=1), args)
               for name in ("ldc", "dsb")}
    assert (configs["ldc"].polarity, configs["dsb"].polarity) == ("keep", "auto")
    assert all(c.target == "disk" and c.radius == 7.0 and not c.tta for c in configs.values())
    # the per-dataset detector budget: DSB2018 6 epochs per round, LDC's positions detector 2 x 3
    assert (configs["ldc"].epochs, configs["dsb"].epochs) == (3, 6)
    positions = al.detector_config(SimpleNamespace(ds=SimpleNamespace(name="ldc"), radius=7.0, seed=1), args, scale=2)
    assert positions.epochs == positions.patience == 6


def test_n_labelled_cells_counts_trainable_cells(al) -> None:
    cells = {"a": pd.DataFrame({"label": ["alive", "dead", "unknown"], "p_alive": [0.9, 0.1, np.nan],
                                "weight": [0.8, 0.0, 1.0]}),
             "b": pd.DataFrame({"label": ["dead"], "p_alive": [0.2], "weight": [0.5]})}
    assert al.n_labelled_cells(cells) == 2


def test_retired_images_follow_the_default_policy(al) -> None:
    # settled: 3 runs, one sure cell, every run clicked once; unsure: a split cell; full: max runs
    cells = pd.DataFrame({"image": ["settled", "unsure", "full"], "confidence": [0.99, 0.55, 0.5],
                          "p_cell": [1.0, 1.0, 0.6]})
    runs = pd.DataFrame({"image": ["settled"] * 3 + ["unsure"] * 3 + ["full"] * 6,
                         "task_run": [str(i) for i in range(12)]})
    clicks = pd.DataFrame({"task_run": [str(i) for i in range(12)]})
    assert al.retired_images(cells, runs, clicks, ["settled", "unsure", "full"], max_runs=6) == {"settled", "full"}
    assert al.retired_images(cells, runs, clicks, [], max_runs=6) == set()


@pytest.mark.parametrize("argv, check", [
    (["--quick"], lambda a: a.seeds == [0] and a.plans["ldc"]["rounds"] == 2 and a.plans["dsb"]["batch"] == 2
     and a.ldc_positions == "truth" and a.trainings == 1),
    ([], lambda a: a.seeds == [0, 1, 2] and a.strategies == ["random", "random@1", "crowd", "model", "combined"]
     and a.ldc_positions == "detector" and a.det_minutes is None and a.adaptive_runs == 1 and a.trainings == 2),
    (["--trainings", "3"], lambda a: a.trainings == 3),
    (["--datasets", "dsb", "--batch", "5", "--rounds", "0", "--seeds", "2"],
     lambda a: list(a.plans) == ["dsb"] and a.plans["dsb"] == {"seed_images": 3, "batch": 5, "rounds": 0,
                                                               "det_epochs": 6}
     and a.seeds == [0, 1]),
    (["--det-epochs", "4"], lambda a: a.plans["dsb"]["det_epochs"] == 4 and a.plans["ldc"]["det_epochs"] == 4),
])
def test_parse_args(al, argv, check) -> None:
    assert check(al.parse_args(argv))


@pytest.mark.parametrize("argv", [["--strategies", "random,nope"], ["--datasets", "bccd"],
                                  ["--strategies", "bald"], ["--runs-per-image", "11"],
                                  ["--strategies", "random,combined@0"], ["--strategies", "random,combined@x"],
                                  ["--strategies", "combined,crowd"], ["--adaptive-runs", "0"],
                                  ["--trainings", "0"]])
def test_parse_args_rejects(al, argv) -> None:
    with pytest.raises(SystemExit):
        al.parse_args(argv)


@pytest.mark.parametrize("arm, expected", [
    ("random", ("random", 3)), ("random@1", ("random", 1)), ("combined", ("combined", 1)),
    ("combined@2", ("combined", 2)), ("model", ("model", 1)),
])
def test_parse_arm_runs_per_image(al, arm, expected) -> None:
    assert al.parse_arm(arm, al.parse_args([])) == expected


@pytest.mark.parametrize("k, expected", [(3, 8), (1, 24), (2, 12), (5, 4), (24, 1)])
def test_round_batch_spends_equal_runs_per_round(al, k, expected) -> None:
    args = al.parse_args([])
    batch = al.round_batch({"batch": 8}, args, k)
    assert batch == expected
    assert batch * k <= 8 * args.runs_per_image


def test_simulation_module_is_pure() -> None:
    script = ("import json, sys; import cellspot.active.simulation; "
              "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sqlalchemy'))))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_mean_metrics_average_finite_values_per_key(al) -> None:
    out = al.mean_metrics([{"f1": 0.6, "recall": 0.5}, {"f1": 0.8, "recall": float("nan")},
                           {"f1": float("nan"), "precision": 0.9}])
    assert out["f1"] == pytest.approx(0.7)
    assert out["recall"] == pytest.approx(0.5)
    assert out["precision"] == pytest.approx(0.9)
    assert math.isnan(al.mean_metrics([{"f1": float("nan")}])["f1"])


def test_training_seeds_differ_and_the_first_is_the_setups(al) -> None:
    setup = SimpleNamespace(seed=2)
    seeds = [al.training_seed(setup, t) for t in range(3)]
    assert seeds[0] == 2 and len(set(seeds)) == 3


def test_configs_take_the_training_seed(al) -> None:
    args = al.parse_args([])
    setup = SimpleNamespace(seed=1, radius=6.0, ds=SimpleNamespace(name="dsb"))
    assert al.detector_config(setup, args).seed == 1
    assert al.detector_config(setup, args, seed=1001).seed == 1001
    assert al.classifier_config(setup, args, 200).seed == 1
    assert al.classifier_config(setup, args, 200, seed=2001).seed == 2001


def test_report_only_summarises_a_saved_run_again(al, tmp_path) -> None:
    records = (curve_rows("random", {0: [0.5, 0.96, 0.8, 0.97]}) + curve_rows("combined", {0: [0.5, 0.9, 0.95, 0.97]}))
    saved = {"params": {**{k: (str(v) if hasattr(v, "is_dir") else v) for k, v in vars(al.parse_args([])).items()},
                        "datasets": ["ldc"], "strategies": ["random", "combined"], "seeds": [0], "trainings": 2},
             "plans": {"ldc": {"seed_images": 10, "batch": 8, "rounds": 3}},
             "setups": [{"dataset": "ldc", "seed": 0}], "records": records,
             "references": [{"dataset": "ldc", "seed": 0, "metric": 1.0, "task_runs": 846, "seconds": 1.0}],
             "environment": {"seconds": 60.0}}
    path = tmp_path / "run" / "active_learning.json"
    path.parent.mkdir()
    path.write_text(json.dumps(saved))
    assert al.main(["--report-only", str(path), "--out", str(tmp_path / "again"), "--quantile", "0.9"]) == 0
    md = (tmp_path / "again" / "active_learning.md").read_text()
    assert "Task runs to reach 90% of the reference" in md
    assert "2 training(s) per round" in md
    again = json.loads((tmp_path / "again" / "active_learning.json").read_text())
    rows = {r["strategy"]: r for r in again["comparison"]}
    assert rows["combined"]["runs_to_target"] == pytest.approx(60.0)  # 0.9 reached at round 1
    assert rows["random"]["runs_to_target"] == pytest.approx(30 + 0.4 / 0.46 * 30)
    assert path.read_text() == json.dumps(saved)  # the saved run is not touched


def test_report_only_names_a_bad_file(al, tmp_path) -> None:
    bad = tmp_path / "active_learning.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="not a readable active_learning.json"):
        al.main(["--report-only", str(bad), "--out", str(tmp_path / "o")])
