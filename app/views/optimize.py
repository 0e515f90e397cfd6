"""Optimize: learn the rotations (SpinQuant: R1 and every R2; FLRot: R1-R4) and watch them learn."""

from pathlib import Path

import pandas as pd
import streamlit as st

from app import charts, progress, state
from engine.evaluate import EvalConfig, beside_baselines, eval_table_job
from engine.events import Metric
from engine.learn.random_spread import FAMILIES, SpreadConfig, spread_job
from engine.learn.rotated_network import KURTOSIS_SITES, ONLINE_SEED
from engine.learn.spinquant import (
    METHODS,
    TRAIN_BITS,
    TrainConfig,
    checkpoint_result,
    learned_recipe,
    train_job,
)
from engine.quant.recipes import PRESETS

METHOD_LABELS = {
    "spinquant": "SpinQuant: learn R1 and every layer's R2 (R3, R4 fixed random Hadamard)",
    "flrot": "FLRot: learn R1, R2, R3 and a block-diagonal R4",
}
BITS_LABELS = {"4-4-4": "W4A4KV4 (RTN weights)", "16-4-4": "W16A4KV4 (weights by GPTQ afterwards)"}
SITE_LABELS = {"attn_in": "q/k/v_proj input (rotated by R1)", "down_in": "down_proj input (rotated by R4)"}

st.title("Optimize: learn the rotations")
st.caption(
    "Cayley SGD on the orthogonal group (SpinQuant: lr 1.5, cosine decay) moves the rotations to lower the "
    "next-token loss of the rotated, fake-quantized model; every weight stays frozen. Both start from "
    "random Hadamard rotations: SpinQuant's step 0 is QuaRot with seed 0."
)

handle = state.model()
if handle is None:
    st.stop()
arch = handle.arch


def draw_training(slots, history, ppl, kurtosis, tag: str) -> None:
    slots[0].plotly_chart(charts.training_curves(history, ppl), key=f"opt_loss_{tag}")
    if kurtosis:
        for slot, site in zip(slots[1:], KURTOSIS_SITES, strict=False):
            slot.plotly_chart(
                charts.kurtosis_over_training(
                    kurtosis, site, arch.n_layers, f"Per-token kurtosis: {SITE_LABELS[site]}"
                ),
                key=f"opt_heat_{site}_{tag}",
            )


# ---- the form -----------------------------------------------------------------------------------------------
with st.form("optimize"):
    c1, c2 = st.columns(2)
    method = c1.radio("Method", METHODS, format_func=METHOD_LABELS.get, key="opt_method")
    bits = c2.selectbox(
        "Bits during training",
        TRAIN_BITS,
        format_func=lambda b: f"{b}: {BITS_LABELS[b]}",
        key="opt_bits",
        help="SpinQuant trains at W16A4KV4 when GPTQ quantizes the weights after.",
    )
    c3, c4, c5, c6 = st.columns(4)
    steps = c3.number_input("Steps", 1, 10_000, 20, key="opt_steps", help="SpinQuant's paper: 100.")
    n_windows = c4.number_input(
        "Calibration windows",
        1,
        10_000,
        20,
        key="opt_windows",
        help="Random windows of the calibration split, one per step, cycled.",
    )
    window = c5.number_input(
        "Window length",
        2,
        handle.max_length,
        min(256, handle.max_length),
        key="opt_window",
        help="Tokens per window (SpinQuant: 2048). 20 steps of 256 take minutes on a CPU.",
    )
    every = c6.number_input(
        "Probe every N steps",
        0,
        10_000,
        5,
        key="opt_every",
        help="Kurtosis and a quick perplexity on 512 evaluation tokens; 0 never.",
    )
    c7, c8, c9 = st.columns(3)
    block = c7.number_input(
        "R4 block (FLRot)",
        1,
        arch.intermediate,
        min(128, arch.intermediate),
        key="opt_block",
        help=f"Must divide the intermediate width {arch.intermediate}; FLRot uses 128. "
        f"{arch.intermediate} makes R4 one dense learned block.",
    )
    seed = c8.number_input("Seed", 0, 2**31 - 1, 0, key="opt_seed", help="Random Hadamard start and data sample.")
    permute = c9.checkbox(
        "Permute R4's channels (FLRot)",
        key="opt_permute",
        help="Deal the down_proj input channels over R4's blocks by their calibration magnitude "
        "before learning, so every block gets its share of the outlier channels (fused "
        "exactly into gate/up and down_proj).",
    )
    restart = c9.checkbox(
        "Start over",
        key="opt_restart",
        help="Ignore a saved checkpoint of the same settings (otherwise Start resumes it).",
    )
    start = st.form_submit_button("Start (or resume)", type="primary", key="opt_start")

if start:
    st.session_state.update(
        {state.OPT_RESULT: None, state.OPT_EVAL_ROWS: None, state.OPT_SPREAD: None, state.OPT_RESUMED: None}
    )
    try:
        cfg = TrainConfig(
            method=method,
            bits=bits,
            steps=int(steps),
            windows=int(n_windows),
            window=int(window),
            block=int(block),
            eval_every=int(every),
            checkpoint_every=max(int(every), 5),
            seed=int(seed),
            permute=bool(permute) and method == "flrot",
        )
    except ValueError as e:
        st.error(str(e))
        st.stop()
    st.session_state[state.OPT_CONFIG] = cfg
    resume_slot, loss_slot, (left, right) = st.empty(), st.empty(), st.columns(2)
    slots = [loss_slot, left.empty(), right.empty()]
    live = {"history": [], "ppl": [], "kurtosis": [], "resumed": 0}

    def on_resumed(saved):  # the checkpoint's history: the charts continue from it
        live.update(history=list(saved.history), ppl=list(saved.ppl), kurtosis=list(saved.kurtosis), resumed=saved.step)
        resume_slot.info(
            f"Resumed from the checkpoint at step {saved.step}: training steps {saved.step + 1}-{cfg.steps}"
        )
        draw_training(slots, live["history"], live["ppl"], live["kurtosis"], f"resumed{saved.step}")

    def on_metric(m: Metric):
        if m.name == "loss":
            live["history"].append({"step": m.step, "loss": m.value})
        elif m.name == "ppl":
            live["ppl"].append({"step": m.step, "ppl": m.value})
        elif m.name == "kurtosis":
            live["kurtosis"].append({"step": m.step, **m.extra})
        draw_training(slots, live["history"], live["ppl"], live["kurtosis"], f"live{len(live['history'])}_{m.name}")

    try:
        done = progress.run(
            train_job(handle, cfg, resume=not restart),
            f"Training {cfg.method}",
            on_partial=on_resumed,
            on_metric=on_metric,
            stop_help="Stops after the step in progress; the finished steps are checkpointed and "
            "Start with the same settings resumes from there.",
            running_key=state.OPT_RUNNING,
        )
    except ValueError as e:
        st.error(str(e))
        done = None
    for s in [resume_slot, *slots]:
        s.empty()
    if done is not None:
        st.session_state[state.OPT_RESULT] = done.result
        end = done.result.state.step
        if live["resumed"] == end:  # no step left to train: the checkpoint held them all
            st.session_state[state.OPT_RESUMED] = (
                f"Resumed from the checkpoint at step {end}: nothing left to train (**Start over** trains again)."
            )
        elif live["resumed"]:
            st.session_state[state.OPT_RESUMED] = (
                f"Resumed from the checkpoint at step {live['resumed']}: trained steps {live['resumed'] + 1}-{end}."
            )
elif progress.was_stopped(state.OPT_RUNNING):  # the rerun a Stop press causes: the job saved its last step on closing
    cfg = st.session_state[state.OPT_CONFIG]
    stopped = checkpoint_result(handle, cfg) if cfg is not None else None
    st.session_state[state.OPT_RESULT] = stopped
    k = stopped.state.step if stopped is not None else 0
    progress.stopped_after(
        k,
        cfg.steps if cfg is not None else 0,
        "step",
        sequential=True,
        kept=f"The checkpoint of step {k} is saved: **Start** with the same settings resumes at "
        f"step {k + 1}; the rotations as they are can be evaluated below.",
        nothing="nothing was saved; **Start** begins at step 1.",
    )

res = st.session_state[state.OPT_RESULT]
if res is None:
    st.info(
        "Choose a method and press **Start**. On the default model a 20-step run on 256-token windows takes a "
        "few minutes on a laptop CPU; the loss curve and the kurtosis heat maps update as it learns."
    )
    st.stop()

# ---- the learned rotations ----------------------------------------------------------------------------------
cfg = TrainConfig(**res.config)
run = res.state
(st.success if res.finished else st.warning)(
    f"{METHOD_LABELS[cfg.method]}: {run.step} of {cfg.steps} steps at {cfg.bits}, {cfg.windows} windows of "
    f"{cfg.window} tokens, {run.seconds:.0f} s of training. Rotations saved to `{res.path}` (SpinQuant's layout: "
    "'R1' and 'model.layers.{i}.self_attn.R2'"
    + (", plus FLRot's R3 and R4 blocks" if cfg.method == "flrot" else "")
    + ")."
)
if st.session_state[state.OPT_RESUMED]:
    st.info(st.session_state[state.OPT_RESUMED])
draw_training([st.empty()] + [c.empty() for c in st.columns(2)], run.history, run.ppl, run.kurtosis, "final")
st.caption(
    "Loss: next-token cross-entropy of the rotated, fake-quantized model on that step's calibration window "
    "(noisy: a different window each step). Quick perplexity: the same model on 512 evaluation tokens. Heat "
    "maps: mean per-token kurtosis (sink token excluded) of the inputs the 4-bit activation quantizer sees; "
    "3 is Gaussian, the ideal for a uniform grid."
)
st.download_button(
    "Download the rotation file",
    Path(res.path).read_bytes(),
    file_name=Path(res.path).name,
    help="Loads here (Evaluate page, recipe 'rotated') and in SpinQuant's ptq.py, which reads "
    "R1 and R2 and ignores the rest.",
)

# ---- evaluate beside fp, rtn and quarot ----------------------------------------------------------------------
st.header("Evaluate beside fp, rtn and quarot")
learned = learned_recipe(res.path, cfg.method)
with st.form("optimize_eval"):
    c1, c2, c3, c4 = st.columns(4)
    eval_bits = c1.selectbox("Bits (W-A-KV)", PRESETS, index=PRESETS.index("4-4-4"), key="opt_eval_bits")
    weights = c2.radio(
        "Weight quantizer",
        ["rtn", "gptq"],
        index=1 if cfg.bits.startswith("16") else 0,
        horizontal=True,
        key="opt_eval_weights",
        help="Round-to-nearest, or GPTQ (as SpinQuant does after W16A4KV4 training).",
    )
    clip = c3.checkbox(
        "Weight clipping search",
        value=cfg.w_clip_search,
        key="opt_eval_clip",
        help="For every row. Off by default because training used plain RTN (the search costs 80 "
        "quantizations per step): rotations are evaluated with the quantizer they learned for.",
    )
    eval_tokens = c4.number_input(
        "Evaluation tokens",
        64,
        1_000_000,
        4096,
        step=1024,
        key="opt_eval_tokens",
        help="Perplexity on this many tokens of the evaluation split, windows of 1024 "
        "(the Evaluate page's quick mode). The random spread below uses it too.",
    )
    go_eval = st.form_submit_button("Evaluate beside fp, rtn and quarot", key="opt_eval_go")
# seed 0: the random Hadamard R3/R4 that SpinQuant training used (and quarot's seed, where training started)
EVAL = EvalConfig(tokens=int(eval_tokens), window=min(1024, int(eval_tokens)), seed=ONLINE_SEED)
if go_eval:
    try:
        done = progress.run(
            eval_table_job(handle, beside_baselines(learned, eval_bits, weights, clip), EVAL),
            "Evaluating fp, rtn, quarot and the learned rotations",
        )
        st.session_state[state.OPT_EVAL_ROWS] = done.result
    except ValueError as e:
        st.error(str(e))
if st.session_state[state.OPT_EVAL_ROWS]:
    names = {"rotated": f"{cfg.method} (learned, rotated recipe)", "flrot": "flrot (learned)"}
    table = pd.DataFrame(
        [
            {
                "recipe": names.get(r["recipe"], r["recipe"]),
                "weights": "fp" if r["weights"] == "-" else r["weights"] + " + clip" * r["w_search"],
                "bits": r["bits"],
                "perplexity": round(r["ppl"], 3),
                "tokens": r["tokens"],
            }
            for r in st.session_state[state.OPT_EVAL_ROWS]
        ]
    )
    st.table(table)
    st.caption(
        f"Perplexity on {EVAL.tokens} tokens of the evaluation split. quarot is random Hadamard R1-R4 with "
        "seed 0: where the learned rotations started. Runs are cached (the Evaluate page shows them too). "
        "Compare rows with the same weight quantizer: a rotation learned with plain RTN weights can lose "
        "under the clipping search, which random rotations need."
    )

# ---- the spread of random rotations -------------------------------------------------------------------------
st.header("How lucky is a random rotation?")
with st.form("optimize_spread"):
    c1, c2, c3 = st.columns(3)
    n_seeds = c1.number_input("Random rotations per family", 1, 100, 10, key="opt_spread_seeds")
    families = c2.multiselect("Families", list(FAMILIES), default=list(FAMILIES), key="opt_spread_families")
    spread_bits = c3.selectbox("Bits (W-A-KV)", PRESETS, index=PRESETS.index("4-4-4"), key="opt_spread_bits")
    go_spread = st.form_submit_button("Run the random spread", key="opt_spread_go")
if go_spread:
    try:
        scfg = SpreadConfig(
            seeds=int(n_seeds),
            families=tuple(families),
            bits=spread_bits,
            eval=EVAL,
            weights=weights,
            w_clip_search=clip,
        )
        done = progress.run(
            spread_job(handle, scfg, learned={f"{cfg.method} (learned)": (res.path, cfg.method)}), "Random rotations"
        )
        st.session_state[state.OPT_SPREAD] = done.result
    except ValueError as e:
        st.error(str(e))
spread = st.session_state[state.OPT_SPREAD]
if spread is not None:
    quantizer = spread.weights + (" with clipping search" if spread.w_clip_search else "")
    st.plotly_chart(
        charts.random_spread(
            spread.random(), spread.learned(), f"Perplexity of random rotations at {spread.bits} ({quantizer} weights)"
        ),
        key="opt_spread_fig",
    )
    st.caption(
        "Each dot is one random rotation (a seed); the box spans the middle half, the line inside is the "
        "median. The dashed red line is the learned rotation. SpinQuant's Figure 1 makes the same point on "
        "LLaMA-2: random rotations vary a lot, and learning removes the luck."
    )
    summary = spread.summary()
    summary["count"] = summary["count"].astype(int)
    st.table(summary.style.format(precision=3))
    st.caption(
        "Per family: the spread of perplexity over seeds; the last columns give the share of random rotations "
        "that the learned one beats (1.0: better than all of them)."
    )
