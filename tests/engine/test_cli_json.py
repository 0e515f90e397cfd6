"""`--json FILE` on every CLI verb that produces results: the file parses and holds the figures the printed table
shows (the same numbers, in full precision), on the tiny model directory."""

import json
import re

import pytest

from engine.__main__ import main


def run(capsys, tmp_path, *argv) -> tuple[str, dict]:
    out = tmp_path / "out.json"
    assert main([*argv, "--json", str(out)]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_plan_json(capsys, tmp_path, tiny_model_dir):
    printed, data = run(capsys, tmp_path, "plan", "--model", str(tiny_model_dir), "--max-memory", "cpu=1GiB")
    assert data["summary"] in printed and data["rows"]
    for r in data["rows"]:
        assert re.search(rf"{re.escape(r['module'])}\s+{r['device']}\s+{r['MiB']}", printed)


@pytest.mark.slow  # the first corpus read
def test_capture_json(capsys, tmp_path, tiny_model_dir):
    printed, data = run(capsys, tmp_path, "capture", "--model", str(tiny_model_dir), "--tokens", "64", "--window", "32")
    resid = [r for r in data["table"] if r["site"] == "resid_attn"]
    assert [r["layer"] for r in resid] == [0, 1]
    for r in resid:  # the printed per-layer row: kurt_token (1 decimal) is the JSON's kurt_token_mean_nosink
        assert re.search(rf"^\s*{r['layer']}\s+{r['kurt_token_mean_nosink']:.1f}\s", printed, re.M)


@pytest.mark.slow
def test_rotate_json(capsys, tmp_path, tiny_model_dir):
    printed, data = run(
        capsys,
        tmp_path,
        "rotate",
        "--model",
        str(tiny_model_dir),
        "--rotations",
        "R1,R2",
        "--tokens",
        "64",
        "--window",
        "32",
        "--check",
    )
    assert [r["rotation"] for r in data["check_each"]][:2] == ["R1=hadamard,seed=0", "R2=hadamard,seed=0"]
    assert len(data["check_each"]) == 3 and all(r["max_abs_logit_diff"] < 1e-4 for r in data["check_each"])
    assert f"max |logit diff| {data['check']['max_abs_logit_diff']:.2e}" in printed
    assert [r["layer"] for r in data["table"]] == [0, 1]


@pytest.mark.slow
def test_eval_json(capsys, tmp_path, tiny_model_dir):
    printed, data = run(
        capsys,
        tmp_path,
        "eval",
        "--model",
        str(tiny_model_dir),
        "--recipe",
        "fp,rtn",
        "--bits",
        "4-16-16",
        "--tokens",
        "64",
        "--window",
        "32",
    )
    assert [(r["recipe"], r["bits"]) for r in data["rows"]] == [("fp", "16-16-16"), ("rtn", "4-16-16")]
    for r in data["rows"]:
        assert f"{r['ppl']:.4g}" in printed  # the table prints 4 significant digits of the same number
    assert data["tokens"] == data["rows"][0]["tokens"] and data["corpus"] in printed


@pytest.mark.slow
def test_optimize_json(capsys, tmp_path, tiny_model_dir):
    printed, data = run(
        capsys,
        tmp_path,
        "optimize",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--windows",
        "2",
        "--window",
        "16",
        "--eval-every",
        "0",
    )
    assert [h["step"] for h in data["history"]] == [1, 2] and data["finished"]
    for h in data["history"]:
        assert f"step {h['step']}/2  loss {h['loss']:.4f}" in printed
    assert data["path"] in printed
