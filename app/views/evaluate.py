"""Evaluate: recipes x bit settings on the same perplexity and zero-shot numbers; results fill in live."""

import json

import pandas as pd
import streamlit as st

from app import charts, progress, state
from app.sections import export
from engine.evaluate import EvalConfig, eval_table_job
from engine.quant.formats import describe_formats
from engine.quant.recipes import CLIP_LABELS, CLIP_MODES, PRESETS, RECIPES, Bits, get_recipe

st.title("Evaluate quantized models")
st.caption(
    "What does W4A4KV4 cost with RTN, with random Hadamard rotations (QuaRot), with learned rotations, "
    "with QRazor? Every row is built from the same model, corpus and tasks. Runs are cached: asking for the "
    "same run again returns at once."
)

handle = state.model()
if handle is None:
    st.stop()

MODES = {
    "quick": dict(tokens=4096, window=1024, limit=50, calib_tokens=2048),
    "full": dict(tokens=16384, window=2048, limit=200, calib_tokens=8192),
}
try:
    from engine.data.tasks import TASKS
except ImportError:  # zero-shot support missing: perplexity only
    TASKS = {}

with st.form("evaluate"):
    c1, c2 = st.columns(2)
    # Names only on the chips: "name: description" chips are cut off in a half-width column.
    recipes = c1.multiselect(
        "Recipes",
        list(RECIPES),
        default=["fp", "rtn", "quarot"],
        key="eval_recipes",
        help="\n".join(f"- **{r}**: {RECIPES[r].description}" for r in RECIPES),
    )
    presets = c2.multiselect(
        "Bits (W-A-KV)",
        PRESETS,
        default=["4-4-4"],
        accept_new_options=True,
        key="eval_bits",
        help="16 = floating point. 4-4-16: 4-bit weights and activations, 16-bit KV cache. Each "
        f"part may also name a format: {describe_formats()}. The presets are shortcuts: "
        "type any W-A-KV (e.g. 8-8-8, 16-4-4 or nvfp4-nvfp4-fp8) and press Enter.",
    )
    c3, c4, c5 = st.columns(3)
    weights = c3.radio(
        "Weight quantizer",
        ["rtn", "gptq"],
        horizontal=True,
        key="eval_weights",
        help="Round to nearest, or GPTQ (calibrated on the calibration split), on the grid of the weights' format.",
    )
    mode = c4.radio(
        "Mode",
        list(MODES),
        horizontal=True,
        key="eval_mode",
        help="quick: 4096 tokens, 50 documents per task; full: 16384 tokens, 200 documents.",
    )
    rotation_file = c5.text_input(
        "Rotation file (recipe 'rotated')", placeholder="cache/rotations/....bin", key="eval_rotation_file"
    )
    c6, c7, c8 = st.columns([2, 2, 1])
    clip = c6.radio(
        "Clipping",
        CLIP_MODES,
        format_func=CLIP_LABELS.get,
        key="eval_clip",
        help="calibrated: clip ratios chosen per layer on the calibration split, on the error of each "
        "linear's output (weights per row, activations per linear, K on the attention scores, V "
        "per layer); no clipping is always a candidate. fixed: QuaRot's settings. QRazor has none.",
    )
    tasks = c7.multiselect(
        "Zero-shot tasks (optional; minutes each on a CPU)", list(TASKS), default=[], key="eval_tasks"
    )
    custom_tokens = c8.number_input(
        "Perplexity tokens (0 = the mode's)",
        0,
        1_000_000,
        0,
        step=1024,
        key="eval_tokens",
        help="Override the mode's evaluation token budget.",
    )
    run = st.form_submit_button("Run", type="primary", key="eval_run")


def _weights(row) -> str:
    # fp rows store "-", which st.table's markdown would draw as a list bullet.
    return "none (fp)" if row["weights"] == "-" else row["weights"]


if run:
    m = MODES[mode]
    try:
        if not recipes:
            raise ValueError("choose at least one recipe to run")
        if not presets and any(r != "fp" for r in recipes):
            raise ValueError("choose or type at least one bit setting (W-A-KV, e.g. 4-4-4)")
        tok = int(custom_tokens) or m["tokens"]
        cfg = EvalConfig(
            tokens=tok,
            window=min(m["window"], tok),
            tasks=tuple(tasks),
            limit=m["limit"],
            calib_tokens=m["calib_tokens"],
        )
        jobs = [
            (get_recipe(r, weights=weights, rotation_file=rotation_file.strip() or None, clip=clip), Bits.parse(b))
            for r in recipes
            for b in (presets if r != "fp" else ["16-16-16"])
        ]
    except ValueError as e:  # the results on screen stay: only a valid request replaces them
        st.error(str(e))
        jobs = []
    table = st.empty()  # live results while the runs go on; the Results section below replaces it at the end

    def show_rows(rows):  # after each run: keep the rows so far and show them
        st.session_state[state.EVAL_ROWS] = rows
        table.table(
            pd.DataFrame(
                [
                    {"recipe": r["recipe"], "weights": _weights(r), "bits": r["bits"], "perplexity": f"{r['ppl']:.2f}"}
                    for r in rows
                ]
            )
        )

    if jobs:
        st.session_state[state.EVAL_ROWS] = []
        st.session_state[state.EVAL_REQUEST] = (jobs, cfg)
        try:
            progress.run(
                eval_table_job(handle, jobs, cfg),
                f"{len(jobs)} run{'s' * (len(jobs) > 1)}",
                on_partial=show_rows,
                stop_help="Stops the current run; the runs already finished are kept (and cached).",
                running_key=state.EVAL_RUNNING,
                running=len(jobs),
            )
        except ValueError as e:  # the rows finished before it stay
            st.error(str(e))
    table.empty()
elif n := progress.was_stopped(state.EVAL_RUNNING):  # the rerun a Stop press causes: the job was closed
    kept = len(st.session_state[state.EVAL_ROWS])
    progress.stopped_after(
        kept,
        n,
        "run",
        kept=f"The {kept} finished row{'s are' if kept > 1 else ' is'} kept below and cached: "
        "**Run** with the same settings computes only the rest.",
        nothing="nothing was kept; the runs start from the beginning on **Run**.",
    )

rows = st.session_state[state.EVAL_ROWS]
if not rows:
    st.info(
        "Pick recipes and bit settings and press **Run**. A quick 4-4-4 comparison of fp, rtn and quarot "
        "takes a few minutes on a laptop CPU."
    )
    st.stop()

df = pd.DataFrame(rows)
if "clip" not in df:
    df["clip"] = "-"
df = df[
    [
        "recipe",
        "weights",
        "bits",
        "clip",
        "ppl",
        "tokens",
        "seconds",
        *[c for c in df.columns if c.endswith((" acc", " acc_norm"))],
    ]
].rename(columns={"ppl": "perplexity"})
df["seconds"] = df["seconds"].round(1)
st.header("Results")
acc_format = {c: "{:.3f}" for c in df.columns if c.endswith((" acc", " acc_norm"))}
st.table(
    df.assign(weights=[_weights(r) for r in rows])
    .style.hide(axis="index")
    .format({"perplexity": "{:.2f}", "seconds": "{:.1f}", **acc_format}, na_rep="-")
)

fp = next((r["ppl"] for r in rows if r["recipe"] == "fp"), None)
labels = [
    f"{r['recipe']} {r['bits']}" + (f" ({r['weights']})" if r["weights"] not in ("-", "rtn") else "") for r in rows
]
st.plotly_chart(
    charts.perplexity_bars(labels, [r["ppl"] for r in rows], fp, f"Perplexity on {rows[0]['tokens']} evaluation tokens")
)
st.caption(
    f"Corpus: {rows[0]['corpus']}. The dashed line is the floating-point model: the closer a bar comes to "
    "it, the less its quantization costs."
)

task_cols = [c for c in df.columns if c.endswith(" acc")]
if task_cols:
    st.plotly_chart(
        charts.task_accuracy(labels, [c.removesuffix(" acc") for c in task_cols], df[task_cols].values.tolist())
    )
    st.caption(
        f"lm-eval acc on {rows[0]['limit']} documents per task from local copies of the task data "
        "(no network). Chance is 0.5 for two-choice tasks and 0.25 for four-choice ones."
    )

calibrated = [
    (i, r)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=False))
    if r.get("clip") == "calibrated" and r.get("clips")
]
if calibrated:
    st.header("Clip ratios chosen")
    pick = st.selectbox("Row", [i for i, _ in calibrated], format_func=lambda i: labels[i], key="eval_clip_row")
    st.plotly_chart(
        charts.clip_heatmap(rows[pick]["clips"], f"Calibrated clip ratios: {labels[pick]}"), key="eval_clip_heatmap"
    )
    from engine.quant.calibrate import ACTIVATION_GRID, KV_GRID, WEIGHT_GRID  # the candidates, for the caption

    floor = min(WEIGHT_GRID + ACTIVATION_GRID)
    st.caption(
        "Chosen per layer on the calibration split, never the evaluation split; 1.0 (yellow) is no clipping, "
        "always a candidate, so each choice is no worse than no clipping on calibration data. "
        f"{floor:g} (dark purple) is the smallest ratio tried for weights and activations (K and V: "
        f"{min(KV_GRID):g}): a site there took the strongest clipping on offer. Weights: the mean of the "
        "per-row shrinks; activations: the per-token quantizer of each linear's input; K: on the causal "
        "attention scores; V: per layer. Hover a cell for its value."
    )
    if check := rows[pick].get("clip_check"):  # engine.quant.clip_check: what the end-to-end check kept and reverted
        st.caption(
            f"End-to-end check on {check['tokens']} calibration tokens: kept the choices of layers "
            f"{check['kept'] or 'none'}, reverted layers {check['reverted'] or 'none'} to no clipping; loss "
            f"{check['loss_final']:.4f} (no clipping {check['loss_none']:.4f}, every per-layer choice "
            f"{check['loss_calibrated']:.4f})."
        )


c1, c2 = st.columns(2)
c1.download_button("Download CSV", df.to_csv(index=False).encode(), "spinscope_eval.csv", "text/csv")
c2.download_button(
    "Download JSON", json.dumps(rows, indent=1, default=str).encode(), "spinscope_eval.json", "application/json"
)

export.draw(handle, labels)
