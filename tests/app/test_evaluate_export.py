"""Evaluate's Export section, as a user meets it on a tiny model directory: a weight-only row exports to the
directory typed (a compressed-tensors checkpoint that transformers reads), a second press into the same directory is
refused until 'Replace' is ticked, and a row with calibrated activation clipping says why it cannot be exported."""

import json

from tests.app.apptest import open_page, run_evaluate


def export_to(at, row: int, out) -> None:
    at.selectbox(key="eval_export_row").set_value(row).run()
    at.text_input(key=f"eval_export_dir_{row}").set_value(str(out))
    at.button(key="eval_export").click().run()
    assert not at.exception, at.exception


def test_a_finished_row_exports_and_a_row_that_cannot_says_why(tiny_model_dir, tmp_path):
    at = open_page("evaluate", tiny_model_dir)
    at.number_input(key="eval_tokens").set_value(64)  # perplexity tokens
    run_evaluate(at, ["rtn", "quarot"], ["4-16-16", "4-4-4"])
    assert not at.error, [e.value for e in at.error]
    assert [h.value for h in at.header if h.value == "Export for serving"]

    # row 1 is rtn 4-4-4 with the default calibrated clipping: dynamic activation quantizers cannot clip
    at.selectbox(key="eval_export_row").set_value(1).run()
    assert any(
        "cannot be exported" in i.value and "calibrated activation and KV clip ratios" in i.value for i in at.info
    ), [i.value for i in at.info]
    assert not [b for b in at.button if b.key == "eval_export"]

    out = tmp_path / "w4a16"
    export_to(at, 0, out)  # rtn 4-16-16: weights only, their calibrated clipping lives in the stored scales
    assert not at.error, [e.value for e in at.error]
    assert any(str(out) in s.value for s in at.success), [s.value for s in at.success]
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert (config["format"], weights["num_bits"], weights["type"]) == ("pack-quantized", 4, "int")
    assert json.loads((out / "SPINSCOPE_EXPORT.json").read_text())["bits"] == "4-16-16"

    export_to(at, 0, out)  # the same directory again: refused, the first export kept
    assert any("already exists" in e.value and "Replace" in e.value for e in at.error), [e.value for e in at.error]
    assert (out / "config.json").is_file()
    at.checkbox(key="eval_export_force").check()
    export_to(at, 0, out)
    assert not at.error and any(str(out) in s.value for s in at.success)
