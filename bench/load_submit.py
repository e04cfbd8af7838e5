"""Load test of the classroom workflow: 40 students submitting at once lose nothing.

Drives the workflow layer exactly as the app does (one shared engine, one short transaction
per step, committed): every writer thread is a student that joins the class
(:func:`cellspot.workflows.classroom.join_class`), then repeats ``next_image`` ->
``submit_run`` for a fixed number of submissions with 3-25 random clicks each. Threads, not
processes, because Streamlit serves every browser session from threads of one process, so
the GIL and the shared connection pool are part of what a class really sees.

Deliberate double submits, with the same ``client_key``:

* every ``--repeat-every``-th submission is sent again after it returned (a reload after
  submit, a double tap);
* every ``--race-every``-th submission is sent by two threads at the same moment (two tabs).

Afterwards the store is checked: every client key is one run, every run has exactly the
clicks its writer sent (same order, same coordinates and labels), no run or click is
missing, duplicated or unexpected, and exactly one submit per key reported ``created``.

With ``--think-ms`` each writer pauses before every submit (a class's pace; a real student
takes tens of seconds per image), otherwise all 40 submit back to back (the worst case).

Latency is the wall time of one submit transaction (``submit_run`` + commit), measured per
call. The same workload is first run by a single writer (the baseline) in the same process,
and the 40-writer figures are printed as ratios against it. SQLite runs in a temporary
``CELLSPOT_HOME``; PostgreSQL (``--postgres-url``, default the local test server) runs in a
fresh schema that is dropped afterwards, and is skipped with a message when it does not
answer.

    python bench/load_submit.py                      # SQLite + PostgreSQL when available
    python bench/load_submit.py --writers 40 --submissions 25 --backends sqlite
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from cellspot.settings import Settings
from cellspot.store.db import make_engine, transaction
from cellspot.store.migrate import upgrade
from cellspot.store.models import Annotator, Click, GoldCell, Image, Project, TaskRun
from cellspot.workflows.classroom import join_class, next_image, submit_run

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
CLASS_CODE = "LOAD40"
WIDTH, HEIGHT = 384, 288

log = logging.getLogger("bench.load_submit")


@dataclass
class Ledger:
    """What the writers sent and measured (shared by all threads, guarded by a lock)."""

    expected: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)
    created: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    first_latency: list[float] = field(default_factory=list)
    repeat_latency: list[float] = field(default_factory=list)
    next_latency: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, bucket: list[float], seconds: float) -> None:
        with self.lock:
            bucket.append(seconds)


def build_project(engine: sa.Engine, n_images: int, n_gold: int, gold_rate: float) -> None:
    """A project with ``n_images`` images (rows only: the workflow never reads pixels), the
    first ``n_gold`` of them with expert cells, class code :data:`CLASS_CODE`."""
    rng = random.Random(0)
    with transaction(engine) as s:
        # no maximum of runs per image: 40 students x 25 submissions are 1,000 runs on 60 images, over
        # the default maximum of 10 each, and the students would run out of images (this measures submits)
        project = Project(name="load", settings={"class_codes": [CLASS_CODE], "gold_rate": gold_rate,
                                                 "retire_max_runs": None})
        s.add(project)
        s.flush()
        images = [Image(project_id=project.id, name=f"img_{i:04d}.png", width=WIDTH, height=HEIGHT,
                        has_pixels=True, path=None) for i in range(n_images)]
        s.add_all(images)
        s.flush()
        s.add_all(GoldCell(image_id=img.id, x=rng.uniform(20, WIDTH - 20), y=rng.uniform(20, HEIGHT - 20),
                           label=rng.choice(["alive", "dead"]), source="bench")
                  for img in images[:n_gold] for _ in range(12))


def _clicks(rng: random.Random) -> list[tuple[float, float, str]]:
    return [(round(rng.uniform(0, WIDTH - 1), 2), round(rng.uniform(0, HEIGHT - 1), 2),
             rng.choice(("alive", "alive", "dead", "not_sure"))) for _ in range(rng.randint(3, 25))]


def _submit(engine: sa.Engine, ledger: Ledger, annotator_id: int, image_id: int,
            clicks: list[tuple[float, float, str]], key: str, first: bool) -> None:
    started = time.perf_counter()
    try:
        with transaction(engine) as s:
            result = submit_run(s, s.get(Annotator, annotator_id), image_id, clicks, key)
    except Exception as exc:  # noqa: BLE001 - every failure is a finding of the bench
        with ledger.lock:
            ledger.errors.append(f"{key}: {type(exc).__name__}: {exc}")
        return
    ledger.add(ledger.first_latency if first else ledger.repeat_latency, time.perf_counter() - started)
    with ledger.lock:
        ledger.created[key] += int(result.created)


def writer(engine: sa.Engine, ledger: Ledger, index: int, n_submissions: int, repeat_every: int,
           race_every: int, start: threading.Barrier, think_ms: float = 0.0) -> None:
    """One student: join, then ``n_submissions`` x (next image, think, submit), with double submits.

    ``think_ms``: mean pause between getting an image and submitting it (uniform 0..2x);
    0 = back-to-back submits, the worst case."""
    rng = random.Random(1000 + index)
    try:
        start.wait(timeout=60)
        with transaction(engine) as s:
            annotator_id = join_class(s, CLASS_CODE.lower(), f"student-{index:02d}").id
        for i in range(n_submissions):
            t0 = time.perf_counter()
            with transaction(engine) as s:
                image = next_image(s, s.get(Annotator, annotator_id), rng)
                image_id = image.id if image is not None else None
            ledger.add(ledger.next_latency, time.perf_counter() - t0)
            if image_id is None:
                raise RuntimeError(f"student {index} ran out of images after {i} submissions")
            clicks = _clicks(rng)
            if think_ms > 0:
                time.sleep(rng.uniform(0, 2 * think_ms) / 1000)
            key = f"w{index:02d}-{i:03d}-{uuid.uuid4().hex[:8]}"
            with ledger.lock:
                ledger.expected[key] = clicks
            racing = race_every > 0 and i % race_every == race_every - 1
            twin = None
            if racing:  # a second tab submits the same key at the same moment
                twin = threading.Thread(target=_submit, args=(engine, ledger, annotator_id, image_id,
                                                              clicks, key, False))
                twin.start()
            _submit(engine, ledger, annotator_id, image_id, clicks, key, True)
            if twin is not None:
                twin.join()
            if repeat_every > 0 and i % repeat_every == repeat_every - 1:  # reload after submit
                _submit(engine, ledger, annotator_id, image_id, clicks, key, False)
    except Exception as exc:  # noqa: BLE001
        with ledger.lock:
            ledger.errors.append(f"writer {index}: {type(exc).__name__}: {exc}")


def verify(engine: sa.Engine, ledger: Ledger) -> list[str]:
    """Problems found comparing the store with what the writers sent (empty = exactly once)."""
    problems: list[str] = []
    with engine.connect() as conn:
        runs = dict(conn.execute(sa.select(TaskRun.client_key, TaskRun.id)).tuples().all())
        n_runs = conn.scalar(sa.select(sa.func.count()).select_from(TaskRun))
        rows = conn.execute(sa.select(Click.task_run_id, Click.click_index, Click.x, Click.y, Click.label)
                            .order_by(Click.task_run_id, Click.click_index)).tuples().all()
    if n_runs != len(runs):
        problems.append(f"{n_runs} runs but {len(runs)} distinct client keys")
    missing = set(ledger.expected) - set(runs)
    extra = set(runs) - set(ledger.expected)
    if missing:
        problems.append(f"{len(missing)} submitted runs missing, e.g. {sorted(missing)[:3]}")
    if extra:
        problems.append(f"{len(extra)} unexpected runs, e.g. {sorted(extra)[:3]}")
    stored: dict[int, list[tuple[int, float, float, str]]] = defaultdict(list)
    for run_id, idx, x, y, label in rows:
        stored[run_id].append((idx, x, y, label))
    n_expected_clicks = 0
    for key, clicks in ledger.expected.items():
        n_expected_clicks += len(clicks)
        if key not in runs:
            continue
        want = [(i, float(x), float(y), label) for i, (x, y, label) in enumerate(clicks)]
        if stored.get(runs[key], []) != want:
            problems.append(f"run {key}: stored clicks differ from the {len(clicks)} sent")
    if len(rows) != n_expected_clicks:
        problems.append(f"{len(rows)} clicks stored, {n_expected_clicks} sent")
    not_once = {k: n for k, n in ledger.created.items() if n != 1}
    never = set(ledger.expected) - set(ledger.created)
    if not_once or never:
        problems.append(f"created != 1 for {len(not_once) + len(never)} keys")
    return problems


def run_load(url: str | None, settings: Settings, writers: int, submissions: int, repeat_every: int,
             race_every: int, n_images: int, think_ms: float = 0.0) -> dict[str, object]:
    """One workload on a fresh store: returns the figures and the exact-once verdict."""
    engine = make_engine(url, settings=settings)
    try:
        upgrade(engine)
        build_project(engine, n_images, n_gold=max(1, n_images // 20), gold_rate=0.1)
        ledger = Ledger()
        start = threading.Barrier(writers)
        threads = [threading.Thread(target=writer, args=(engine, ledger, i, submissions, repeat_every,
                                                         race_every, start, think_ms)) for i in range(writers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        problems = verify(engine, ledger) + ledger.errors
    finally:
        engine.dispose()
    first = np.array(ledger.first_latency) * 1000
    every = np.array(ledger.first_latency + ledger.repeat_latency) * 1000
    nxt = np.array(ledger.next_latency) * 1000
    pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan"))
    return {
        "writers": writers, "think_ms": think_ms, "runs": len(ledger.expected),
        "clicks": sum(len(c) for c in ledger.expected.values()),
        "double_submits": len(ledger.repeat_latency), "wall_s": round(wall, 2),
        "submits_per_s": round(len(every) / wall, 1) if wall else float("nan"),
        "p50_ms": round(pct(first, 50), 1), "p95_ms": round(pct(first, 95), 1), "max_ms": round(pct(first, 100), 1),
        "p50_all_ms": round(pct(every, 50), 1), "p95_all_ms": round(pct(every, 95), 1),
        "next_p50_ms": round(pct(nxt, 50), 1), "next_p95_ms": round(pct(nxt, 95), 1),
        "exactly_once": not problems, "problems": "; ".join(problems[:5]),
    }


def _postgres_schema(url: str) -> tuple[str | None, str]:
    """A fresh schema on the server at ``url``: (its URL, its name); (None, reason) when down."""
    try:
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        schema = f"bench_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}", schema


def _drop_schema(url: str, schema: str) -> None:
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    admin.dispose()


def bench_backend(backend: str, args: argparse.Namespace) -> list[dict[str, object]]:
    """Baseline (1 writer) then ``args.writers`` writers on ``backend``, each on a fresh store."""
    rows = []
    baseline_subs = max(args.submissions, 100)  # enough single-writer submits for stable percentiles
    for writers, subs in ((1, baseline_subs), (args.writers, args.submissions)):
        with tempfile.TemporaryDirectory(prefix="cellspot-load-") as tmp:
            settings = Settings(home=Path(tmp) / "home")  # temporary CELLSPOT_HOME, SQLite file inside
            url, schema = None, None
            if backend == "postgresql":
                url, schema = _postgres_schema(args.postgres_url)
                if url is None:
                    print(f"postgresql: skipped, the server does not answer ({schema})")
                    return rows
            try:
                row = run_load(url, settings, writers, subs, args.repeat_every, args.race_every,
                               n_images=max(args.images, subs + 5), think_ms=args.think_ms if writers > 1 else 0.0)
            finally:
                if schema:
                    _drop_schema(args.postgres_url, schema)
        rows.append({"backend": backend, **row})
    base, load = rows
    for name in ("p50_ms", "p95_ms"):
        load[f"{name[:3]}_ratio"] = round(float(load[name]) / float(base[name]), 2) if base[name] else float("nan")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--writers", type=int, default=40)
    p.add_argument("--submissions", type=int, default=25, help="submissions per writer")
    p.add_argument("--repeat-every", type=int, default=4, help="resubmit every n-th run after it returned")
    p.add_argument("--race-every", type=int, default=5, help="submit every n-th run from two threads at once")
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--think-ms", type=float, default=0.0,
                   help="mean pause of a writer before each submit (0 = back-to-back, the worst case); "
                        "the single-writer baseline never pauses")
    p.add_argument("--backends", type=lambda s: s.split(","), default=["sqlite", "postgresql"])
    p.add_argument("--postgres-url", default=POSTGRES_URL)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "load_submit.csv"))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    rows = []
    for backend in args.backends:
        rows += bench_backend(backend, args)
    if not rows:
        return 1
    table = pd.DataFrame(rows)
    cols = ["backend", "writers", "think_ms", "runs", "clicks", "double_submits", "wall_s", "submits_per_s", "p50_ms",
            "p95_ms", "max_ms", "p50_ratio", "p95_ratio", "next_p50_ms", "next_p95_ms", "exactly_once"]
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(table[[c for c in cols if c in table.columns]].to_string(index=False))
    for row in rows:
        if not row["exactly_once"]:
            print(f"FAILED exactly-once on {row['backend']} with {row['writers']} writers: {row['problems']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(f"written {args.out}")
    return 0 if all(r["exactly_once"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
