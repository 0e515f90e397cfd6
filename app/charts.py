"""Plotly figures. Every figure has a title and axis titles with units; the page adds a caption under it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GAUSSIAN_KURTOSIS = 3.0
COLORS = {"token": "#4b3fb5", "token_sink": "#9d95e0", "tensor": "#d1495b", "tensor_sink": "#f0a6b0",
          "normal": "#7a7a7a", "outlier": "#d1495b", "channel": "#4b3fb5"}


def layout(fig: go.Figure, title: str, x: str, y: str, height: int = 380) -> go.Figure:
    # Title and legend both hang from the top of the figure (container coordinates), the legend 30 px under the
    # title, and both push the plot down (automargin). Anchored to the plot instead, a legend sat on the title, and
    # one that wraps to two rows in a narrow column covered it.
    fig.update_layout(title=dict(text=title, automargin=True, yref="container", y=0.98, yanchor="top"),
                      xaxis_title=x, yaxis_title=y, height=height, margin=dict(l=60, r=20, t=40, b=50),
                      legend=dict(orientation="h", yref="container", yanchor="top", y=1 - 30 / height, x=0,
                                  font=dict(size=11)))
    return fig


def _log_y(fig: go.Figure, **kw) -> None:
    """Log y axis labelled and gridded at decades only (plotly's default 2 and 5 between decades crowd the axis)."""
    fig.update_yaxes(type="log", dtick=1, **kw)


def share_axes(*figs: go.Figure) -> None:
    """Give figures shown side by side (before / after) one range per axis, so heights compare at a glance: each
    chart autoscaled to its own data would draw a 100x smaller outlier just as tall. Surfaces share z and colours."""
    if all(any(t.type == "surface" for t in f.data) for f in figs):
        top = max(float(np.nanmax(np.asarray(t.z, dtype=float))) for f in figs for t in f.data if t.type == "surface")
        for f in figs:
            f.update_layout(scene_zaxis_range=[0, top])
            f.update_traces(cmin=0, cmax=top, selector=dict(type="surface"))
        return
    for axis in ("x", "y"):
        extents = [_extent(f, axis) for f in figs]
        if any(e is None for e in extents):
            continue
        common = [min(e[0] for e in extents), max(e[1] for e in extents)]
        for f in figs:
            f.update_layout({f"{axis}axis_range": common})


def _extent(fig: go.Figure, axis: str) -> tuple[float, float] | None:
    """(low, high) of a figure's axis in plotly's range units (log10 on a log axis): its explicit range if set, else
    its traces and lines padded by 3%; None for a categorical axis."""
    ax = fig.layout[f"{axis}axis"]
    if ax.range is not None:
        return float(ax.range[0]), float(ax.range[1])
    try:
        parts = [np.asarray(getattr(t, axis), dtype=float).ravel() for t in fig.data if getattr(t, axis) is not None]
        parts += [np.asarray([sh[f"{axis}0"], sh[f"{axis}1"]], dtype=float) for sh in fig.layout.shapes
                  if sh[f"{axis}ref"] == axis]
    except (TypeError, ValueError):  # category labels
        return None
    v = np.concatenate(parts) if parts else np.empty(0)
    v = v[np.isfinite(v)]
    if ax.type == "log":
        v = np.log10(v[v > 0])
    if v.size == 0:
        return None
    low, high = float(v.min()), float(v.max())
    pad = 0.03 * (high - low) or 0.5
    bars_from_zero = axis == "y" and ax.type != "log" and low >= 0 and any(t.type == "bar" for t in fig.data)
    return (0.0 if bars_from_zero else low - pad), high + pad


def kurtosis_by_layer(site_table: pd.DataFrame, title: str) -> go.Figure:
    """site_table: rows indexed by layer with the kurt_* columns of a CaptureResult."""
    t = site_table.sort_index()
    fig = go.Figure()
    series = [
        # Short names keep the legend on one row (two in a half-width column); Home defines "per token".
        ("kurt_token_mean_nosink", "per token, sink excluded", "token", "solid"),
        ("kurt_token_mean", "per token, with sink", "token_sink", "dot"),
        ("kurt_tensor_nosink", "whole tensor, sink excluded", "tensor", "solid"),
        ("kurt_tensor", "whole tensor, with sink", "tensor_sink", "dot"),
    ]
    for col, name, color, dash in series:
        if col in t:
            fig.add_trace(go.Scatter(x=t.index, y=t[col], mode="lines+markers", name=name,
                                     line=dict(color=COLORS[color], dash=dash)))
    fig.add_hline(y=GAUSSIAN_KURTOSIS, line_dash="dash", line_color=COLORS["normal"])
    # Not add_hline's annotation_text: on a log axis plotly places that label at 10**3 instead of 3.
    fig.add_annotation(x=1, xref="paper", y=math.log10(GAUSSIAN_KURTOSIS), yref="y", text="Gaussian (3)",
                       showarrow=False, xanchor="right", yanchor="bottom", font=dict(color=COLORS["normal"]))
    values = t[[c for c, *_ in series if c in t]].to_numpy().ravel()
    finite = values[np.isfinite(values) & (values > 0)]
    if finite.size and finite.max() / finite.min() < 10:  # within one decade: decade ticks alone would show none
        fig.update_yaxes(type="log", tickvals=[1, 1.2, 1.5, 1.8, 2, 2.5, 3, 4, 5, 7, 10, 15, 20, 30])
    else:
        _log_y(fig)
    fig.update_xaxes(tick0=0, dtick=max(1, len(t) // 15))  # whole layers, never 0.2 of one
    return layout(fig, title, "decoder layer", "kurtosis (Pearson, log scale)")


def channel_absmax(absmax: np.ndarray, outliers: list[int], title: str, y_label: str = "max |activation|") -> go.Figure:
    absmax = np.asarray(absmax, dtype=float)
    colors = np.full(absmax.shape, COLORS["channel"], dtype=object)
    colors[outliers] = COLORS["outlier"]
    fig = go.Figure(go.Bar(x=np.arange(absmax.size), y=absmax, marker_color=colors.tolist(), marker_line_width=0,
                           name="channel max |x|"))
    if outliers:
        fig.add_trace(go.Scatter(x=outliers, y=absmax[outliers], mode="markers", name="outlier channel",
                                 marker=dict(color=COLORS["outlier"], size=7, symbol="triangle-down")))
    # The median goes in the legend: a label on the line itself sits on top of the bars and cannot be read.
    median = float(np.median(absmax))
    fig.add_trace(go.Scatter(x=[0, absmax.size - 1], y=[median, median], mode="lines",
                             name=f"median channel ({median:.3g})", line=dict(color=COLORS["normal"], dash="dot"),
                             hoverinfo="skip"))
    return layout(fig, title, "channel index", y_label)


def surface(mat: np.ndarray, title: str, first_token: int = 0, channel_bin: int = 1) -> go.Figure:
    """mat [tokens, channels] of |x|; first_token is the position of row 0 (1 when the sink row is dropped)."""
    tokens = np.arange(first_token, first_token + mat.shape[0])
    channels = np.arange(mat.shape[1]) * channel_bin
    fig = go.Figure(go.Surface(z=mat, x=channels, y=tokens, colorscale="Viridis", colorbar=dict(title="|x|")))
    # A wide, flat box fills the page's width; the default cube leaves most of it empty.
    fig.update_layout(title=title, height=520, margin=dict(l=10, r=10, t=60, b=10),
                      scene=dict(xaxis_title="channel", yaxis_title="token position", zaxis_title="|activation|",
                                 aspectmode="manual", aspectratio=dict(x=2.0, y=1.0, z=0.7),
                                 # the camera fills the frame
                                 camera=dict(eye=dict(x=1.3, y=-1.75, z=0.85), center=dict(x=0, y=0, z=-0.2))))
    return fig


def histogram_vs_gaussian(values: np.ndarray, title: str, bins: int = 120) -> go.Figure:
    """Density histogram of sampled values with the Gaussian of the same mean and variance (log density axis)."""
    values = np.asarray(values, dtype=float)
    mu, sd = float(values.mean()), float(values.std()) or 1e-12
    counts, edges = np.histogram(values, bins=bins, density=True)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(go.Bar(x=centers, y=counts, width=np.diff(edges), name="sampled activations",
                           marker_color=COLORS["channel"], marker_line_width=0))
    xs = np.linspace(edges[0], edges[-1], 400)
    pdf = np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    fig.add_trace(go.Scatter(x=xs, y=pdf, mode="lines", name="Gaussian, same variance",
                             line=dict(color=COLORS["outlier"], width=2)))
    _log_y(fig, exponentformat="power", range=[math.log10(max(counts[counts > 0].min(), 1e-12) / 3),
                                               math.log10(max(counts.max(), pdf.max()) * 2)])
    return layout(fig, title, "activation value", "density (log scale)")


def kernel_latency(rows: pd.DataFrame, d: int, title: str, labels: dict[str, str], floor: str = "memcpy",
                   highlight: str = "triton_blockdiag") -> go.Figure:
    """Median time per kernel against tokens L at width d, log-log; rows: kernel, d, L, median_us (kernels.bench).

    The floor (a plain copy of the activations) is a thick dashed black line; the highlighted kernel (the one the
    page is about) a thick line drawn over the others. Both lead the legend."""
    fig = go.Figure()
    sub = rows[rows.d == d]
    kernels = list(dict.fromkeys(sub.kernel))
    for kernel in sorted(kernels, key=lambda k: k == highlight):  # the highlighted one last: on top
        k = sub[sub.kernel == kernel].sort_values("L")
        name, line, rank = labels.get(kernel, kernel), dict(width=2), 1000
        if kernel == floor:
            name, line, rank = f"{name}: the floor", dict(dash="dash", color="black", width=3), 1
        elif kernel == highlight:
            line, rank = dict(width=4), 2
        fig.add_trace(go.Scatter(x=k.L, y=k.median_us, mode="lines+markers", name=name, line=line, legendrank=rank))
    fig.update_xaxes(type="log", dtick=1)  # decades only: plotly's 2 and 5 between them crowd the axis
    _log_y(fig)
    return layout(fig, title, "tokens L (log scale)", "median time, microseconds (log scale; lower is faster)",
                  height=480)


def expert_tokens(tokens: pd.DataFrame, title: str) -> go.Figure:
    """Heat map of tokens [layer x expert] routed to each expert of a mixture."""
    fig = go.Figure(go.Heatmap(z=tokens.to_numpy(), x=[f"expert {e}" for e in tokens.columns],
                               y=[f"layer {i}" for i in tokens.index], colorscale="Blues",
                               colorbar=dict(title="tokens"), hovertemplate="%{y}, %{x}: %{z} tokens<extra></extra>"))
    return layout(fig, title, "expert", "decoder layer", height=max(300, 40 + 22 * len(tokens)))


def clip_heatmap(clips: dict, n_layers: int, title: str) -> go.Figure:
    """The clip ratios a calibrated row chose (engine.quant.calibrate.ClipPlan.summary): one column per site
    (weights: the mean over a linear's rows), one row per decoder layer; 1.0 = not clipped."""
    columns, z = [], []
    for kind, label in (("weights", "W"), ("activations", "A")):
        for role, values in clips.get(kind, {}).items():
            columns.append(f"{label} {role}")
            z.append(values)
    for kind in ("k", "v"):
        if kind in clips:
            columns.append(kind.upper())
            z.append(clips[kind])
    grid = [[col[i] for col in z] for i in range(n_layers)]
    fig = go.Figure(go.Heatmap(z=grid, x=columns, y=list(range(n_layers)), zmin=0.7, zmax=1.0,
                               colorscale="Viridis", colorbar=dict(title="clip ratio<br>(1 = none)"),
                               hovertemplate="%{x}, layer %{y}: clip ratio %{z:.3f}<extra></extra>"))
    # White rules between the groups (weights | activations | KV cache), which otherwise run into each other.
    groups = [c[0] if c[:2] in ("W ", "A ") else "KV" for c in columns]
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            fig.add_vline(x=i - 0.5, line_color="white", line_width=3)
    return layout(fig, title, "quantized site (W: weight rows' mean shrink, A: input activations, K/V: cache)",
                  "decoder layer", height=max(380, 14 * n_layers + 120))
