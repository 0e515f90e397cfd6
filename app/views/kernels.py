"""Kernels: online-rotation kernels timed on this machine's GPU; without one, the latest recorded GPU run."""

from pathlib import Path

import pandas as pd
import streamlit as st

from app import charts
from kernels.bench import KERNEL_LABELS, KERNELS, NoGPUError, gpu_available, run_benchmark

DOCS = Path(__file__).resolve().parents[2] / "docs"
# The run that docs/BENCHMARKS.md's "Latest run" section names (tests/app/test_kernels_page.py checks they agree).
RECORDED = (
    "bench_h100_2026-11-23.csv",
    "NVIDIA H100 80GB, 2026-11-23 17:58 UTC, GPU time of CUDA-graph replays "
    "(torch 2.11, triton 3.6; FHT rows: our torch implementation, the package's rows timed eagerly at 14:08)",
)
RECORDED_FHT = "bench_h100_fht_package_2026-11-23.csv"
LABELS = {**KERNEL_LABELS, "fht_padded_package": "FHT, padded (fast-hadamard-transform package)"}
WIDTHS_HELP = (
    "The width of the activations rotated: 4096 is LLaMA-2 7B's hidden size, 11008 its MLP width "
    "(not a power of two: 344 x 32), 14336 LLaMA-3 8B's MLP width."
)

FIGURE_NOTE = (
    "Lines that hug the dashed memcpy floor cost no more than copying the activations once. 'FHT, exact K*2^m' is "
    "the exact Hadamard transform of the d values (d = K * 2^m, e.g. 11008 = 344 * 32: a 32-point FHT, then a "
    "344 x 344 matmul); 'FHT, padded to 2^m' zero-pads the vector to the next power of two: fast, but not an "
    "orthogonal transform of the d values. Rotate + quantize stays above the floor: a token's scale needs its "
    "whole rotated row, spread over d / 128 programs, so it runs as two launches (row maxima, then integers) and "
    "reads x twice; on the H100 that is 1.4x to 1.7x a copy at L >= 2048 (docs/BENCHMARKS.md says why a one-pass "
    "kernel did not do better). The MXFP4 / NVFP4 / MXFP8 rows need no row-wide scale (one per 32 or 16 rotated "
    "values), so they rotate and quantize in one pass; 'block-diagonal, then ...' does the same in two launches "
    "through an fp16 intermediate."
)

st.title("Online-rotation kernels")
st.caption(
    "FLRot's claim: a learned block-diagonal R4, run as a Triton matmul of 128x128 blocks, costs no more than "
    "the Fast Hadamard Transform. A plain copy of the activations (memcpy) is the floor for any online "
    "rotation: every kernel must read and write the same bytes. Each kernel is timed on L tokens of width d."
)


def recorded_rows() -> pd.DataFrame:
    rows = pd.read_csv(DOCS / RECORDED[0])
    pkg = DOCS / RECORDED_FHT
    if pkg.exists():
        fht = pd.read_csv(pkg)
        fht["kernel"] = "fht_padded_package"
        rows = pd.concat([rows, fht], ignore_index=True)
    return rows


def kernel_order(kernel: str) -> tuple[int, str]:
    """Table and legend order: the benchmark's (memcpy, FHT, Triton, ...), the package's FHT after ours."""
    base = "fht_padded" if kernel == "fht_padded_package" else kernel
    return (KERNELS.index(base) if base in KERNELS else len(KERNELS), kernel)


gpu = gpu_available()
if not gpu:
    st.warning(
        "No CUDA GPU on this machine, so nothing can be timed here. Below: the latest recorded GPU run "
        f"({RECORDED[1]}). Full tables and the commands: docs/BENCHMARKS.md."
    )
    rows = recorded_rows()
    d = st.selectbox("Width d", sorted(rows.d.unique()), index=1, key="kern_rec_d", help=WIDTHS_HELP)
    st.plotly_chart(charts.kernel_latency(rows, d, f"Recorded latency vs tokens, d = {d}, fp16, block 128", LABELS))
    st.caption(FIGURE_NOTE)
    # Kernels as rows (readable names), token counts as columns: the other way round is wider than the page.
    table = rows[rows.d == d].pivot_table(index="kernel", columns="L", values="median_us")
    table = table.loc[sorted(table.index, key=kernel_order)]
    table = table.rename(index=lambda k: LABELS.get(k, k), columns=lambda n: f"L = {n}")
    table.index.name = "kernel (median microseconds)"
    st.table(table.style.format("{:.1f}"))
    st.caption(f"Median time in microseconds at d = {d}, per kernel and number of tokens L; lower is faster.")

st.subheader("Time the kernels on this machine")
st.caption(
    "Each kernel is first checked against its reference on the same inputs, then timed. "
    + ("This needs a CUDA GPU: on this machine the button only says why it cannot run." if not gpu else "")
)
with st.form("bench"):
    c1, c2, c3 = st.columns([1, 1.5, 0.6])  # room for the six token counts' chips
    ds = c1.multiselect("Widths d", [4096, 8192, 11008, 14336, 16384], default=[11008], help=WIDTHS_HELP)
    ls = c2.multiselect(
        "Tokens L",
        [1, 16, 128, 512, 2048, 8192],
        default=[1, 128, 512, 2048, 8192],
        help="How many tokens (rows of activations) one call rotates.",
    )
    dtype = c3.radio("dtype", ["fp16", "bf16"], horizontal=True)
    kernels = st.multiselect("Kernels", list(KERNELS), default=list(KERNELS), format_func=LABELS.get)
    run = st.form_submit_button("Run benchmark", type="primary", key="kern_run")

if run:
    rows = []
    chart = st.empty()
    bar = st.progress(0, text="checking and timing")
    total = len(ds) * len(ls) * len(set(kernels) | {"memcpy"})
    try:
        for row in run_benchmark(ds, ls, dtype, kernels):
            rows.append(row)
            bar.progress(
                len(rows) / total, text=f"{row['kernel']} d={row['d']} L={row['L']}: {row['median_us']:.1f} us"
            )
            df = pd.DataFrame(rows)
            chart.plotly_chart(
                charts.kernel_latency(df, row["d"], f"Latency vs tokens, d = {row['d']}, {dtype}", LABELS)
            )
    except (ValueError, NoGPUError, AssertionError) as e:
        st.error(str(e))
    bar.empty()
    if rows:
        df = pd.DataFrame(rows)
        st.caption(FIGURE_NOTE)
        st.caption(
            "Every kernel was checked against its reference before it was timed. Times: median of "
            "triton.testing.do_bench over CUDA-graph replays (GPU time, no Python), the L2 cache flushed "
            "before each call; 'over_memcpy' = time / memcpy time at the same d and L."
        )
        st.table(
            df[["kernel", "d", "L", "median_us", "gbps", "over_memcpy", "backend"]]
            .style.format(precision=2)
            .hide(axis="index")
        )
        st.download_button("Download CSV", df.to_csv(index=False).encode(), "spinscope_kernels.csv", "text/csv")
