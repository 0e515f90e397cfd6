"""Explore: capture activations of the loaded model and see where the outliers live."""

import numpy as np
import pandas as pd
import streamlit as st

from app import charts, progress, state
from engine.data.corpus import WIKI, WIKI_LABEL
from engine.observe.capture import CaptureConfig, capture_job, site_label
from engine.observe.stats import SURFACE_CHANNELS

st.title("Explore activation outliers")
st.caption("Run the model on text, with hooks at every site the rotations touch, and look at the statistics.")

handle = state.model()
if handle is None:
    st.stop()

with st.form("capture"):
    c1, c2, c3 = st.columns([2, 1, 1])
    corpus_choice = c1.radio(
        "Corpus",
        ["Wikipedia sample (default)", "My text file or WikiText-2 directory"],
        help=WIKI_LABEL,
        horizontal=True,
        key="explore_corpus",
    )
    corpus_path = c1.text_input(
        "Path (for your own text)", placeholder="/path/to/text.txt or /path/to/wikitext-2", key="explore_path"
    )
    tokens = c2.number_input(
        "Token budget",
        min_value=1,
        max_value=1_000_000,
        value=2048,
        step=512,
        key="explore_tokens",
        help="Tokens captured, from the calibration split (whole articles).",
    )
    window = c3.number_input(
        "Window length",
        min_value=2,
        max_value=handle.max_length,
        value=min(512, handle.max_length),
        step=128,
        key="explore_window",
        help="Tokens per forward pass; the first token of each window is an attention sink.",
    )
    submitted = st.form_submit_button("Capture", type="primary", key="explore_capture")

if submitted:
    corpus = WIKI if corpus_choice.startswith("Wikipedia") else corpus_path.strip()
    live = st.empty()

    def show_partial(partial):
        t = partial[partial.site == "resid_attn"].set_index("layer")
        live.plotly_chart(charts.kurtosis_by_layer(t, "Residual stream kurtosis so far"), key=None)

    try:
        cfg = CaptureConfig(tokens=int(tokens), window=int(window))
        done = progress.run(
            capture_job(handle, corpus, cfg),
            "Capturing",
            on_partial=show_partial,
            stop_help="Stops the capture; nothing partial is kept or cached.",
            running_key=state.CAPTURE_RUNNING,
        )
        st.session_state[state.CAPTURE] = done.result  # earlier results stay until new ones replace them
    except ValueError as e:
        st.error(str(e))
    live.empty()
elif progress.was_stopped(state.CAPTURE_RUNNING):
    kept = " The previous capture is shown below." if st.session_state[state.CAPTURE] is not None else ""
    st.warning("Capture stopped: nothing partial was kept or cached; press **Capture** to start again." + kept)

res = st.session_state[state.CAPTURE]
if res is None:
    st.info("Choose a corpus and a token budget, then press **Capture** (2048 tokens take about 15 s here).")
    st.stop()

meta = res.meta
st.success(
    f"{meta['tokens']} tokens in {meta['n_windows']} windows of {meta['window']} from "
    f"{meta['corpus_label']}. Model: {meta['model_note']}"
)

# ---- kurtosis per layer -------------------------------------------------------------------------------------
st.header("Kurtosis per layer")
site = st.selectbox("Site", res.sites, format_func=site_label, key="explore_site")
st.plotly_chart(charts.kurtosis_by_layer(res.site_table(site), f"Kurtosis per layer: {site}"))
st.caption(
    "Notice the two scales: per-token kurtosis (blue) measures channel outliers inside each token, which "
    "a rotation can spread; whole-tensor kurtosis (red) is dominated by a few massive tokens, which no "
    "rotation of channels can spread. The dashed line is a Gaussian (3)."
)

# ---- a mixture of experts: where the router sent the tokens ---------------------------------------------------
tokens = res.expert_tokens()
if tokens is not None:
    st.header("Experts")
    st.plotly_chart(charts.expert_tokens(tokens, "Tokens routed to each expert, per layer"))
    st.caption(
        "Each token goes to its top-k experts. An expert's down_proj input (site down_in[expertN]) holds only "
        "its tokens: pick it above to see where those tokens' outliers land."
    )

# ---- one layer, one site ------------------------------------------------------------------------------------
st.header("One layer up close")
c1, c2, c3 = st.columns([1, 2, 1])
layer = c1.number_input("Layer", 0, meta["n_layers"] - 1, value=min(5, meta["n_layers"] - 1), key="explore_layer")
site2 = c2.selectbox("Site for this layer", res.sites, format_func=site_label, key="explore_site2")
with_sink = c3.toggle(
    "Include the sink token",
    value=False,
    key="explore_sink",
    help="The first token of each window often carries massive activations (an attention sink).",
)

absmax = res.array(layer, site2, "absmax" if with_sink else "absmax_nosink").numpy()
outliers = res.outlier_channels(layer, site2, include_sink=with_sink)
st.plotly_chart(
    charts.channel_absmax(
        absmax,
        outliers,
        f"Per-channel max |x|, layer {layer}, {site2}" + (" (sink included)" if with_sink else " (sink excluded)"),
    )
)
st.caption(
    f"{len(outliers)} outlier channels (red: max above 6x the median channel)"
    + (f": {', '.join(map(str, outliers[:20]))}{' ...' if len(outliers) > 20 else ''}" if outliers else "")
    + ". A few channels holding most of the range is what makes per-token 4-bit quantization fail."
)

surf = res.array(layer, site2, "surface").float().numpy()
routed = "[expert" in site2  # an expert's rows are the tokens of window 0 routed to it, in order, not positions
first = 0 if with_sink or routed else 1
bin_width = int(np.ceil(res.array(layer, site2, "absmax").numel() / SURFACE_CHANNELS)) if surf.shape[1] else 1
st.plotly_chart(
    charts.surface(
        surf[first:],
        f"|x| over tokens and channels, layer {layer}, {site2} "
        + (
            f"(the first {surf.shape[0]} tokens of window 0 routed to it)"
            if routed
            else f"(positions {first}-{surf.shape[0] - 1} of window 0)"
        ),
        first_token=first,
        channel_bin=max(bin_width, 1),
        token_axis="token routed to it (in order)" if routed else "token position",
    )
)
st.caption(
    "As in SpinQuant's Figure 2: ridges along the token axis are outlier channels (fixed channels, every "
    "token); a spike at one token is a massive activation. Drag to rotate."
    + (f" Channels are max-pooled in bins of {bin_width}." if bin_width > 1 else "")
    + (" An expert sees only the tokens routed to it: the sink is among them if it was routed there." if routed else "")
)

samples = res.array(layer, site2, "samples").numpy()
vals = samples[:, :-1] if with_sink else samples[samples[:, -1] == 0, :-1]
st.plotly_chart(charts.histogram_vs_gaussian(vals.ravel(), f"Distribution of values, layer {layer}, {site2}"))
st.caption(
    f"{vals.shape[0]} randomly sampled tokens x {vals.shape[1]} channels. Heavy tails far above the red "
    "Gaussian of the same variance are the outliers that a 4-bit grid cannot cover."
)

# ---- massive tokens -----------------------------------------------------------------------------------------
st.header("Tokens with the largest norms (massive activations)")
top = res.array(layer, site2, "top_tokens").numpy()


def visible(token: str) -> str:
    """Spaces and newlines shown (a table cell would trim " the" to "the" and hide "\\n")."""
    return token.replace(" ", "\u2423").replace("\n", "\\n") or "(empty)"


def num(v: float) -> str:
    """One decimal from 10 up, else 3 significant digits (a small model's norms of 0.1 would all read 0.0 or 0.1)."""
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


rows = [
    {
        "token norm": float(r[0]),
        "max |x|": float(r[1]),
        "window": int(r[2]),
        "position": int(r[3]),
        "token": visible(handle.tokenizer.decode([int(r[4])])),
    }
    for r in top
]
# st.table would print every float with 4 decimals; the Styler keeps what num() keeps.
st.table(pd.DataFrame(rows).style.format({"token norm": num, "max |x|": num}).hide(axis="index"))
row = res.site_table(site2).loc[layer]
st.caption(
    f"Largest token norms at layer {layer}, {site2}. Median token norm {num(row.median_token_norm)}; the "
    f"largest is {num(row.massive_ratio)}x the median. Position 0 is the attention sink. In the token column, "
    "\u2423 marks a space and \\n a newline."
)

st.download_button(
    "Download the per-layer table (CSV)",
    res.table.to_csv(index=False).encode(),
    file_name="spinscope_capture.csv",
    mime="text/csv",
)
