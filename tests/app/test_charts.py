"""The figure builders the pages draw (app/charts.py), checked on small hand-made inputs: what each figure claims
(the bars' heights, the saturation of the matrix colours, the share of values per error bin) against numbers
computed here."""

import math

import numpy as np
import pandas as pd
import pytest

from app import charts
from tests.app.apptest import decode


def test_perplexity_bars_start_at_one_on_a_log_axis_and_mark_the_fp_model():
    fig = charts.perplexity_bars(["fp 16-16-16", "rtn 4-4-4"], [12.5, 300.0], 12.5, "Perplexity").to_plotly_json()
    assert fig["layout"]["yaxis"]["type"] == "log"
    assert fig["layout"]["yaxis"]["range"] == pytest.approx([0, math.log10(300.0) + 0.35])  # from perplexity 1
    assert decode(fig["data"][0]["y"]) == [12.5, 300.0] and list(fig["data"][0]["text"]) == ["12.5", "300.0"]
    (line,) = fig["layout"]["shapes"]
    assert (line["y0"], line["y1"]) == (12.5, 12.5)
    assert fig["layout"]["annotations"][0]["text"] == "fp 12.50"


def test_the_matrix_colours_saturate_at_four_times_the_best_cell():
    table = pd.DataFrame([[10.0, 12.0], [80.0, np.nan]], index=["4", "mxfp4"], columns=["none", "block16"])
    assert charts.colour_cap(table) == 40.0
    heat = charts.perplexity_matrix(table, {"block16": "block 16"}, "Perplexity").to_plotly_json()["data"][0]
    assert (heat["zmin"], heat["zmax"]) == (10.0, 40.0)
    assert list(heat["x"]) == ["none", "block 16"] and heat["z"][1][1] is None  # a cell not computed stays blank
    assert charts.colour_cap(table.iloc[:1]) == 12.0  # within 4x: the colours span the cells


def test_error_histograms_give_the_share_of_all_values_per_bin():
    rng = np.random.default_rng(0)
    err = np.abs(rng.standard_normal(1000))
    err[:100] = 0.0  # exact zeros are not drawn, but still count in the denominator
    fig = charts.error_histograms({"SDR (QRazor, g=16)": ("SDR", err)}, "errors", "|x_hat - x|").to_plotly_json()
    (trace,) = fig["data"]
    assert sum(decode(trace["y"])) == pytest.approx(90.0)
    assert fig["layout"]["xaxis"]["type"] == "log"


def test_group_size_lines_draw_one_line_per_method_and_mark_the_chosen_size():
    sweep = pd.DataFrame(
        {"sdr_group": [4, 16, 4, 16], "method": ["SDR", "SDR", "RTN-4", "RTN-4"], "sqnr_db": [20.0, 18.0, 19.0, 19.0]}
    )
    fig = charts.group_size_lines(sweep, "sqnr_db", "SQNR", "dB", 16, (4, 16)).to_plotly_json()
    assert [t["name"] for t in fig["data"]] == ["SDR", "RTN-4"]
    assert decode(fig["data"][0]["y"]) == [20.0, 18.0]
    assert fig["layout"]["shapes"][0]["x0"] == 16


def test_clip_heatmap_has_a_row_per_layer_and_a_column_per_site():
    clips = {"weights": {"q": [0.9, 0.8], "down": [1.0, 0.95]}, "activations": {"q": [1.0, 0.85]}, "k": [0.9, 1.0]}
    heat = charts.clip_heatmap(clips, "clips").to_plotly_json()["data"][0]
    assert list(heat["x"]) == ["W q", "W down", "A q", "K"]
    assert heat["z"] == [[0.9, 1.0, 1.0, 0.9], [0.8, 0.95, 0.85, 1.0]]
