"""Home: what SpinScope is, the loaded model, and what each page does."""

import pandas as pd
import streamlit as st

from app import charts, state
from engine import memory

st.title("SpinScope")
st.markdown(
    "Explore **activation outliers** in large language models and the **rotation-based quantization** methods "
    "that remove them (QuaRot, SpinQuant, FLRot) beside QRazor's significant-data razoring. Every number here "
    "is computed live on this machine by the same engine that `python -m engine` runs."
)

placement, problem = state.plan()
if problem:
    st.error(f"Cannot place the model: {problem}")
elif placement is not None and (placement.devices != ["cpu"] or st.session_state[state.MAX_MEMORY]):
    st.subheader("Memory plan")
    st.caption(
        f"Before loading, from the config alone: {placement.summary()}. Each decoder layer stays whole on "
        "one device; offloaded weights (CPU when a GPU computes, or disk) are streamed in for every forward."
    )
    left, right = st.columns([1, 2])
    left.plotly_chart(charts.device_weights(placement.device_bytes))
    right.dataframe(pd.DataFrame(placement.rows()), hide_index=True, height=320)
    st.caption("Each job's predicted peak on one device (engine.memory, as benchmarks.gpu_scale measures it):")
    st.dataframe(
        pd.DataFrame(memory.plan_rows(st.session_state[state.MODEL_NAME], st.session_state[state.MODEL_DTYPE])),
        hide_index=True,
    )
    for note in placement.notes:
        st.warning(note)

handle = state.model() if not problem else None
if handle is not None:
    a = handle.arch
    st.subheader("Loaded model")
    st.info(handle.note)
    cols = st.columns(5)
    cols[0].metric("Architecture", a.name.replace("ForCausalLM", ""))
    cols[1].metric("Decoder layers", a.n_layers)
    cols[2].metric("Hidden width", a.hidden)
    cols[3].metric("MLP width", a.intermediate)
    cols[4].metric("Heads (query / KV)", f"{a.n_heads} / {a.n_kv_heads}")
    st.caption(
        f"head_dim {a.head_dim} · vocabulary {a.vocab} · tied embeddings: {a.tied_embeddings} · "
        f"{handle.dtype} on {handle.device}"
    )
    st.markdown("**What SpinScope can do with this model**")
    st.dataframe(pd.DataFrame([{"what": k, "supported": v} for k, v in a.support().items()]), hide_index=True)

st.subheader("Pages")
st.caption(
    "In the sidebar's order. New here? Start with **Explore** (where the outliers are), then **Rotate** "
    "(how a rotation removes them)."
)
st.markdown(
    "- **Explore**: capture activations on a text corpus and see where outliers live: kurtosis per layer for "
    "every site the rotations touch, per-channel maxima with the outlier channels marked, a 3D tokens x channels "
    "surface, and the value distribution against a Gaussian. The first token of each window (the *attention "
    "sink*) carries a few *massive activations*; every view can include or exclude it.\n"
    "- **Rotate**: apply R1-R4 (random Hadamard, random orthogonal, or from a file), check that the rotated "
    "network computes the same logits, and compare kurtosis, per-channel maxima, surfaces, histograms and 4/8-bit "
    "quantization SQNR before and after, layer by layer.\n"
    "- **Optimize**: learn rotations with Cayley SGD (SpinQuant R1/R2, FLRot R3/R4 too) and watch the loss and "
    "kurtosis fall; compare with the spread of random rotations.\n"
    "- **Evaluate**: perplexity and zero-shot accuracy of recipes (fp, rtn, quarot, rotated, qrazor) at W-A-KV bit "
    "settings such as 4-4-4, with RTN or GPTQ weights; results are cached and exportable.\n"
    "- **QRazor**: significant data razoring bit by bit: one group's integers in binary, the razoring point, kept "
    "and dropped bits, and the error against 4-bit RTN with and without a Hadamard rotation.\n"
    "- **Kernels**: time the online-rotation kernels (Triton block-diagonal, FHT, fused rotate-and-quantize) "
    "against a memcpy floor on a GPU; without one, the latest recorded GPU run."
)
st.subheader("Words used on these pages")
st.markdown(
    "- **Kurtosis** (Pearson): $\\mathbb{E}[(x-\\mu)^4] / \\sigma^4$. A Gaussian gives 3, a Laplace 6, a uniform "
    "1.8; outliers push it into the tens or thousands. *Per token* = across the channels of one token, then averaged "
    "over tokens: what a per-token activation quantizer sees. *Whole tensor* = all values together.\n"
    "- **Sites**: the residual stream entering attention and the MLP, the inputs of q/k/v, o_proj, gate/up and "
    "down_proj, and the queries, keys (after RoPE) and values: the places rotations R1-R4 act on.\n"
    "- **Rotations**: R1 rotates the residual stream, R2 the values per head, R3 queries and keys, R4 the "
    "down_proj input. An orthogonal rotation leaves the network's output unchanged but spreads outliers across "
    "channels, which makes 4-bit quantization work."
)
