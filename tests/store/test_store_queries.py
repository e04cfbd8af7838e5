"""Query helpers: get-or-create, idempotent submit, validation, constraints, frames."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.store import queries as q
from cellspot.store.models import Click, ConsensusCell, ConsensusSnapshot, GoldCell, Image, TaskRun


@pytest.fixture
def project(session: Session):
    return q.get_or_create_project(session, "p1", retire_min_runs=2)


@pytest.fixture
def image(session: Session, project) -> Image:
    img = Image(project=project, name="a.png", width=100, height=50)
    session.add(img)
    session.flush()
    return img


def _count(session: Session, model: type) -> int:
    return session.scalar(sa.select(sa.func.count()).select_from(model))


def test_get_or_create_project_is_stable(session: Session, project) -> None:
    again = q.get_or_create_project(session, "p1", retire_min_runs=9)
    assert again.id == project.id
    assert again.settings == {"retire_min_runs": 2}  # settings only apply on creation


def test_get_project_lists_existing_names(session: Session, project) -> None:
    q.get_or_create_project(session, "zeta")
    with pytest.raises(q.ProjectNotFoundError, match=r"'nope'.*'p1', 'zeta'"):
        q.get_project(session, "nope")
    assert q.get_project(session, "p1").id == project.id


@pytest.mark.parametrize(
    ("nickname", "class_code", "role", "error"),
    [
        ("ann", "7b", "student", None),
        ("", "7b", "student", "nickname"),
        ("ann", "7b", "teacher", "role 'teacher'"),
    ],
)
def test_get_or_create_annotator(session, project, nickname, class_code, role, error) -> None:
    if error:
        with pytest.raises(ValueError, match=error):
            q.get_or_create_annotator(session, project, nickname, class_code, role)
        return
    first = q.get_or_create_annotator(session, project, nickname, class_code, role)
    second = q.get_or_create_annotator(session, project, nickname, class_code)
    other_class = q.get_or_create_annotator(session, project, nickname, "8a")
    assert first.id == second.id != other_class.id


def test_submit_is_idempotent_on_client_key(session: Session, project, image) -> None:
    ann = q.get_or_create_annotator(session, project, "ann")
    clicks = [(1.0, 2.0, "alive"), (50.5, 10.0, "dead"), (99.9, 49.9, "not_sure")]
    run, created = q.submit_task_run(session, image, ann, clicks, client_key="k1")
    again, created_again = q.submit_task_run(session, image, ann, clicks, client_key="k1")
    assert (created, created_again) == (True, False)
    assert again.id == run.id
    assert _count(session, TaskRun) == 1
    assert _count(session, Click) == 3
    assert [(c.x, c.y, c.label) for c in run.clicks] == clicks


def test_client_key_reused_for_other_image_is_rejected(session, project, image) -> None:
    other = Image(project=project, name="b.png", width=10, height=10)
    session.add(other)
    ann = q.get_or_create_annotator(session, project, "ann")
    q.submit_task_run(session, image, ann, [], client_key="k1")
    with pytest.raises(q.ClientKeyConflictError, match="k1"):
        q.submit_task_run(session, other, ann, [], client_key="k1")


@pytest.mark.parametrize(
    ("clicks", "index", "field"),
    [
        ([(1, 1, "alive"), (100, 1, "alive")], 1, "x"),  # x == width is outside
        ([(-0.1, 1, "alive")], 0, "x"),
        ([(1, 50, "dead")], 0, "y"),
        ([(1, float("nan"), "dead")], 0, "y"),
        ([(1, 1, "alive"), (2, 2, "alive"), (3, 3, "maybe")], 2, "label"),
        ([(1, 1)], 0, "click"),
    ],
)
def test_invalid_click_rejected_and_nothing_written(session, project, image, clicks, index, field) -> None:
    ann = q.get_or_create_annotator(session, project, "ann")
    with pytest.raises(q.InvalidClickError, match=f"click {index}:") as info:
        q.submit_task_run(session, image, ann, clicks, client_key="bad")
    assert (info.value.index, info.value.field) == (index, field)
    assert _count(session, TaskRun) == 0
    assert _count(session, Click) == 0


@pytest.mark.parametrize(
    ("model", "values"),
    [
        (Click, {"click_index": 0, "x": 1.0, "y": 1.0, "label": "maybe"}),
        (GoldCell, {"x": 1.0, "y": 1.0, "label": "not_sure"}),
    ],
)
def test_bad_label_rejected_by_check_constraint(session, project, image, model, values) -> None:
    ann = q.get_or_create_annotator(session, project, "ann")
    run, _ = q.submit_task_run(session, image, ann, [], client_key="k")
    fk = {"task_run_id": run.id} if model is Click else {"image_id": image.id}
    with pytest.raises(sa.exc.IntegrityError):
        with session.begin_nested():
            session.execute(sa.insert(model).values(**fk, **values))


def test_deleting_an_image_cascades(session: Session, project, image) -> None:
    ann = q.get_or_create_annotator(session, project, "ann")
    q.submit_task_run(session, image, ann, [(1, 1, "alive")], client_key="k")
    session.add(GoldCell(image_id=image.id, x=1, y=1, label="dead"))
    session.flush()
    session.execute(sa.delete(Image).where(Image.id == image.id))
    assert [_count(session, m) for m in (TaskRun, Click, GoldCell)] == [0, 0, 0]


def test_deleting_a_snapshot_unretires_nothing_but_clears_the_link(session, project, image) -> None:
    snap = ConsensusSnapshot(project_id=project.id, method="m")
    session.add(snap)
    session.flush()
    session.execute(sa.update(Image).where(Image.id == image.id)
                    .values(status="retired", retired_snapshot_id=snap.id))
    session.execute(sa.delete(ConsensusSnapshot).where(ConsensusSnapshot.id == snap.id))
    row = session.execute(sa.select(Image.status, Image.retired_snapshot_id)
                          .where(Image.id == image.id)).one()
    assert tuple(row) == ("retired", None)


def test_frames(session: Session, project, image) -> None:
    other = Image(project=project, name="b.png", width=10, height=10)
    session.add(other)
    ann1 = q.get_or_create_annotator(session, project, "ann1")
    ann2 = q.get_or_create_annotator(session, project, "ann2")
    run1, _ = q.submit_task_run(session, image, ann1, [(1, 2, "alive"), (3, 4, "dead")], "r1")
    run2, _ = q.submit_task_run(session, other, ann2, [], "r2")  # zero-click run
    session.add(GoldCell(image_id=image.id, x=5, y=6, label="alive"))
    session.flush()

    clicks = q.clicks_frame(session, project)
    assert list(clicks.columns) == q.CLICK_FRAME_COLUMNS
    assert clicks[["image", "annotator", "task_run", "x", "y", "label", "click_index"]].values.tolist() == [
        ["a.png", str(ann1.id), str(run1.id), 1.0, 2.0, "alive", 0],
        ["a.png", str(ann1.id), str(run1.id), 3.0, 4.0, "dead", 1],
    ]
    runs = q.runs_frame(session, project)
    assert list(runs.columns) == q.RUN_FRAME_COLUMNS
    assert runs[["image", "task_run", "annotator"]].values.tolist() == [
        ["a.png", str(run1.id), str(ann1.id)], ["b.png", str(run2.id), str(ann2.id)],
    ]
    gold = q.gold_frame(session, project)
    assert gold.values.tolist() == [["a.png", image.id, 5.0, 6.0, "alive"]]


def test_frames_of_empty_project_have_columns(session: Session, project) -> None:
    assert list(q.clicks_frame(session, project).columns) == q.CLICK_FRAME_COLUMNS
    assert list(q.runs_frame(session, project).columns) == q.RUN_FRAME_COLUMNS
    assert list(q.gold_frame(session, project).columns) == q.GOLD_FRAME_COLUMNS
    assert q.latest_snapshot(session, project) is None


def test_latest_snapshot_and_its_cells(session: Session, project, image) -> None:
    old = ConsensusSnapshot(project_id=project.id, method="old")
    new = ConsensusSnapshot(project_id=project.id, method="new")
    session.add_all([old, new])
    session.flush()
    session.add(ConsensusCell(snapshot_id=new.id, image_id=image.id, x=1, y=2, label="dead",
                              p_alive=0.1, confidence=0.9, support=2, n_runs=3))
    session.flush()
    assert q.latest_snapshot(session, project).id == new.id
    cells = q.snapshot_cells_frame(session, new)
    assert list(cells.columns) == q.SNAPSHOT_CELL_COLUMNS
    assert cells.iloc[0][["image", "label", "support", "from_gold"]].tolist() == ["a.png", "dead", 2, False]


def test_project_summaries(session: Session, project, image) -> None:
    ann = q.get_or_create_annotator(session, project, "ann")
    q.submit_task_run(session, image, ann, [(1, 1, "alive")], "k")
    q.get_or_create_project(session, "empty")
    table = q.project_summaries(session).set_index("project")
    counts = ["images", "annotators", "task_runs", "clicks", "snapshots"]
    assert table.loc["p1", counts].tolist() == [1, 1, 1, 1, 0]
    assert table.loc["empty", "images"] == 0


@pytest.mark.parametrize(
    ("victim", "left"),  # left: TaskRun, Click, ConsensusCell, AnnotatorReliability, Image
    [
        ("annotator", [0, 0, 1, 0, 1]),
        ("project", [0, 0, 0, 0, 0]),
        ("snapshot", [1, 1, 0, 0, 1]),
        ("image", [0, 0, 0, 1, 0]),
    ],
)
def test_orm_delete_cascades(session: Session, project, image, victim: str, left: list[int]) -> None:
    from cellspot.store.models import AnnotatorReliability

    ann = q.get_or_create_annotator(session, project, "ann")
    q.submit_task_run(session, image, ann, [(1, 1, "alive")], "k")
    snap = ConsensusSnapshot(project_id=project.id, method="m")
    session.add(snap)
    session.flush()
    session.add_all([
        ConsensusCell(snapshot_id=snap.id, image_id=image.id, x=1, y=1, label="alive",
                      p_alive=1, confidence=1, support=1, n_runs=1),
        AnnotatorReliability(snapshot_id=snap.id, annotator_id=ann.id, sensitivity=1, precision=1,
                             accuracy_alive=1, accuracy_dead=1, weight=1, n_runs=1, n_clicks=1),
    ])
    session.flush()
    _ = ann.task_runs, project.images, image.task_runs  # loaded collections must not block deletes
    session.delete({"annotator": ann, "project": project, "snapshot": snap, "image": image}[victim])
    session.flush()
    session.expire_all()
    models = (TaskRun, Click, ConsensusCell, AnnotatorReliability, Image)
    assert [_count(session, m) for m in models] == left
