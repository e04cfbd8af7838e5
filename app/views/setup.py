"""Project setup: create a project; import images (upload or server folder) with metadata, click
exports (tidy CSV, PyBossa) and expert cells; class codes, target runs, retirement, gold rate."""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import streamlit as st
from appkit import researcher, resources, roles

from cellspot.active.retirement import SETTING_KEYS, RetirementPolicy
from cellspot.active.rounds import target_runs_setting
from cellspot.active.scheduler import DEFAULT_LEASE_SECONDS
from cellspot.importers import (
    CellspotImportError,
    ImageImportReport,
    import_clicks,
    import_gold,
    import_images,
)
from cellspot.names import tidying_note
from cellspot.store.models import Project
from cellspot.workflows.classroom import DEFAULT_FEEDBACK_RADIUS, DEFAULT_GOLD_RATE
from cellspot.workflows.dashboard import (
    ConflictingProjectSettingsError,
    DashboardError,
    create_project,
    update_project_settings,
)

log = logging.getLogger(__name__)

IMAGE_TYPES = ["png", "jpg", "jpeg", "tif", "tiff", "zip"]
DEFAULT_POLICY = RetirementPolicy()
#: what a project without the setting gets (the form shows it, so Save stores no other value;
#: the runs per image: cellspot.active.rounds.target_runs_setting, as rounds read it)
UNSET_DEFAULTS = {"gold_rate": DEFAULT_GOLD_RATE, "feedback_radius": DEFAULT_FEEDBACK_RADIUS}
#: what a new project starts with
NEW_PROJECT_DEFAULTS = {"target_runs_per_image": 5, "gold_rate": 0.1, "feedback_radius": 20.0,
                        **{SETTING_KEYS[f.name]: getattr(DEFAULT_POLICY, f.name) for f in fields(RetirementPolicy)}}

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Setup")


def _retirement_shown(current: Mapping) -> RetirementPolicy:
    """The retirement policy of the settings ``current`` (to fill the form), the default one
    when they do not make a valid policy."""
    try:
        return RetirementPolicy.from_settings(current)
    except (TypeError, ValueError) as exc:  # RetirementPolicyError is a ValueError
        log.warning("retirement settings %s do not make a policy (%s): showing the defaults",
                    {k: current.get(k) for k in SETTING_KEYS.values() if k in current}, exc)
        return DEFAULT_POLICY


class _Field(NamedTuple):
    """A number field of the settings form: its label, the values it takes (in the form's unit),
    and the shorter name a message about two fields uses."""

    label: str
    lowest: float
    highest: float
    whole: bool = False
    short: str = ""

    def allowed(self) -> str:
        return f"{'a whole number' if self.whole else 'a number'} from {self.lowest:g} to {self.highest:g}"


#: the number fields by project setting. The widgets take any number and Save checks these
#: ranges: a widget with bounds kept its previous value when one out of range was typed (shown
#: red), so Save stored the old value and said "Saved.".
NUMBER_FIELDS = {
    "target_runs_per_image": _Field("Target runs per image", 1, 1000, whole=True),
    "gold_rate": _Field("Gold rate", 0, 1),
    "retire_min_runs": _Field("Retire after at least ... runs", 1, 1000, whole=True),
    "retire_min_confidence": _Field("... when every cell has confidence ≥", 0, 1),
    "retire_min_cell_certainty": _Field("... and every cell's existence certainty ≥", 0, 1),
    "retire_count_tolerance": _Field("Count tolerance (share of the cells)", 0, 10),
    "retire_max_runs": _Field("Retire after at most ... runs (0 = no maximum)", 0, 1000, whole=True,
                              short="Retire after at most ... runs"),
    "feedback_radius": _Field("Feedback radius (px)", 1, 500),
    "lease_seconds": _Field("Hold a student's image for (minutes)", 1, 24 * 60, whole=True),
}
#: how to settle two settings that contradict each other (ConflictingProjectSettingsError's pair)
CONFLICT_HINTS = {
    ("retire_max_runs", "retire_min_runs"): "raise the maximum, lower the minimum, or set the maximum to 0 for none",
    ("retire_max_runs", "target_runs_per_image"):
        "images retire at the maximum, so a round could never give them the target; lower the target, raise "
        "the maximum, or set the maximum to 0 for none",
}


def _number(col, setting: str, value: float, key: str, help: str = "", step: float | None = None):
    """The number input of ``setting`` (unbounded: :func:`_out_of_range` checks it) in ``col``;
    its help ends with the values allowed."""
    field = NUMBER_FIELDS[setting]
    allowed = field.allowed()
    return col.number_input(field.label, value=value, step=step, key=key,
                            help=f"{help} {allowed[0].upper()}{allowed[1:]}.".strip())


def _out_of_range(typed: Mapping[str, float]) -> list[str]:
    """One line per value of ``typed`` (setting -> the number in the form) outside its field's range."""
    problems = []
    for setting, value in typed.items():
        field = NUMBER_FIELDS[setting]
        if not field.lowest <= value <= field.highest:
            shown = value if isinstance(value, int) else f"{value:g}"
            problems.append(f'"{field.label}" must be {field.allowed()}; you typed {shown}.')
    return problems


def _refusal(exc: DashboardError) -> str:
    """The workflow's refusal of the settings in the form's words: two fields that contradict
    each other by their labels and the values typed; any other refusal as it is."""
    if isinstance(exc, ConflictingProjectSettingsError) and (exc.low[0], exc.high[0]) in CONFLICT_HINTS:
        (low_key, low), (high_key, high) = exc.low, exc.high
        low_field, high_field = NUMBER_FIELDS[low_key], NUMBER_FIELDS[high_key]
        return (f'"{low_field.short or low_field.label}" ({low}) is below "{high_field.short or high_field.label}" '
                f"({high}): {CONFLICT_HINTS[(low_key, high_key)]}.")
    return str(exc)


def _settings_inputs(current: dict, prefix: str) -> tuple[dict, list[str]]:
    """The project-setting widgets; returns the values typed (validated by the workflow) and
    the problems of those out of their field's range (nothing may be stored when there are any)."""
    policy = _retirement_shown(current)
    cols = st.columns(3)
    codes = cols[0].text_input(
        "Class codes (comma-separated)", ", ".join(current.get("class_codes") or []), key=f"{prefix}_codes",
        help="Students join with one of these; 2 to 32 letters, digits, - or _. Each code names one project.")
    target = _number(cols[1], "target_runs_per_image", int(target_runs_setting(current)), f"{prefix}_target")
    gold_now = current.get("gold_rate", UNSET_DEFAULTS["gold_rate"])
    gold = _number(cols[2], "gold_rate", float(gold_now), f"{prefix}_gold", step=0.05,
                   help="Share of images served from the expert-marked (gold) images.")
    cols = st.columns(3)
    min_runs = _number(cols[0], "retire_min_runs", int(policy.min_runs), f"{prefix}_min_runs",
                       help="No image retires on its consensus before it has this many runs.")
    min_conf = _number(cols[1], "retire_min_confidence", float(policy.min_confidence), f"{prefix}_min_conf",
                       step=0.05, help="Every consensus cell's label (alive or dead) must be at least this sure.")
    certainty = _number(
        cols[2], "retire_min_cell_certainty", float(policy.min_cell_certainty), f"{prefix}_min_cell_certainty",
        step=0.05,
        help="Each cell's probability p of being a cell must be far from 0.5: |2p − 1| at least this "
             "(0.5 means p ≤ 0.25 or p ≥ 0.75); 0 skips this check.")
    cols = st.columns(3)
    check_count = cols[0].checkbox(
        "... and the cell count agrees", policy.count_tolerance is not None, key=f"{prefix}_count_check",
        help="Untick to retire without comparing the number of clicks per run with the consensus count.")
    shown_tolerance = policy.count_tolerance if policy.count_tolerance is not None else DEFAULT_POLICY.count_tolerance
    tolerance = _number(
        cols[0], "retire_count_tolerance", float(shown_tolerance or 0.0), f"{prefix}_count_tolerance", step=0.05,
        help="The median number of clicks per run must be within this share of the consensus cell count "
             "(at least 1 click off is always allowed).")
    max_runs = _number(cols[1], "retire_max_runs", int(policy.max_runs or 0), f"{prefix}_max_runs",
                       help="An image with this many runs retires whatever its consensus; 0 never retires by "
                            "run count.")
    radius_now = current.get("feedback_radius", UNSET_DEFAULTS["feedback_radius"])
    radius = _number(cols[2], "feedback_radius", float(radius_now), f"{prefix}_radius",
                     help="A student's mark this close to an expert cell counts as finding it.")
    lease = _number(
        st.columns(3)[0], "lease_seconds",
        max(1, round(float(current.get("lease_seconds", DEFAULT_LEASE_SECONDS)) / 60)), f"{prefix}_lease",
        help="An image given to a student is held for them this long after their last click, in a round and "
             "outside one, so classmates get other images; an image left unfinished (a closed tab) is free "
             "again after it. A nickname used this recently also counts as taken: a second student typing "
             "it is asked \"is that you?\".")
    typed = {"target_runs_per_image": target, "gold_rate": gold, "retire_min_runs": min_runs,
             "retire_min_confidence": min_conf, "retire_min_cell_certainty": certainty,
             "retire_max_runs": max_runs, "feedback_radius": radius, "lease_seconds": lease,
             **({"retire_count_tolerance": tolerance} if check_count else {})}  # unticked: not used
    values = {"class_codes": codes, "target_runs_per_image": int(target), "gold_rate": float(gold),
              "retire_min_runs": int(min_runs), "retire_min_confidence": float(min_conf),
              "feedback_radius": float(radius), "lease_seconds": int(lease) * 60,
              SETTING_KEYS["min_cell_certainty"]: float(certainty),
              SETTING_KEYS["count_tolerance"]: float(tolerance) if check_count else None,
              SETTING_KEYS["max_runs"]: int(max_runs) or None}
    return values, _out_of_range(typed)


def _problems(problems: Iterable[object], tmp: str) -> list[str]:
    """Problem lines with the temporary upload folder stripped (they name the uploaded file)."""
    strip = re.compile(re.escape(tmp.rstrip("/")) + r"/upload-[^/]+/")
    return [strip.sub("", str(p)) for p in problems]


def _listed(message: str) -> str:
    """An importer's message (a summary line, then one ``file:line: field: reason`` per line) as
    markdown: the summary, then a bullet per problem (plain newlines would run them together)."""
    head, *rest = message.split("\n")
    items = [roles.plain(line.strip()) for line in rest if line.strip()]
    return roles.plain(head) + ("\n\n" + "\n".join(f"- {item}" for item in items) if items else "")


def _save_uploads(files, tmp: str) -> list[Path]:
    """Write uploaded files to ``tmp/upload-*/<their name>`` (names kept: they become image names)."""
    paths = []
    for upload in files:
        folder = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp))
        path = folder / Path(upload.name).name
        path.write_bytes(upload.getbuffer())
        paths.append(path)
    return paths


def _show_image_report(report, tmp: str) -> None:
    st.success(roles.plain(report.summary()))
    errors = _problems(report.errors, tmp)
    if errors:
        st.error("Not imported:\n\n" + "\n".join(f"- {roles.plain(e)}" for e in errors))
    duplicates = _problems(report.duplicates, tmp)
    if duplicates:
        st.warning("Not imported again (the same picture as another image):\n\n"
                   + "\n".join(f"- {roles.plain(d)}" for d in duplicates))
    notes = _problems(report.notes, tmp)
    if notes:
        st.info("Imported, but note:\n\n" + "\n".join(f"- {roles.plain(n)}" for n in notes))


# --------------------------------------------------------------------------- create

with st.expander("Create a project", expanded=researcher.projects(researcher.url()).empty):
    with st.form("create_project"):
        name = st.text_input("Name", key="new_name")
        description = st.text_area("Description", key="new_description", height=68)
        values, out_of_range = _settings_inputs(NEW_PROJECT_DEFAULTS, "new")
        create = st.form_submit_button("Create", type="primary")
    if create and out_of_range:
        st.error(roles.plain("Nothing was created. " + " ".join(out_of_range)))
    elif create:
        try:
            with resources.session() as session:
                project = create_project(session, name, description, **values)
                new_id, created_name = project.id, project.name
        except DashboardError as exc:
            st.error(roles.plain(_refusal(exc)))
        else:
            researcher.refresh()
            researcher.switch_project(new_id)
            tidied = tidying_note(name)  # create_project stores the name tidied: say so
            st.session_state["setup_message"] = f"Project {created_name!r} created{f' ({tidied})' if tidied else ''}."
            st.rerun()

if "setup_message" in st.session_state:
    st.success(roles.plain(st.session_state.pop("setup_message")))
if project is None:
    st.info("No project yet: create one above.")
    st.stop()

st.header(roles.plain(project.name))
counts_slot = st.empty()  # filled at the end of the page, after this run's imports and recompute


def _show_counts() -> None:
    summary = researcher.projects(researcher.url()).set_index("project_id").loc[project.id]
    counts_slot.caption(
        f"{summary['images']} images ({summary['retired']} retired) · {summary['annotators']} annotators · "
        f"{summary['task_runs']} runs · {summary['clicks']} clicks · {summary['gold_cells']} expert cells · "
        f"{summary['snapshots']} consensus snapshots")


# --------------------------------------------------------------------------- settings

with st.expander("Class codes and rules", expanded=True):
    with st.form("project_settings"):
        values, out_of_range = _settings_inputs(project.settings or {}, f"p{project.id}")
        save = st.form_submit_button("Save", type="primary")
    if save and out_of_range:
        st.error(roles.plain("Nothing was saved. " + " ".join(out_of_range)))
    elif save:
        try:
            with resources.session() as session:
                stored = session.get(Project, project.id)
                update_project_settings(session, stored, **values)
        except DashboardError as exc:
            st.error(roles.plain(_refusal(exc)))
        else:
            researcher.refresh()
            st.success("Saved.")

# --------------------------------------------------------------------------- images

def _import_with_progress(paths: list[Path], meta_path: Path | None, what: str) -> ImageImportReport:
    """import_images with a progress bar that moves per file (left at its last state when done);
    one transaction, so a failure stores nothing."""
    bar = st.progress(0.0, text=f"Importing {what}...")

    def progress(done: int, total: int, label: str) -> None:
        name = label.replace("\\", "/").rsplit("/", 1)[-1]  # the file, not the temporary folder
        bar.progress(done / total if total else 1.0, text=f"Imported {done} / {total}: {name}")

    try:
        with resources.session() as session:
            return import_images(session, session.get(Project, project.id), paths,
                                 settings=resources.settings(), metadata_csv=meta_path, progress=progress)
    except BaseException:
        bar.empty()
        raise


st.subheader("Images")
upload_tab, folder_tab = st.tabs(["Upload files or a zip", "Folder on the server"])
with upload_tab:
    # the files stay chosen after an import, as the click file does: a cleared uploader ignored
    # the same file chosen again after a refused import (importing it twice adds nothing)
    with st.form("upload_images"):
        files = st.file_uploader("Images (TIFF, PNG, JPEG; 8/16-bit, grey or RGB) or zip archives",
                                 type=IMAGE_TYPES, accept_multiple_files=True, key="upload_images")
        meta = st.file_uploader("Metadata CSV (optional): image, condition, drug, dose, time, ...",
                                type=["csv"], key="upload_meta")
        go = st.form_submit_button("Import", type="primary")
    if go and files:
        with tempfile.TemporaryDirectory(prefix="cellspot-upload-") as tmp:
            paths = _save_uploads(files, tmp)
            meta_path = _save_uploads([meta], tmp)[0] if meta is not None else None
            try:
                report = _import_with_progress(paths, meta_path, f"{len(paths)} file(s)")
            except CellspotImportError as exc:
                st.error(_listed(_problems([exc], tmp)[0]))
            else:
                researcher.refresh()
                _show_image_report(report, tmp)
    elif go:
        st.warning("Choose at least one file.")
with folder_tab:
    with st.form("folder_images"):
        folder = st.text_input("Folder (or zip, or image) on the server", key="folder_path",
                               help="Read recursively; only image files and zips are imported.")
        folder_meta = st.text_input("Metadata CSV on the server (optional)", key="folder_meta")
        go_folder = st.form_submit_button("Import", type="primary")
    if go_folder:
        source = Path(folder.strip()).expanduser()
        meta_path = Path(folder_meta.strip()).expanduser() if folder_meta.strip() else None
        if not folder.strip():
            st.error("Enter the path of a folder, zip or image on the server.")
        elif not source.exists():
            st.error(f"{roles.plain(source)} does not exist on the server.")
        elif meta_path is not None and not meta_path.is_file():
            st.error(f"The metadata file {roles.plain(meta_path)} is a folder, not a CSV file." if meta_path.is_dir()
                     else f"The metadata file {roles.plain(meta_path)} does not exist on the server.")
        else:
            try:
                report = _import_with_progress([source], meta_path, str(source))
            except CellspotImportError as exc:
                st.error(_listed(str(exc)))
            else:
                researcher.refresh()
                _show_image_report(report, "/nonexistent")

# --------------------------------------------------------------------------- clicks and expert cells

st.subheader("Clicks and expert cells")
clicks_col, gold_col = st.columns(2)
with clicks_col:
    # the file stays chosen after an import: a refused one (rows to fix, runs to replace) is tried
    # again with a box ticked; a cleared uploader ignored the same file chosen again
    with st.form("upload_clicks"):
        click_file = st.file_uploader("Click export: tidy CSV or PyBossa task runs", type=["csv"],
                                      key="upload_clicks")
        fmt = st.selectbox("Format", ["auto", "csv", "pybossa"], key="clicks_format",
                           format_func={"auto": "detect", "csv": "tidy CSV", "pybossa": "PyBossa task runs"}.get)
        skip = st.checkbox("Import the valid rows when some are invalid", key="clicks_skip")
        replace = st.checkbox("Replace runs imported before from another file", key="clicks_replace",
                              help="For a corrected or extended copy of a click file imported before: its runs "
                                   "(same task_run, or annotator and image) replace the earlier ones")
        go_clicks = st.form_submit_button("Import clicks", type="primary")
    if go_clicks and click_file is None:
        st.warning("Choose a click file first.")
    if go_clicks and click_file is not None:
        with tempfile.TemporaryDirectory(prefix="cellspot-upload-") as tmp:
            path = _save_uploads([click_file], tmp)[0]
            try:
                with st.spinner("Importing clicks..."):
                    with resources.session() as session:
                        report = import_clicks(session, session.get(Project, project.id), path, format=fmt,
                                               skip_invalid=skip, settings=resources.settings(),
                                               source_name=f"uploaded {click_file.name}", replace_runs=replace)
            except CellspotImportError as exc:  # the importer's hints name the CLI flags: name the checkboxes
                st.error(_listed(_problems([exc], tmp)[0].replace(
                    "skip_invalid / --skip-invalid imports the valid rows",
                    "tick 'Import the valid rows when some are invalid' to import the rest").replace(
                    "replace_runs / --replace-runs replaces the earlier runs with this file's",
                    "tick 'Replace runs imported before from another file' to replace them")))
            else:
                researcher.refresh()
                (st.warning if report.duplicates else st.success)(roles.plain(_problems([report.summary()], tmp)[0]))
                if report.rejects_path:
                    st.warning(f"{report.rejected} rejected rows, with reasons, in {roles.plain(report.rejects_path)} "
                               "on the server, and here:")
                    st.download_button("Download the rejected rows (CSV)", Path(report.rejects_path).read_bytes(),
                                       file_name=Path(report.rejects_path).name, mime="text/csv",
                                       key="clicks_rejects", icon=":material/download:", on_click="ignore")
with gold_col:
    with st.form("upload_gold"):  # the file stays chosen, as above (cells already stored are skipped)
        gold_file = st.file_uploader("Expert cells CSV: image, x, y, label", type=["csv"], key="upload_gold")
        go_gold = st.form_submit_button("Import expert cells", type="primary")
    if go_gold and gold_file is None:
        st.warning("Choose an expert cells file first.")
    if go_gold and gold_file is not None:
        with tempfile.TemporaryDirectory(prefix="cellspot-upload-") as tmp:
            path = _save_uploads([gold_file], tmp)[0]
            try:
                with resources.session() as session:
                    report = import_gold(session, session.get(Project, project.id), path,
                                         source=f"import:{gold_file.name}")
            except CellspotImportError as exc:
                st.error(_listed(_problems([exc], tmp)[0]))
            else:
                researcher.refresh()
                st.success(roles.plain(_problems([report.summary()], tmp)[0]))

st.subheader("Consensus")
if st.button("Recompute consensus", key="setup_aggregate",
             help="Cells, reliability and retirement from every click (after imports or new rules)"):
    st.success(researcher.recompute_consensus(project.id))

_show_counts()
