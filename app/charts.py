"""Plotly figures. Every figure has a title and axis titles with units; the page adds a caption under it."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go

GAUSSIAN_KURTOSIS = 3.0
COLORS = {"token": "#4b3fb5", "token_sink": "#9d95e0", "tensor": "#d1495b", "tensor_sink": "#f0a6b0",
          "normal": "#7a7a7a", "outlier": "#d1495b", "channel": "#4b3fb5"}


def _layout(fig: go.Figure, title: str, x: str, y: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y, height=height, margin=dict(l=60, r=20, t=60, b=50),
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0))
    return fig


def kurtosis_by_layer(site_table: pd.DataFrame, title: str) -> go.Figure:
    """site_table: rows indexed by layer with the kurt_* columns of a CaptureResult."""
    t = site_table.sort_index()
    fig = go.Figure()
    series = [
        ("kurt_token_mean_nosink", "per token, mean over tokens (sink excluded)", "token", "solid"),
        ("kurt_token_mean", "per token, mean over tokens (with sink)", "token_sink", "dot"),
        ("kurt_tensor_nosink", "whole tensor (sink excluded)", "tensor", "solid"),
        ("kurt_tensor", "whole tensor (with sink)", "tensor_sink", "dot"),
    ]
    for col, name, color, dash in series:
        if col in t:
            fig.add_trace(go.Scatter(x=t.index, y=t[col], mode="lines+markers", name=name,
                                     line=dict(color=COLORS[color], dash=dash)))
    fig.add_hline(y=GAUSSIAN_KURTOSIS, line_dash="dash", line_color=COLORS["normal"],
                  annotation_text="Gaussian (3)", annotation_position="bottom right")
    fig.update_yaxes(type="log")
    return _layout(fig, title, "decoder layer", "kurtosis (Pearson, log scale)")


def channel_absmax(absmax: np.ndarray, outliers: list[int], title: str, y_label: str = "max |activation|") -> go.Figure:
    absmax = np.asarray(absmax, dtype=float)
    colors = np.full(absmax.shape, COLORS["channel"], dtype=object)
    colors[outliers] = COLORS["outlier"]
    fig = go.Figure(go.Bar(x=np.arange(absmax.size), y=absmax, marker_color=colors.tolist(), marker_line_width=0,
                           name="channel max |x|"))
    if outliers:
        fig.add_trace(go.Scatter(x=outliers, y=absmax[outliers], mode="markers", name="outlier channel",
                                 marker=dict(color=COLORS["outlier"], size=7, symbol="triangle-down")))
    fig.add_hline(y=float(np.median(absmax)), line_dash="dot", line_color=COLORS["normal"],
                  annotation_text="median channel", annotation_position="top left")
    return _layout(fig, title, "channel index", y_label)


def surface(mat: np.ndarray, title: str, first_token: int = 0, channel_bin: int = 1) -> go.Figure:
    """mat [tokens, channels] of |x|; first_token is the position of row 0 (1 when the sink row is dropped)."""
    tokens = np.arange(first_token, first_token + mat.shape[0])
    channels = np.arange(mat.shape[1]) * channel_bin
    fig = go.Figure(go.Surface(z=mat, x=channels, y=tokens, colorscale="Viridis", colorbar=dict(title="|x|")))
    fig.update_layout(title=title, height=520, margin=dict(l=10, r=10, t=60, b=10),
                      scene=dict(xaxis_title="channel", yaxis_title="token position", zaxis_title="|activation|",
                                 camera=dict(eye=dict(x=1.6, y=-1.6, z=0.9))))
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
    fig.update_yaxes(type="log", range=[math.log10(max(counts[counts > 0].min(), 1e-12) / 3),
                                        math.log10(max(counts.max(), pdf.max()) * 2)])
    return _layout(fig, title, "activation value", "density (log scale)")
