"""What-if matrix: which number format, which rotation, which block size, on this model; cells fill in live."""

import json

import pandas as pd
import streamlit as st

from app import charts, progress, state
from engine.evaluate import EvalConfig
from engine.matrix import COLUMN_KINDS, DEFAULT_FORMATS, DEFAULT_ROTATIONS, MatrixConfig, cell_sqnr_job, matrix_job
from engine.quant.formats import FORMATS

st.title("What-if matrix: formats x rotations")
st.caption(
    "Rows are number formats for weights and activations (4 = QuaRot's integers: per-row weights, per-token "
    "activations; MXFP4: 32 values share a power-of-two scale; NVFP4: 16 values share an FP8 scale). Columns "
    "say what R1 and R4 are: none, QuaRot's global random Hadamard, or a block-diagonal one of 16 to 256 "
    "(BRQ: a block the size of the format's group), optionally after a permutation that deals R4's outlier "
    "channels out over the blocks. Every cell is one cached evaluation."
)

handle = state.model()
if handle is None:
    st.stop()

COLUMN_LABELS = {
    "none": "none",
    "hadamard": "global Hadamard",
    **{
        k: f"block {k[5:].rstrip('p')}" + (" + permutation" if k.endswith("p") else "")
        for k in COLUMN_KINDS
        if k.startswith("block")
    },
}
FORMAT_CHOICES = ("4", "8", "int4g128") + tuple(FORMATS)

with st.form("matrix"):
    c1, c2 = st.columns(2)
    formats = c1.multiselect(
        "Formats (rows)",
        FORMAT_CHOICES,
        default=list(DEFAULT_FORMATS[:3]),
        key="mx_formats",
        help="Weights and activations in this format. 4 / 8: integer bit widths.",
    )
    rotations = c2.multiselect(
        "Rotations (columns)",
        COLUMN_KINDS,
        default=list(DEFAULT_ROTATIONS[:4]),
        format_func=COLUMN_LABELS.get,
        key="mx_rotations",
    )
    c3, c4, c5, c6 = st.columns(4)
    kv = c3.selectbox(
        "KV cache",
        ["16", "8", "4", "fp8", "mxfp4", "nvfp4"],
        key="mx_kv",
        help="The KV cache's format in every cell (16: not quantized).",
    )
    weights = c4.radio(
        "Weights",
        ["rtn", "gptq"],
        horizontal=True,
        key="mx_weights",
        help="Round to nearest, or GPTQ on the format's grid (group scales fixed per group).",
    )
    tokens = c5.number_input(
        "Evaluation tokens",
        64,
        1_000_000,
        4096,
        step=1024,
        key="mx_tokens",
        help="Perplexity on this many tokens of the evaluation split, windows of 1024.",
    )
    rotation_file = c6.text_input(
        "Also a rotation file (optional)",
        placeholder="cache/rotations/....bin",
        key="mx_file",
        help="Adds a column with R1/R2 (and R3/R4 if present) from it.",
    )
    run = st.form_submit_button("Fill the matrix", type="primary", key="mx_fill")


def pivot(cells: list, formats: list, rotations: list) -> pd.DataFrame:
    table = pd.DataFrame(cells).pivot(index="format", columns="rotation", values="ppl")
    return table.reindex(index=formats, columns=rotations)


def column_labels(rotations) -> dict:
    """st.dataframe's column_config: the rotations' labels as on the heat map ('block 32', not 'block32')."""
    return {c: COLUMN_LABELS.get(c, c) for c in rotations}


if run:
    try:
        cols = list(rotations) + ([f"file:{rotation_file.strip()}"] if rotation_file.strip() else [])
        mcfg = MatrixConfig(formats=tuple(formats), rotations=tuple(cols), kv=kv, weights=weights)
        cfg = EvalConfig(tokens=int(tokens), window=min(1024, int(tokens)), calib_tokens=2048)
    except ValueError as e:  # the cells on screen stay
        st.error(str(e))
        mcfg = None
    if mcfg is not None:
        live = st.empty()

        def show(cells):
            st.session_state[state.MATRIX_CELLS] = cells
            # strings: st.dataframe draws a styled NaN as "None"; a cell still to come reads "computing..."
            table = pivot(cells, list(mcfg.formats), list(mcfg.rotations))
            live.dataframe(
                table.map(lambda v: "computing..." if pd.isna(v) else f"{v:.2f}"),
                column_config=column_labels(table.columns),
            )

        st.session_state.update({state.MATRIX_CELLS: [], state.MATRIX_REQUEST: mcfg})
        try:
            progress.run(
                matrix_job(handle, mcfg, cfg),
                f"{len(mcfg.runs())} cells",
                on_partial=show,
                stop_help="Stops the cell in progress; finished cells are kept (and cached).",
                running_key=state.MATRIX_RUNNING,
                running=len(mcfg.runs()),
            )
        except ValueError as e:
            st.error(str(e))
        live.empty()
elif n := progress.was_stopped(state.MATRIX_RUNNING):  # the rerun a Stop press causes
    progress.stopped_after(
        len(st.session_state[state.MATRIX_CELLS]),
        n,
        "cell",
        kept="The finished cells are kept below and cached, so **Fill the matrix** with the same "
        "settings computes only the rest.",
        nothing="nothing was kept; **Fill the matrix** starts from the beginning.",
    )

cells, mcfg = st.session_state[state.MATRIX_CELLS], st.session_state[state.MATRIX_REQUEST]
if not cells or mcfg is None:
    st.info(
        "Pick formats and rotations and press **Fill the matrix**. Each cell takes about half a minute on a "
        "laptop CPU for 4096 tokens; cells already computed come back at once."
    )
    st.stop()

st.header("Perplexity")
table = pivot(cells, list(mcfg.formats), list(mcfg.rotations))
cap = charts.colour_cap(table)
st.plotly_chart(
    charts.perplexity_matrix(
        table, COLUMN_LABELS, f"Perplexity on {cells[0]['tokens']} evaluation tokens (lower is better)"
    ),
    key="mx_heat",
)
st.caption(
    f"KV cache {mcfg.kv}; weights {mcfg.weights.upper()} in the row's format; clip ratios calibrated per "
    "layer. "
    + (
        f"Colours saturate at {cap:.1f} (4x the best cell) so the good cells stay distinguishable; "
        "the number in each cell is its perplexity."
        if cap < float(table.max().max())
        else "The number in each cell is its perplexity."
    )
)
st.dataframe(table.style.format("{:.3f}", na_rep="-"), column_config=column_labels(table.columns))

st.header("Why: SQNR per layer for one cell")
c1, c2 = st.columns(2)
pick_f = c1.selectbox("Format", list(mcfg.formats), key="mx_sqnr_format")
pick_r = c2.selectbox(
    "Rotation",
    [c for c in mcfg.rotations if not c.startswith("file:")],
    format_func=lambda c: COLUMN_LABELS.get(c, c),
    key="mx_sqnr_rotation",
)
if st.button("Measure the SQNR of this cell", key="mx_sqnr_go"):
    try:
        done = progress.run(
            cell_sqnr_job(handle, pick_f, pick_r), "SQNR", stop_help="Stops the measurement; nothing is kept."
        )
        st.session_state[state.MATRIX_SQNR] = (pick_f, pick_r, done.result)
    except ValueError as e:
        st.error(str(e))
if st.session_state[state.MATRIX_SQNR]:
    f, r, sq = st.session_state[state.MATRIX_SQNR]
    st.plotly_chart(
        charts.sqnr_by_layer(sq, f"Activation SQNR per layer: {f}, {COLUMN_LABELS.get(r, r)}"), key="mx_sqnr_fig"
    )
    st.caption(
        "10 log10 of signal over quantization noise of the row's activation quantizer (no clipping) on 512 "
        "evaluation tokens; each 6 dB is about one bit."
    )

c1, c2 = st.columns(2)
c1.download_button(
    "Download CSV",
    pd.DataFrame(cells).drop(columns=["clips"]).to_csv(index=False).encode(),
    "spinscope_matrix.csv",
    "text/csv",
)
c2.download_button(
    "Download JSON", json.dumps(cells, indent=1, default=str).encode(), "spinscope_matrix.json", "application/json"
)
