"""QRazor: base-precision integers, one SDR group bit by bit, and SDR against RTN-4 and Hadamard+RTN-4 on the
same real tensor at matched effective bits."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import charts, state
from engine.quant import qrazor_view as qv
from engine.quant.qrazor import flag_bits, qmax

METHOD_COLORS = {"SDR": charts.COLORS["outlier"], "RTN-4": charts.COLORS["normal"],
                 "Hadamard + RTN-4": charts.COLORS["channel"]}

st.title("QRazor: significant data razoring, bit by bit")
st.caption("QRazor (Lee, Choi, Chang 2025) first quantizes to wide integers with one static absmax scale "
           "(activations 16-bit, KV cache 8-bit, weights 8-bit per output channel), then keeps only each group's "
           "most significant bits: the OR of the group's magnitudes marks the razoring point, 3 magnitude bits "
           "and the sign are kept, and a small per-group flag records the shift. No rotation, no training.")

handle = state.model()
if handle is None:
    st.stop()
arch = handle.arch


def _source_label(source: str) -> str:
    return "activation" if source == "activation" else f"weight of {source}_proj (the linear reading it)"


c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
layer = c1.number_input("Layer", 0, arch.n_layers - 1, min(5, arch.n_layers - 1), key="qr_layer")
sites = [s for s in qv.SITE_ROLES if s != "down_in" or "down" in arch.down_roles]  # a mixture's are per expert
site = c2.selectbox("Site", sites, format_func=lambda s: f"{s}: {qv.SITE_LABELS[s]}", key="qr_site")
source = c3.selectbox("Tensor", ["activation", *qv.site_readers(arch)[site]], format_func=_source_label,
                      key="qr_source")
tokens = c4.number_input("Tokens", 16, min(2048, handle.max_length), min(256, handle.max_length), step=64,
                         key="qr_tokens",
                         help="One window of the Wikipedia sample's calibration split, run up to this layer.")
group_size = st.select_slider("Group size g (values sharing one flag)", qv.GROUP_SIZES, value=16, key="qr_group",
                              help="Smaller groups razor closer to each value's own magnitude but store more flags.")

try:
    with st.spinner(f"Running {int(tokens)} tokens through layers 0-{int(layer)}..."):
        tensor = qv.site_tensor(handle, int(layer), site, source, int(tokens))
except ValueError as e:
    st.error(str(e))
    st.stop()

base = tensor.base_bits
rows, d = tensor.values.shape
scope = "one scale per output channel" if tensor.per_channel else "one scale for the whole tensor"
st.info(f"**{tensor.label}**: {rows} {tensor.row_name}s x {d} values. Base precision: {base}-bit integers, "
        f"q = round(x * {qmax(base)} / absmax), {scope} (static absmax over these {rows} rows). "
        f"Flags: {flag_bits(base)} bits per group (shifts 0 to {base - 4}). Model: {handle.note}")

# ---- one group in binary ------------------------------------------------------------------------------------
st.header("One group in binary")
best_row, best_group = qv.largest_group(tensor, group_size)
n_groups = -(-d // group_size)
k1, k2 = st.columns(2)
# Keys carry the tensor and g, so a new tensor starts at its own most interesting group.
ident = f"{layer}-{site}-{source}-{tokens}-{group_size}"
row = k1.number_input(f"Row ({tensor.row_name})", 0, rows - 1, best_row, key=f"qr_row_{ident}",
                      help="Starts at the row holding the tensor's largest |x| (the sink token excluded).")
group = k2.number_input(f"Group (of {n_groups} in the row)", 0, n_groups - 1, best_group, key=f"qr_g_{ident}",
                        help=f"Group j holds values j*{group_size} to (j+1)*{group_size}-1 of the row.")
gb = qv.bit_table(tensor, int(row), int(group), group_size)
st.markdown(f"OR of the group's magnitudes: `{gb.or_bits}`")
m1, m2, m3 = st.columns(3)
m1.metric("Razoring point (leading one of the OR)", "none (all zero)" if gb.razoring_point < 0
          else f"bit {gb.razoring_point}")
m2.metric("Flag (right shift)", f"{gb.flag} ({gb.flag_bits} bits)")
m3.metric("Stored bits for the group", f"{gb.stored_bits} = {group_size} x 4 + {gb.flag_bits}")
st.table(gb.rows.style.format({"x": "{:.4g}", "decoded x": "{:.4g}"}).hide(axis="index"))
st.caption(f"Magnitude bits are {base - 1} digits: `zeros [kept] dropped`. The `[` sits at the razoring point "
           "(the leading one of the group's OR); the 3 kept bits plus the sign are the 4-bit code; the dropped bits "
           "round the code to nearest, except when the kept bits are all ones (rounding up would need a new bit, "
           "so they are floored). Decoded q = sign x code << flag; decoded x = decoded q x the base scale.")

# ---- error over the whole tensor ----------------------------------------------------------------------------
st.header("Error over the whole tensor")
results = qv.compare_methods(tensor, group_size)


def _short(method: str) -> str:
    return method.split(" (")[0]


fig = go.Figure()
zero_notes = []
for c in results:
    err = c.errors.abs().numpy().ravel()
    nonzero = err[err > 0]
    zero_notes.append(f"{_short(c.method)} {100 * (1 - nonzero.size / err.size):.1f}%")
    if nonzero.size:
        edges = np.logspace(np.log10(nonzero.min()), np.log10(nonzero.max()), 61)
        counts, _ = np.histogram(nonzero, bins=edges)
        centers = np.sqrt(edges[:-1] * edges[1:])
        fig.add_trace(go.Scatter(x=centers, y=100 * counts / err.size, mode="lines", name=c.method,
                                 line=dict(color=METHOD_COLORS[_short(c.method)], width=2)))
fig.update_xaxes(type="log", exponentformat="power", dtick=1)  # decades only: the 2 and 5 between them crowd
units = "weight" if tensor.role == "weight" else "activation"
grid_cost = "fp16 scale, symmetric" if tensor.role == "weight" else "fp16 scale + 4-bit zero point, asymmetric"
st.plotly_chart(charts.layout(fig, f"|quantization error| of every value: {tensor.label}",
                               f"|x_hat - x| ({units} units, log scale)", "share of values (% per bin)"))
st.caption(f"A curve further left means smaller errors. Same effective bits: RTN gets the finest grids ({grid_cost}, "
           "per grid) that cost no more bits per value than SDR's flags, i.e. the smallest divisor of the row "
           "length whose overhead fits; the Hadamard variant rotates each row first (QuaRot, random signs"
           f"{', one Hadamard per head' if tensor.role == 'kv' else ''}). Exactly zero errors, not drawn: "
           + ", ".join(zero_notes) + ".")
st.table(pd.DataFrame([{"method": c.method, "effective bits": c.effective_bits, "MSE": c.mse,
                        "SQNR (dB)": c.sqnr_db} for c in results])
         .style.format({"effective bits": "{:.3f}", "MSE": "{:.3g}", "SQNR (dB)": "{:.2f}"}).hide(axis="index"))

# ---- group size ---------------------------------------------------------------------------------------------
st.header("Group size: bits against error")
sweep = qv.group_size_sweep(tensor)
left, right = st.columns(2)
for col, y, title, y_label, caption in (
        (left, "effective_bits", "Effective bits per value vs SDR group size", "bits per value (incl. side info)",
         f"SDR stores 4 + {flag_bits(base)}/g bits per value; each RTN is matched to it (at or just below); the two "
         "RTN variants use the same grids, so their lines coincide (the rotation stores nothing)."),
        (right, "sqnr_db", "Quantization SQNR vs SDR group size", "SQNR (dB, higher is better)",
         "Signal-to-noise of the whole tensor after each method; 6 dB is one bit of precision.")):
    fig = go.Figure()
    for method, part in sweep.groupby("method", sort=False):
        dash = "dash" if "Hadamard" in method else None  # drawn over RTN's identical bits: keep both visible
        fig.add_trace(go.Scatter(x=part.sdr_group, y=part[y], mode="lines+markers", name=method,
                                 line=dict(color=METHOD_COLORS[method], dash=dash)))
    fig.add_vline(x=group_size, line_dash="dot", line_color=charts.COLORS["normal"])
    fig.update_xaxes(type="log", tickvals=list(qv.GROUP_SIZES), ticktext=[str(g) for g in qv.GROUP_SIZES])
    with col:
        st.plotly_chart(charts.layout(fig, title, "SDR group size g (values per flag, log scale)", y_label))
        st.caption(caption + f" The dotted line is the chosen g = {group_size}.")
