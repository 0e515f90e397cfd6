"""Rotate: apply R1-R4, prove the network is unchanged, and see the outliers flatten layer by layer."""

import pandas as pd
import streamlit as st

from app import charts, progress, state
from engine.observe.capture import CaptureConfig, site_label
from engine.observe.compare import compare_job
from engine.rotation.fusion import BLOCK_KINDS, RotationConfig

st.title("Rotate: R1-R4 before and after")
st.caption(
    "R1 rotates the residual stream, R2 the values of each head (both fused into the weights), R3 queries "
    "and keys after RoPE and R4 the down_proj input (both online). An orthogonal rotation leaves the "
    "network's output unchanged, so the check below must read about zero."
)

handle = state.model()
if handle is None:
    st.stop()

KIND_LABELS = {
    "none": "identity (off)",
    "hadamard": "random Hadamard",
    "orthogonal": "random orthogonal",
    "file": "from a file",
    **{k: f"block Hadamard {k[5:]}" for k in BLOCK_KINDS},
}
CHOICES = tuple(KIND_LABELS)  # a permuted block R4 needs calibration data: the Formats x rotations page has it
with st.form("rotate"):
    cols = st.columns(4)
    kinds = {}
    for col, r, default in zip(
        cols, ("r1", "r2", "r3", "r4"), ("hadamard", "hadamard", "hadamard", "hadamard"), strict=False
    ):
        kinds[r] = col.selectbox(
            r.upper(), CHOICES, index=CHOICES.index(default), format_func=KIND_LABELS.get, key=f"rot_{r}"
        )
    c1, c2, c3, c4 = st.columns(4)
    path = c1.text_input(
        "Rotation file (SpinQuant layout)",
        placeholder="/path/to/R.bin",
        key="rot_file",
        help="A torch file with 'R1' and 'model.layers.{i}.self_attn.R2' (optional R3, R4).",
    )
    seed = c2.number_input(
        "Seed", 0, 2**31 - 1, 0, key="rot_seed", help="Seeds the random Hadamard signs / orthogonal draws."
    )
    tokens = c3.number_input("Token budget", 1, 1_000_000, 1024, step=512, key="rot_tokens")
    window = c4.number_input(
        "Window length", 2, handle.max_length, min(512, handle.max_length), step=128, key="rot_window"
    )
    go_button = st.form_submit_button("Rotate and compare", type="primary", key="rot_go")

if go_button:
    live = st.empty()
    try:
        rot = RotationConfig(**kinds, seed=int(seed), file=path.strip() or None)
        cap = CaptureConfig(tokens=int(tokens), window=int(window), sqnr_bits=(4, 8))

        def show_partial(partial):
            t = partial[partial.site == "resid_attn"].set_index("layer")
            live.plotly_chart(charts.kurtosis_by_layer(t, "Residual stream kurtosis (capture in progress)"))

        done = progress.run(
            compare_job(handle, "wiki", rot, cap),
            "Rotating and capturing",
            on_partial=show_partial,
            stop_help="Stops the job; nothing partial is kept or cached.",
            running_key=state.ROTATE_RUNNING,
        )
        st.session_state[state.COMPARE] = done.result  # earlier results stay until new ones replace them
    except ValueError as e:
        st.error(str(e))
    live.empty()
elif progress.was_stopped(state.ROTATE_RUNNING):
    kept = " The previous comparison is shown below." if st.session_state[state.COMPARE] is not None else ""
    st.warning(
        "Stopped: nothing partial was kept or cached (a capture that finished before the stop is cached and "
        "comes back at once); press **Rotate and compare** to start again." + kept
    )

cmp = st.session_state[state.COMPARE]
if cmp is None:
    st.info("Pick a kind for each rotation and press **Rotate and compare** (about a minute for 1024 tokens).")
    st.stop()

# ---- equivalence badge --------------------------------------------------------------------------------------
chk = cmp.check
tol = 1e-3 if handle.dtype == "float32" else 0.5
ok = chk["max_abs_logit_diff"] <= tol
badge = st.success if ok else st.warning
badge(
    f"{'Same function' if ok else 'Outputs differ'}: {cmp.rotation.tag()}: max |logit difference| = "
    f"{chk['max_abs_logit_diff']:.2e} (logits reach {chk['max_abs_logit']:.0f}), KL = {chk['kl']:.2e} nats "
    f"over {chk['tokens']} evaluation tokens ({handle.dtype})."
)

before, after = cmp.before, cmp.after
# The sites captured: a mixture has down_in[expertN] (where R4 acts) instead of one down_in.
site = st.selectbox("Site", before.sites, format_func=site_label, key="rot_site")


def pair(make, caption: str):
    figs = make(before, "before"), make(after, "after")
    charts.share_axes(*figs)  # one scale for both, so the drop in height is what the eye reads
    for col, fig in zip(st.columns(2), figs, strict=False):
        with col:
            st.plotly_chart(fig, key=None)
    st.caption(caption + " Both charts share one scale.")


# ---- kurtosis -----------------------------------------------------------------------------------------------
st.header("Kurtosis per layer")
pair(
    lambda r, tag: charts.kurtosis_by_layer(r.site_table(site), f"{site}, {tag} rotation"),
    "Per-token kurtosis (blue) is what a per-token quantizer sees: rotation brings it to about 3 (Gaussian). "
    "Whole-tensor kurtosis (red) can stay high: it comes from a few massive tokens, and a rotation mixes "
    "channels, never tokens, so a token that is 100x larger than the others stays 100x larger.",
)

rows = pd.DataFrame(
    {
        "per-token before": before.site_table(site).kurt_token_mean_nosink,
        "per-token after": after.site_table(site).kurt_token_mean_nosink,
        "whole-tensor before": before.site_table(site).kurt_tensor_nosink,
        "whole-tensor after": after.site_table(site).kurt_tensor_nosink,
    }
).round(1)
with st.expander("Table: kurtosis per layer before and after (sink excluded)"):
    st.table(rows)

# ---- quantization error --------------------------------------------------------------------------------------
st.header("Why it helps quantization")
st.plotly_chart(
    charts.sqnr_before_after(
        before.site_table(site), after.site_table(site), f"Activation quantization SQNR per layer: {site}"
    )
)
st.caption(
    "Per-token asymmetric round-to-nearest on this site's activations (sink excluded). Each 6 dB is one "
    "bit of precision: the gap between the dotted (before) and solid (after) lines is what rotation buys."
)

# ---- one layer ----------------------------------------------------------------------------------------------
st.header("One layer up close")
layer = st.slider("Layer", 0, before.meta["n_layers"] - 1, min(5, before.meta["n_layers"] - 1), key="rot_layer")
pair(
    lambda r, tag: charts.channel_absmax(
        r.array(layer, site, "absmax_nosink").numpy(), r.outlier_channels(layer, site), f"Per-channel max |x|, {tag}"
    ),
    "Outlier channels (red, above 6x the median) before; after rotation their energy is spread over all channels.",
)


pair(
    lambda r, tag: charts.half_width_surface(
        r.array(layer, site, "surface").float().numpy()[1:], f"|x| tokens x channels, {tag}", first_token=1
    ),
    "The sink token (position 0) is left out. Ridges along tokens (outlier channels) vanish after rotation.",
)


def hist(r, tag):
    s = r.array(layer, site, "samples").numpy()
    return charts.histogram_vs_gaussian(s[s[:, -1] == 0, :-1].ravel(), f"Values vs a Gaussian, {tag}")


pair(
    hist,
    "After rotation the values follow the Gaussian of the same variance (red): no tails for a 4-bit grid "
    "to waste its levels on.",
)
