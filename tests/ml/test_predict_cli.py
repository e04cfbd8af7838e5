"""``cellspot predict`` on tiny images, with fake models behind the loaders (tests/ml/predict_fakes.py)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from PIL import Image as PILImage

from cellspot.ml import project_predictions
from cellspot.ml.predict import CELL_COLUMNS, SUMMARY_COLUMNS
from clikit import ok_cli, run_cli

from .predict_fakes import CELLS, disc_pixels, noisy_image_bytes, write_images


@pytest.fixture
def model_dirs(tmp_path: Path) -> tuple[Path, Path]:
    det, cls = tmp_path / "models" / "det-x", tmp_path / "models" / "cls-y"
    det.mkdir(parents=True)
    cls.mkdir(parents=True)
    return det, cls


def _store_project(settings, images: Path, *, active: bool = True):
    """Init the store, import ``images`` into project "p", optionally with active runs."""
    from cellspot.importers import import_images
    from cellspot.ml import registry
    from cellspot.store.db import transaction
    from cellspot.store.migrate import prepare_store
    from cellspot.store.queries import get_or_create_project

    engine = prepare_store(settings)
    with transaction(engine) as session:
        project = get_or_create_project(session, "p")
        import_images(session, project, [images], settings)
        if active:
            for kind in ("detector", "classifier"):
                run = registry.create_run(session, kind, project=project)
                run.status = "done"
                registry.promote(session, run)
    return engine


def _stored(engine) -> pd.DataFrame:
    from cellspot.store.db import session_factory
    from cellspot.store.queries import get_project

    with session_factory(engine)() as session:
        return project_predictions.predictions_frame(session, get_project(session, "p"))


def test_predict_cli_with_model_folders(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    result = ok_cli("predict", images, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1])

    assert fake_loaders == list(model_dirs)  # each model loaded once for all images
    cells = pd.read_csv(out / "cells.csv")
    assert list(cells.columns) == CELL_COLUMNS
    assert set(cells.detector_version) == {"det-x"} and set(cells.classifier_version) == {"cls-y"}
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS
    assert summary.set_index("image").n_cells.to_dict() == {n: len(c) for n, c in CELLS.items()}
    assert sorted(p.name for p in (out / "overlays").iterdir()) == sorted(CELLS)
    assert "predicted 3 image(s) with det-x + cls-y" in result.output
    assert "4 (2 alive, 2 dead; viability 50.0%)" in result.output
    assert f"cells:    {out / 'cells.csv'}" in result.output
    assert "not stored: there is no cellspot store here" in result.output
    assert not settings.home.exists()  # predicting with folders creates no store


def test_predict_cli_no_overlays_and_single_file(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    images = write_images(tmp_path / "images")
    out = tmp_path / "out"
    ok_cli("predict", images / "well_b.png", "--out", out, "--detector", model_dirs[0], "--classifier",
        model_dirs[1], "--no-overlays", "--no-store")
    assert sorted(p.name for p in out.iterdir()) == ["cells.csv", "summary.csv"]
    assert pd.read_csv(out / "cells.csv").label.tolist() == ["dead"]


def test_predict_cli_refuses_a_folder_with_other_files_before_predicting(settings, tmp_path: Path, fake_loaders,
                                                                         model_dirs) -> None:
    images = write_images(tmp_path / "images")
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.txt").write_text("months of work")
    result = run_cli("predict", images, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1],
                     "--no-store")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "holds files that no prediction wrote (chapter1.txt)" in result.output
    assert "predict" not in result.stderr.split("Error:")[0]  # it stopped before the progress bar
    assert sorted(p.name for p in out.iterdir()) == ["chapter1.txt"]


def test_an_empty_out_or_outdir_is_refused_not_the_current_folder(settings, tmp_path: Path, monkeypatch) -> None:
    images = write_images(tmp_path / "images")
    monkeypatch.chdir(tmp_path)
    for args in (["predict", images, "--out", ""], ["export", ""]):
        result = run_cli(*args)
        assert result.exit_code == 2 and "needs a folder; got an empty value" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_out_folder_that_cannot_be_made_is_refused_before_predicting(settings, tmp_path: Path, fake_loaders,
                                                                         model_dirs) -> None:
    images = write_images(tmp_path / "images")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli("predict", images, "--out", blocker / "out", "--detector", model_dirs[0],
                     "--classifier", model_dirs[1], "--no-store")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "cannot be created (Not a directory)" in result.output
    assert "predict" not in result.stderr.split("Error:")[0]  # it stopped before the progress bar


def test_predict_cli_refuses_two_images_with_one_name_before_loading_models(settings, tmp_path: Path, fake_loaders,
                                                                           model_dirs) -> None:
    first = write_images(tmp_path / "day1")
    second = write_images(tmp_path / "day2")
    result = run_cli("predict", first / "well_b.png", second / "well_b.png", "--out", tmp_path / "out",
                     "--detector", model_dirs[0], "--classifier", model_dirs[1], "--no-store")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"two images are named 'well_b.png': {first / 'well_b.png'} and {second / 'well_b.png'}" in result.output
    assert fake_loaders == []  # refused before the models were loaded
    assert not (tmp_path / "out").exists()


def test_predict_cli_bad_file(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    images = write_images(tmp_path / "images")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    out = tmp_path / "out"
    args = ("predict", images, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1])
    failed = run_cli(*args)
    assert failed.exit_code != 0 and "broken.png" in failed.output and "Traceback" not in failed.output
    assert not out.exists() or not (out / "cells.csv").exists()
    result = ok_cli(*args, "--skip-invalid")
    assert "skipped 1 unreadable file(s)" in result.output
    assert pd.read_csv(out / "errors.csv").image.tolist() == ["broken.png"]


def test_unreadable_files_are_all_listed_before_the_models_load(settings, tmp_path: Path, fake_loaders,
                                                                model_dirs) -> None:
    images = write_images(tmp_path / "images", {"a.png": [(10, 10, "alive")], "b.png": []})
    (images / "broken.png").write_text("a text file")
    (images / "truncated.png").write_bytes(noisy_image_bytes("PNG")[:500])
    out = tmp_path / "out1"
    args = ("predict", images, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1])
    failed = run_cli(*args)
    assert failed.exit_code == 1 and "Traceback" not in failed.output
    assert fake_loaders == [] and not out.exists()  # refused before the models loaded; nothing written
    assert "predict" not in failed.stderr.split("Error:")[0]  # no prediction started
    assert failed.stderr.split("Error: ", 1)[1].splitlines() == [
        "2 of 4 image file(s) cannot be read:",
        f"  {images / 'broken.png'}: not a PNG, JPEG or TIFF image",
        f"  {images / 'truncated.png'}: corrupt or truncated PNG data: image file is truncated",
        "nothing was written; --skip-invalid skips them (listing them in errors.csv) and predicts the other "
        "2 image(s)"]

    result = ok_cli(*args, "--skip-invalid")
    assert "predicted 2 image(s)" in result.output and "skipped 2 unreadable file(s)" in result.output
    errors = pd.read_csv(out / "errors.csv")
    assert errors.image.tolist() == ["broken.png", "truncated.png"]
    assert errors.error.tolist()[1] == "corrupt or truncated PNG data: image file is truncated"


def test_the_list_of_unreadable_files_is_capped(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    images = write_images(tmp_path / "images", {"a.png": []})
    for i in range(23):
        (images / f"bad{i:02d}.png").write_text("junk")
    failed = run_cli("predict", images, "--out", tmp_path / "out", "--detector", model_dirs[0],
                     "--classifier", model_dirs[1])
    lines = failed.stderr.split("Error: ", 1)[1].splitlines()
    assert lines[0] == "23 of 24 image file(s) cannot be read:"
    assert len(lines) == 23 and lines[20] == f"  {images / 'bad19.png'}: not a PNG, JPEG or TIFF image"
    assert lines[21] == "  ... and 3 more" and "--skip-invalid" in lines[22]


@pytest.mark.parametrize("skip_invalid", [True, False])
def test_no_readable_image_fails_and_writes_nothing(settings, tmp_path: Path, fake_loaders, model_dirs,
                                                   skip_invalid: bool) -> None:
    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "broken.png").write_text("a text file")
    out = tmp_path / "out"
    result = run_cli("predict", folder, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1],
                     *(["--skip-invalid"] if skip_invalid else []))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.split("Error: ", 1)[1].splitlines() == [
        "no readable image among the 1 image file(s) given; nothing was predicted or written (--out is left as "
        "it was):",
        f"  {folder / 'broken.png'}: not a PNG, JPEG or TIFF image"]
    assert fake_loaders == [] and not out.exists()


def test_a_decode_failure_after_the_check_writes_nothing_when_no_image_is_left(
        settings, tmp_path: Path, fake_loaders, model_dirs, monkeypatch: pytest.MonkeyPatch) -> None:
    from cellspot.ml import predict

    folder = tmp_path / "only_bad"
    folder.mkdir()
    (folder / "broken.png").write_text("a text file")
    monkeypatch.setattr(predict, "image_problem", lambda path: None)  # as if it passed the cheap check
    out = tmp_path / "out"
    result = run_cli("predict", folder, "--out", out, "--detector", model_dirs[0], "--classifier", model_dirs[1],
                     "--skip-invalid")
    assert result.exit_code == 1 and "no readable image among the 1 image file(s) given" in result.output
    assert not out.exists()


def test_no_images_found_names_the_folders(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("predict", empty, "--out", tmp_path / "out", "--detector", model_dirs[0],
                     "--classifier", model_dirs[1])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: no images found in {empty}; expected files ending in .png" in result.output
    assert fake_loaders == []


def test_predict_cli_uses_and_stores_the_active_models(settings, tmp_path: Path, fake_loaders) -> None:
    from cellspot.ml import registry
    from cellspot.store.db import session_factory
    from cellspot.store.queries import get_project

    images = write_images(tmp_path / "images")
    engine = _store_project(settings, images)
    extra = write_images(tmp_path / "more", {"elsewhere.png": [(30, 30, "alive")]})
    try:
        result = ok_cli("predict", images, extra / "elsewhere.png", "--out", tmp_path / "out", "--project", "p")
        with session_factory(engine)() as session:
            project = get_project(session, "p")
            active = [registry.active_run(session, project, k) for k in ("detector", "classifier")]
        assert fake_loaders == [registry.model_dir(settings, run) for run in active]
        assert "stored 4 cells on 3 image(s) of project 'p'" in result.output
        stored = _stored(engine)
        assert len(stored) == 4 and set(stored.detector_version) == {active[0].version}
        assert "elsewhere.png" not in set(stored.image)

        ok_cli("predict", images, "--out", tmp_path / "out", "--project", "p")  # again: replaced
        assert len(_stored(engine)) == 4
        ok_cli("predict", images, "--out", tmp_path / "out", "--project", "p", "--no-store")
        assert len(_stored(engine)) == 4

        folders = [str(registry.model_dir(settings, run)) for run in active]
        for folder in folders:
            Path(folder).mkdir(parents=True, exist_ok=True)
        given = ok_cli("predict", images, "--out", tmp_path / "out", "--project", "p",
                    "--detector", folders[0], "--classifier", folders[1])
        assert "stored 4 cells" in given.output  # the active folders given explicitly count as active
    finally:
        engine.dispose()


def test_predict_cli_other_models_are_not_stored(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    images = write_images(tmp_path / "images")
    engine = _store_project(settings, images)
    try:
        args = ("predict", images, "--out", tmp_path / "out", "--project", "p",
                "--detector", model_dirs[0], "--classifier", model_dirs[1])
        assert "not stored: the models are not the active ones of project 'p'" in ok_cli(*args).output
        forced = run_cli(*args, "--store")
        assert forced.exit_code != 0 and "--store needs the active models" in forced.output
        assert len(_stored(engine)) == 0
    finally:
        engine.dispose()


@pytest.mark.parametrize("with_store", [True, False])
def test_predict_cli_without_active_models_says_how_to_train(settings, tmp_path: Path, fake_loaders, with_store) -> None:
    images = write_images(tmp_path / "images")
    if with_store:
        _store_project(settings, images, active=False).dispose()
    result = run_cli("predict", images, "--out", tmp_path / "out", "--project", "p")
    assert result.exit_code != 0 and "Traceback" not in result.output
    if with_store:
        assert "train one with `cellspot train detector --project p`" in result.output
    else:
        assert "cellspot init" in result.output and "--detector MODEL_DIR" in result.output
    assert fake_loaders == []


def test_predict_cli_reads_any_mode(settings, tmp_path: Path, fake_loaders, model_dirs) -> None:
    rgb = disc_pixels([(10, 10, "alive"), (40, 30, "dead")])
    PILImage.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    PILImage.fromarray(rgb).convert("P", palette=PILImage.Palette.ADAPTIVE, colors=8).save(tmp_path / "palette.png")
    ok_cli("predict", tmp_path / "gray.png", tmp_path / "palette.png", "--out", tmp_path / "out",
        "--detector", model_dirs[0], "--classifier", model_dirs[1])
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("image")
    assert summary.n_cells.to_dict() == {"gray.png": 2, "palette.png": 2}


def test_predict_stores_each_project_image_once_and_marks_the_images_it_ran_on(settings, tmp_path: Path,
                                                                               fake_loaders) -> None:
    """Copies of one project image are one prediction; an image predicted empty is known to
    have been predicted, an image left out is not (the active-learning signals tell them apart)."""
    import shutil

    from sqlalchemy import select

    from cellspot.active.signals import image_signals
    from cellspot.store.db import session_factory
    from cellspot.store.models import Image, PredictedImage

    images = write_images(tmp_path / "images")
    engine = _store_project(settings, images)
    copies = tmp_path / "copies"
    for sub in ("a", "b"):
        (copies / sub).mkdir(parents=True)
        shutil.copy(images / "well_a.png", copies / sub / "one.png")
    shutil.copy(images / "well_c.png", copies / "empty.png")
    try:
        result = ok_cli("predict", copies, "--out", tmp_path / "out", "--project", "p")
        assert "stored 3 cells on 2 image(s) of project 'p'" in result.output
        stored = _stored(engine)
        assert len(stored) == 3 and set(stored.image) == {"well_a.png"}
        with session_factory(engine)() as session:
            marks = session.execute(select(Image.name, PredictedImage.n_cells)
                                    .join(Image, Image.id == PredictedImage.image_id)).tuples().all()
            signals = image_signals(session, "p").set_index("image")
        assert sorted(marks) == [("well_a.png", 3), ("well_c.png", 0)]
        assert signals.loc["well_c.png", "n_pred_cells"] == 0 and signals.loc["well_a.png", "n_pred_cells"] == 3
        assert pd.isna(signals.loc["well_b.png", "n_pred_cells"])  # never predicted: no model signal
        assert not signals.loc["well_b.png", "has_model"]
    finally:
        engine.dispose()


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that sets it."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_predict_cli_uses_the_torch_threads_setting(settings, tmp_path: Path, fake_loaders, model_dirs,
                                                     monkeypatch, torch_threads) -> None:
    """CELLSPOT_TORCH_THREADS was documented for prediction but only training applied it."""
    import torch

    torch.set_num_threads(2)
    monkeypatch.setenv("CELLSPOT_TORCH_THREADS", "1")
    ok_cli("predict", write_images(tmp_path / "images"), "--out", tmp_path / "out", "--detector", model_dirs[0],
           "--classifier", model_dirs[1], "--no-overlays")
    assert torch.get_num_threads() == 1


def test_predicting_a_project_uses_the_torch_threads_setting(settings, tmp_path: Path, fake_loaders,
                                                             torch_threads) -> None:
    """A worker's prediction job (and an automatic round) runs with its share of the threads."""
    import torch

    from cellspot.store.db import session_factory
    from cellspot.store.queries import get_project

    engine = _store_project(settings, write_images(tmp_path / "images"))
    torch.set_num_threads(2)
    with session_factory(engine)() as session:
        project_predictions.predict_project(session, settings.model_copy(update={"torch_threads": 1}),
                                            get_project(session, "p"))
    assert torch.get_num_threads() == 1
