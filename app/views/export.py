"""Export: the same dataset as ``cellspot export`` (cells, clicks, reliability, images, COCO
keypoints, crops, manifest), zipped and downloadable."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import streamlit as st
from appkit import researcher, resources, roles

from cellspot.crops import DEFAULT_FRACTIONS, SplitError, parse_fractions
from cellspot.export import DEFAULT_MIN_CONFIDENCE, MAX_CROP_SIZE, ExportError, NoSnapshotError, export_choices
from cellspot.workflows.dashboard import EXPORTS_KEPT, export_zip

#: the progress bar's words for the export's stages (``progress(stage, done, total)``)
STAGES = {"crops": ("Cutting crops", "images"), "zip": ("Zipping the export", "files")}
UNREADABLE_SHOWN = 10


def as_shown(value: float, decimals: int = 2) -> float:
    """``value`` as a ``%.{decimals}f`` number field shows it (the browser rounds half up), so
    the export uses the number the researcher sees."""
    return float(Decimal(value).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))


roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Export")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()

with resources.session() as session:
    choices = export_choices(session, project)
if choices.n_images == 0:
    st.info(f"Project **{roles.plain(project.name)}** has no images yet: import them on the Setup page.")
    st.stop()
if not choices.snapshots:
    st.info("There is no consensus yet: press 'Recompute consensus' on the Class page first.")
    st.stop()

st.write(f"Exports a consensus snapshot of **{roles.plain(project.name)}** (the latest unless you pick another) like "
         "`cellspot export`: cells, clicks, annotator reliability, per-image table, COCO keypoints, crops "
         "and a manifest with checksums.")
snapshot_labels = {
    snap.id: f"{snap.id} · {snap.method} · {snap.created_at:%Y-%m-%d %H:%M} UTC · {snap.n_cells} cells"
             + (" (latest)" if i == 0 else "")
    for i, snap in enumerate(choices.snapshots)
}
# no min / max on the fields: a value typed out of range made the browser drop the press of
# "Build the export" without a word; the export checks the values and says what is wrong.
# Whole-number fields have an int value and step (and "%d"), so the browser shows the whole
# number it sends; the confidence is used as its field shows it (two decimals).
with st.form("export"):
    cols = st.columns(3)
    crop_size = cols[0].number_input("Crop size (px)", value=96, step=1, format="%d", key="export_crop_size",
                                     help=f"A whole number of pixels, 1 to {MAX_CROP_SIZE}.")
    min_confidence = cols[1].number_input(
        "Minimum confidence", value=DEFAULT_MIN_CONFIDENCE, step=0.05, format="%.2f", key="export_min_confidence",
        help="0 to 1. Cells whose consensus confidence is below it are left out of the cells, the COCO "
             "file and the crops (they are listed in cells_left_out.csv and counted in the manifest). The "
             "Results page's slider starts at 0 and counts every cell, so its counts are higher unless it "
             "is set to the same value.")
    seed = cols[2].number_input("Split seed", value=0, step=1, format="%d", key="export_seed",
                                help="A whole number, 0 or more.")
    cols = st.columns(2)
    split_text = cols[0].text_input(
        "Split: train, val, test", value=",".join(f"{f:g}" for f in DEFAULT_FRACTIONS), key="export_split",
        help="Fractions of the images, like `cellspot export --split`: split by image, stratified by "
             "dead fraction. Images nobody has labelled yet get the split 'unlabelled'.")
    snapshot_id = cols[1].selectbox("Consensus snapshot", list(snapshot_labels), format_func=snapshot_labels.get,
                                    help="The latest by default; an earlier one rebuilds an earlier dataset.")
    build = st.form_submit_button("Build the export", type="primary")

min_confidence = as_shown(min_confidence)
fractions, split_problem = None, None
try:
    fractions = parse_fractions(split_text)
except SplitError as exc:
    split_problem = f"Split: {exc}."
problems = [message for bad, message in (
    (not 1 <= crop_size <= MAX_CROP_SIZE, f"Crop size must be from 1 to {MAX_CROP_SIZE} px; got {crop_size}."),
    (not 0 <= min_confidence <= 1, f"Minimum confidence must be from 0 to 1; got {min_confidence:g}."),
    (seed < 0, f"Split seed must be 0 or more; got {seed}."),
    (split_problem is not None, split_problem),
) if bad]

state_key = f"export-{project.id}"
# One slot for the build's progress and its outcome, right under the form: a new build's first
# draw replaces the previous outcome (message and download button) at once.
panel = st.empty()
offered = st.session_state.pop(state_key, None) if build else None  # a new build clears the previous outcome
if build and problems:
    panel.error("Nothing was built. " + " ".join(problems))
elif build:
    with panel.container():
        bar = st.progress(0.0, text="Exporting...")

    def progress(stage: str, done: int, total: int) -> None:
        # the export only reads the store: a rerun that stops it here loses nothing
        words, unit = STAGES.get(stage, (stage, "steps"))
        bar.progress(done / total if total else 1.0, text=f"{words}: {done} / {total} {unit}")

    try:
        with resources.session() as session:
            path, report = export_zip(
                session, project, resources.settings(), crop_size=int(crop_size), split=fractions,
                min_confidence=min_confidence, seed=int(seed), snapshot=int(snapshot_id), progress=progress,
                keep=(offered["path"],) if offered else (),
            )
    except NoSnapshotError:
        panel.error("That consensus snapshot is gone: reload the page and pick another.")
    except (ExportError, SplitError) as exc:
        panel.error(f"The export failed: {exc}")
    else:
        c = report.counts
        split = c["images_per_split"]
        st.session_state[state_key] = {
            "path": str(path), "stale": report.stale, "unreadable": report.unreadable,
            "used": f"Snapshot {report.snapshot_id} ({roles.plain(report.method)}), crop size {crop_size} px, minimum "
                    f"confidence {min_confidence:.2f} ({c['cells_below_min_confidence']} cells below it left "
                    f"out), split {'/'.join(f'{f:g}' for f in fractions)} with seed {seed}: "
                    f"{c['cells_exported']} cells, {c['crops']} crops; images train {split['train']}, val "
                    f"{split['val']}, test {split['test']}, unlabelled {c['images_unlabelled']}.",
            "cells_on_unreadable": c["cells_on_unreadable_images"],
        }

done = st.session_state.get(state_key)
if done and Path(done["path"]).is_file():
    path = Path(done["path"])
    with panel.container():
        st.success(f"Export ready: {path.name} ({path.stat().st_size / 1e6:.1f} MB), kept in {path.parent} "
                   f"(with at most {EXPORTS_KEPT - 1} earlier exports of this project: older ones are deleted).")
        st.caption(done["used"])
        if done["stale"]:
            st.warning(f"The cells and crops of this export are those of the consensus snapshot, but "
                       f"{done['stale']}. clicks.csv has every click.", icon=":material/history:")
        if unreadable := done["unreadable"]:
            names = ", ".join(f"{roles.plain(name)} ({roles.plain(reason)})"
                              for name, reason in list(unreadable.items())[:UNREADABLE_SHOWN])
            more = f" and {len(unreadable) - UNREADABLE_SHOWN} more" if len(unreadable) > UNREADABLE_SHOWN else ""
            st.warning(f"{len(unreadable)} image file(s) could not be read, so their {done['cells_on_unreadable']} "
                       f"cells are in the tables but have no crops (manifest.json lists them as "
                       f"unreadable_images): {names}{more}.", icon=":material/broken_image:")
        st.download_button("Download the zip", path.read_bytes(), file_name=path.name, mime="application/zip",
                           type="primary", key="export_download")
