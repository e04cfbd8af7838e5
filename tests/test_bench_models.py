"""The pure helpers of bench/models.py: the training-seed spread and the command line."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def bm(bench_script):
    """bench/models.py, loaded by path."""
    return bench_script("models")


LABEL = np.array([1, 1, 1, 1, 0, 0])


def test_seed_spread_counts_shared_and_single_seed_errors(bm):
    # seed 0 gets cells 0 and 4 wrong, seed 1 cells 0 and 1: cell 0 is wrong in both
    p0 = np.array([0.2, 0.9, 0.8, 0.9, 0.7, 0.1])
    p1 = np.array([0.3, 0.4, 0.8, 0.9, 0.2, 0.1])
    out = bm.seed_spread(LABEL, [p0, p1], "accuracy")
    assert out["per_seed"] == pytest.approx([4 / 6, 4 / 6])
    assert out["errors_per_seed"] == [2, 2]
    assert (out["wrong_in_all"], out["wrong_in_any"]) == (1, 3)
    assert out["mean"] == pytest.approx(4 / 6) and out["sd"] == pytest.approx(0.0)
    # the mean logit puts cell 1 at 0.65 / 0.4 -> alive, cell 4 at 0.7 / 0.2 -> dead: only cell 0 stays wrong
    assert out["ensemble"] == pytest.approx(5 / 6)
    assert out["n"] == 6


def test_seed_spread_of_one_seed_and_balanced_accuracy(bm):
    p = np.array([0.9, 0.9, 0.9, 0.1, 0.1, 0.1])  # one alive cell called dead
    out = bm.seed_spread(LABEL, [p], "balanced_accuracy")
    assert out["per_seed"] == pytest.approx([0.5 * (3 / 4 + 1.0)])
    assert out["ensemble"] == pytest.approx(out["mean"])
    assert out["sd"] == 0.0 and out["wrong_in_all"] == out["wrong_in_any"] == 1


def test_seed_spread_rejects_bad_input(bm):
    with pytest.raises(ValueError, match="at least one"):
        bm.seed_spread(LABEL, [], "accuracy")
    with pytest.raises(ValueError, match="5 predictions per seed for 6 labels"):
        bm.seed_spread(LABEL, [np.full(5, 0.5)], "accuracy")


def test_seeds_step_is_opt_in(bm):
    assert "seeds" not in bm.parse_args([]).only
    args = bm.parse_args(["--only", "seeds", "--seeds", "2"])
    assert args.only == ["seeds"] and args.seeds == 2


@pytest.mark.parametrize("argv, message", [(["--only", "seed"], "unknown step"),
                                           (["--only", "seeds", "--seeds", "0"], "at least 1")])
def test_bad_arguments_say_what_is_wrong(bm, capsys, argv, message):
    with pytest.raises(SystemExit):
        bm.parse_args(argv)
    assert message in capsys.readouterr().err
