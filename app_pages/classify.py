"""Classify: try a trained model on a picture (upload, camera or an example), see its
verdict in plain words, what it looks at (Grad-CAM), and how stage 2 changed its mind.

Thin page: widgets -> core.analysis.inference -> render. Uploads stay in memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

from app_pages._common import get_store, new_run_link, pick_run
from core.analysis import inference
from core.runs.entities import TRAINING_KINDS
from core.views import charts
from core.views.images import panel, pixelated
from core.views.tables import fmt_pct, short_id, tiny_validation, val_caveat
from core.views.text import md

log = logging.getLogger("finetune_lab.classify")

P = "classify."
SOURCES = ("Upload a picture", "Take a photo", "Pick an example")
DISPLAY_PX = 256  # on-screen side of the picture panels, in pixels
TOP_K = 5


@st.cache_resource(max_entries=6, show_spinner="Loading the model…")
def load_predictor(path: str, mtime_ns: int) -> inference.Predictor:
    """One Predictor per checkpoint file version: a retrained/overwritten file (new mtime)
    is loaded afresh. Raises CheckpointError with a plain message."""
    del mtime_ns  # part of the cache key only
    return inference.Predictor.load(path)


def predictor_for(path: str | Path) -> inference.Predictor:
    p = Path(path)
    return load_predictor(str(p), p.stat().st_mtime_ns)


def usable_predictor(run) -> inference.Predictor | None:
    """The run's best model, or None after saying plainly why it can't be used."""
    from core.engine.checkpoints import CheckpointError  # imports torch: only once a model is used

    try:
        return predictor_for(run.best_checkpoint)
    except (CheckpointError, OSError) as exc:
        st.error(f"This model can't be used: {exc}. Pick another one above.")
        return None


@st.cache_resource(max_entries=8, show_spinner="Finding example pictures…")
def load_gallery(source: str, path: str, classes: tuple[str, ...], per_class: int):
    """Example pictures from a run's data."""
    return inference.gallery(source, path, list(classes), per_class=per_class)


def model_label(run) -> str:
    """The run and its one headline figure, named as on Runs and Compare: test accuracy
    where the run has a test split, else validation accuracy (said so)."""
    name = f"{run.name or run.id} · {short_id(run.id)}"
    if run.test_acc is not None:
        acc = f"test accuracy {fmt_pct(run.test_acc)}"
    elif run.best_val_acc is not None:
        acc = f"validation accuracy {fmt_pct(run.best_val_acc)} (no test split)"
        if n := tiny_validation(run):
            acc += f", only {n} pictures"
    else:
        acc = "not scored"
    stopped = " · stopped early" if run.status == "cancelled" else ""
    return f"{name} — {acc}{stopped}"


def model_facts(run, predictor) -> None:
    """What the chosen model knows and which file answers, on the page itself: a verdict
    can only ever be one of these classes."""
    classes = ", ".join(md(inference.display_name(c)) for c in predictor.classes)
    st.markdown(f"This model knows **{len(predictor.classes)} classes**: {classes}. "
                f"Whatever the picture, its answer is one of these.")
    st.caption(f"The verdict comes from `{Path(predictor.path).name}` (the best checkpoint: "
               f"stage {predictor.stage}, epoch {predictor.epoch}) of run **{md(run.name)}** "
               f"(`{short_id(run.id)}`), trained on {run.config.data_source}"
               f"{' ' + md(run.config.data_path) if run.config.data_path else ''}.")
    if caveat := val_caveat(run):
        st.warning(caveat)


def sure_threshold() -> float:
    """The probability (0..1) from which the verdict says "pretty sure" (set under Details)."""
    return st.session_state.get(P + "threshold", int(inference.DEFAULT_SURE_THRESHOLD * 100)) / 100


def get_picture(run, predictor):
    """The chosen picture as (RGB PIL image, caption, true label or None), or None."""
    source = st.radio("Picture", SOURCES, horizontal=True, key=P + "source",
                      label_visibility="collapsed")
    if source == SOURCES[0]:
        # Any file is accepted and checked in core, so a refusal (HEIC, SVG, too big, not a
        # picture) is said in words on the page, not only as a mark on the upload chip.
        upload = st.file_uploader(
            "Choose a picture from your computer", key=P + "upload",
            help=f"JPEG, PNG, GIF, WebP, BMP or TIFF, up to {inference.MAX_UPLOAD_BYTES // 1024**2} MB.")
        if upload is None:
            return None
        # Bytes stay in memory: decoded from a BytesIO, never saved.
        return inference.decode_upload(upload.getvalue(), upload.name), upload.name, None
    if source == SOURCES[1]:
        photo = st.camera_input("Take a photo", key=P + "camera")
        if photo is None:
            return None
        return inference.decode_upload(photo.getvalue(), "camera photo"), "your photo", None

    items, note = load_gallery(run.config.data_source, run.config.data_path,
                               tuple(predictor.classes), 2 if len(predictor.classes) <= 6 else 1)
    if note:
        st.caption(note)
    if not items:
        return None
    pick_key = P + f"pick.{run.id}"
    picked = min(st.session_state.get(pick_key, 0), len(items) - 1)
    per_row = 8
    for start in range(0, len(items), per_row):
        cols = st.columns(per_row)
        for col, i in zip(cols, range(start, min(start + per_row, len(items)))):
            item = items[i]
            with col:
                try:
                    st.image(pixelated(item.open(), 72), caption=item.caption)
                except inference.ImageRejected as exc:
                    st.caption(str(exc))
                    continue
                if st.button("Try this" if i != picked else "Chosen", key=P + f"try.{i}",
                             type="primary" if i == picked else "secondary", disabled=i == picked):
                    st.session_state[pick_key] = i
                    st.rerun()
    item = items[picked]
    return item.open(), f"example: {item.caption}", item.true_label


def show_result(run, predictor, img, caption: str, true_label: str | None) -> None:
    preds = predictor.predict(img, TOP_K)
    top = preds[0]
    st.header(md(inference.verdict(preds, sure_threshold())))
    st.markdown(f"Best guess: **{md(inference.display_name(top.label))}** ({inference.percent(top.probability)} sure)")
    if true_label is not None:
        right = "got it right" if true_label == top.label else "got it wrong"
        st.caption(f"This example really is: {md(inference.display_name(true_label))} — the model {right}.")

    left, middle, chart = st.columns([1, 1, 1.4])
    with left:
        st.image(panel(img, DISPLAY_PX), caption=f"Your picture ({caption})")
    with middle:
        r = predictor.resolution
        st.image(pixelated(predictor.model_view(img), DISPLAY_PX),
                 caption=f"What the model sees: {r} × {r} pixels")
    with chart:
        st.markdown("**Its top guesses**")
        st.plotly_chart(charts.top_guesses_figure([inference.display_name(p.label) for p in preds],
                                                  [p.probability for p in preds],
                                                  [inference.percent(p.probability) for p in preds]),
                        key=P + "chart", config={"displayModeBar": False})

    st.subheader("What did it look at?")
    layer = st.session_state.get(P + "cam_layer", "layer4")
    # core picks a method that means something at this input size, or says why there is none.
    explanation = predictor.explanation(img, top.index, layer=layer)
    if explanation.available:
        from core.analysis.explain import overlay

        c1, c2 = st.columns([1, 2])
        c1.image(overlay(predictor.model_view(img), explanation.heatmap, size=DISPLAY_PX),
                 caption=f"Heat map for “{inference.display_name(top.label)}”")
        c2.markdown(explanation.meaning)
    else:
        st.info(explanation.meaning)

    before_after(run, predictor, img)

    with st.expander("Details"):
        import pandas as pd

        st.dataframe(pd.DataFrame({"class": [p.label for p in preds],
                                   "probability": [round(p.probability, 4) for p in preds]}),
                     hide_index=True, key=P + "table")
        st.slider("Say “pretty sure” from this confidence (%)", 10, 95,
                  int(inference.DEFAULT_SURE_THRESHOLD * 100), step=5, key=P + "threshold")
        st.radio("Heat map from", ("layer4", "layer3"), horizontal=True, key=P + "cam_layer",
                 help="layer4 is the last convolutional block (Grad-CAM's usual choice); layer3 "
                      "has a grid twice as fine.")
        st.markdown(f"Checkpoint `{predictor.path}` — stage {predictor.stage}, epoch {predictor.epoch}; "
                    f"input {predictor.resolution} px; {len(predictor.classes)} classes: "
                    f"{', '.join(predictor.classes)}.")


def before_after(run, predictor, img) -> None:
    """Stage 1's model beside the verdict's: the right panel is the very model (checkpoint
    and preprocessing) the verdict above came from, so its figures are the same."""
    st.subheader("Before and after")
    n_stages = len(run.config.stages)
    models = inference.stage_checkpoints(get_store().files(run.id), n_stages)
    if models.note:
        st.caption(models.note)
        return
    from core.engine.checkpoints import CheckpointError

    cols = st.columns(2)
    for col, path, title in ((cols[0], models.stage1, "After stage 1"),
                             (cols[1], None, f"The model above (stage {predictor.stage}, "
                                              f"epoch {predictor.epoch}: the best)")):
        with col:
            st.markdown(f"**{title}**")
            try:
                preds = (predictor_for(path) if path else predictor).predict(img, 3)
            except (CheckpointError, OSError) as exc:
                st.caption(f"That model can't be loaded: {exc}")
                continue
            st.markdown(md(inference.verdict(preds, sure_threshold())))
            st.caption(" · ".join(f"{md(inference.display_name(p.label))} {inference.percent(p.probability)}"
                                  for p in preds))
    st.caption("Stage 1 trains only the last layers of the network; the later stages also "
               "adjust deeper layers. Seeing both shows what that second step changed.")


# ---------------------------------------------------------------- page

def page() -> None:
    """The page body. It ends early with `return`, never st.stop(): the app draws the
    sidebar after the page (streamlit_app.py), and st.stop() would end that run too."""
    st.title("Classify a picture")
    store = get_store()
    runs = inference.classifiable_runs(store)
    if not runs:
        st.info("No trained model yet — start a run on New run")
        new_run_link()
        return
    newest = store.list_runs(kinds=TRAINING_KINDS)[0]  # the data set the user last worked with: the newest run's
    best = inference.default_run(runs, preferred_data=inference.data_set_of(newest))
    run = pick_run("Model", runs, P + "run", model_label, default_id=best.id,
                   help="Which trained model to ask. Picked for you: a finished run with a real "
                        "validation set, on the data you last used, with the best test accuracy.")
    predictor = usable_predictor(run)
    if predictor is None:
        return
    model_facts(run, predictor)
    try:
        picture = get_picture(run, predictor)
    except inference.ImageRejected as exc:
        st.error(str(exc))
        return
    if picture is None:
        st.caption("Choose a picture above to see what the model thinks it is.")
        return
    try:
        show_result(run, predictor, *picture)
    except Exception as exc:  # the page must stay usable whatever the picture does
        log.exception("classify failed")
        st.error(f"Something went wrong while looking at this picture ({type(exc).__name__}: {exc}). "
                 f"Try another picture.")


page()
