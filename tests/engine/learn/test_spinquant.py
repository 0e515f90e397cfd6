"""Learned rotations on a tiny random Llama: the manifold, gradients through the fake quantizers, fusion equals the
on-the-fly network, stop/resume, bad input; and the random-rotation spread on a tiny model directory."""

from dataclasses import replace

import pytest
import torch

from engine.events import Done, Metric, Progress, run_to_end
from engine.learn.cayley import cayley_skew
from engine.learn.rotated_network import LearnedRotations, RotatedTrainingModel
from engine.learn.spinquant import (
    TrainConfig,
    cosine_lr,
    learned_recipe,
    train,
    train_job,
)
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import RECIPES, Bits
from engine.rotation.files import dense, load_rotations
from engine.rotation.fusion import rotate
from engine.rotation.orthogonal import orthogonality_error

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 2, 32, 4, 2, 64, 128

pytestmark = pytest.mark.slow  # every test trains rotations


def tiny(dtype=torch.float32):
    model = tiny_llama(
        seed=0, layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, intermediate=INTER, vocab=VOCAB
    ).to(dtype)
    return model, resolve(model)


def data(seed=0, n=4, t=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g), torch.randint(0, VOCAB, (2, t), generator=g)


def config(**kw):
    base = dict(steps=4, windows=4, window=24, block=16, eval_every=2, checkpoint_every=0)
    return TrainConfig(**{**base, **kw})


def run(model, arch, cfg, **kw):
    calib, ev = data()
    return run_to_end(train(model, arch, calib, ev, cfg, **kw))


def load_into(rots: LearnedRotations, path) -> None:
    rs = load_rotations(path)
    with torch.no_grad():
        rots.r1.weight.copy_(rs.r1)
        for i in range(len(rots.r2)):
            rots.r2[i].weight.copy_(rs.r2[i])
            if rots.r3 is not None:
                rots.r3[i].weight.copy_(rs.r3[i])
                rots.r4[i].blocks.copy_(rs.r4[i])
    rots.r4_perm = rs.r4_perm


@pytest.mark.parametrize("method", ["spinquant", "flrot"])
def test_rotations_stay_orthogonal_and_move(method, tmp_cache):
    model, arch = tiny()
    result = run(model, arch, config(method=method, steps=6))
    start = LearnedRotations(arch, method, 16, 0).rotation_set()
    learned = load_rotations(result.path, arch)  # also checks shapes and orthogonality against the model
    mats = [learned.r1, *learned.r2] + ([*learned.r3, *learned.r4] if method == "flrot" else [])
    assert max(float(orthogonality_error(m).max()) for m in mats) < 1e-5
    assert not torch.allclose(learned.r1, start.r1, atol=1e-4), "R1 did not move"
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(learned.r2, start.r2, strict=False)), (
        "an R2 did not move"
    )
    if method == "flrot":
        assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(learned.r4, start.r4, strict=False))
        for blocks in learned.r4:  # block-diagonal: [n_blocks, b, b] blocks, the dense matrix orthogonal
            assert blocks.shape == (INTER // 16, 16, 16)
            full = dense(blocks).double()
            assert torch.allclose(full @ full.T, torch.eye(INTER, dtype=torch.float64), atol=1e-5)
            assert full[:16, 16:].abs().max() == 0  # nothing leaks outside the diagonal blocks
    else:
        assert learned.r3 is None and learned.r4 is None


def test_gradient_reaches_r1_to_r4_through_the_fake_quantizers():
    model, arch = tiny()
    rots = LearnedRotations(arch, "flrot", 16, 0)
    net = RotatedTrainingModel(model, arch, rots, Bits(4, 4, 4), RECIPES["rotated"])
    net.loss(data()[0]).backward()
    grads = {"R1": [rots.r1.weight.grad]} | {
        f"R{k}": [getattr(rots, f"r{k}")[i].weight.grad for i in range(LAYERS)] for k in (2, 3)
    }
    grads["R4"] = [rots.r4[i].blocks.grad for i in range(LAYERS)]
    for name, gs in grads.items():
        for g in gs:
            assert g is not None and torch.isfinite(g).all() and g.abs().max() > 1e-6, f"no gradient for {name}"
    # With a 16-bit KV cache nothing after R3 is quantized: q R3 (k R3)^T = q k^T on the manifold, so the
    # Riemannian gradient (the skew part of G X^T, what a Cayley step follows) vanishes for R3 but not for R1.
    rots2 = LearnedRotations(arch, "flrot", 16, 0)
    RotatedTrainingModel(model, arch, rots2, Bits(4, 4, 16), RECIPES["rotated"]).loss(data()[0]).backward()
    skew = lambda p: cayley_skew(p.detach().double(), -p.grad.double()).abs().max()  # noqa: E731
    assert skew(rots2.r3[0].weight) < 1e-6 * skew(rots2.r1.weight)
    assert skew(rots2.r1.weight) > 1e-4


def test_unquantized_on_the_fly_network_equals_the_original():
    model, arch = tiny()
    for method in ("spinquant", "flrot"):
        net = RotatedTrainingModel(
            model, arch, LearnedRotations(arch, method, 16, 3), Bits(16, 16, 16), RECIPES["rotated"]
        )
        ids = data()[0]
        with torch.no_grad():
            torch.testing.assert_close(net.model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method, permute", [("spinquant", False), ("flrot", False), ("flrot", True)])
def test_trained_then_fused_equals_the_on_the_fly_network(method, permute, tmp_cache):
    """float64 so that no 4-bit rounding decision differs between the two computations. With `permute` the file
    carries each layer's channel order, fused into gate/up rows and down columns before the learned blocks."""
    model, arch = tiny(torch.float64)
    result = run(model, arch, config(method=method, steps=3, permute=permute))
    assert (load_rotations(result.path).r4_perm is not None) == permute
    rots = LearnedRotations(arch, method, 16, 0)
    load_into(rots, result.path)
    net = RotatedTrainingModel(model, arch, rots, Bits(4, 4, 4), replace(RECIPES["rotated"], clip=ClipPolicy("fixed")))
    fused = rotate(model, arch, learned_recipe(result.path, method).rotation)
    plain_rtn = ClipPolicy("fixed", weight_range_search=False)
    for _ in quantize_model(fused, arch, Bits(4, 4, 4), replace(RECIPES["rotated"], clip=plain_rtn)):
        pass
    ids = data(seed=5)[0]
    with torch.no_grad():
        a, b = net.model(ids).logits, fused(ids).logits
    assert (a - b).abs().max() < 1e-6
    assert not torch.allclose(a, model(ids).logits, atol=1e-2), "4-bit quantization should change the logits"


def test_spinquant_step_zero_is_quarot_with_the_same_seed():
    """The initial rotations and SpinQuant's fixed R3/R4 are the ones rotate() draws for the 'quarot' recipe."""
    model, arch = tiny(torch.float64)
    net = RotatedTrainingModel(
        model,
        arch,
        LearnedRotations(arch, "spinquant", 16, 0),
        Bits(4, 4, 4),
        replace(RECIPES["rotated"], clip=ClipPolicy("fixed")),
    )
    quarot = rotate(model, arch, RECIPES["quarot"].rotation)
    plain_rtn = ClipPolicy("fixed", weight_range_search=False)
    for _ in quantize_model(quarot, arch, Bits(4, 4, 4), replace(RECIPES["quarot"], clip=plain_rtn)):
        pass
    ids = data(seed=6)[0]
    with torch.no_grad():
        assert (net.model(ids).logits - quarot(ids).logits).abs().max() < 1e-6


def test_loss_metrics_and_probes_are_reported():
    model, arch = tiny()
    calib, ev = data()
    events = list(train(model, arch, calib, ev, config(steps=4, eval_every=2)))
    losses = [e for e in events if isinstance(e, Metric) and e.name == "loss"]
    assert [e.step for e in losses] == [1, 2, 3, 4]
    assert [e.extra["lr"] for e in losses] == [cosine_lr(1.5, s, 4) for s in range(4)]  # the same function
    kurt = [e for e in events if isinstance(e, Metric) and e.name == "kurtosis"]
    assert [e.step for e in kurt] == [0, 2, 4]  # the initial rotations, then every 2 steps
    assert all(len(e.extra["attn_in"]) == LAYERS and len(e.extra["down_in"]) == LAYERS for e in kurt)
    assert all(1.0 < k < 50 for e in kurt for k in e.extra["attn_in"])
    assert [e.step for e in events if isinstance(e, Metric) and e.name == "ppl"] == [0, 2, 4]
    assert isinstance(events[-1], Done) and events[-1].result.state.step == 4


def test_cosine_schedule():
    assert cosine_lr(1.5, 0, 10) == 1.5
    assert cosine_lr(1.5, 5, 10) == pytest.approx(0.75)
    assert 0 < cosine_lr(1.5, 9, 10) < 0.04


def test_stop_then_resume_equals_an_uninterrupted_run(tmp_cache):
    model, arch = tiny()
    calib, ev = data()
    cfg = config(method="flrot", steps=6, checkpoint_every=4)
    whole = run_to_end(train(model, arch, calib, ev, cfg, key="whole"))

    job = train(model, arch, calib, ev, cfg, key="stopped")
    for ev_ in job:
        if isinstance(ev_, Metric) and ev_.name == "loss" and ev_.step == 3:
            break
    job.close()  # Stop: steps 1-3 are checkpointed although checkpoint_every is 4
    resumed_events = list(train(model, arch, calib, ev, cfg, key="stopped"))
    assert [e.step for e in resumed_events if isinstance(e, Metric) and e.name == "loss"] == [4, 5, 6]
    first = resumed_events[0]  # the saved history comes first, for charts that continue where the stop left off
    assert isinstance(first, Progress) and first.done == 3 and "resumed from the checkpoint at step 3" in first.message
    assert [h["step"] for h in first.partial.history] == [1, 2, 3]
    assert [h["loss"] for h in first.partial.history] == [h["loss"] for h in whole.state.history[:3]]
    resumed = resumed_events[-1].result
    # exactly: the checkpoint restores the rotations and the optimizer's state, and the same steps run again
    assert [h["loss"] for h in resumed.state.history] == [h["loss"] for h in whole.state.history]
    a, b = load_rotations(whole.path), load_rotations(resumed.path)
    for x, y in zip([a.r1, *a.r2, *a.r3, *a.r4], [b.r1, *b.r2, *b.r3, *b.r4], strict=False):
        assert torch.equal(x, y)
    # resume=False starts over from the random Hadamard initialisation
    fresh = list(train(model, arch, calib, ev, replace(cfg, steps=1), key="stopped", resume=False))
    assert [e.step for e in fresh if isinstance(e, Metric) and e.name == "loss"] == [1]


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="W-A-KV"):
        TrainConfig(bits="4-4")
    with pytest.raises(ValueError, match="rotation invariant"):
        TrainConfig(bits="16-16-16")
    with pytest.raises(ValueError, match="between 2 and 16|from 2 to 16"):
        TrainConfig(bits="1-4-4")
    for steps in (0, -3):
        with pytest.raises(ValueError, match="steps must be a positive integer"):
            TrainConfig(steps=steps)
    with pytest.raises(ValueError, match="method must be one of spinquant, flrot"):
        TrainConfig(method="quarot")
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(windows=2, batch=3)
    model, arch = tiny()
    with pytest.raises(ValueError, match="not divisible by block 48; divisors near it"):
        LearnedRotations(arch, "flrot", block=48)


def test_train_job_and_random_spread_on_a_model_directory(tiny_model_dir, tmp_cache):
    from engine.evaluate import EvalConfig
    from engine.learn.random_spread import SpreadConfig, spread_job
    from engine.model.loading import load_model

    handle = load_model(str(tiny_model_dir))
    cfg = TrainConfig(steps=2, windows=2, window=16, eval_every=0, eval_tokens=32)
    result = run_to_end(train_job(handle, cfg))
    assert result.finished and result.state.step == 2
    again = list(train_job(handle, cfg))  # the finished run is found in its checkpoint: no step is redone
    assert not [e for e in again if isinstance(e, Metric)] and again[-1].result.path == result.path
    with pytest.raises(ValueError, match="not divisible"):
        list(train_job(handle, replace(cfg, method="flrot", block=5)))

    spread_cfg = SpreadConfig(
        seeds=2, families=("hadamard", "orthogonal"), bits="4-4-4", eval=EvalConfig(tokens=64, window=32)
    )
    spread = run_to_end(spread_job(handle, spread_cfg, learned={"SpinQuant": (result.path, "spinquant")}))
    rows = spread.rows
    assert list(rows.family) == ["hadamard", "hadamard", "orthogonal", "orthogonal", "learned"]
    assert rows.ppl.gt(1).all() and rows.ppl.nunique() >= 4  # different seeds, different perplexities
    summary = spread.summary()
    assert set(summary.index) == {"hadamard", "orthogonal"} and "SpinQuant beats" in summary.columns
    assert summary.loc["hadamard", "count"] == 2
    with pytest.raises(ValueError, match="families"):
        SpreadConfig(families=("sobol",))
