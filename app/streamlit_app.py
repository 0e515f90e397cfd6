"""SpinScope entry point: page config, the shared sidebar and navigation. No logic lives here."""

import streamlit as st

from app import state  # the project is installed (pip install -e .), so `app` imports from anywhere

st.set_page_config(page_title="SpinScope", page_icon=":material/360:", layout="wide")
state.init()

with st.sidebar:
    st.markdown("### Model")
    st.text_input(
        "Model",
        key=state.MODEL_NAME,
        help="'default' = SmolLM2-135M-Instruct shipped offline; or a local model directory, a .gguf "
        "file (converted once, weights dequantized), "
        "or a Hugging Face id already in the local cache (no network here).",
    )
    st.selectbox(
        "Precision",
        ["float32", "bfloat16", "float16"],
        key=state.MODEL_DTYPE,
        help="float32 is exact enough for equivalence checks; 16-bit halves memory.",
    )
    with st.expander("Beyond one device"):
        st.text_input(
            "Memory budgets",
            key=state.MAX_MEMORY,
            placeholder="cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB",
            help="Empty: the whole model on one device. Otherwise accelerate spreads the decoder layers "
            "over these devices in order (GPUs, then CPU memory). Home shows the plan first.",
        )
        st.checkbox(
            "Allow disk offload",
            key=state.OFFLOAD_DISK,
            help="What does not fit the budgets goes to cache/offload/ on disk and is read back at every "
            "forward (slow). Off: a model that does not fit is refused.",
        )

pages = [
    st.Page("views/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("views/explore.py", title="Explore", icon=":material/search:"),
    st.Page("views/rotate.py", title="Rotate", icon=":material/360:"),
    st.Page("views/optimize.py", title="Optimize", icon=":material/tune:"),
    st.Page("views/evaluate.py", title="Evaluate", icon=":material/bar_chart:"),
    st.Page("views/matrix.py", title="Formats x rotations", icon=":material/grid_on:"),
    st.Page("views/qrazor.py", title="QRazor", icon=":material/content_cut:"),
    st.Page("views/kernels.py", title="Kernels", icon=":material/memory:"),
]
st.navigation(pages).run()
