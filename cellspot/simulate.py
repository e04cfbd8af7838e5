"""Crowd simulator: a class of students clicking on cells whose truth is known.

Pure module (numpy, scipy, pandas; no torch, no database). Used by the demo, the tests and
the benchmarks.

Each simulated student has a persistent skill drawn once from a :class:`CrowdProfile`:
recall (chance to mark a true cell), position jitter (a fraction of the cell diameter),
stray-click rate, label-flip rate, and how often their runs are lazy (a few cells only) or
spam (one "alive" click in the bottom-right corner, like 23 % of the runs in the real
Cell Spotting export). Every run is simulated with vectorised numpy, without a Python loop
per click: 10,000 images x 40 cells x 5 students (about 1.7 M clicks) take a few seconds.

Calibration of ``realistic`` (see ``../shared/data/README.md`` section 1a and
``cellspotting_clicks/crowd_stats.json``). The real clicks are in a 524x391 frame whose
cells we take to be **50 px** across: the nearest other click of the same run lies at a
median 75 px (p10 41 px), i.e. cells touch rarely and are 40-60 px wide, and the thesis's
35 px merge radius is 0.7 of that diameter. With that scale, jitter and rates were tuned
so that :func:`crowd_statistics` on a simulated class gives back the real numbers (matched
distance median 14.4 px / p90 27.6 px, 17.8 % unmatched clicks between two non-spam runs,
95.75 % label agreement, 0.4 % not_sure, 23 % single-click spam runs); the test
``tests/test_simulate.py`` checks it. Note that the real 23 % *overall* unmatched share
depends on how the real spam runs were spread over images (mostly images nobody else
saw); in a class where everyone sees every image, spam runs pair with every other run and
the overall unmatched share is higher (about 38 %), while the spam-free figure matches;
re-weighted to the real mix of run pairs (186 spam-free, 32 with a single-click run) the
simulated overall share is back at about 23 % (also tested).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields

import numpy as np
import pandas as pd
from scipy import special
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

logger = logging.getLogger(__name__)

CLICK_COLUMNS = ["image", "annotator", "task_run", "x", "y", "label"]
RUN_COLUMNS = ["image", "task_run", "annotator"]
STUDENT_COLUMNS = ["annotator", "recall", "jitter", "flip", "stray", "lazy", "spam"]
LABELS = np.array(["alive", "dead", "not_sure"], dtype=object)
ALIVE, DEAD, NOT_SURE = 0, 1, 2


class UnknownProfileError(ValueError):
    """Raised for a crowd profile name that is not in :data:`PROFILES`."""


@dataclass(frozen=True)
class CrowdProfile:
    """Distribution of student skill for a simulated class.

    Per-student values are drawn once and kept across images. Beta distributions are
    given by a mean and a concentration (a + b; high = students alike, low = a few
    students carry most of it).
    """

    name: str
    recall_mean: float            # P(student marks a true cell), Beta across students
    recall_concentration: float
    jitter_frac: float            # median per-student click sigma (per axis), x cell diameter
    jitter_spread: float          # log-normal sigma of the per-student jitter factor
    dead_jitter_factor: float     # dead cells are small and round: clicks land closer
    stray_rate: float             # stray clicks per run, per true cell of the image (mean)
    stray_dead_prob: float        # share of stray clicks labelled dead
    flip_mean: float              # P(alive <-> dead flip) per click, Beta across students
    flip_concentration: float
    not_sure_prob: float          # P(a marked cell gets not_sure)
    lazy_mean: float              # P(a run is lazy), Beta across students
    lazy_recall: float            # a lazy run marks this share of what it would have marked
    spam_mean: float              # P(a run is a single-click spam run), Beta across students
    spam_concentration: float
    double_click_prob: float      # P(a click is followed by a second one on the same spot)
    spam_region: tuple[float, float, float, float] = (0.664, 0.65, 0.985, 0.995)
    # spam click box as fractions of the image (x0, y0, x1, y1): real x 348-516, y 254-389 of 524x391

    def __post_init__(self) -> None:
        probabilities = ("recall_mean", "stray_dead_prob", "flip_mean", "not_sure_prob", "lazy_mean",
                         "lazy_recall", "spam_mean", "double_click_prob")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in probabilities and not 0.0 <= value <= 1.0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be in [0, 1], got {value}")
            if f.name.endswith("concentration") and not value > 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be > 0, got {value}")
            if f.name in ("jitter_frac", "jitter_spread", "dead_jitter_factor", "stray_rate") and value < 0:
                raise ValueError(f"profile {self.name!r}: {f.name} must be >= 0, got {value}")
        x0, y0, x1, y1 = self.spam_region
        if not (0.0 <= x0 <= x1 <= 1.0 and 0.0 <= y0 <= y1 <= 1.0):
            raise ValueError(f"profile {self.name!r}: spam_region must be 0 <= x0 <= x1 <= 1, "
                             f"0 <= y0 <= y1 <= 1; got {self.spam_region}")


PROFILES: dict[str, CrowdProfile] = {
    "easy": CrowdProfile(
        name="easy", recall_mean=0.96, recall_concentration=60.0, jitter_frac=0.12, jitter_spread=0.15,
        dead_jitter_factor=0.85, stray_rate=0.01, stray_dead_prob=0.4, flip_mean=0.005,
        flip_concentration=50.0, not_sure_prob=0.002, lazy_mean=0.01, lazy_recall=0.3,
        spam_mean=0.02, spam_concentration=2.0, double_click_prob=0.001,
    ),
    # Calibrated on the real Cell Spotting export (module docstring, tests/test_simulate.py).
    "realistic": CrowdProfile(
        name="realistic", recall_mean=0.92, recall_concentration=25.0, jitter_frac=0.205,
        jitter_spread=0.15, dead_jitter_factor=0.85, stray_rate=0.02, stray_dead_prob=0.35,
        flip_mean=0.014, flip_concentration=20.0, not_sure_prob=0.0045, lazy_mean=0.035,
        lazy_recall=0.3, spam_mean=0.23, spam_concentration=4.0, double_click_prob=0.001,
    ),
    "hard": CrowdProfile(
        name="hard", recall_mean=0.75, recall_concentration=8.0, jitter_frac=0.28, jitter_spread=0.3,
        dead_jitter_factor=0.85, stray_rate=0.12, stray_dead_prob=0.4, flip_mean=0.06,
        flip_concentration=6.0, not_sure_prob=0.02, lazy_mean=0.12, lazy_recall=0.3,
        spam_mean=0.35, spam_concentration=2.0, double_click_prob=0.01,
    ),
}


def get_profile(name: str) -> CrowdProfile:
    """The registered profile called ``name`` (``easy``, ``realistic`` or ``hard``)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown crowd profile {name!r}; valid names: {', '.join(sorted(PROFILES))}"
        ) from None


@dataclass(frozen=True)
class SimulatedCrowd:
    """Result of :func:`simulate_crowd`.

    ``clicks``: columns :data:`CLICK_COLUMNS` (``task_run`` int64, ``label`` alive | dead |
    not_sure). ``runs``: columns :data:`RUN_COLUMNS`, every run including those with no
    click. ``students``: columns :data:`STUDENT_COLUMNS`, the true per-student skills.
    """

    clicks: pd.DataFrame
    runs: pd.DataFrame
    students: pd.DataFrame


def _strata(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` uniforms, one in each of ``n`` equal strata of (0, 1), in random order.

    Stratified draws keep a small class representative of its profile (a class of five
    gets one student from each fifth of every skill distribution) while staying random.
    """
    return (rng.permutation(n) + rng.random(n)) / n


def _beta(rng: np.random.Generator, mean: float, concentration: float, n: int) -> np.ndarray:
    u = _strata(rng, n)
    if mean <= 0.0 or mean >= 1.0:
        return np.full(n, float(np.clip(mean, 0.0, 1.0)))
    return special.betaincinv(mean * concentration, (1.0 - mean) * concentration, u)


def student_names(n_students: int) -> list[str]:
    """Annotator ids ``s01``, ``s02``, ... (zero-padded to at least two digits)."""
    width = max(2, len(str(n_students)))
    return [f"s{i + 1:0{width}d}" for i in range(n_students)]


def draw_students(n_students: int, profile: CrowdProfile, rng: np.random.Generator) -> pd.DataFrame:
    """Draw ``n_students`` persistent skills; columns :data:`STUDENT_COLUMNS`.

    Each skill is drawn stratified (see :func:`_strata`), independently of the others.

    ``jitter`` is a fraction of the cell diameter; ``stray`` is stray clicks per true cell;
    ``lazy`` and ``spam`` are per-run probabilities.
    """
    if n_students < 1:
        raise ValueError(f"n_students must be >= 1, got {n_students}")
    n = n_students
    return pd.DataFrame({
        "annotator": student_names(n),
        "recall": _beta(rng, profile.recall_mean, profile.recall_concentration, n),
        "jitter": profile.jitter_frac * np.exp(profile.jitter_spread * special.ndtri(_strata(rng, n))),
        "flip": _beta(rng, profile.flip_mean, profile.flip_concentration, n),
        "stray": profile.stray_rate * 0.5 * special.gammaincinv(2.0, _strata(rng, n)),
        "lazy": _beta(rng, profile.lazy_mean, 4.0, n),
        "spam": _beta(rng, profile.spam_mean, profile.spam_concentration, n),
    }, columns=STUDENT_COLUMNS)


def class_runs(images: pd.DataFrame, n_students: int) -> pd.DataFrame:
    """Every student sees every image once: runs (image-major), columns :data:`RUN_COLUMNS`.

    ``task_run`` is ``image_index * n_students + student_index``.
    """
    names = np.asarray(images["image"], dtype=object)
    return pd.DataFrame({
        "image": np.repeat(names, n_students),
        "task_run": np.arange(len(names) * n_students, dtype=np.int64),
        "annotator": np.tile(np.asarray(student_names(n_students), dtype=object), len(names)),
    }, columns=RUN_COLUMNS)


def random_runs(images: pd.DataFrame, runs_per_image: int | np.ndarray, n_students: int,
                rng: np.random.Generator) -> pd.DataFrame:
    """Each image gets ``runs_per_image`` runs (int or array (n_images,)) by distinct
    students drawn from a pool of ``n_students``; columns :data:`RUN_COLUMNS`."""
    n_img = len(images)
    k = np.broadcast_to(np.asarray(runs_per_image, dtype=np.int64), (n_img,))
    if n_img and (k.min() < 0 or k.max() > n_students):
        raise ValueError(f"runs_per_image must be in [0, n_students={n_students}], "
                         f"got {int(k.min())}..{int(k.max())}")
    order = np.argsort(rng.random((n_img, n_students)), axis=1)
    take = np.arange(n_students)[None, :] < k[:, None]
    img_idx = np.nonzero(take)[0]
    who = order[take]
    return pd.DataFrame({
        "image": np.asarray(images["image"], dtype=object)[img_idx],
        "task_run": np.arange(len(img_idx), dtype=np.int64),
        "annotator": np.asarray(student_names(n_students), dtype=object)[who],
    }, columns=RUN_COLUMNS)


def _image_index(names: pd.Series, images: pd.DataFrame, what: str) -> np.ndarray:
    index = pd.Index(images["image"])
    if not index.is_unique:
        raise ValueError(f"images table lists an image twice, e.g. {list(index[index.duplicated()][:5])}")
    idx = index.get_indexer(names)
    if (idx < 0).any():
        missing = pd.unique(np.asarray(names)[idx < 0])[:5]
        raise ValueError(f"{what} name images not in the images table, e.g. {list(missing)}")
    return idx


def simulate_crowd(truth_cells: pd.DataFrame, images: pd.DataFrame, runs: pd.DataFrame,
                   profile: CrowdProfile, rng: np.random.Generator,
                   students: pd.DataFrame | None = None) -> SimulatedCrowd:
    """Simulate the clicks of ``runs`` on images with known cells.

    ``truth_cells``: columns ``image, x, y, label (alive|dead), diameter``. ``images``:
    ``image, width, height``. ``runs``: ``image, task_run, annotator`` (see
    :func:`class_runs`, :func:`random_runs`); annotators are looked up in ``students``
    (drawn with :func:`draw_students` from the annotator names in ``runs`` when None).
    Clicks are clipped to ``[0, width-1] x [0, height-1]``. Deterministic given ``rng``.
    """
    if students is None:
        names = sorted(pd.unique(runs["annotator"].astype(str)))
        students = draw_students(len(names), profile, rng)
        students["annotator"] = names
    s_idx = pd.Index(students["annotator"]).get_indexer(runs["annotator"])
    if (s_idx < 0).any():
        raise ValueError(f"runs name annotators not in students, e.g. "
                         f"{list(pd.unique(runs['annotator'][s_idx < 0]))[:5]}")
    bad = ~truth_cells["label"].isin(["alive", "dead"])
    if bad.any():
        found = sorted(truth_cells["label"][bad].astype(str).unique())
        raise ValueError(f"truth labels must be alive|dead, found {found}")
    c_img = _image_index(truth_cells["image"], images, "truth_cells")
    r_img = _image_index(runs["image"], images, "runs")
    width = images["width"].to_numpy(np.float64)
    height = images["height"].to_numpy(np.float64)
    diam = truth_cells["diameter"].to_numpy(np.float64)
    ok = np.isfinite(diam) & (diam > 0)
    if not ok.all():
        raise ValueError(f"truth diameters must be positive numbers ({int((~ok).sum())} bad rows)")
    clicks = _simulate_arrays(
        c_img, truth_cells["x"].to_numpy(np.float64), truth_cells["y"].to_numpy(np.float64),
        (truth_cells["label"] == "dead").to_numpy(), diam, width, height, r_img, s_idx,
        students, profile, rng,
    )
    run_id, x, y, lab = clicks
    table = pd.DataFrame({
        "image": np.asarray(runs["image"], dtype=object)[run_id],
        "annotator": np.asarray(runs["annotator"], dtype=object)[run_id],
        "task_run": np.asarray(runs["task_run"])[run_id],
        "x": x, "y": y, "label": LABELS[lab],
    }, columns=CLICK_COLUMNS)
    logger.info("simulated %d clicks in %d runs (%s profile)", len(table), len(runs), profile.name)
    return SimulatedCrowd(clicks=table, runs=runs[RUN_COLUMNS].reset_index(drop=True), students=students)


def _simulate_arrays(c_img, cx, cy, c_dead, diam, width, height, r_img, r_stu, students, profile, rng):
    """Vectorised core, no loop over clicks.

    Cells: ``c_img`` (C,) image index, ``cx``, ``cy``, ``c_dead``, ``diam`` (C,). Images:
    ``width``, ``height`` (I,). Runs: ``r_img``, ``r_stu`` (R,) image and student index.
    Returns ``(run, x, y, label)``, each (K,) for K clicks, sorted by run (clicks shuffled
    within a run); ``label`` holds codes ALIVE / DEAD / NOT_SURE.
    """
    n_img, n_runs = len(width), len(r_img)
    order = np.argsort(c_img, kind="stable")
    c_img, cx, cy, c_dead, diam = c_img[order], cx[order], cy[order], c_dead[order], diam[order]
    count = np.bincount(c_img, minlength=n_img)
    start = np.concatenate([[0], np.cumsum(count)[:-1]])
    mean_d = np.bincount(c_img, weights=diam, minlength=n_img) / np.maximum(count, 1)
    mean_d[count == 0] = np.median(diam) if len(diam) else 0.05 * float(np.median(np.minimum(width, height)))

    recall = students["recall"].to_numpy()[r_stu]
    jitter = students["jitter"].to_numpy()[r_stu]
    flip = students["flip"].to_numpy()[r_stu]
    spam = rng.random(n_runs) < students["spam"].to_numpy()[r_stu]
    lazy = ~spam & (rng.random(n_runs) < students["lazy"].to_numpy()[r_stu])
    effort = np.where(lazy, profile.lazy_recall, 1.0) * ~spam

    # marks on true cells: one candidate per (run, cell of the run's image)
    n_cand = count[r_img]
    cand_run = np.repeat(np.arange(n_runs), n_cand)
    first = np.cumsum(n_cand) - n_cand
    cand_cell = start[r_img][cand_run] + (np.arange(len(cand_run)) - first[cand_run])
    hit = rng.random(len(cand_run)) < (recall * effort)[cand_run]
    m_run, m_cell = cand_run[hit], cand_cell[hit]
    sigma = jitter[m_run] * diam[m_cell] * np.where(c_dead[m_cell], profile.dead_jitter_factor, 1.0)
    m_x = cx[m_cell] + rng.standard_normal(len(m_run)) * sigma
    m_y = cy[m_cell] + rng.standard_normal(len(m_run)) * sigma
    flipped = rng.random(len(m_run)) < flip[m_run]
    m_lab = np.where(c_dead[m_cell] != flipped, DEAD, ALIVE)
    m_lab[rng.random(len(m_run)) < profile.not_sure_prob] = NOT_SURE

    # stray clicks anywhere in the image
    lam = students["stray"].to_numpy()[r_stu] * np.maximum(count[r_img], 1) * effort
    n_stray = rng.poisson(lam)
    s_run = np.repeat(np.arange(n_runs), n_stray)
    s_x = rng.random(len(s_run)) * width[r_img][s_run]
    s_y = rng.random(len(s_run)) * height[r_img][s_run]
    s_lab = np.where(rng.random(len(s_run)) < profile.stray_dead_prob, DEAD, ALIVE)
    s_lab[rng.random(len(s_run)) < profile.not_sure_prob] = NOT_SURE

    # spam runs: a single "alive" click in the bottom-right corner
    p_run = np.flatnonzero(spam)
    x0, y0, x1, y1 = profile.spam_region
    p_x = width[r_img][p_run] * rng.uniform(x0, x1, len(p_run))
    p_y = height[r_img][p_run] * rng.uniform(y0, y1, len(p_run))

    run = np.concatenate([m_run, s_run])
    x = np.concatenate([m_x, s_x])
    y = np.concatenate([m_y, s_y])
    lab = np.concatenate([m_lab, s_lab])
    # rare double clicks: a second click a couple of pixels from the first
    dbl = np.flatnonzero(rng.random(len(run)) < profile.double_click_prob)
    d_scale = 0.04 * mean_d[r_img][run[dbl]]
    run = np.concatenate([run, run[dbl], p_run])
    x = np.concatenate([x, x[dbl] + rng.standard_normal(len(dbl)) * d_scale, p_x])
    y = np.concatenate([y, y[dbl] + rng.standard_normal(len(dbl)) * d_scale, p_y])
    lab = np.concatenate([lab, lab[dbl], np.full(len(p_run), ALIVE)])

    x = np.clip(x, 0.0, width[r_img][run] - 1.0)
    y = np.clip(y, 0.0, height[r_img][run] - 1.0)
    shuffle = np.argsort(run + 0.999 * rng.random(len(run)))   # runs in order, clicks shuffled within
    return run[shuffle], x[shuffle], y[shuffle], lab[shuffle]


def simulate_class(truth_cells: pd.DataFrame, images: pd.DataFrame, n_students: int,
                   profile: CrowdProfile, rng: np.random.Generator) -> pd.DataFrame:
    """A class of ``n_students`` (``s01``...) where every student labels every image once.

    ``truth_cells``: ``image, x, y, label (alive|dead), diameter``; ``images``: ``image,
    width, height``. Returns clicks with columns :data:`CLICK_COLUMNS`; ``task_run`` matches
    :func:`class_runs` (``image_index * n_students + student_index``), which also lists
    the runs that clicked nothing. Deterministic given ``rng``.
    """
    students = draw_students(n_students, profile, rng)
    return simulate_crowd(truth_cells, images, class_runs(images, n_students), profile, rng, students).clicks


def simulate_runs(truth_cells: pd.DataFrame, images: pd.DataFrame, runs_per_image: int | np.ndarray,
                  n_students: int, profile: CrowdProfile, rng: np.random.Generator) -> SimulatedCrowd:
    """Each image gets ``runs_per_image`` runs by distinct students from a pool of
    ``n_students`` (like a crowd platform, not a class). Returns clicks, runs and students."""
    students = draw_students(n_students, profile, rng)
    runs = random_runs(images, runs_per_image, n_students, rng)
    return simulate_crowd(truth_cells, images, runs, profile, rng, students)


# --------------------------------------------------------------------------- statistics


def _pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _run_slices(img_code: np.ndarray, run_code: np.ndarray) -> list[list[slice]]:
    """For arrays sorted by (image, run): per image, the slice of each of its runs."""
    if len(img_code) == 0:
        return []
    run_edges = np.flatnonzero(np.diff(run_code) != 0) + 1
    run_starts = np.concatenate([[0], run_edges])
    run_stops = np.concatenate([run_edges, [len(run_code)]])
    run_img = img_code[run_starts]
    img_edges = np.flatnonzero(np.diff(run_img) != 0) + 1
    out = []
    for lo, hi in zip(np.concatenate([[0], img_edges]), np.concatenate([img_edges, [len(run_img)]])):
        out.append([slice(a, b) for a, b in zip(run_starts[lo:hi], run_stops[lo:hi])])
    return out


def _match_pairs(xy: np.ndarray, lab: np.ndarray, per_image: list[list[slice]], radius: float
                 ) -> dict[str, float]:
    """Hungarian matching (within ``radius``) between every two runs on the same image."""
    dists, same, in_pairs, n_pairs = [], [], 0, 0
    for runs in per_image:
        for i, ra in enumerate(runs):
            pa, la = xy[ra], lab[ra]
            for rb in runs[i + 1:]:
                pb, lb = xy[rb], lab[rb]
                n_pairs += 1
                in_pairs += len(pa) + len(pb)
                d = np.hypot(pa[:, None, 0] - pb[None, :, 0], pa[:, None, 1] - pb[None, :, 1])
                rows, cols = linear_sum_assignment(np.where(d <= radius, d, 1e6))
                good = d[rows, cols] <= radius
                dists.append(d[rows, cols][good])
                same.append(la[rows[good]] == lb[cols[good]])
    dist = np.concatenate(dists) if dists else np.empty(0)
    agree = np.concatenate(same) if same else np.empty(0, bool)
    matched = 2 * len(dist) / in_pairs if in_pairs else float("nan")
    return {
        "n_run_pairs": n_pairs,
        "n_clicks_in_pairs": in_pairs,
        "n_matched": int(len(dist)),
        "frac_clicks_matched": matched,
        "unmatched_frac": 1.0 - matched,
        "label_agreement": float(agree.mean()) if len(agree) else float("nan"),
        "distance_median": _pct(dist, 50),
        "distance_p90": _pct(dist, 90),
    }


def crowd_statistics(clicks: pd.DataFrame, match_radius: float = 35.0) -> dict:
    """The crowd statistics of ``../shared/data/README.md`` section 1a for a click table.

    ``clicks``: columns ``image, x, y, label`` and ``task_run`` (or ``annotator``: one
    run per annotator x image). Labels starting with ``not_sure`` count as not sure.
    ``match_radius``: 35 px for the real 524x391 frame with ~50 px cells; use
    ``0.7 * diameter`` at other scales. Returns a dict with ``n_runs``, ``n_clicks``,
    ``n_images``, ``clicks_per_run`` (mean/median/p10/p90), ``single_click_run_share``,
    ``label_frac``, ``matched`` and ``matched_without_single`` (n_run_pairs,
    n_clicks_in_pairs (sum of both runs' clicks over all pairs), n_matched (pairs of
    clicks), frac_clicks_matched, unmatched_frac, label_agreement, distance_median/p90) and
    ``within_run_nn`` (median/p10/frac_below_10px). Loops over run pairs: meant for
    calibration-sized tables (thousands of runs), not millions of clicks.
    """
    run_key = clicks["task_run"] if "task_run" in clicks else clicks["annotator"]
    img_code = pd.factorize(clicks["image"])[0]
    run_code = pd.factorize(pd.MultiIndex.from_arrays([clicks["image"], run_key]))[0]
    order = np.lexsort((run_code, img_code))
    img_code, run_code = img_code[order], run_code[order]
    xy = clicks[["x", "y"]].to_numpy(np.float64)[order]
    raw = clicks["label"].astype(str).to_numpy()[order]
    lab = np.where(np.char.startswith(raw.astype(str), "not_sure"), "not_sure", raw)
    per_image = _run_slices(img_code, run_code)
    n = np.array([r.stop - r.start for runs in per_image for r in runs], dtype=np.int64)
    multi = [[r for r in runs if r.stop - r.start > 1] for runs in per_image]
    nn = [cKDTree(xy[r]).query(xy[r], k=2)[0][:, 1] for runs in multi for r in runs]
    nn_all = np.concatenate(nn) if nn else np.empty(0)
    labels, counts = np.unique(lab, return_counts=True)
    label_frac = dict(zip(labels.tolist(), (counts / max(len(lab), 1)).tolist()))
    return {
        "n_runs": int(len(n)),
        "n_clicks": int(len(lab)),
        "n_images": int(len(per_image)),
        "clicks_per_run": {"mean": float(n.mean()) if len(n) else float("nan"), "median": _pct(n, 50),
                           "p10": _pct(n, 10), "p90": _pct(n, 90)},
        "single_click_run_share": float((n == 1).mean()) if len(n) else float("nan"),
        "label_frac": {k: float(label_frac.get(k, 0.0)) for k in ("alive", "dead", "not_sure")},
        "matched": _match_pairs(xy, lab, per_image, match_radius),
        "matched_without_single": _match_pairs(xy, lab, multi, match_radius),
        "within_run_nn": {"median": _pct(nn_all, 50), "p10": _pct(nn_all, 10),
                          "frac_below_10px": float((nn_all < 10).mean()) if len(nn_all) else float("nan")},
    }
