"""The end-to-end check of calibrated clips: on tiny random models where the per-layer choices (each no worse than
no clipping on its own local error) compound into a worse model, it reverts some of them, and the final plan's
loss on the calibration windows is never above no clipping's; losses are checked against a cross entropy written
out on a model built independently with `--clip none`."""

import copy

import pytest
import torch

from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.clip_check import CHECK_WINDOWS, _Replay
from engine.quant.recipes import Bits, get_recipe
from tests.helpers import drain


def scaled_model(seed: int, scale: float = 20.0, layers: int = 4):
    """A tiny random Llama whose matrices are `scale` times larger than at init, so its predictions are peaked
    and quantization moves the loss well above float32 rounding."""
    model = tiny_llama(seed=seed, layers=layers, hidden=64, heads=4, kv_heads=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model, resolve(model)


def next_token_loss(model, windows) -> float:
    """Mean of -log softmax(logits)[next token] over every position of every window, in float64."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = model(w[None]).logits[0, :-1].double().log_softmax(-1)
            total -= float(logp.gather(1, w[1:, None]).sum())
            count += len(w) - 1
    return total / count


def build(model, arch, bits, clip, calib):
    q = copy.deepcopy(model)
    plan = drain(quantize_model(q, arch, Bits.parse(bits), get_recipe("rtn", clip=clip), calib))
    return q, plan


def calib_windows(seed: int):
    return torch.randint(0, 256, (CHECK_WINDOWS, 64), generator=torch.Generator().manual_seed(seed))


def test_where_per_layer_clips_compound_the_check_reverts_some_and_ends_below_no_clipping():
    model, arch = scaled_model(seed=1)
    calib = calib_windows(1)
    q, plan = build(model, arch, "3-3-3", "calibrated", calib)
    check = plan.check
    none_model, _ = build(model, arch, "3-3-3", "none", calib)
    loss_none = next_token_loss(none_model, calib)
    # the case: every layer chose some clipping, and the whole per-layer plan is worse end to end than none
    assert sorted(check["kept"] + check["reverted"]) == list(range(arch.n_layers))
    assert check["loss_calibrated"] > loss_none * 1.01, check
    assert check["reverted"], check  # ... so the check reverts some layers
    assert check["loss_none"] == pytest.approx(loss_none, rel=1e-5)  # its baseline is exactly `--clip none`
    assert next_token_loss(q, calib) == pytest.approx(check["loss_final"], rel=1e-5)  # the model it leaves
    assert check["loss_final"] < loss_none
    # a reverted layer is `none` there: its ratios are 1.0 and its weights are the unclipped model's
    summary = plan.summary(arch.n_layers)
    for i in check["reverted"]:
        assert summary["check"][i] == "reverted"
        assert all(summary["activations"][role][i] == 1.0 for role in arch.linears)
        assert summary["k"][i] == summary["v"][i] == 1.0
        for role in arch.linears:
            assert torch.equal(arch.module(q, role, i).weight, arch.module(none_model, role, i).weight), (i, role)
    assert [summary["check"][i] for i in check["kept"]] == ["kept"] * len(check["kept"])


@pytest.mark.parametrize("seed, bits", [(0, "4-4-4"), (0, "3-3-3"), (2, "4-4-4"), (2, "4-4-16"), (3, "3-3-3")])
def test_the_final_plan_is_never_worse_than_none_on_the_calibration_windows(seed, bits):
    model, arch = scaled_model(seed)
    calib = calib_windows(seed)
    q, plan = build(model, arch, bits, "calibrated", calib)
    none_model, _ = build(model, arch, bits, "none", calib)
    final, loss_none = next_token_loss(q, calib), next_token_loss(none_model, calib)
    assert final <= loss_none * (1 + 1e-6), (final, loss_none, plan.check)
    assert plan.check["loss_final"] <= plan.check["loss_none"]  # as the check recorded it


def test_when_every_layer_is_reverted_the_model_is_exactly_the_unclipped_one():
    model, arch = scaled_model(seed=2)  # here the greedy walk keeps no layer, and the whole plan is worse too
    calib = calib_windows(2)
    q, plan = build(model, arch, "3-3-3", "calibrated", calib)
    assert plan.check["kept"] == [] and plan.check["reverted"] == list(range(arch.n_layers)), plan.check
    none_model, _ = build(model, arch, "3-3-3", "none", calib)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(q(ids).logits, none_model(ids).logits)


def test_a_forward_replayed_from_a_middle_layer_gives_the_whole_models_loss_without_running_the_layers_before():
    model, arch = scaled_model(seed=0)
    calib = calib_windows(0)
    replay = _Replay(model, [arch.layer(model, i) for i in range(arch.n_layers)], calib)
    whole = replay.loss(start=0, capture=(1,))
    assert whole == pytest.approx(next_token_loss(model, calib), rel=1e-6)
    calls = []
    hook = arch.module(model, "q", 1).register_forward_pre_hook(lambda m, args: calls.append(1))
    replay.prefix = replay.captured[1]  # what layer 1 returned for each window
    assert replay.loss(start=2) == pytest.approx(whole, rel=1e-6)
    assert not calls  # layers 0 and 1 were stood in for
    hook.remove()
    assert "forward" not in arch.layer(model, 0).__dict__  # the stubs are gone


def test_where_the_whole_plan_beats_no_clipping_the_walk_takes_out_the_layers_that_hurt():
    model, arch = scaled_model(seed=0)
    calib = calib_windows(0)
    q, plan = build(model, arch, "4-4-4", "calibrated", calib)
    check = plan.check
    assert check["loss_calibrated"] < check["loss_none"], check  # the case: the walk starts from the whole plan
    assert check["reverted"] and check["kept"], check  # ... and takes some layers out
    assert check["loss_final"] < check["loss_calibrated"]
    assert next_token_loss(q, calib) == pytest.approx(check["loss_final"], rel=1e-5)
    none_model, _ = build(model, arch, "4-4-4", "none", calib)
    for i in check["reverted"]:
        for role in arch.linears:
            assert torch.equal(arch.module(q, role, i).weight, arch.module(none_model, role, i).weight), (i, role)
