"""Families whose rotations cannot be fused exactly (Gemma 2/3 and OLMo-2 normalize a sublayer's output before the
residual add; StableLM uses LayerNorm): capture and evaluation work on the unrotated model, while rotation and
Cayley training refuse with the architectural reason, in the engine and in the CLI (exit 2, one `error:` line)."""

import os
import subprocess
import sys

import pytest
import torch
import transformers

from engine.evaluate import perplexity
from engine.events import Done
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import UnsupportedArchitectureError, resolve
from engine.observe.capture import SITES, CaptureConfig, capture
from engine.quant.apply import quantize_model
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig, rotate

COMMON = dict(
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {  # name: (config class, model class, settings, the reason's words)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=12), "normalize each sublayer's output"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(), "normalize each sublayer's output"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(partial_rotary_factor=0.5), "uses LayerNorm"),
}


def build(family: str, vocab: int = 96):
    config_cls, model_cls, extra, _ = FAMILIES[family]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=vocab, **COMMON, **extra)
    return getattr(transformers, model_cls)(cfg).eval().requires_grad_(False)


def ids(n: int = 2, t: int = 16) -> torch.Tensor:
    return torch.randint(3, 96, (n, t), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_sees_every_site_and_the_residual_stream_entering_each_layer(family):
    model = build(family)
    arch = resolve(model)
    windows = ids()
    done = [e for e in capture(model, arch, windows, CaptureConfig(tokens=32, window=16)) if isinstance(e, Done)]
    table = done[-1].result.table.set_index(["layer", "site"])
    assert set(table.index) == {(i, s) for i in range(arch.n_layers) for s in SITES}
    with torch.no_grad():  # transformers' own view of each layer's input: hidden_states[i]
        hidden = model(windows, output_hidden_states=True).hidden_states
    for i in range(arch.n_layers):
        assert table.loc[(i, "resid_attn"), "absmax"] == pytest.approx(float(hidden[i].abs().max()), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_rtn_evaluation_runs_on_the_unrotated_model(family):
    model = build(family)
    arch = resolve(model)
    fp = [e for e in perplexity(model, ids()) if isinstance(e, Done)][-1].result
    list(quantize_model(model, arch, Bits(4, 4, 4), get_recipe("rtn", clip="fixed")))
    q = [e for e in perplexity(model, ids()) if isinstance(e, Done)][-1].result
    assert torch.isfinite(torch.tensor([fp, q])).all() and q != fp
    assert arch.support()["evaluate (fp, rtn, qrazor)"] == "yes"


@pytest.mark.parametrize("family", FAMILIES)
def test_rotation_and_training_refuse_with_the_reason(family):
    model = build(family)
    arch = resolve(model)
    reason = FAMILIES[family][3]
    with pytest.raises(UnsupportedArchitectureError, match=f"cannot be rotated exactly: .*{reason}"):
        rotate(model, arch, RotationConfig(r1="hadamard"))
    with pytest.raises(UnsupportedArchitectureError, match=reason):
        list(train(model, arch, ids(), ids(1), TrainConfig(steps=1, windows=2, window=16)))
    assert reason in arch.support()["rotate (Rotate)"]
    assert rotate(model, arch, RotationConfig()) is not model  # no rotation asked: an unrotated copy, no refusal


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma3", "stablelm"])
def test_cli_rotate_and_optimize_exit_2_with_one_error_line(family, tmp_path, tmp_cache):
    from transformers import AutoTokenizer

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    build(family, vocab=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    env = {**os.environ, "SPINSCOPE_CACHE": str(tmp_cache)}
    for verb in (["rotate", "--rotations", "R1"], ["optimize", "--steps", "1"]):
        proc = subprocess.run(
            [sys.executable, "-m", "engine", verb[0], "--model", str(tmp_path), *verb[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr  # besides transformers' loading bar, only the one line
        assert len(errors) == 1 and FAMILIES[family][3] in errors[0], proc.stderr[-2000:]
