"""Image review: consensus cells over the image, raw clicks on demand, per-cell details and
adjudication (accept, relabel, delete, add) stored as expert cells that override consensus."""

from __future__ import annotations

import hashlib

import streamlit as st
from appkit import canvas, researcher, resources, roles
from appkit.marks import view_window
from PIL import ImageDraw

from cellspot.consensus import DEFAULT_METHOD
from cellspot.export import DEFAULT_MIN_CONFIDENCE
from cellspot.render import ImageUnavailableError, draw_consensus, find_mark, to_display_pixels
from cellspot.workflows.aggregate import aggregate
from cellspot.workflows.review import (
    DEFAULT_PICK_TOLERANCE,
    AdjudicationError,
    adjudicate,
    clear_expert_cells,
    image_review,
    researcher_annotator,
)

NEXT_CONSENSUS = "Expert cells replace consensus in the next consensus computation."
NO_CELLS = ("the image has no cells now: an expert decision that replaces its consensus in the next consensus "
            "computation, until 'Back to consensus'")
UNCERTAIN_BELOW = DEFAULT_MIN_CONFIDENCE  # cells an export leaves out by default


def cells_word(n: int, noun: str) -> str:
    """``"1 expert cell"``, ``"3 expert cells"``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
PICKED = "review_image_id"  # the image the researcher chose, by id (see the picker below)
ACTIONS = {
    "accept": "Accept the cell",
    "relabel": "Relabel the cell",
    "delete": "Delete the cell",
    "add": "Add a cell here",
}

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Review")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()

per_image = researcher.project_results(researcher.url(), project.id).per_image
if per_image.empty:
    st.info("This project has no images yet: import some on the Setup page.")
    st.stop()
# least certain images first: those are the ones worth a look
order = per_image.sort_values(["mean_confidence", "image"], na_position="last")
info = {r.image_id: f"{r.image} · {r.status} · {r.n_runs} runs · "
        + ("no cells" if r.mean_confidence != r.mean_confidence else f"confidence {r.mean_confidence:.2f}")
        for r in order.itertuples(index=False)}
# The picker is keyed by what it lists: after a recompute the order and the labels change, and
# a widget kept under one key showed its old label and followed the list position to another
# image (a click on that image's buttons was then lost). The chosen image is kept by its id.
options = order["image_id"].tolist()
chosen = st.session_state.get(PICKED)
listing = hashlib.sha1(repr([(i, info[i]) for i in options]).encode()).hexdigest()[:12]
image_id = st.selectbox("Image (least certain first)", options, format_func=info.get,
                        index=options.index(chosen) if chosen in options else 0, key=f"review_image-{listing}")
st.session_state[PICKED] = image_id

with resources.session() as session:
    review = image_review(session, image_id)
try:
    rgb = resources.display_rgb(review.image)
except ImageUnavailableError as exc:
    st.warning(f"{exc}. Its cells and clicks are listed below.")
    rgb = None

cells = review.cells.reset_index(drop=True)
point_key = f"review_point-{image_id}"
key = f"review-canvas-{image_id}"
view = view_window(review.image.width, review.image.height, 1, None)
click = canvas.take_click(key, slot="review")
if click is not None:
    st.session_state[point_key] = click
point = st.session_state.get(point_key)
# a click picks the cell whose marker it lands on: the markers' size on screen, in image px (a
# fixed image-px tolerance is a few screen px on a large image shown small)
pick = canvas.click_tolerance(view, slot="review")
selected = None
if point is not None and len(cells):
    selected = find_mark(list(cells[["x", "y", "label"]].itertuples(index=False, name=None)),
                         point[0], point[1], pick)

# a cell is named by its id, the "cell" column of the tables (not by its row in them)
cell_name = f"#{cells.at[selected, 'cell']}" if selected is not None else ""
picture_col, side_col = st.columns([3, 2], gap="medium")
with side_col:
    kind = "expert cells (they override consensus)" if review.expert else (
        f"consensus cells of snapshot {review.snapshot_id}" if review.snapshot_id else "no consensus yet")
    if review.expert and not len(cells):
        kind = "cells: an expert found none (this replaces consensus)"
    st.markdown(f"**{len(cells)}** {kind} · **{review.n_runs}** runs · **{len(review.clicks)}** raw clicks")
    show_clicks = st.toggle("Show raw clicks", key="review_clicks")
    st.caption("Shape = label (○ alive, □ with X dead); colour = probability of being alive "
               "(orange dead → grey unsure → green alive); size = confidence; dots = raw clicks. "
               "Click the image to pick a cell or a place.")

    st.subheader("Adjudicate")
    if point is None:
        st.info("Click a cell (or an empty place, to add one) on the image.")
    else:
        where = f"({point[0]:.1f}, {point[1]:.1f})"
        st.markdown(f"Picked point {where}" + (f" · cell {cell_name}" if selected is not None else " · no cell there"))
    action = st.radio("Action", list(ACTIONS), format_func=ACTIONS.get, horizontal=True, key="review_action")
    label = st.radio("Label", ["alive", "dead"], horizontal=True, key="review_label",
                     disabled=action not in ("relabel", "add"))
    needs_cell = action in ("accept", "relabel", "delete")
    on_a_cell = action == "add" and selected is not None  # a second cell on top of this one
    apply = st.button("Apply", type="primary", key="review_apply",
                      disabled=point is None or (needs_cell and selected is None) or on_a_cell)
    if point is not None and needs_cell and selected is None:
        st.caption(f"{ACTIONS[action]} needs a cell: click one on the image, or pick \"{ACTIONS['add']}\" "
                   "to add a cell at this place.")
    if point is not None and on_a_cell:
        st.caption(f"The point is on cell {cell_name}: relabel or delete it, or click an empty place to add "
                   "a cell there.")
    # the first decision copies every consensus cell into the expert set, uncertain ones too: say so before
    uncertain = 0 if review.expert else int((cells["confidence"] < UNCERTAIN_BELOW).sum())
    if uncertain:
        st.warning(f"The first decision on this image makes all its {len(cells)} consensus cells expert cells "
                   f"(certain, and gold for the students' reliability), {uncertain} of them with a consensus "
                   f"confidence below {UNCERTAIN_BELOW:g}, which an export leaves out by default (the smallest "
                   "markers). Check those first: delete or relabel what is not right.",
                   icon=":material/warning:")
    whole, back = st.columns(2)
    # a short label: "Accept the whole image" was cut off at 1024 px
    empty_now = not len(cells)
    accept_all = whole.button("Confirm no cells" if empty_now else "Accept all cells", key="review_accept_all",
                              disabled=empty_now and review.expert,
                              help=("Store the image's current cells as expert cells" if not empty_now else
                                    "Already decided: an expert found no cells here" if review.expert else
                                    "An expert decision that the image has no cells: it replaces the crowd's "
                                    f"cells (if any) until 'Back to consensus'; or add cells with "
                                    f"'{ACTIONS['add']}'"))
    to_consensus = back.button("Back to consensus", key="review_clear", disabled=not review.expert,
                               help="Remove this image's expert cells (or its expert 'no cells')")
    # expert cells imported from a file are ground truth that no click can bring back: ask first
    imported_from = cells.loc[cells["source"] != "adjudication", "source"] if review.expert else []
    imported = len(imported_from)
    confirm_key = f"review_confirm_clear-{image_id}"
    if to_consensus and imported and not st.session_state.get(confirm_key):
        st.session_state[confirm_key], to_consensus = True, False
    if st.session_state.get(confirm_key):
        st.warning(f"{imported} of this image's {len(cells)} expert cells were not decided here but "
                   f"imported ({', '.join(sorted(set(imported_from)))}). Going back to consensus deletes "
                   "them too; only importing that file again brings them back.")
        sure, keep = st.columns(2)
        if sure.button("Delete them all", key="review_clear_confirm"):
            st.session_state.pop(confirm_key)
            to_consensus = True
        elif keep.button("Keep them", key="review_clear_cancel"):
            st.session_state.pop(confirm_key)
            st.rerun()

    message = None

    def outcome(done, what: str) -> str:
        """What a decision left: the expert cells (and how many came from consensus, uncertain
        ones among them), or the expert's "no cells"."""
        copied = (f" ({done.seeded} copied from consensus first"
                  + (f", {uncertain} of them uncertain" if uncertain else "") + ")") if done.seeded else ""
        if not done.n_expert_cells:
            return f"{what}: {NO_CELLS}{copied}."
        return f"{what}: the image has {cells_word(done.n_expert_cells, 'expert cell')}{copied}. {NEXT_CONSENSUS}"

    try:
        if apply and point is not None:
            with resources.session() as session:
                done = adjudicate(session, image_id, action, point[0], point[1],
                                  label if action in ("relabel", "add") else None,
                                  researcher=researcher_annotator(session, project), tolerance=pick)
            message = outcome(done, f"{ACTIONS[action]}: done")
        elif accept_all:
            with resources.session() as session:
                done = adjudicate(session, image_id, "accept",
                                  researcher=researcher_annotator(session, project))
            message = outcome(done, "Accepted" if done.n_expert_cells else "Confirmed")
        elif to_consensus:
            # the snapshot still holds the expert cells as this image's cells: recompute, so that the
            # page (and the next adjudication, which starts from the snapshot) shows the crowd's cells
            with st.spinner("Removing the expert cells and recomputing consensus..."):
                with resources.session() as session:
                    n = clear_expert_cells(session, image_id)
                    report = aggregate(session, project, method=DEFAULT_METHOD)
            removed = f"Removed {cells_word(n, 'expert cell')}" if n else "Removed the expert's \"no cells\""
            message = (f"{removed} and recomputed consensus (snapshot {report.snapshot_id}): the image shows the "
                       "crowd's cells again.")
    except AdjudicationError as exc:
        st.error(str(exc))
    if message:
        st.session_state.pop(point_key, None)
        researcher.refresh()
        st.session_state["review_message"] = message
        st.rerun()
    if "review_message" in st.session_state:
        st.success(st.session_state.pop("review_message"))
    if st.button("Recompute consensus", key="review_aggregate"):
        st.session_state["review_message"] = researcher.recompute_consensus(project.id)
        st.rerun()  # the image, its cells, status and the picker from the new snapshot

with picture_col:
    if rgb is not None:
        scale, factor = canvas.render_scale(view, "review"), canvas.screen_factor(view, "review")
        picture = draw_consensus(rgb, cells, scale, clicks=review.clicks if show_clicks else None,
                                 min_radius=5 * factor, max_radius=13 * factor, selected=selected,
                                 click_radius=4 * factor)
        if point is not None:  # the picked point: a small cross
            px, py = to_display_pixels(point[0], point[1], scale, review.image.width, review.image.height)
            draw = ImageDraw.Draw(picture)
            arm = 9 * factor
            for width, colour in ((round(5 * factor), (0, 0, 0)), (round(2 * factor), (255, 255, 255))):
                draw.line([(px - arm, py), (px + arm, py)], fill=colour, width=width)
                draw.line([(px, py - arm), (px, py + arm)], fill=colour, width=width)
        canvas.show(picture, view, key)
        st.caption(f"{review.image.name} ({review.image.width}×{review.image.height} px) · "
                   f"status {review.image.status}")

st.subheader("Cells")
if selected is not None:
    st.markdown(f"Selected cell {cell_name}:")
    st.dataframe(cells.iloc[[selected]], hide_index=True, width="stretch")
    near = review.clicks[((review.clicks["x"] - cells.at[selected, "x"]) ** 2
                          + (review.clicks["y"] - cells.at[selected, "y"]) ** 2) <= DEFAULT_PICK_TOLERANCE**2]
    st.markdown(f"Raw clicks within {DEFAULT_PICK_TOLERANCE:g} px of it: **{len(near)}**")
    st.dataframe(near, hide_index=True, width="stretch")
with st.expander(f"All cells ({len(cells)})", expanded=selected is None):
    st.dataframe(cells, hide_index=True, width="stretch")
if show_clicks:
    with st.expander(f"Raw clicks ({len(review.clicks)})"):
        st.dataframe(review.clicks, hide_index=True, width="stretch")
