"""The what-if matrix page as a user fills it on a tiny model directory: a 2x2 corner fills in with a perplexity
per cell, a bad rotation column is refused in one sentence and the cells on screen stay, and the SQNR of one cell
is drawn per layer."""

from tests.app.apptest import decode, figure, open_page


def test_a_2x2_corner_fills_in_and_one_cell_shows_its_sqnr(tiny_model_dir, tmp_path):
    at = open_page("matrix", tiny_model_dir)
    at.multiselect(key="mx_formats").set_value(["4", "mxfp4"])
    at.multiselect(key="mx_rotations").set_value(["none", "block16"])
    at.number_input(key="mx_tokens").set_value(128)
    at.button(key="mx_fill").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    table = at.dataframe[-1].value
    assert list(table.index) == ["4", "mxfp4"] and list(table.columns) == ["none", "block16"]
    assert (table.values > 1).all()  # a perplexity in every cell

    at.text_input(key="mx_file").set_value(str(tmp_path / "missing.bin"))
    at.button(key="mx_fill").click().run()
    assert any("missing.bin" in e.value for e in at.error)
    assert list(at.dataframe[-1].value.columns) == ["none", "block16"]  # the earlier cells stay

    at.selectbox(key="mx_sqnr_format").set_value("mxfp4")
    at.selectbox(key="mx_sqnr_rotation").set_value("block16")
    at.button(key="mx_sqnr_go").click().run()
    assert not at.exception
    fig = figure(at, "Activation SQNR per layer: mxfp4, block 16")
    assert [t["name"] for t in fig["data"]] == [
        "down_proj input (after R4)",
        "attention input (residual stream after R1)",
    ]
    assert all(len(decode(t["y"])) == 2 for t in fig["data"])  # one point per layer of the tiny model
