"""Layer-wise training on a tiny random Llama: each block's inputs are the model's own hidden states when nothing is
quantized, the first loss is the MSE of the QuaRot-quantized block computed the independent way (rotate +
quantize_model + HF hidden states), learnable clip ratios stay in (0, 1], the written file loads in the 'rotated'
recipe without changing the floating-point logits, and each block's loss goes down."""

import json
from dataclasses import replace

import pytest
import torch

from engine.__main__ import main
from engine.events import Done, Metric, run_to_end
from engine.learn.layerwise import LayerwiseConfig, clip_sites, learned_clip_plan, train_layerwise
from engine.learn.learned_clip import THETA_BOUND, ClipRatios, clip_fake_quant, ratio_logit
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.clipping import ClipPolicy
from engine.quant.quantizers import quantize_activation
from engine.quant.recipes import RECIPES, Bits, get_recipe
from engine.rotation.files import RotationSet, load_rotations, save_rotations
from engine.rotation.fusion import rotate
from engine.rotation.hadamard import random_hadamard

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 2, 32, 4, 2, 64, 128


def tiny(dtype=torch.float32):
    model = tiny_llama(
        seed=0, layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, intermediate=INTER, vocab=VOCAB
    ).to(dtype)
    return model, resolve(model)


def calib(n=4, t=24, seed=0):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def config(**kw):
    base = dict(steps=3, windows=4, window=24, batch=4, block=16)
    return LayerwiseConfig(**{**base, **kw})


def hidden_states(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True, use_cache=False).hidden_states


@pytest.mark.parametrize("method", ["spinquant", "flrot"])
def test_block_inputs_are_the_models_hidden_states_when_nothing_is_quantized(method):
    """At 16-16-16 the quantized blocks compute the floating-point ones (whatever R2/R3/R4 learned), so block k's
    inputs are the model's hidden state k, rotated by R1 (the random Hadamard of the seed). The float32 rotations
    (as stored in the file) and R4's float32 online product leave float32 rounding."""
    model, arch = tiny(torch.float64)
    ids = calib()
    seen = {}
    cfg = config(method=method, bits="16-16-16", steps=2, batch=2)
    run_to_end(train_layerwise(model, arch, ids, cfg, device="cpu", probe=lambda k, z: seen.setdefault(k, z.clone())))
    r1 = random_hadamard(HIDDEN, seed=0).float().double()
    hs = hidden_states(model, ids)
    assert sorted(seen) == list(range(LAYERS))
    for k in range(LAYERS):
        torch.testing.assert_close(seen[k] @ r1.T, hs[k], atol=1e-7, rtol=1e-5)


def test_first_loss_is_the_mse_of_the_quarot_block_against_floating_point():
    """Step 1 of block 0 sees every window (batch = windows) at the initial transforms, which are QuaRot's for seed 0:
    its loss is mean((quantized layer-0 output - FP layer-0 output R1)^2), computed here from rotate() and
    quantize_model() on the whole model and the HF hidden states."""
    model, arch = tiny(torch.float64)
    ids = calib()
    result = run_to_end(train_layerwise(model, arch, ids, config(clip="fixed", steps=1), device="cpu"))
    quarot = rotate(model, arch, RECIPES["quarot"].rotation)
    for _ in quantize_model(
        quarot, arch, Bits(4, 4, 4), replace(RECIPES["quarot"], clip=ClipPolicy("fixed", weight_range_search=False))
    ):
        pass
    r1 = random_hadamard(HIDDEN, seed=0).float().double()
    expected = ((hidden_states(quarot, ids)[1] - hidden_states(model, ids)[1] @ r1) ** 2).mean()
    assert result.history[0]["block"] == 0
    assert result.history[0]["loss"] == pytest.approx(float(expected), rel=1e-6)
    assert expected > 1e-8  # 4-bit quantization does change the block's output


def test_learnable_clip_ratios_stay_in_bounds():
    clips = ClipRatios({"a": 0.9, "b": 1.0})
    assert clips.values()["a"] == pytest.approx(0.9, abs=1e-6) and 0.99 < clips.values()["b"] < 1
    x = torch.randn(3, 5, 16) * torch.linspace(0.1, 30, 16)
    with torch.no_grad():
        clips.theta.copy_(torch.tensor([-1e4, 1e4]))
    low, high = clips.ratio("a"), clips.ratio("b")
    assert 0 < float(low) <= float(high) == 1.0
    assert torch.equal(clip_fake_quant(x, 4, high), quantize_activation(x, 4, clip_ratio=1.0))
    assert torch.isfinite(clip_fake_quant(x, 4, low)).all()
    with torch.no_grad():  # inside the bounds: the forward is the engine's quantizer, the ratio gets a gradient
        clips.theta.copy_(torch.tensor([ratio_logit(0.8), THETA_BOUND / 2]))
    r = clips.ratio("a")
    assert torch.equal(clip_fake_quant(x, 4, r), quantize_activation(x, 4, clip_ratio=float(r)))
    ((clip_fake_quant(x, 4, r) - x) ** 2).sum().backward()
    assert clips.theta.grad[0] != 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            ratio_logit(bad)


@pytest.mark.slow
def test_written_file_loads_in_the_rotated_recipe_and_keeps_the_floating_point_logits():
    model, arch = tiny()
    result = run_to_end(train_layerwise(model, arch, calib(), config(method="flrot", steps=2), device="cpu"))
    rs = load_rotations(result.path, arch)  # shapes and orthogonality checked
    assert rs.r3 is not None and rs.r4 is not None and rs.r4[0].shape == (INTER // 16, 16, 16)
    assert [set(c) for c in rs.clips] == [set(clip_sites(arch))] * LAYERS
    assert all(0 < r <= 1 for c in rs.clips for r in c.values())
    plan = learned_clip_plan(rs.clips, arch)
    assert plan.activations[(1, "up")] == rs.clips[1]["mlp_in"] and plan.k[0] == rs.clips[0]["k_cache"]
    recipe = get_recipe("rotated", rotation_file=result.path)
    assert (recipe.rotation.r3, recipe.rotation.r4) == ("file", "file")  # the learned online rotations are used
    ids = calib(seed=3)
    with torch.no_grad():
        ref, rotated = model(ids).logits, rotate(model, arch, recipe.rotation)(ids).logits
    assert (rotated - ref).abs().max() < 1e-4
    # a file written before clip ratios existed still loads
    old = save_rotations(RotationSet(rs.r1, rs.r2), result.path + ".old.bin")
    assert load_rotations(old, arch).clips is None


@pytest.mark.slow
@pytest.mark.parametrize("method", ["spinquant", "flrot"])
def test_each_blocks_loss_decreases(method):
    """One batch of every window at every step: the trained block's MSE over them is below its first step's. On
    random weights the STE loss of 4-bit weights is nearly flat in the rotations (12 steps move it by a few percent
    either way), so this case quantizes activations and the KV cache, where the learned clip ratios and the online
    rotations have something to find."""
    model, arch = tiny()
    events = list(train_layerwise(model, arch, calib(), config(method=method, steps=12, bits="16-4-4"), device="cpu"))
    blocks = [e for e in events if isinstance(e, Metric) and e.name == "block_mse"]
    assert [e.step for e in blocks] == list(range(LAYERS))
    for e in blocks:
        assert e.value < 0.9 * e.extra["first_loss"], (e.step, e.value, e.extra["first_loss"])
    losses = [e for e in events if isinstance(e, Metric) and e.name == "loss"]
    assert [e.step for e in losses] == list(range(1, 12 * LAYERS + 1)) and isinstance(events[-1], Done)


def test_bad_settings_give_one_clear_error():
    for kw, match in (
        (dict(clip="calibrated"), "clipping must be one of"),
        (dict(a_clip=1.5), r"\(0, 1\]"),
        (dict(kv_clip=0.0), r"\(0, 1\]"),
        (dict(inputs="mixed"), "inputs must be"),
        (dict(method="quarot"), "method must be"),
        (dict(batch=8), "cannot exceed"),
        (dict(bits="mxfp4-mxfp4-16"), "integer grids"),
    ):
        with pytest.raises(ValueError, match=match):
            config(**kw)
    model, arch = tiny()
    with pytest.raises(ValueError, match="not divisible by block 24"):
        run_to_end(train_layerwise(model, arch, calib(), config(method="flrot", block=24), device="cpu"))


@pytest.mark.slow
def test_cli_layerwise_names_the_written_file(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "out.json"
    assert (
        main(
            [
                "optimize",
                "--mode",
                "layerwise",
                "--method",
                "flrot",
                "--model",
                str(tiny_model_dir),
                "--steps",
                "2",
                "--windows",
                "2",
                "--batch",
                "2",
                "--window",
                "16",
                "--block",
                "16",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["path"] in capsys.readouterr().out and data["mode"] == "layerwise"
    assert load_rotations(data["path"]).clips is not None
    assert [h["step"] for h in data["history"]] == [1, 2] * len(data["blocks"])
    assert main(["optimize", "--clip", "none", "--model", str(tiny_model_dir)]) == 2  # end-to-end has fixed clips


def test_scale_benchmark_on_the_cpu_adds_up(tmp_path):
    """benchmarks.layerwise_scale on a tiny shape: per block = both passes + the step budget x seconds per step, the
    projection is that times the blocks, and the memory model counts what one step saves."""
    from benchmarks.layerwise_scale import main as bench

    out = tmp_path / "scale.json"
    assert (
        bench(
            [
                "--shape",
                "tiny",
                "--device",
                "cpu",
                "--windows",
                "2",
                "--tokens",
                "16",
                "--batch",
                "1",
                "--steps",
                "3",
                "--steps-per-block",
                "5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    row = data["rows"][0]
    assert data["seconds_per_block"] == pytest.approx(
        row["target_pass_s"] + row["next_inputs_pass_s"] + 5 * row["seconds_per_step"]
    )
    assert data["projected_seconds"] == pytest.approx(2 * data["seconds_per_block"]) and len(row["losses"]) == 3
    assert data["cpu_inputs_bytes"] == 3 * 2 * 16 * 64 * 2  # X, Z, Y in bfloat16
    assert row["saved"]["activations"] > 0 and row["saved"]["weights"] > 0
    assert data["memory_model"]["estimated_peak_bytes"] > 0 and data["peak_bytes"] is None
