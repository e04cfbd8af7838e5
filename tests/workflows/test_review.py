"""Review decisions that leave an image without cells: an expert's "no cells" replaces its
consensus until "Back to consensus" (it came back at the next aggregate before)."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from cellspot.store import queries as q
from cellspot.store.models import ConsensusSnapshot, Image, Project
from cellspot.workflows import review as rv
from cellspot.workflows.aggregate import aggregate, snapshot_lag


@pytest.fixture
def project(session: Session) -> Project:
    return q.get_or_create_project(session, "p", class_codes=["7B"])


@pytest.fixture
def images(session: Session, project) -> dict[str, Image]:
    """Image a: one cell that 3 students clicked; image b: no click at all."""
    out = {n: Image(project=project, name=n, width=100, height=80, has_pixels=False) for n in "ab"}
    session.add_all(out.values())
    session.flush()
    for i in range(3):
        who = q.get_or_create_annotator(session, project, f"s{i}", "7B")
        q.submit_task_run(session, out["a"], who, [(30.0 + i, 40.0, "alive")], f"a{i}")
    session.flush()
    return out


def _cells(session, project, image) -> list[tuple[int, int, str]]:
    report = aggregate(session, project)
    cells = q.snapshot_cells_frame(session, session.get(ConsensusSnapshot, report.snapshot_id))
    return [(round(r.x), round(r.y), r.label) for r in cells[cells["image_id"] == image.id].itertuples()]


def test_deleting_the_last_cell_keeps_the_image_empty(session, project, images) -> None:
    image = images["a"]
    assert _cells(session, project, image) == [(31, 40, "alive")]
    done = rv.adjudicate(session, image.id, "delete", 31, 40)
    assert (done.seeded, done.n_expert_cells) == (1, 0)
    review = rv.image_review(session, image.id)
    assert review.expert and review.cells.empty  # the page shows the expert's "no cells"
    assert snapshot_lag(session, project, session.get(ConsensusSnapshot, q.latest_snapshot(session, project).id))
    assert _cells(session, project, image) == []  # the deleted cell stays deleted
    assert aggregate(session, project).reused  # and the fingerprint sees the flag: nothing new
    # a later decision starts from the empty set, not from the crowd's cells again
    done = rv.adjudicate(session, image.id, "add", 70, 20, "dead")
    assert (done.seeded, done.n_expert_cells) == (0, 1) and not session.get(Image, image.id).expert_empty
    assert _cells(session, project, image) == [(70, 20, "dead")]
    # back to consensus: the crowd's cell again
    rv.adjudicate(session, image.id, "delete", 70, 20)
    assert rv.clear_expert_cells(session, image.id) == 0
    assert not rv.image_review(session, image.id).expert
    assert _cells(session, project, image) == [(31, 40, "alive")]


def test_accepting_an_image_without_cells_confirms_it_empty(session, project, images) -> None:
    aggregate(session, project)
    done = rv.adjudicate(session, images["b"].id, "accept")
    assert done.n_expert_cells == 0 and session.get(Image, images["b"].id).expert_empty
    assert q.expert_empty_ids(session, project) == [images["b"].id]
    assert rv.image_review(session, images["b"].id).expert


def test_importing_gold_cells_clears_the_empty_mark(session, project, images, tmp_path: Path) -> None:
    from cellspot.importers import import_gold

    aggregate(session, project)
    rv.adjudicate(session, images["a"].id, "delete", 31, 40)
    assert q.expert_empty_ids(session, project) == [images["a"].id]
    gold = tmp_path / "gold.csv"
    gold.write_text("image,x,y,label\na,10,10,dead\n")
    import_gold(session, project, gold)
    session.flush()
    assert not session.get(Image, images["a"].id).expert_empty and q.expert_empty_ids(session, project) == []
    assert _cells(session, project, images["a"]) == [(10, 10, "dead")]


def test_the_flag_survives_a_commit(engine) -> None:
    """The column is in the migrated schema on both backends (server default false)."""
    from cellspot.store.db import transaction

    with transaction(engine) as session:
        project = q.get_or_create_project(session, "p")
        image = Image(project=project, name="x", width=10, height=10)
        session.add(image)
        session.flush()
        image_id = image.id
    with engine.connect() as conn:
        assert conn.execute(sa.text("select expert_empty from images where id = :i"), {"i": image_id}).scalar() \
            in (False, 0)
