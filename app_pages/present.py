"""Present: what a trained model thinks of a picture, for a room. A large picture (camera,
upload or an example), the verdict in big plain words, the top three guesses as bars, and
"what did it look at?" one tap away. No run ids, no paths, no sidebar (streamlit_app.py
draws none here).

In the lab the presenter picks the model (Presenter settings) and can hide the controls
(?present=1). In viewer mode the model is the one the owner named (core.access, present_run)
or the best one, and nothing can be changed. Uploads stay in memory and are size-limited.

Thin page: widgets -> core.analysis.inference -> render.
"""

from __future__ import annotations

import logging

import streamlit as st

from app_pages._common import access, get_store, predictor_for
from core.access import VIEWER_UPLOAD_MB
from core.analysis import inference
from core.views.images import panel, pixelated
from core.views.text import html as as_html

log = logging.getLogger("finetune_lab.present")

P = "present."
PRESENT_PARAM = "present"  # ?present=1: the controls hidden, for a shared screen
SOURCES = ("Camera", "Upload", "Examples")
PICTURE_PX = 640  # the picture's width on screen, px (narrower columns shrink it to fit)
THUMB_PX = 96  # an example's tile, px
TOP_N = 3
VIEWER_UPLOAD_BYTES = VIEWER_UPLOAD_MB * 1024 * 1024

# Sizes in rem so a phone's browser scales them with its own font size; the verdict is read
# from the back of a room, the bars from the middle.
STYLE = """
<style>
.present-verdict {font-size: clamp(2rem, 5vw, 4.5rem); font-weight: 700; line-height: 1.1;
                  margin: 0.2em 0 0.4em 0;}
.present-verdict.unsure {color: #8a5a00;}
.present-bar {margin: 0.5em 0;}
[class*="st-key-present"][class*="look"] p {font-size: clamp(1.2rem, 2vw, 1.8rem);}
/* The picture fills its column but never the whole height of a 16:9 screen. */
.st-key-present-picture img {max-height: 68vh; object-fit: contain;}
.present-note {font-size: clamp(1rem, 1.6vw, 1.4rem); color: #4A5060;}
.present-bar .label {font-size: clamp(1.2rem, 2.2vw, 2rem); display: flex;
                     justify-content: space-between;}
.present-bar .track {background: #E4E8F0; border-radius: 0.4em; height: 1.4em;}
.present-bar .fill {background: #2F6FDE; border-radius: 0.4em; height: 100%;}
</style>
"""


def presenter_model(runs) -> object:
    """The run whose model is shown: in the lab the presenter's pick (opening on the owner's
    present_run, else the best); for a viewer the owner's present_run, else the best."""
    you = access()
    best = inference.default_run(runs, selected_id=you.present_run)
    if you.lab:
        chosen = inference.default_run(runs, selected_id=st.session_state.get(P + "run_id")
                                       or you.present_run)
        return st.selectbox("Model", runs, key=P + "run", index=runs.index(chosen),
                            format_func=lambda r: f"{r.name} — "
                            + (f"{r.best_val_acc:.0%} right on held-out pictures"
                               if r.best_val_acc is not None else "not scored"))
    return best


def get_picture(predictor, run):
    """The chosen picture as (RGB PIL image, true label or None), or None."""
    source = st.segmented_control("Picture from", SOURCES, default=SOURCES[2], key=P + "source",
                                  label_visibility="collapsed")
    if source == "Upload":
        upload = st.file_uploader("Choose a picture", key=P + "upload",
                                  type=None, max_upload_size=VIEWER_UPLOAD_MB,
                                  help=f"A photo or picture up to {VIEWER_UPLOAD_MB} MB. "
                                       f"It is looked at and forgotten: never stored.")
        if upload is None:
            return None
        data = upload.getvalue()  # in memory only; decoded from bytes, never written
        if len(data) > VIEWER_UPLOAD_BYTES:
            raise inference.ImageRejected(f"This picture is too big ({len(data) / 1024**2:.1f} MB). "
                                          f"The limit here is {VIEWER_UPLOAD_MB} MB.")
        return inference.decode_upload(data, upload.name), None
    if source == "Camera":
        photo = st.camera_input("Take a photo", key=P + "camera", label_visibility="collapsed")
        if photo is None:
            return None
        return inference.decode_upload(photo.getvalue(), "camera photo"), None
    if source is None:
        return None
    items = gallery(run.config.data_source, run.config.data_path, tuple(predictor.classes))
    if not items:
        st.caption("No example pictures are available for this model.")
        return None
    pick_key = P + f"pick.{run.id}"
    picked = min(st.session_state.get(pick_key, 0), len(items) - 1)
    cols = st.columns(10)  # tiles of one row; a phone stacks them
    for i, item in enumerate(items[:len(cols)]):
        with cols[i]:
            try:
                st.image(pixelated(item.open(), THUMB_PX), width=THUMB_PX)
            except inference.ImageRejected:
                continue
            if st.button("Chosen" if i == picked else "Try", key=P + f"try.{i}",
                         type="primary" if i == picked else "secondary"):
                st.session_state[pick_key] = i
                st.rerun()
    item = items[picked]
    return item.open(), item.true_label


@st.cache_resource(max_entries=8, show_spinner="Finding example pictures…")
def gallery(source: str, path: str, classes: tuple[str, ...]):
    """One example per class from the run's test data (fixed seed: stable across reruns)."""
    items, _note = inference.gallery(source, path, list(classes), per_class=1)
    return items


def bars(preds) -> None:
    """The top guesses as labelled bars. Class names come from folder names: escaped, shown
    as text."""
    rows = "".join(
        f'<div class="present-bar"><div class="label"><span>{as_html(inference.display_name(p.label))}'
        f'</span><span>{as_html(inference.percent(p.probability))}</span></div>'
        f'<div class="track"><div class="fill" style="width:{max(0.0, min(1.0, p.probability)) * 100:.1f}%">'
        f'</div></div></div>' for p in preds)
    st.html(rows)


def show(predictor, img, true_label: str | None) -> None:
    preds = predictor.predict(img, TOP_N)
    top = preds[0]
    sure = top.probability >= inference.DEFAULT_SURE_THRESHOLD
    look = st.session_state.get(P + "look", False)
    picture, answer = st.columns([1, 1], gap="large")
    picture = picture.container(key=P + "picture")
    with answer:
        words = inference.verdict(preds)
        st.html(f'<div class="present-verdict{"" if sure else " unsure"}">{as_html(words)}</div>')
        bars(preds)
        if true_label is not None:
            right = "right" if true_label == top.label else "wrong"
            st.html(f'<p class="present-note">This example really is '
                    f'{as_html(inference.display_name(true_label))}: the model got it '
                    f'<b>{right}</b>.</p>')
        st.toggle("What did it look at?", key=P + "look", width="stretch")
    with picture:
        if not look:
            st.image(panel(img, PICTURE_PX), width="stretch")
            return
        explanation = predictor.explanation(img, top.index)
        name = as_html(inference.display_name(top.label))
        if explanation.available:
            from core.analysis.explain import overlay

            st.image(overlay(predictor.model_view(img), explanation.heatmap, size=PICTURE_PX),
                     width="stretch")
            st.html(f'<p class="present-note present-heat">Red and yellow: the parts that made '
                    f'the model say {name}. Blue: parts that mattered little.</p>')
        else:
            st.image(panel(img, PICTURE_PX), width="stretch")
            st.html(f'<p class="present-note present-heat">No part of this picture stands out: '
                    f'covering any one part does not change the model\'s mind about {name}.</p>')


def page() -> None:
    """The page body; ends early with `return`, never st.stop()."""
    st.html(STYLE)
    you = access()
    presenting = st.query_params.get(PRESENT_PARAM) == "1"
    runs = inference.classifiable_runs(get_store())
    if not runs:
        st.title("Nothing to show yet")
        st.info("There is no trained model yet." + ("" if not you.lab else
                " Train one on New run, then come back."))
        return
    if you.lab and not presenting:
        with st.expander("Presenter settings", expanded=True):
            run = presenter_model(runs)
            if st.button("Hide these controls for the room", key=P + "hide"):
                st.query_params[PRESENT_PARAM] = "1"
                st.rerun()
    elif you.lab:
        run = next((r for r in runs if r.id == st.session_state.get(P + "run_id")),
                   inference.default_run(runs))
    else:
        run = presenter_model(runs)
    st.session_state[P + "run_id"] = run.id
    from core.engine.checkpoints import CheckpointError

    try:
        predictor = predictor_for(run.best_checkpoint)
    except (CheckpointError, OSError) as exc:
        log.warning("present: model unusable: %s", exc)
        st.error("The model for this view can't be loaded right now.")
        return
    known = ", ".join(inference.display_name(c) for c in predictor.classes)
    st.html(f'<p class="present-note">What does the model think this is? It knows '
            f'{as_html(known)}: whatever the picture, its answer is one of these.</p>')
    # The answer is drawn above the picture sources, though the sources are read first.
    stage = st.container()
    try:
        picture = get_picture(predictor, run)
        with stage:
            if picture is None:
                st.html('<div class="present-verdict present-prompt">Take a photo, upload one, or pick an '
                        'example below.</div>')
            else:
                show(predictor, *picture)
    except inference.ImageRejected as exc:
        stage.error(str(exc))
    except Exception as exc:  # the room must never see a traceback
        log.exception("present failed")
        stage.error(f"Something went wrong with this picture ({type(exc).__name__}). "
                    f"Try another one.")
    if you.lab and presenting and st.button("Show the controls", key=P + "show"):
        del st.query_params[PRESENT_PARAM]
        st.rerun()


page()
