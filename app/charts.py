"""Every plotly figure of the app, one public builder per figure. Each has a title and axis titles with units; the
page adds a caption under it. Pages only draw what these return."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GAUSSIAN_KURTOSIS = 3.0
COLORS = {
    "token": "#4b3fb5",
    "token_sink": "#9d95e0",
    "tensor": "#d1495b",
    "tensor_sink": "#f0a6b0",
    "normal": "#7a7a7a",
    "outlier": "#d1495b",
    "channel": "#4b3fb5",
}


def layout(fig: go.Figure, title: str, x: str, y: str, height: int = 380) -> go.Figure:
    # Title and legend both hang from the top of the figure (container coordinates), the legend 30 px under the
    # title, and both push the plot down (automargin). Anchored to the plot instead, a legend sat on the title, and
    # one that wraps to two rows in a narrow column covered it.
    fig.update_layout(
        title=dict(text=title, automargin=True, yref="container", y=0.98, yanchor="top"),
        xaxis_title=x,
        yaxis_title=y,
        height=height,
        margin=dict(l=60, r=20, t=40, b=50),
        legend=dict(orientation="h", yref="container", yanchor="top", y=1 - 30 / height, x=0, font=dict(size=11)),
    )
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
        parts += [
            np.asarray([sh[f"{axis}0"], sh[f"{axis}1"]], dtype=float)
            for sh in fig.layout.shapes
            if sh[f"{axis}ref"] == axis
        ]
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
            fig.add_trace(
                go.Scatter(
                    x=t.index, y=t[col], mode="lines+markers", name=name, line=dict(color=COLORS[color], dash=dash)
                )
            )
    fig.add_hline(y=GAUSSIAN_KURTOSIS, line_dash="dash", line_color=COLORS["normal"])
    # Not add_hline's annotation_text: on a log axis plotly places that label at 10**3 instead of 3.
    fig.add_annotation(
        x=1,
        xref="paper",
        y=math.log10(GAUSSIAN_KURTOSIS),
        yref="y",
        text="Gaussian (3)",
        showarrow=False,
        xanchor="right",
        yanchor="bottom",
        font=dict(color=COLORS["normal"]),
    )
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
    fig = go.Figure(
        go.Bar(
            x=np.arange(absmax.size),
            y=absmax,
            marker_color=colors.tolist(),
            marker_line_width=0,
            name="channel max |x|",
        )
    )
    if outliers:
        fig.add_trace(
            go.Scatter(
                x=outliers,
                y=absmax[outliers],
                mode="markers",
                name="outlier channel",
                marker=dict(color=COLORS["outlier"], size=7, symbol="triangle-down"),
            )
        )
    # The median goes in the legend: a label on the line itself sits on top of the bars and cannot be read.
    median = float(np.median(absmax))
    fig.add_trace(
        go.Scatter(
            x=[0, absmax.size - 1],
            y=[median, median],
            mode="lines",
            name=f"median channel ({median:.3g})",
            line=dict(color=COLORS["normal"], dash="dot"),
            hoverinfo="skip",
        )
    )
    return layout(fig, title, "channel index", y_label)


def surface(
    mat: np.ndarray, title: str, first_token: int = 0, channel_bin: int = 1, token_axis: str = "token position"
) -> go.Figure:
    """mat [tokens, channels] of |x|; first_token is the position of row 0 (1 when the sink row is dropped)."""
    tokens = np.arange(first_token, first_token + mat.shape[0])
    channels = np.arange(mat.shape[1]) * channel_bin
    fig = go.Figure(go.Surface(z=mat, x=channels, y=tokens, colorscale="Viridis", colorbar=dict(title="|x|")))
    # A wide, flat box fills the page's width; the default cube leaves most of it empty.
    fig.update_layout(
        title=title,
        height=520,
        margin=dict(l=10, r=10, t=60, b=10),
        scene=dict(
            xaxis_title="channel",
            yaxis_title=token_axis,
            zaxis_title="|activation|",
            aspectmode="manual",
            aspectratio=dict(x=2.0, y=1.0, z=0.7),
            # the camera fills the frame
            camera=dict(eye=dict(x=1.3, y=-1.75, z=0.85), center=dict(x=0, y=0, z=-0.2)),
        ),
    )
    return fig


def half_width_surface(mat: np.ndarray, title: str, first_token: int = 0) -> go.Figure:
    """surface() for a half-width column (before / after side by side)."""
    fig = surface(mat, title, first_token=first_token)
    # In a half-width column the full-width box and camera cut off the token and z axes: a squarer box seen from
    # further back, with the colour bar below the scene instead of beside it.
    fig.update_layout(scene_aspectratio=dict(x=1.5, y=1.0, z=0.7), scene_camera_eye=dict(x=1.5, y=-2.3, z=1.2))
    fig.update_traces(colorbar=dict(orientation="h", y=0, yanchor="top", len=0.6, thickness=12))
    return fig


def histogram_vs_gaussian(values: np.ndarray, title: str, bins: int = 120) -> go.Figure:
    """Density histogram of sampled values with the Gaussian of the same mean and variance (log density axis)."""
    values = np.asarray(values, dtype=float)
    mu, sd = float(values.mean()), float(values.std()) or 1e-12
    counts, edges = np.histogram(values, bins=bins, density=True)
    centers = (edges[:-1] + edges[1:]) / 2
    fig = go.Figure(
        go.Bar(
            x=centers,
            y=counts,
            width=np.diff(edges),
            name="sampled activations",
            marker_color=COLORS["channel"],
            marker_line_width=0,
        )
    )
    xs = np.linspace(edges[0], edges[-1], 400)
    pdf = np.exp(-0.5 * ((xs - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    fig.add_trace(
        go.Scatter(
            x=xs, y=pdf, mode="lines", name="Gaussian, same variance", line=dict(color=COLORS["outlier"], width=2)
        )
    )
    _log_y(
        fig,
        exponentformat="power",
        range=[math.log10(max(counts[counts > 0].min(), 1e-12) / 3), math.log10(max(counts.max(), pdf.max()) * 2)],
    )
    return layout(fig, title, "activation value", "density (log scale)")


def kernel_latency(
    rows: pd.DataFrame,
    d: int,
    title: str,
    labels: dict[str, str],
    floor: str = "memcpy",
    highlight: str = "triton_blockdiag",
) -> go.Figure:
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
    return layout(
        fig, title, "tokens L (log scale)", "median time, microseconds (log scale; lower is faster)", height=480
    )


def expert_tokens(tokens: pd.DataFrame, title: str) -> go.Figure:
    """Heat map of tokens [layer x expert] routed to each expert of a mixture."""
    fig = go.Figure(
        go.Heatmap(
            z=tokens.to_numpy(),
            x=[f"expert {e}" for e in tokens.columns],
            y=[f"layer {i}" for i in tokens.index],
            colorscale="Blues",
            colorbar=dict(title="tokens"),
            hovertemplate="%{y}, %{x}: %{z} tokens<extra></extra>",
        )
    )
    return layout(fig, title, "expert", "decoder layer", height=max(300, 40 + 22 * len(tokens)))


def clip_heatmap(clips: dict, title: str) -> go.Figure:
    """The clip ratios a calibrated row chose (engine.quant.calibrate.ClipPlan.summary): one column per site
    (weights: the mean over a linear's rows), one row per decoder layer; 1.0 = not clipped."""
    n_layers = max(len(v) for kind in clips.values() for v in (kind.values() if isinstance(kind, dict) else [kind]))
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
    fig = go.Figure(
        go.Heatmap(
            z=grid,
            x=columns,
            y=list(range(n_layers)),
            zmin=0.7,
            zmax=1.0,
            colorscale="Viridis",
            colorbar=dict(title="clip ratio<br>(1 = none)"),
            hovertemplate="%{x}, layer %{y}: clip ratio %{z:.3f}<extra></extra>",
        )
    )
    # White rules between the groups (weights | activations | KV cache), which otherwise run into each other.
    groups = [c[0] if c[:2] in ("W ", "A ") else "KV" for c in columns]
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            fig.add_vline(x=i - 0.5, line_color="white", line_width=3)
    return layout(
        fig,
        title,
        "quantized site (W: weight rows' mean shrink, A: input activations, K/V: cache)",
        "decoder layer",
        height=max(380, 14 * n_layers + 120),
    )


# ---- Home ------------------------------------------------------------------------------------------------------


def device_weights(device_bytes: dict[str, int]) -> go.Figure:
    """Bars of the weight bytes a placement puts on each device (GiB)."""
    fig = go.Figure(go.Bar(x=list(device_bytes), y=[b / 2**30 for b in device_bytes.values()]))
    return layout(fig, "Weights per device", "device", "GiB", height=320)


# ---- Evaluate ----------------------------------------------------------------------------------------------------


def perplexity_bars(labels: list[str], ppl: list[float], fp: float | None, title: str) -> go.Figure:
    """One bar per evaluated row on a log axis, the floating-point model's perplexity `fp` as a dashed line."""
    fig = go.Figure(
        go.Bar(
            x=labels,
            y=ppl,
            marker_color=COLORS["token"],
            text=[f"{p:.1f}" for p in ppl],
            textposition="outside",
            name="perplexity",
        )
    )
    # From perplexity 1 (a perfect model): on a log axis a bar has no natural base, and plotly's would hide the fp bar.
    top = max((p for p in ppl if math.isfinite(p)), default=10.0)
    _log_y(fig, range=[0, math.log10(max(top, 10.0)) + 0.35])
    if fp:
        fig.add_hline(y=fp, line_dash="dash", line_color=COLORS["outlier"])
        # Not add_hline's annotation_text: on a log axis plotly places that label at 10**fp and stretches the axis.
        fig.add_annotation(
            x=1,
            xref="paper",
            y=math.log10(fp),
            yref="y",
            text=f"fp {fp:.2f}",
            showarrow=False,
            xanchor="right",
            yanchor="bottom",
            font=dict(color=COLORS["outlier"]),
        )
    return layout(fig, title, "recipe and bits (W-A-KV)", "perplexity (log scale, lower is better)")


def task_accuracy(labels: list[str], tasks: list[str], accuracy: list[list[float]]) -> go.Figure:
    """Grouped bars: accuracy[i][j] of row labels[i] on task tasks[j]."""
    fig = go.Figure()
    for label, row in zip(labels, accuracy, strict=False):
        fig.add_trace(go.Bar(x=tasks, y=row, name=label))
    return layout(fig, "Zero-shot accuracy per task", "task", "accuracy (acc, 0-1)")


# ---- Optimize ----------------------------------------------------------------------------------------------------


def training_curves(history: list[dict], ppl: list[dict]) -> go.Figure:
    """The loss of every step ({step, loss}) and, on a second axis, the quick perplexity probes ({step, ppl})."""
    fig = go.Figure(
        go.Scatter(
            x=[h["step"] for h in history],
            y=[h["loss"] for h in history],
            mode="lines+markers",
            name="training loss (one step's windows)",
            line=dict(color=COLORS["token"]),
        )
    )
    if ppl:
        fig.add_trace(
            go.Scatter(
                x=[p["step"] for p in ppl],
                y=[p["ppl"] for p in ppl],
                mode="lines+markers",
                name="quick perplexity (evaluation windows)",
                yaxis="y2",
                line=dict(color=COLORS["tensor"], dash="dot"),
            )
        )
        fig.update_layout(yaxis2=dict(title="perplexity", overlaying="y", side="right", showgrid=False))
    fig.update_xaxes(rangemode="tozero")
    return layout(fig, "Training loss and quick perplexity", "optimizer step", "cross-entropy (nats per token)")


def kurtosis_over_training(kurtosis: list[dict], site: str, n_layers: int, title: str) -> go.Figure:
    """Heat map [decoder layer x checkpoint] of one site's per-token kurtosis; kurtosis: {step, site: [layers]}."""
    z = [[k[site][layer] for k in kurtosis] for layer in range(n_layers)]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[f"step {k['step']}" for k in kurtosis],
            y=list(range(n_layers)),
            colorscale="Viridis",
            colorbar=dict(title="kurtosis"),
        )
    )
    return layout(fig, title, "checkpoint", "decoder layer")


def random_spread(random: pd.DataFrame, learned: pd.DataFrame, title: str) -> go.Figure:
    """One box of perplexities per random family (rows: family, label, ppl), each learned rotation a dashed line."""
    fig = go.Figure()
    for fam, g in random.groupby("family"):
        fig.add_trace(
            go.Box(
                y=g.ppl,
                name=f"random {fam}",
                boxpoints="all",
                jitter=0.4,
                pointpos=0,
                text=g.label,
                marker=dict(color=COLORS["token"]),
                line=dict(color="#888"),
            )
        )
    for _, row in learned.iterrows():
        fig.add_hline(
            y=row.ppl,
            line_dash="dash",
            line_color=COLORS["outlier"],
            annotation_text=f"{row.label}: {row.ppl:.2f}",
            annotation_position="top left",
        )
    return layout(fig, title, "rotation family", "perplexity (lower is better)")


# ---- Formats x rotations -----------------------------------------------------------------------------------------


def colour_cap(table: pd.DataFrame) -> float:
    """Where the perplexity heat map's colours saturate: 4x the best cell, so one broken cell does not flatten the
    good ones into one colour."""
    return min(float(table.max().max()), 4 * float(table.min().min()))


def perplexity_matrix(table: pd.DataFrame, column_labels: dict[str, str], title: str) -> go.Figure:
    """Heat map of perplexity [format x rotation] with each cell's value written in it; NaN (not computed) blank."""
    z = [[None if pd.isna(v) else float(v) for v in row] for row in table.values]  # a stopped fill leaves gaps
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=[column_labels.get(c, c) for c in table.columns],
            y=list(table.index),
            text=[["" if v is None else f"{v:.2f}" for v in row] for row in z],
            texttemplate="%{text}",
            textfont=dict(size=14),
            colorscale="Viridis_r",
            zmin=float(table.min().min()),
            zmax=colour_cap(table),
            colorbar=dict(title="perplexity"),
            hovertemplate="%{y}, %{x}: perplexity %{z:.3f}<extra></extra>",
        )
    )
    # Category axes: plotly would read a row named "4" as the number 4 and draw the rows on a numeric axis. The first
    # format on top, as in the table below.
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category", autorange="reversed")
    return layout(
        fig, title, "rotation (R1 and R4)", "format (weights and activations)", height=max(300, 70 * len(table) + 160)
    )


def sqnr_by_layer(sqnr: dict[str, list[float]], title: str) -> go.Figure:
    """Activation SQNR (dB) per decoder layer at down_proj's input and the attention input."""
    fig = go.Figure()
    for site, label, color in (
        ("down_in", "down_proj input (after R4)", COLORS["tensor"]),
        ("attn_in", "attention input (residual stream after R1)", COLORS["token"]),
    ):
        fig.add_trace(
            go.Scatter(
                x=list(range(len(sqnr[site]))), y=sqnr[site], mode="lines+markers", name=label, line=dict(color=color)
            )
        )
    return layout(fig, title, "decoder layer", "SQNR (dB, higher is better)")


# ---- Rotate ------------------------------------------------------------------------------------------------------


def sqnr_before_after(before: pd.DataFrame, after: pd.DataFrame, title: str) -> go.Figure:
    """4- and 8-bit SQNR per layer (site tables indexed by layer, columns sqnr4 and sqnr8): dotted before the
    rotation, solid after."""
    fig = go.Figure()
    for t, tag, dash in ((before, "before", "dot"), (after, "after", "solid")):
        for bits, color in ((4, COLORS["tensor"]), (8, COLORS["token"])):
            fig.add_trace(
                go.Scatter(
                    x=t.index,
                    y=t[f"sqnr{bits}"],
                    mode="lines+markers",
                    name=f"{bits}-bit, {tag}",
                    line=dict(color=color, dash=dash),
                )
            )
    return layout(fig, title, "decoder layer", "SQNR (dB, higher is better)")


# ---- QRazor ------------------------------------------------------------------------------------------------------

QRAZOR_COLORS = {"SDR": COLORS["outlier"], "RTN-4": COLORS["normal"], "Hadamard + RTN-4": COLORS["channel"]}


def error_histograms(errors: dict[str, tuple[str, np.ndarray]], title: str, x_label: str) -> go.Figure:
    """errors: {method: (its short name, |x_hat - x| of every value)}. One line per method: the share of values (%)
    per logarithmic bin of |error|; exact zeros have no place on a log axis and are left out (the caption says how
    many)."""
    fig = go.Figure()
    for method, (short, err) in errors.items():
        nonzero = err[err > 0]
        if nonzero.size:
            edges = np.logspace(np.log10(nonzero.min()), np.log10(nonzero.max()), 61)
            edges[[0, -1]] = nonzero.min(), nonzero.max()  # 10**log10(v) may round past v and drop it from the bins
            counts, _ = np.histogram(nonzero, bins=edges)
            centers = np.sqrt(edges[:-1] * edges[1:])
            fig.add_trace(
                go.Scatter(
                    x=centers,
                    y=100 * counts / err.size,
                    mode="lines",
                    name=method,
                    line=dict(color=QRAZOR_COLORS[short], width=2),
                )
            )
    fig.update_xaxes(type="log", exponentformat="power", dtick=1)  # decades only: the 2 and 5 between them crowd
    return layout(fig, title, x_label, "share of values (% per bin)")


def group_size_lines(
    sweep: pd.DataFrame, y: str, title: str, y_label: str, chosen: int, sizes: tuple[int, ...]
) -> go.Figure:
    """Column `y` of a group-size sweep (rows: sdr_group, method, y) per method against the SDR group size, with
    the chosen size dotted."""
    fig = go.Figure()
    for method, part in sweep.groupby("method", sort=False):
        dash = "dash" if "Hadamard" in method else None  # drawn over RTN's identical bits: keep both visible
        fig.add_trace(
            go.Scatter(
                x=part.sdr_group,
                y=part[y],
                mode="lines+markers",
                name=method,
                line=dict(color=QRAZOR_COLORS[method], dash=dash),
            )
        )
    fig.add_vline(x=chosen, line_dash="dot", line_color=COLORS["normal"])
    fig.update_xaxes(type="log", tickvals=list(sizes), ticktext=[str(g) for g in sizes])
    return layout(fig, title, "SDR group size g (values per flag, log scale)", y_label)
