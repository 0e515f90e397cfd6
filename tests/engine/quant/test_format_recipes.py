"""Bit settings that name formats: weights, activations and KV in MXFP4, NVFP4 and FP8 through RTN and GPTQ, on
a tiny model. Every quantized weight lies on its format's grid (checked with ml_dtypes, an independent rounding),
GPTQ on a format's grid beats RTN on the layer loss it minimizes, and what cannot take a format says so."""

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

from engine.learn.spinquant import TrainConfig
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.formats import IntFormat, MXFormat, NVFP4Format
from engine.quant.gptq import HessianAccumulator, gptq_encode, gptq_quantize
from engine.quant.recipes import Bits, get_recipe
from tests.helpers import drain


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_mxfp4_weights_land_on_the_mx_grid_and_activations_are_quantized(weights):
    model = tiny_llama()
    arch = resolve(model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(model)
    drain(quantize_model(q, arch, Bits.parse("mxfp4-mxfp4-16"), get_recipe("rtn", weights=weights), calib))
    for i in range(arch.n_layers):
        for role in arch.linears:
            w, w0 = arch.module(q, role, i).weight, arch.module(model, role, i).weight
            groups = w.reshape(w.shape[0], -1, 32)
            amax = groups.abs().amax(-1)
            shared = torch.floor(torch.log2(amax))
            scale = 2.0 ** (shared - 2)
            codes = (groups / scale[..., None]).numpy().astype(np.float32)
            grid = codes.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
            assert np.array_equal(grid, codes), (role, i)  # every value is an E2M1 value times the block's 2^k
            assert not torch.equal(w, w0)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(q(ids).logits).all()


def test_gptq_on_an_nvfp4_grid_lowers_the_layer_loss_below_rtn_and_returns_its_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)  # correlated inputs: GPTQ's case
    acc = HessianAccumulator(64)
    acc.add_batch(x)
    fmt = NVFP4Format()
    rtn = fmt.fake_quantize(w)
    enc = gptq_encode(w, acc.hessian, fmt.column_rounder(w))
    gptq = enc.dequantize()
    loss = lambda q: float(((q - w) @ x.T).pow(2).sum())  # noqa: E731
    assert loss(gptq) < 0.9 * loss(rtn)
    # the codes and scales, decoded by ml_dtypes: E2M1 value * E4M3 block scale * the tensor's g, in that order
    assert (
        enc.codes.shape == (32, 64)
        and enc.scales.shape == (32, 4)
        and float(enc.global_scale) == float(NVFP4Format.global_scale(w))
    )
    v = enc.codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32).reshape(32, 4, 16)
    s = enc.scales.numpy().view(ml_dtypes.float8_e4m3fn).astype(np.float32)[..., None]
    want = (v * s * np.float32(enc.global_scale)).reshape(32, 64)
    np.testing.assert_array_equal(gptq.numpy(), want)
    assert fmt.column_rounder(w).group == 16


def test_mx_column_rounder_matches_the_format_on_a_fitted_group():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(2)) * 3
    rounder = MXFormat().column_rounder(w)
    rounder.fit(w)
    columns = torch.stack([rounder.round(w[:, j])[1] for j in range(32)], dim=1)
    assert torch.equal(columns, MXFormat().fake_quantize(w))


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_returns_integer_codes_and_scales_that_make_its_weight(bits):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 96, generator=g)
    acc = HessianAccumulator(96)
    acc.add_batch(torch.randn(128, 96, generator=g))
    enc = gptq_encode(w, acc.hessian, IntFormat(bits, group=32).column_rounder(w))
    maxq = 2 ** (bits - 1) - 1
    assert enc.codes.dtype == torch.int8 and int(enc.codes.abs().max()) <= maxq and enc.scales.shape == (16, 3)
    by_hand = enc.codes.float().reshape(16, 3, 32) * enc.scales[..., None]  # q * scale per group of 32
    assert torch.equal(enc.dequantize(), by_hand.reshape(16, 96))
    assert torch.equal(gptq_quantize(w, acc.hessian, bits, group_size=32), by_hand.reshape(16, 96))


def test_nvfp4_weights_and_fp8_kv_run_end_to_end_with_calibrated_clips():
    model = tiny_llama()
    arch = resolve(model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = drain(quantize_model(model, arch, Bits.parse("nvfp4-nvfp4-fp8"), get_recipe("quarot"), calib))
    summary = plan.summary(arch.n_layers)
    assert set(summary) == {"weights", "activations", "k", "v", "check"}  # check: what the end-to-end check kept
    assert all(0.7 <= r <= 1.0 for r in summary["k"] + summary["v"])


def test_what_takes_only_bit_widths_refuses_a_format():
    model = tiny_llama()
    with pytest.raises(ValueError, match="qrazor razors integers"):
        drain(quantize_model(model, resolve(model), Bits.parse("mxfp4-16-16"), get_recipe("qrazor")))
    with pytest.raises(ValueError, match="training quantizes with integer grids"):
        TrainConfig(bits="mxfp4-mxfp4-16")
    with pytest.raises(ValueError, match="unknown number format 'fp3'"):
        Bits.parse("fp3-4-4")
