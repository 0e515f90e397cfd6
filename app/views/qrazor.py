"""QRazor: base-precision integers, one SDR group bit by bit, and SDR against RTN-4 and Hadamard+RTN-4 on the
same real tensor at matched effective bits."""

import pandas as pd
import streamlit as st

from app import charts, state
from app.qrazor_bits import bit_table, largest_group
from engine.observe import qrazor_compare as qc
from engine.quant.qrazor import flag_bits, qmax

st.title("QRazor: significant data razoring, bit by bit")
st.caption(
    "QRazor (Lee, Choi, Chang 2025) first quantizes to wide integers with one static absmax scale "
    "(activations 16-bit, KV cache 8-bit, weights 8-bit per output channel), then keeps only each group's "
    "most significant bits: the OR of the group's magnitudes marks the razoring point, 3 magnitude bits "
    "and the sign are kept, and a small per-group flag records the shift. No rotation, no training."
)

handle = state.model()
if handle is None:
    st.stop()
arch = handle.arch


def _source_label(source: str) -> str:
    return "activation" if source == "activation" else f"weight of {source}_proj (the linear reading it)"


c1, c2, c3, c4 = st.columns([1, 2, 2, 1])
layer = c1.number_input("Layer", 0, arch.n_layers - 1, min(5, arch.n_layers - 1), key="qr_layer")
sites = [s for s in qc.SITE_ROLES if s != "down_in" or "down" in arch.down_roles]  # a mixture's are per expert
site = c2.selectbox("Site", sites, format_func=lambda s: f"{s}: {qc.SITE_LABELS[s]}", key="qr_site")
source = c3.selectbox(
    "Tensor", ["activation", *qc.site_readers(arch)[site]], format_func=_source_label, key="qr_source"
)
tokens = c4.number_input(
    "Tokens",
    16,
    min(2048, handle.max_length),
    min(256, handle.max_length),
    step=64,
    key="qr_tokens",
    help="One window of the Wikipedia sample's calibration split, run up to this layer.",
)
group_size = st.select_slider(
    "Group size g (values sharing one flag)",
    qc.GROUP_SIZES,
    value=16,
    key="qr_group",
    help="Smaller groups razor closer to each value's own magnitude but store more flags.",
)

try:
    with st.spinner(f"Running {int(tokens)} tokens through layers 0-{int(layer)}..."):
        tensor = qc.site_tensor(handle, int(layer), site, source, int(tokens))
except ValueError as e:
    st.error(str(e))
    st.stop()

base = tensor.base_bits
rows, d = tensor.values.shape
scope = "one scale per output channel" if tensor.per_channel else "one scale for the whole tensor"
st.info(
    f"**{tensor.label}**: {rows} {tensor.row_name}s x {d} values. Base precision: {base}-bit integers, "
    f"q = round(x * {qmax(base)} / absmax), {scope} (static absmax over these {rows} rows). "
    f"Flags: {flag_bits(base)} bits per group (shifts 0 to {base - 4}). Model: {handle.note}"
)

# ---- one group in binary ------------------------------------------------------------------------------------
st.header("One group in binary")
best_row, best_group = largest_group(tensor, group_size)
n_groups = -(-d // group_size)
k1, k2 = st.columns(2)
# Keys carry the tensor and g, so a new tensor starts at its own most interesting group.
ident = f"{layer}-{site}-{source}-{tokens}-{group_size}"
row = k1.number_input(
    f"Row ({tensor.row_name})",
    0,
    rows - 1,
    best_row,
    key=f"qr_row_{ident}",
    help="Starts at the row holding the tensor's largest |x| (the sink token excluded).",
)
group = k2.number_input(
    f"Group (of {n_groups} in the row)",
    0,
    n_groups - 1,
    best_group,
    key=f"qr_g_{ident}",
    help=f"Group j holds values j*{group_size} to (j+1)*{group_size}-1 of the row.",
)
gb = bit_table(tensor, int(row), int(group), group_size)
st.markdown(f"OR of the group's magnitudes: `{gb.or_bits}`")
m1, m2, m3 = st.columns(3)
m1.metric(
    "Razoring point (leading one of the OR)", "none (all zero)" if gb.razoring_point < 0 else f"bit {gb.razoring_point}"
)
m2.metric("Flag (right shift)", f"{gb.flag} ({gb.flag_bits} bits)")
m3.metric("Stored bits for the group", f"{gb.stored_bits} = {group_size} x 4 + {gb.flag_bits}")
st.table(gb.rows.style.format({"x": "{:.4g}", "decoded x": "{:.4g}"}).hide(axis="index"))
st.caption(
    f"Magnitude bits are {base - 1} digits: `zeros [kept] dropped`. The `[` sits at the razoring point "
    "(the leading one of the group's OR); the 3 kept bits plus the sign are the 4-bit code; the dropped bits "
    "round the code to nearest, except when the kept bits are all ones (rounding up would need a new bit, "
    "so they are floored). Decoded q = sign x code << flag; decoded x = decoded q x the base scale."
)

# ---- error over the whole tensor ----------------------------------------------------------------------------
st.header("Error over the whole tensor")
results = qc.compare_methods(tensor, group_size)
units = "weight" if tensor.role == "weight" else "activation"
grid_cost = "fp16 scale, symmetric" if tensor.role == "weight" else "fp16 scale + 4-bit zero point, asymmetric"
st.plotly_chart(
    charts.error_histograms(
        {c.method: (c.name, c.errors.abs().numpy().ravel()) for c in results},
        f"|quantization error| of every value: {tensor.label}",
        f"|x_hat - x| ({units} units, log scale)",
    )
)
st.caption(
    f"A curve further left means smaller errors. Same effective bits: RTN gets the finest grids ({grid_cost}, "
    "per grid) that cost no more bits per value than SDR's flags, i.e. the smallest divisor of the row "
    "length whose overhead fits; the Hadamard variant rotates each row first (QuaRot, random signs"
    f"{', one Hadamard per head' if tensor.role == 'kv' else ''}). Exactly zero errors, not drawn: "
    + ", ".join(f"{c.name} {100 * c.zero_share:.1f}%" for c in results)
    + "."
)
st.table(
    pd.DataFrame(
        [
            {"method": c.method, "effective bits": c.effective_bits, "MSE": c.mse, "SQNR (dB)": c.sqnr_db}
            for c in results
        ]
    )
    .style.format({"effective bits": "{:.3f}", "MSE": "{:.3g}", "SQNR (dB)": "{:.2f}"})
    .hide(axis="index")
)

# ---- group size ---------------------------------------------------------------------------------------------
st.header("Group size: bits against error")
sweep = qc.group_size_sweep(tensor)
left, right = st.columns(2)
for col, y, title, y_label, caption in (
    (
        left,
        "effective_bits",
        "Effective bits per value vs SDR group size",
        "bits per value (incl. side info)",
        f"SDR stores 4 + {flag_bits(base)}/g bits per value; each RTN is matched to it (at or just below); the two "
        "RTN variants use the same grids, so their lines coincide (the rotation stores nothing).",
    ),
    (
        right,
        "sqnr_db",
        "Quantization SQNR vs SDR group size",
        "SQNR (dB, higher is better)",
        "Signal-to-noise of the whole tensor after each method; 6 dB is one bit of precision.",
    ),
):
    with col:
        st.plotly_chart(charts.group_size_lines(sweep, y, title, y_label, group_size, qc.GROUP_SIZES))
        st.caption(caption + f" The dotted line is the chosen g = {group_size}.")
