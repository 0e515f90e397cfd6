"""Clip ratios calibrated per layer: each choice is the grid's best on the error that matters downstream (checked
against a textbook loop), never worse than no clipping on the calibration data; on a model whose keys and values
carry planted outlier channels a fixed KV clip hurts while calibration keeps K and V unclipped."""

import copy

import pytest
import torch

from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.calibrate import ACTIVATION_GRID, KV_GRID, WEIGHT_GRID, search_activation, search_kv, search_weight
from engine.quant.formats import IntFormat
from engine.quant.methods import RTNActivations
from engine.quant.recipes import Bits, get_recipe
from tests.helpers import drain


def row_output_error(w_hat_row, w_row, x):
    """sum over tokens of ((w_hat - w) . x_t)^2, one token at a time, in float64."""
    d = (w_hat_row - w_row).double()
    return sum(float(torch.dot(d, xt.double())) ** 2 for xt in x)


def rtn_row(w_row, bits, shrink):
    """Symmetric round to nearest of one row on the grid of shrink * absmax, written out."""
    maxq = 2 ** (bits - 1) - 1
    scale = shrink * float(w_row.abs().max()) / maxq
    return torch.clamp(torch.round(w_row / scale), -maxq, maxq) * scale


def test_weight_clip_per_row_is_the_grid_candidate_of_least_output_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 32, generator=g)
    w[:, 3] *= 8  # an outlier input column: a row's range is set by it
    x = torch.randn(40, 32, generator=g)
    x[:, 3] *= 0.05  # ... but its input channel carries little energy: clipping it costs little output error
    w_hat, shrink = search_weight(w, x, IntFormat(3))
    for r in range(w.shape[0]):
        errors = [row_output_error(rtn_row(w[r], 3, s), w[r], x) for s in WEIGHT_GRID]
        chosen = min(WEIGHT_GRID, key=lambda s: abs(s - float(shrink[r])))
        assert errors[WEIGHT_GRID.index(chosen)] == pytest.approx(min(errors), rel=1e-4), r
        assert errors[WEIGHT_GRID.index(chosen)] <= errors[0] * (1 + 1e-6)  # never worse than no clipping
        assert torch.allclose(w_hat[r], rtn_row(w[r], 3, chosen), atol=1e-5)
    assert (shrink < 1).any()  # the test has teeth: some rows do clip


def test_without_inputs_a_weight_is_not_clipped():
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    w_hat, shrink = search_weight(w, None, IntFormat(4))
    assert torch.equal(shrink, torch.ones(4))
    assert torch.allclose(w_hat, torch.stack([rtn_row(row, 4, 1.0) for row in w]), atol=1e-6)


def per_token_asym(x, bits, clip):
    """Per-token asymmetric RTN, written out: the range [min(x, 0), max(x, 0)] shrunk by clip."""
    lo, hi = (
        torch.clamp(x.min(-1, keepdim=True).values, max=0) * clip,
        torch.clamp(x.max(-1, keepdim=True).values, min=0) * clip,
    )
    scale = (hi - lo) / (2**bits - 1)
    zero = torch.round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale


def test_activation_clip_minimizes_the_linear_output_error():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 48, generator=g)
    x[:, 5] += torch.randn(64, generator=g) * 30  # a heavy channel ...
    w = torch.randn(16, 48, generator=g)
    w[:, 5] = 0.0  # ... that the linear ignores: clipping it is free, so a strong clip wins on the output
    per_token = RTNActivations().activation_quant(4)
    chosen = search_activation(x, w, per_token)
    out_err = [float(((per_token_asym(x, 4, c) - x) @ w.T).pow(2).sum()) for c in ACTIVATION_GRID]
    assert out_err[ACTIVATION_GRID.index(chosen)] == pytest.approx(min(out_err), rel=1e-4)
    assert chosen < 1.0
    w[:, 5] = 1.0  # now the heavy channel matters downstream: no clipping is best
    assert search_activation(x, w, per_token) == 1.0


def test_kv_clip_is_chosen_on_the_causal_scores_for_k():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 16, 8, generator=g)
    k = torch.randn(1, 2, 16, 8, generator=g)
    v = torch.randn(1, 2, 16, 8, generator=g)
    k_ratio, v_ratio = search_kv([(q, k, v)], RTNActivations().kv_quant(3, 8))

    def scores_error(ratio):  # textbook: every (head, i, j <= i) score, the query head h reading kv head h // 2
        from engine.quant.quantizers import quantize_kv

        dk = quantize_kv(k, 3, 8, clip_ratio=ratio) - k
        return sum(
            float(torch.dot(q[0, h, i], dk[0, h // 2, j])) ** 2
            for h in range(4)
            for i in range(16)
            for j in range(i + 1)
        )

    errors = [scores_error(r) for r in KV_GRID]
    assert errors[KV_GRID.index(k_ratio)] == pytest.approx(min(errors), rel=1e-4)
    assert v_ratio in KV_GRID


def planted_model(factor=100.0):
    """A tiny Llama with weights large enough for attention to matter, and in every head one key channel (read by
    an equally large query channel) and one value channel a hundred times larger than the rest: the scores and the
    attention output hinge on exactly the values a clipped range cuts."""
    model = tiny_llama(layers=2, hidden=64, heads=4, kv_heads=2)
    arch = resolve(model)
    hd = arch.head_dim
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(20)
        for i in range(arch.n_layers):
            for role, channel in (("q", 0), ("k", 0), ("v", 1)):
                w = arch.module(model, role, i).weight
                for h in range(w.shape[0] // hd):
                    w[h * hd + channel] *= factor
    return model, arch


def test_on_planted_kv_outliers_a_fixed_kv_clip_hurts_and_calibration_does_not():
    model, arch = planted_model()
    g = torch.Generator().manual_seed(0)
    calib, evals = torch.randint(0, 256, (4, 64), generator=g), torch.randint(0, 256, (4, 64), generator=g)
    with torch.no_grad():
        reference = model(evals).logits

    def logit_error(clip):  # the quantized model's distance from the floating-point one on evaluation tokens
        q = copy.deepcopy(model)
        plan = drain(quantize_model(q, arch, Bits(16, 16, 4), get_recipe("rtn", clip=clip), calib))
        with torch.no_grad():
            return float((q(evals).logits - reference).pow(2).mean()), plan

    none, _ = logit_error("none")
    fixed, _ = logit_error("fixed")
    calibrated, plan = logit_error("calibrated")
    assert fixed > none * 1.05, (fixed, none)  # the planted structure: QuaRot's fixed KV clip 0.95 hurts here
    assert all(plan.k[i] >= 0.975 and plan.v[i] >= 0.975 for i in range(arch.n_layers)), (plan.k, plan.v)
    assert calibrated <= none * (1 + 1e-6), (calibrated, none)  # no worse than no clipping
    assert plan.summary(arch.n_layers)["k"] == [plan.k[0], plan.k[1]]
