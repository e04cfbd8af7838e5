"""A prediction of a project is queued once per model pair, and a classifier run whose data
has one label only is refused before it is stored.

The queue is the real SQLite huey queue of the test's ``CELLSPOT_HOME`` (no worker runs: the
jobs stay queued), or huey's immediate mode where a job must run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select

from cellspot import jobs
from cellspot.store.db import make_engine, transaction
from cellspot.store.models import ConsensusCell, ConsensusSnapshot, GoldCell, Image
from cellspot.store.queries import get_project
from cellspot.workflows import models as wf
from fake_trainer import install, seed_project


def predict_jobs(settings) -> list:
    """The prediction jobs waiting in the queue of ``settings``."""
    return [t for t in jobs.get_huey(settings).pending() if t.name == "cellspot.predict"]


@pytest.fixture
def queue(settings):
    huey = jobs.get_huey(settings)
    huey.flush()
    yield huey
    huey.flush()


# --------------------------------------------------------------------------- predictions


def test_two_enqueues_of_one_prediction_queue_one_job(settings, queue) -> None:
    first = jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert first is not None
    with pytest.raises(jobs.PredictionPendingError, match="already queued; it was not queued again") as caught:
        jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert caught.value.state == "queued" and caught.value.since is not None
    assert len(predict_jobs(settings)) == 1


@pytest.mark.parametrize(("project", "detector", "classifier"), [
    ("demo", "detector-0001", "classifier-0002"),  # another pair
    ("other", "detector-0001", "classifier-0001"),  # another project
    ("demo", None, None),  # the active pair, named by no version
])
def test_another_project_or_pair_is_queued_beside_it(settings, queue, project, detector, classifier) -> None:
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    jobs.enqueue_prediction(settings, project, detector=detector, classifier=classifier)
    assert len(predict_jobs(settings)) == 2


def _four_clicks_at_once(settings) -> list[str]:
    """Four threads asking for the demo's prediction at the same moment; what each got."""
    start, outcomes = threading.Barrier(4), []

    def click() -> None:
        start.wait()
        try:
            jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
            outcomes.append("queued")
        except jobs.PredictionPendingError:
            outcomes.append("refused")

    threads = [threading.Thread(target=click) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_enqueues_at_the_same_moment_queue_one_job(settings, queue) -> None:
    """The two halves of a double click handled by two threads at once."""
    assert sorted(_four_clicks_at_once(settings)) == ["queued", "refused", "refused", "refused"]
    assert len(predict_jobs(settings)) == 1


def test_a_running_prediction_refuses_another_until_its_worker_is_done(settings, queue) -> None:
    key = jobs._prediction_key("demo", "detector-0001", "classifier-0001")
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    queue.storage.flush_queue()  # a worker took the job ...
    with jobs._running_prediction(queue, key):  # ... and runs it
        mark = queue.get(key, peek=True)
        assert (mark["state"], mark["host"], mark["pid"]) == ("running", socket.gethostname(), os.getpid())
        with pytest.raises(jobs.PredictionPendingError, match="already running"):
            jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert queue.get(key, peek=True) is None  # the mark goes with the job
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert len(predict_jobs(settings)) == 1


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


@pytest.mark.parametrize(("case", "holder", "refused"), [
    ("a worker on another host, renewed now", lambda: {"host": "gpu-box-7", "pid": 4242}, True),
    ("a worker on another host, killed 10 minutes ago", lambda: {"host": "gpu-box-7", "pid": 4242, "beat": -600},
     False),
    ("a worker of this host that no longer runs", lambda: {"pid": _dead_pid()}, False),
    ("a mark written before marks named their worker", lambda: None, False),
])
def test_a_running_prediction_counts_while_its_worker_lives(settings, queue, case, holder, refused) -> None:
    """The mark of a running prediction names its worker and is renewed while the job runs.
    (It counted while any prediction of the project showed under CELLSPOT_HOME/workers, and the
    file of a worker killed on another host stays there: "Predict project" was refused for good.)"""
    key = jobs._prediction_key("demo", "detector-0001", "classifier-0001")
    workers = settings.home / "workers"
    workers.mkdir(parents=True)
    (workers / "gpu-box-7-4242-1.json").write_text(json.dumps(
        {"task": "predict", "project": "demo", "since": "2020-01-01T00:00:00+00:00", "host": "gpu-box-7",
         "pid": 4242}))
    mark = {"state": "running", "since": datetime.now(timezone.utc).isoformat()}
    fields = holder()
    if fields is not None:
        mark |= {"host": socket.gethostname(), "pid": os.getpid(), "token": "t", **fields,
                 "beat": time.time() + fields.get("beat", 0)}
    queue.put(key, mark)
    if refused:
        with pytest.raises(jobs.PredictionPendingError, match="already running"):
            jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
        assert predict_jobs(settings) == [], case
        return
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert len(predict_jobs(settings)) == 1, case
    assert queue.get(key, peek=True)["state"] == "queued"


def test_clicks_at_the_same_moment_on_a_killed_prediction_queue_one_job(settings, queue) -> None:
    key = jobs._prediction_key("demo", "detector-0001", "classifier-0001")
    queue.put(key, {"state": "running", "since": "2020-01-01T00:00:00+00:00", "host": "gpu-box-7", "pid": 4242,
                    "token": "t", "beat": time.time() - 3600})
    assert sorted(_four_clicks_at_once(settings)) == ["queued", "refused", "refused", "refused"]
    assert len(predict_jobs(settings)) == 1


def test_a_mark_whose_job_left_the_queue_does_not_count_once_it_is_a_minute_old(settings, queue) -> None:
    key = jobs._prediction_key("demo", "detector-0001", "classifier-0001")
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    queue.storage.flush_queue()  # the job is gone (a consumer killed between taking it and starting it)
    with pytest.raises(jobs.PredictionPendingError):  # a young mark's caller may be queueing its job
        jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    old = (datetime.now(timezone.utc) - timedelta(seconds=jobs.QUEUEING_S + 1)).isoformat()
    queue.put(key, {**queue.get(key, peek=True), "since": old})
    jobs.enqueue_prediction(settings, "demo", detector="detector-0001", classifier="classifier-0001")
    assert len(predict_jobs(settings)) == 1


def test_a_finished_or_failed_prediction_can_be_queued_again(settings, monkeypatch) -> None:
    import cellspot.ml.project_predictions

    seed_project(settings)
    calls = []

    def fake_predict(session, settings_, project, *, detector_run=None, classifier_run=None, progress=None):
        calls.append(project.name)
        if len(calls) == 2:
            raise RuntimeError("no pixels")
        return None

    monkeypatch.setattr(cellspot.ml.project_predictions, "predict_project", fake_predict)
    huey = jobs.get_huey(settings)
    huey.immediate = True
    try:
        jobs.enqueue_prediction(settings, "demo").get()
        with pytest.raises(Exception, match="no pixels"):
            jobs.enqueue_prediction(settings, "demo").get()
        jobs.enqueue_prediction(settings, "demo").get()
    finally:
        huey.immediate = False
    assert calls == ["demo", "demo", "demo"]


def test_a_prediction_the_queue_cannot_take_leaves_no_mark(settings, queue, monkeypatch) -> None:
    def refuse(task):
        raise OSError("disk full")

    monkeypatch.setattr(queue, "enqueue", refuse)
    with pytest.raises(jobs.JobQueueError, match="disk full"):
        jobs.enqueue_prediction(settings, "demo")
    monkeypatch.undo()
    jobs.enqueue_prediction(settings, "demo")
    assert len(predict_jobs(settings)) == 1


# --------------------------------------------------------------------------- one label only


def _store_labels(settings, labels: list[str], *, source: str, pixels: bool = True) -> None:
    """Cells of ``labels`` on one image of the demo project, in its snapshot or as expert cells."""
    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            project = get_project(session, "demo")
            image = Image(project_id=project.id, name="a.png", path="images/a.png" if pixels else None,
                          width=64, height=64, has_pixels=pixels)
            session.add(image)
            session.flush()
            snapshot_id = session.scalar(select(ConsensusSnapshot.id).where(ConsensusSnapshot.project_id == project.id))
            for i, label in enumerate(labels):
                if source == "consensus":
                    session.add(ConsensusCell(snapshot_id=snapshot_id, image_id=image.id, x=8.0 + 10 * i, y=8.0,
                                              label=label, p_alive=0.9 if label == "alive" else 0.1,
                                              confidence=0.9, support=3, n_runs=3))
                else:
                    session.add(GoldCell(image_id=image.id, x=8.0 + 10 * i, y=8.0, label=label))
    finally:
        engine.dispose()


@pytest.mark.parametrize(("kind", "source", "labels", "refused"), [
    ("classifier", "consensus", ["alive"] * 3, "got 3 alive, 0 dead in all the consensus snapshot 1 of project 'demo'"),
    ("classifier", "consensus", ["dead"] * 2, "got 0 alive, 2 dead"),
    ("classifier", "expert", ["alive"] * 2, "got 2 alive, 0 dead in all the expert cells of project 'demo'"),
    ("classifier", "consensus", ["alive", "alive", "dead"], None),
    ("detector", "consensus", ["alive"] * 3, None),  # a detector finds cells: their labels do not matter
])
def test_a_classifier_on_one_label_is_refused_before_it_is_stored(settings, monkeypatch, kind, source, labels,
                                                                 refused) -> None:
    """It was queued and failed in the worker ("training needs alive and dead cells in the train
    split; got 3 alive, 0 dead"), leaving a failed run in the history."""
    install(monkeypatch)
    queued = []
    monkeypatch.setattr(wf, "enqueue", lambda settings_, run_id, **kw: queued.append(run_id))
    seed_project(settings)
    _store_labels(settings, labels, source=source)
    if refused is None:
        wf.queue_training(settings, "demo", kind, source=source)
        assert len(queued) == 1
        return
    with pytest.raises(wf.WorkflowError, match="training needs alive and dead cells") as caught:
        wf.queue_training(settings, "demo", kind, source=source)
    assert refused in str(caught.value)
    assert queued == []
    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            from cellspot.ml.registry import list_runs

            assert list_runs(session, get_project(session, "demo")) == []
    finally:
        engine.dispose()


def test_cells_on_images_without_pixels_do_not_count(settings, monkeypatch) -> None:
    """The trainer leaves images without pixels out: their dead cells cannot make up for it."""
    install(monkeypatch)
    monkeypatch.setattr(wf, "enqueue", lambda *a, **kw: pytest.fail("must not queue"))
    seed_project(settings)
    _store_labels(settings, ["alive", "alive"], source="consensus")
    engine = make_engine(settings=settings)
    try:
        with transaction(engine) as session:
            project = get_project(session, "demo")
            blank = Image(project_id=project.id, name="b.png", width=64, height=64, has_pixels=False)
            session.add(blank)
            session.flush()
            session.add(ConsensusCell(snapshot_id=session.scalar(select(ConsensusSnapshot.id)), image_id=blank.id,
                                      x=5.0, y=5.0, label="dead", p_alive=0.1, confidence=0.9, support=3, n_runs=3))
    finally:
        engine.dispose()
    with pytest.raises(wf.WorkflowError, match="got 2 alive, 0 dead"):
        wf.queue_training(settings, "demo", "classifier")
