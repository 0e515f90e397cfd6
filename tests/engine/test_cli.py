"""`python -m engine capture`: one clear "error: ..." line and a non-zero exit for each bad input, and the per-layer
table for a good run (in-process through main(argv) on a tiny local model, and once for real on the default model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import store
from engine.__main__ import main

REPO = Path(__file__).resolve().parents[2]


def text_file(path: Path, paragraphs: int = 30) -> Path:
    path.write_text(
        "\n\n".join(
            f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * 20 for i in range(paragraphs)
        )
    )
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["capture", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def sentinel():
    """A valid cache entry that no failed run may damage."""
    store.save("capture", "sentinel", {"v": 1}, {"x": torch.arange(3)})
    yield
    meta, tensors = store.load("capture", "sentinel")
    assert meta == {"v": 1} and torch.equal(tensors["x"], torch.arange(3))


def _bad_inputs(tmp_path: Path, tiny: Path) -> dict:
    from transformers import BertConfig, BertForMaskedLM

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((tiny / "config.json").read_text())
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text((tiny / "config.json").read_text())
    (damaged / "model.safetensors").write_bytes(b"garbage" * 10)
    weights_file = tmp_path / "model.safetensors"
    weights_file.write_bytes(b"\x00" * 64)
    bert = tmp_path / "bert"  # no causal LM: refused (causal LMs outside the table are captured only)
    BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(bert)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 4)
    corpus = text_file(tmp_path / "small.txt")
    return {
        "unknown model id": (["--model", "no-such-org/no-such-model-xyz"], "not found"),
        "directory without weights": (["--model", no_weights], "no weights"),
        "damaged weight file": (["--model", damaged], "cannot load the weights"),
        "file instead of directory": (["--model", weights_file], "is a file"),
        "not a causal LM": (["--model", bert], "BertForMaskedLM is not supported"),
        "empty text file": (["--model", tiny, "--corpus", empty], "is empty"),
        "binary text file": (["--model", tiny, "--corpus", binary], "looks binary"),
        "missing corpus": (["--model", tiny, "--corpus", tmp_path / "nope.txt"], "not found"),
        "token budget 0": (["--model", tiny, "--tokens", 0], "token budget must be positive"),
        "budget beyond the corpus": (
            ["--model", tiny, "--corpus", corpus, "--tokens", 10**7, "--window", 128],
            "exceeds",
        ),
        "window of one token": (["--model", tiny, "--window", 1], "window length must be at least 2"),
    }


BAD = [
    "unknown model id",
    "directory without weights",
    "damaged weight file",
    "file instead of directory",
    "not a causal LM",
    "empty text file",
    "binary text file",
    "missing corpus",
    "token budget 0",
    "budget beyond the corpus",
    "window of one token",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_nonzero_with_one_clear_error(case, tmp_path, tiny_model_dir, capsys, sentinel):
    argv, message = _bad_inputs(tmp_path, tiny_model_dir)[case]
    rc, out, err = run_cli(capsys, *argv)
    assert rc != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and "kurt_token" not in out
    assert store.entries("capture") == ["sentinel"]  # nothing new cached


def test_good_run_on_a_tiny_model_prints_the_table_and_writes_json(tmp_path, tiny_model_dir, capsys):
    corpus = text_file(tmp_path / "small.txt")
    report = tmp_path / "report.json"
    rc, out, err = run_cli(
        capsys, "--model", tiny_model_dir, "--corpus", corpus, "--tokens", 64, "--window", 32, "--json", report
    )
    assert rc == 0, err
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if "kurt_token" in line and "kurt_tensor" in line)
    rows = [line.split() for line in lines[header + 1 :] if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1]  # one row per layer of the 2-layer model
    assert all(len(r) == 8 for r in rows)  # layer + 7 columns
    saved = json.loads(report.read_text())
    assert saved["meta"]["tokens"] == 64 and saved["meta"]["n_windows"] == 2
    assert {(r["layer"], r["site"]) for r in saved["table"]} >= {(0, "resid_attn"), (1, "down_in")}
    assert len(store.entries("capture")) == 1  # the result is cached ...
    rc, out, _ = run_cli(capsys, "--model", tiny_model_dir, "--corpus", corpus, "--tokens", 64, "--window", 32)
    assert rc == 0 and "from cache" in out  # ... and served from the cache the second time


@pytest.mark.slow
def test_default_model_cli_run_prints_the_per_layer_table(tmp_cache):
    env = {**os.environ, "SPINSCOPE_CACHE": str(tmp_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "capture", "--model", "default", "--tokens", "256", "--window", "128"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "256 tokens in 2 windows of 128" in proc.stdout
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "kurt_token" in line and "kurt_tensor" in line)
    rows = [line.split() for line in lines[header + 1 :] if line.split() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(30))
    kurt_token = [float(r[1]) for r in rows]
    assert all(k > 0 for k in kurt_token) and max(kurt_token) > 20  # real outliers, even on 256 tokens
