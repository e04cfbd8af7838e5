"""Rounds: open the next labelling round (the images the system is least sure about go to the
students first), see its queue and why each image is there, close it or roll it back, follow the
learning curve, and switch on the automatic mode.

The page only calls :mod:`cellspot.workflows.rounds` through ``appkit.rounds_view``; the
automatic mode runs in the background worker (``cellspot worker``).
"""

from __future__ import annotations

from functools import partial

import streamlit as st
from appkit import researcher, roles, rounds_view

from cellspot.workflows.rounds import ANY_ROUND, DEFAULT_STRATEGY

ERRORS = (ValueError, LookupError)  # the workflow's errors (strategy, scores, rounds, settings, queue)

roles.require_researcher()  # every researcher page checks again
project = researcher.page_header("Rounds")
if project is None:
    st.info("No project yet: create one on the Setup page.")
    st.stop()
URL = rounds_view.url()

notice = st.session_state.pop("rounds_notice", None)
if notice:
    st.success(notice)


act = partial(researcher.act, "rounds_notice", ERRORS)  # message after the rerun, error at once


strategies = rounds_view.strategies()
names = strategies["name"].tolist()
summaries = dict(zip(strategies["name"], strategies["summary"]))


# --------------------------------------------------------------------------- open a round

with st.form("rounds_open", border=True):
    st.subheader("Open a new round")
    cols = st.columns([3, 1, 1])
    strategy = cols[0].selectbox("Strategy", names, index=names.index(DEFAULT_STRATEGY), key="round_strategy",
                                 format_func=lambda n: f"{n}{' (default)' if n == DEFAULT_STRATEGY else ''}: "
                                                       f"{summaries[n]}",
                                 help="How images are ranked; combined blends crowd and model signals")
    top = cols[1].number_input("Top N images (optional)", min_value=1, value=None, step=1, key="round_top",
                               placeholder="all images")
    default_runs = rounds_view.default_target_runs(project)  # at most the project's maximum of runs
    max_runs = rounds_view.max_runs(project)
    # keyed by project: a keyed widget keeps its value, so switching projects shows the new default
    target_runs = cols[2].number_input(
        "Runs per image this round", min_value=1, max_value=max(rounds_view.TARGET_RUNS_MAX, default_runs),
        value=default_runs, step=1, key=f"round_target_runs_{project.id}",
        help="Each queued image is served to this many students in the round. 1 spreads the runs over more "
             "images, and an image comes back in a later round while the crowd still disputes it."
             + (f" An image gets at most {max_runs} runs in all (Setup page)." if max_runs is not None else ""))
    st.caption(rounds_view.models_caption(rounds_view.sources(URL, project.id)))
    submitted = st.form_submit_button("Open round", type="primary", icon=":material/playlist_add:")
runs_note = st.empty()  # filled below, once the open round is known (its own warning says it then)
round_request = (project.id, strategy, top, target_runs)
if submitted and researcher.repeated("open_round", round_request):
    st.info("This round was opened a moment ago (a double click?), so no second round was opened.")
elif submitted:
    # the open round this page showed when the button was pressed (written below on every run):
    # when another is open by now (the first press of a double click opened it, and this run
    # began before that one had drawn it), nothing more is opened
    seen = st.session_state.get("rounds_seen_open")
    act(rounds_view.open_round, project.id, strategy, top, target_runs,
        seen[1] if seen is not None and seen[0] == project.id else ANY_ROUND,
        remember=researcher.done("open_round", round_request))


# --------------------------------------------------------------------------- current round

st.subheader("Current round")
current = rounds_view.current(URL, project.id)
st.session_state["rounds_seen_open"] = (project.id, None if current is None else current.number)
if current is None or current.target_runs != target_runs:  # the round's own warning says it otherwise
    over = rounds_view.runs_over_max(target_runs, max_runs)
    if over:
        runs_note.warning(over, icon=":material/warning:")
# the numbers are bound when the buttons are drawn: on the click's rerun the page may already see
# another open round, or none (a second tab closed or rolled this one back), and must not close or
# roll back that one; a click's rerun acts even when the round it saw is gone (the workflow says so)
to_close = st.session_state.pop("rounds_close_number", None)
if to_close is not None and researcher.repeated("close_round", (project.id, to_close)):
    st.info(f"Round {to_close} was closed a moment ago (a double click?), so nothing more was done.")
elif to_close is not None:
    act(rounds_view.close, project.id, to_close, remember=researcher.done("close_round", (project.id, to_close)))
wanted = st.session_state.pop("rounds_rollback_number", None)
if wanted is not None:
    act(rounds_view.rollback, project.id, wanted)
if current is None:
    st.info("No round is open: students get the images with the fewest runs. Open a round above.")
else:
    st.markdown(f"**Round {current.number}** · {current.strategy} · {current.images} queued · "
                f"{current.task_runs} task runs since it opened · {current.scoring}")
    over = rounds_view.runs_over_max(current.target_runs, max_runs, current.number)
    if over:
        st.warning(over, icon=":material/warning:")
    close_col, rollback_col = st.columns(2)
    with close_col.popover("Close this round", icon=":material/stop_circle:",
                           help="End this round without opening another: students get the images with the "
                                "fewest runs, as before any round"):
        st.write(f"Close round {current.number}? Its queue stops serving and no round is open afterwards: "
                 "students get the images with the fewest runs until you open the next round. The task runs "
                 "students submitted stay, and the round stays in the history.")
        st.button(f"Yes, close round {current.number}", key="rounds_close", type="primary",
                  on_click=st.session_state.__setitem__, args=("rounds_close_number", current.number))
    with rollback_col.popover("Roll back this round", icon=":material/undo:",
                              help="Undo this round: the round before it (if any) serves the students again"):
        st.write(f"Roll back round {current.number}? Its queue stops serving; the task runs students "
                 "submitted stay.")
        st.button(f"Yes, roll back round {current.number}", key="rounds_rollback", type="primary",
                  on_click=st.session_state.__setitem__, args=("rounds_rollback_number", current.number))
    queue = rounds_view.queue(URL, project.id)
    if queue.empty:
        st.info("The queue is empty" + (" (no open image was left to score when it opened)" if current.empty else "")
                + ": students get the open images with the fewest runs, if any, and gold images, while this round "
                "is open.")
    else:
        target = current.target_runs or rounds_view.default_target_runs(project)
        line, finished = rounds_view.queue_status(queue, target)
        st.caption(line)
        if finished:
            st.success(finished, icon=":material/task_alt:")
        tied = rounds_view.score_warning(queue, current.strategy)
        if tied:
            st.warning(tied)
        order = rounds_view.rank_caption(queue)
        if order:
            st.caption(order)
        shown = rounds_view.queue_with_thumbnails(queue)
        components = shown.columns[len(rounds_view.QUEUE_SHOWN):]
        st.dataframe(shown, hide_index=True, width="stretch", key="rounds_queue", column_config={
            "thumbnail": st.column_config.ImageColumn("preview", width="small"),
            "score": st.column_config.NumberColumn("score", format="%.3f"),
            "runs_round": st.column_config.NumberColumn("runs this round", help=f"Of the {target} it gets"),
            "leased": st.column_config.NumberColumn("being labelled", help="Students holding it now"),
            "n_runs": st.column_config.NumberColumn("runs in all"),
            "reason": st.column_config.TextColumn("reason", width="large",
                                                  help="Why it is queued (hover a cell for the whole text)"),
            **{c: st.column_config.NumberColumn(c, format="%.3f") for c in components},
        })
        st.download_button("Download the queue (CSV)", queue.drop(columns=["components"]).to_csv(index=False),
                           f"{project.name}-round-{current.number}.csv", "text/csv")


# --------------------------------------------------------------------------- history

st.subheader("Round history")
rounds = rounds_view.history(URL, project.id)
if rounds.empty:
    st.info("No round yet.")
else:
    numbers = ("round", "images", "target_runs", "task_runs_at_open", "task_runs")
    st.dataframe(rounds_view.history_table(rounds), hide_index=True, width="stretch", key="rounds_history",
                 column_config={c: (st.column_config.NumberColumn if c in numbers else st.column_config.TextColumn)(
                     label) for c, label in rounds_view.HISTORY_LABELS.items()})
    # the CSV keeps the machine names and empty cells
    st.download_button("Download the round history (CSV)", rounds[rounds_view.HISTORY_SHOWN].to_csv(index=False),
                       f"{project.name}-rounds.csv", "text/csv")


# --------------------------------------------------------------------------- learning curve

st.subheader("Learning curve")
points = rounds_view.curve(URL, project.id)
if points.empty:
    st.info("The curve starts with the first round opened after a model has been trained: each round adds the "
            "task runs collected so far and the metrics of the models it used.")
else:
    st.altair_chart(rounds_view.curve_chart(points), width="stretch", key="rounds_curve")
    st.caption(rounds_view.curve_caption(points))
    st.download_button("Download the learning curve (CSV)", points.to_csv(index=False),
                       f"{project.name}-learning-curve.csv", "text/csv")


# --------------------------------------------------------------------------- automatic mode

st.subheader("Automatic mode")
status = rounds_view.auto(URL, project.id)
with st.form("rounds_auto", border=True):
    cols = st.columns([1, 1, 2, 1], vertical_alignment="bottom")
    # keyed by project, as the runs per image above: a keyed widget keeps its value, and Save would
    # write the previous project's settings into this one
    enabled = cols[0].toggle("Enabled", value=status.settings.enabled, key=f"auto_enabled_{project.id}",
                             help="Automatic mode: retrain both models in the background and refresh the queue "
                                  "on its own")
    every = cols[1].number_input("Retrain after N new task runs", min_value=1, max_value=1_000_000, step=1,
                                 value=status.settings.every_runs, key=f"auto_every_{project.id}")
    auto_strategy = cols[2].selectbox("Strategy of the new rounds", names, key=f"auto_strategy_{project.id}",
                                      index=names.index(status.settings.strategy))
    auto_top = cols[3].number_input("Top N (optional)", min_value=1, step=1, value=status.settings.top,
                                    key=f"auto_top_{project.id}", placeholder="all images")
    saved = st.form_submit_button("Save", icon=":material/save:")
if saved:
    act(rounds_view.save_auto, project.id, enabled, every, auto_strategy, auto_top)

if status.pending_since is not None:
    st.info(f"An automatic round is queued or running since {status.pending_since:%Y-%m-%d %H:%M} UTC "
            "(its runs show on the Models page once the worker takes it). Nothing happens without a "
            "`cellspot worker` (same CELLSPOT_HOME and database as this app).", icon=":material/hourglass_top:")
    if st.button("Forget the pending round", key="rounds_auto_forget", icon=":material/cancel:",
                 help="When its worker was stopped, or none was running: another automatic round may then start "
                      "(its job, if still in the queue, does nothing when a worker starts)"):
        act(rounds_view.forget_auto, project.id)
else:
    st.caption(rounds_view.auto_counter(status))
if status.last:
    last = status.last
    when = str(last.get("finished_at") or "")[:16].replace("T", " ")
    text = f"Last automatic round: {last.get('status')} at {when} UTC · {last.get('message')}"
    (st.error if last.get("status") == "failed" else st.caption)(text)
if st.button("Run an automatic round now", key="rounds_auto_now", icon=":material/autorenew:",
             disabled=status.pending_since is not None,
             help="Aggregate, retrain the detector and the classifier, predict and open a new round, in the worker"):
    act(rounds_view.run_auto_now, project.id)
st.caption("The worker (`cellspot worker`) checks once a minute; it trains on the latest consensus and promotes "
           "the new models (roll back on the Models page). Training takes a few minutes on a laptop CPU.")
