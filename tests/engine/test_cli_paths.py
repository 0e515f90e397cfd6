"""`python -m engine` happy paths, run through the CLI's own main() in this process on the 2-layer tiny Llama
(SPINSCOPE_CACHE = tmp_cache):
- rotate --check with R1-R4 Hadamard exits 0 and its equivalence table shows logit differences at float noise;
- prepare exits 0, names the converted default model under the cache's models/, and writes nothing else into the
  real cache (compared file by file before and after);
- eval --recipe rtn --weights gptq at 4-16-16 exits 0, prints a perplexity row and caches a GPTQ result with it;
- eval --recipe rtn,rotated --rotation-file <SpinQuant-layout file written here> at 4-4-4 exits 0, and the rotated
  perplexity (read at full precision from the cached results: the table prints 4 digits) differs from rtn's.
A subprocess would add only the seconds of Python, torch and transformers starting; tests/engine/test_cli.py keeps
one real `python -m engine` run on the default model.
"""

import math
import os
from pathlib import Path

import pytest
import torch

from engine import store
from engine.__main__ import main


def run_engine(capsys, *argv):
    """`python -m engine ARGV` in this process: exit status 0 and no traceback; what it printed (.out, .err)."""
    capsys.readouterr()
    status = main([str(a) for a in argv])
    printed = capsys.readouterr()
    assert status == 0, printed.err[-3000:]
    assert "Traceback" not in printed.err
    return printed


def table_after(lines: list[str], header_words: tuple) -> list[list[str]]:
    """Rows (split on whitespace) of the last printed table whose header holds all `header_words`: the lines
    after it with as many fields as the header."""
    start = max(i for i, line in enumerate(lines) if all(w in line.split() for w in header_words))
    rows = []
    for line in lines[start + 1 :]:
        if len(line.split()) != len(lines[start].split()):
            break
        rows.append(line.split())
    return rows


def cached_evals() -> list[dict]:
    return [store.load("eval", key)[0] for key in store.entries("eval")]


@pytest.mark.slow
def test_rotate_check_reports_equivalence_at_float_noise(capsys, tmp_cache, tiny_model_dir):
    proc = run_engine(
        capsys,
        "rotate",
        "--model",
        tiny_model_dir,
        "--rotations",
        "R1,R2,R3,R4",
        "--kind",
        "hadamard",
        "--check",
        "--tokens",
        64,
        "--window",
        32,
    )
    lines = proc.out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("Equivalence on 256 evaluation tokens"))
    max_logit = float(lines[head].rsplit(" ", 1)[-1].rstrip(":"))
    assert max_logit > 0
    rows = table_after(lines, ("rotation", "max_abs_logit_diff", "kl_nats"))
    assert [r[0].split(",seed")[0] for r in rows] == [
        "R1=hadamard",
        "R2=hadamard",
        "R3=hadamard",
        "R4=hadamard",
        "R1=hadamard,R2=hadamard,R3=hadamard,R4=hadamard",
    ]
    for name, diff, kl in rows:
        assert 0 <= float(diff) < 1e-5 * max(1.0, max_logit), name  # observed ~1e-7 in float32
        assert abs(float(kl)) < 1e-9, name
    summary = next(line for line in lines if line.startswith("Rotation R1=hadamard,R2=hadamard,R3=hadamard"))
    assert float(summary.split("max |logit diff| ")[1].split(",")[0]) < 1e-5
    kurt = next(i for i, line in enumerate(lines) if "tok_kurt_before" in line.split())
    assert [r.split()[0] for r in lines[kurt + 1 :] if r.split()[0].isdigit()] == ["0", "1"]  # one row per layer
    # the before/after captures and the equivalence figures, cached here (a rerun is answered from them)
    assert sorted(p.name for p in tmp_cache.iterdir()) == ["capture", "models", "rotate"]


def snapshot(root: Path) -> dict:
    """{relative path: (size, mtime_ns)} of every file under root, links not followed."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = Path(dirpath, name)
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.slow
def test_prepare_readies_the_default_model_and_writes_nothing_else(capsys, tmp_cache):
    real = (tmp_cache / "models").resolve().parent
    assert real != tmp_cache.resolve()
    before = snapshot(real)
    proc = run_engine(capsys, "prepare")
    after = snapshot(real)
    line = next(line for line in proc.out.splitlines() if line.startswith("default model ready at "))
    path = Path(line[len("default model ready at ") :].split(";")[0])
    assert path.parent == tmp_cache / "models" and path.name.startswith("smollm2-135m-instruct-")
    assert (path / "config.json").is_file() and list(path.glob("*.safetensors"))
    assert "calibration" in line and "evaluation articles" in line
    model_dir = f"models/{path.name}/"
    if any(k.startswith(model_dir) for k in before):
        assert after == before  # already converted: nothing at all changed in the real cache
    else:  # converted now: only that folder is new
        assert {k: v for k, v in after.items() if not k.startswith(model_dir)} == before
    assert [p.name for p in tmp_cache.iterdir()] == ["models"]  # and no results were written anywhere


@pytest.mark.slow
def test_eval_rtn_with_gptq_weights_reports_a_perplexity(capsys, tiny_model_dir):
    proc = run_engine(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--recipe",
        "rtn",
        "--bits",
        "4-16-16",
        "--weights",
        "gptq",
        "--tokens",
        64,
        "--window",
        32,
        "--calib-tokens",
        64,
    )
    rows = table_after(proc.out.splitlines(), ("recipe", "weights", "bits", "clip", "ppl"))
    assert len(rows) == 1
    recipe, weights, bits, clip, ppl = rows[0][:5]
    assert clip == "calibrated"  # the default
    assert (recipe, weights, bits) == ("rtn", "gptq", "4-16-16")
    assert math.isfinite(float(ppl)) and float(ppl) > 1
    assert "perplexity on 64 evaluation tokens" in proc.out
    (result,) = cached_evals()
    assert (result["recipe"], result["weights"], result["bits"]) == ("rtn", "gptq", "4-16-16")
    assert f"{result['ppl']:.4g}" == ppl


def spinquant_file(path: Path, hidden: int, head_dim: int, layers: int, identity: bool = False) -> Path:
    """R1 [hidden, hidden] and one R2 [head_dim, head_dim] per layer: random orthogonal (QR), or identities."""
    g = torch.Generator().manual_seed(0)

    def orthogonal(n):
        return torch.eye(n) if identity else torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]

    data = {"R1": orthogonal(hidden).float()}
    for i in range(layers):
        data[f"model.layers.{i}.self_attn.R2"] = orthogonal(head_dim).float()
    torch.save(data, path)
    return path


@pytest.mark.slow
def test_eval_rotated_from_a_file_differs_from_rtn(capsys, tiny_model_dir, tmp_path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rot = spinquant_file(tmp_path / "R.bin", cfg.hidden_size, head_dim, cfg.num_hidden_layers)
    proc = run_engine(
        capsys,
        "eval",
        "--model",
        tiny_model_dir,
        "--recipe",
        "rtn,rotated",
        "--rotation-file",
        rot,
        "--bits",
        "4-4-4",
        "--tokens",
        64,
        "--window",
        32,
    )
    rows = table_after(proc.out.splitlines(), ("recipe", "weights", "bits", "ppl"))
    assert [r[:3] for r in rows] == [["rtn", "rtn", "4-4-4"], ["rotated", "rtn", "4-4-4"]]
    ppl = {r["recipe"]: r["ppl"] for r in cached_evals()}
    assert set(ppl) == {"rtn", "rotated"} and all(math.isfinite(v) and v > 1 for v in ppl.values())
    assert ppl["rotated"] != pytest.approx(ppl["rtn"], rel=1e-7)  # the rotation was applied
    # ... and it is the file's: identity R1 / R2 (the fixed Hadamard R3 / R4 alone) give another perplexity
    from engine.evaluate import EvalConfig, eval_job
    from engine.model.loading import load_model
    from engine.quant.recipes import get_recipe

    eye = spinquant_file(tmp_path / "I.bin", cfg.hidden_size, head_dim, cfg.num_hidden_layers, identity=True)
    done = list(
        eval_job(
            load_model(str(tiny_model_dir)),
            get_recipe("rotated", rotation_file=str(eye)),
            "4-4-4",
            EvalConfig(tokens=64, window=32),
        )
    )[-1]
    assert math.isfinite(done.result["ppl"]) and done.result["ppl"] != pytest.approx(ppl["rotated"], rel=1e-7)
