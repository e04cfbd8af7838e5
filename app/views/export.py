"""Export: the same dataset as ``cellspot export`` (cells, clicks, reliability, images, COCO
keypoints, crops, manifest), zipped and downloadable."""

from __future__ import annotations

from pathlib import Path

import streamlit as st
from appkit import researcher, resources, roles

from cellspot.crops import SplitError
from cellspot.export import MAX_CROP_SIZE, ExportError, NoSnapshotError
from cellspot.workflows.dashboard import export_zip

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Export")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()

st.write(f"Exports the latest consensus of **{project.name}** like `cellspot export`: cells, clicks, "
         "annotator reliability, per-image table, COCO keypoints, crops and a manifest with checksums.")
# no min / max on the fields: a value typed out of range made the browser drop the press of
# "Build the export" without a word; the export checks the values and says what is wrong
with st.form("export"):
    cols = st.columns(3)
    crop_size = cols[0].number_input("Crop size (px)", value=96, step=8, help=f"1 to {MAX_CROP_SIZE} px")
    min_confidence = cols[1].number_input("Minimum confidence", value=0.5, step=0.05, help="0 to 1")
    seed = cols[2].number_input("Split seed", value=0, step=1, help="a whole number, 0 or more")
    build = st.form_submit_button("Build the export", type="primary")

problems = [message for bad, message in (
    (not 1 <= crop_size <= MAX_CROP_SIZE, f"Crop size must be from 1 to {MAX_CROP_SIZE} px; got {crop_size}."),
    (not 0 <= min_confidence <= 1, f"Minimum confidence must be from 0 to 1; got {min_confidence:g}."),
    (seed < 0, f"Split seed must be 0 or more; got {seed}."),
) if bad]
if build and problems:
    st.error("Nothing was built. " + " ".join(problems))
elif build:
    bar = st.progress(0.0, text="Exporting...")

    def progress(stage: str, done: int, total: int) -> None:
        # the export only reads the store: a rerun that stops it here loses nothing
        bar.progress(done / total if total else 1.0, text=f"Cutting {stage}: {done} / {total}")

    try:
        with st.spinner("Exporting..."):
            with resources.session() as session:
                path, report = export_zip(session, project, resources.settings(), crop_size=int(crop_size),
                                          min_confidence=float(min_confidence), seed=int(seed), progress=progress)
    except NoSnapshotError:
        st.error("There is no consensus yet: press 'Recompute consensus' on the Class page first.")
    except (ExportError, SplitError) as exc:
        st.error(f"The export failed: {exc}")
    else:
        st.session_state[f"export_path-{project.id}"] = str(path)
        st.session_state[f"export_stale-{project.id}"] = report.stale
    finally:
        bar.empty()

done = st.session_state.get(f"export_path-{project.id}")
if done and Path(done).is_file():
    path = Path(done)
    st.success(f"Export ready: {path.name} ({path.stat().st_size / 1e6:.1f} MB), kept in {path.parent}.")
    if stale := st.session_state.get(f"export_stale-{project.id}"):
        st.warning(f"The cells and crops of this export are those of the latest consensus, but {stale}. "
                   "clicks.csv has every click.", icon=":material/history:")
    st.download_button("Download the zip", path.read_bytes(), file_name=path.name, mime="application/zip",
                       type="primary", key="export_download")
