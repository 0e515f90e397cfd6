"""MXINT8 (OCP MX v1.0): 32 signed 8-bit integers k share one E8M0 scale 2^floor(log2 amax), each meaning k / 64
times it. Checked against a textbook loop over each block in Python floats, and end to end through a bit setting,
both weight quantizers and export's refusal."""

import copy
import math

import pytest
import torch

from engine.export import ExportError, check_exportable
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.formats import FORMATS, MXINT8Format, describe_formats, parse_format
from engine.quant.recipes import Bits, get_recipe
from tests.engine.quant.test_calibrate import drain


def textbook(row: list[float], clip: float = 1.0) -> tuple[list[float], list[int], list[int]]:
    """(values, codes k, E8M0 bytes) of one row, block by block: shared_exp = floor(log2 amax) (-127 for a zero
    block, clamped to [-127, 127]), k = round half to even of x / 2^shared_exp * 64 saturated to +-127."""
    values, codes, scales = [], [], []
    for start in range(0, len(row), 32):
        block = row[start : start + 32]
        amax = float(torch.tensor(max(abs(v) for v in block)) * torch.tensor(clip))  # float32, as the format
        shared = math.frexp(amax)[1] - 1 if amax > 0 else -127
        shared = min(max(shared, -127), 127)
        scales.append(shared + 127)
        for v in block:
            k = min(max(round(v / 2.0**shared * 64), -127), 127)  # Python's round: half to even
            codes.append(k)
            values.append(k / 64 * 2.0**shared)
    return values, codes, scales


def test_mxint8_matches_a_textbook_loop_over_each_block():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 96, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    x[1, 32:64] = 0  # a zero block
    x[2, :4] = torch.tensor([1.0, 1.0 + 1 / 128, 1.0 + 3 / 128, 1.99])  # ties (to even: 64, 66) and saturation
    x[3, 0] = 2.0**-140  # a tiny block: the scale clamps at 2^-127
    fmt = FORMATS["mxint8"]
    for clip in (1.0, 0.8):
        enc = fmt.encode(x, clip)
        for i in range(x.shape[0]):
            values, codes, scales = textbook(x[i].tolist(), clip)
            assert enc.codes[i].tolist() == codes and enc.scales[i].tolist() == scales, (i, clip)
            assert fmt.fake_quantize(x, clip)[i].tolist() == values, (i, clip)
    assert enc.codes.dtype == torch.int8 and enc.scales.dtype == torch.uint8
    assert fmt.encode(x).codes[2, :4].tolist() == [64, 64, 66, 127]


def test_mxint8_is_odd_symmetric_padded_and_straight_through():
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(1))
    fmt = MXINT8Format()
    y = fmt.fake_quantize(x)
    assert torch.equal(fmt.fake_quantize(-x), -y) and int(fmt.encode(-x).codes.min()) >= -127
    padded = torch.nn.functional.pad(x, (0, 26))
    assert torch.equal(y, fmt.fake_quantize(padded)[:, :70])
    leaf = x.clone().requires_grad_(True)
    fmt.fake_quantize(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))
    assert fmt.bits_per_value(4096) == 8.25 and fmt.kernel is None and fmt.name == "mxint8"


def test_mxint8_is_a_bit_setting_by_name():
    bits = Bits.parse("mxint8-mxint8-16")
    assert bits.w == bits.a == MXINT8Format() and bits.kv == 16 and str(bits) == "mxint8-mxint8-16"
    assert parse_format("MXINT8") == MXINT8Format() and "mxint8 (" in describe_formats()


@pytest.mark.parametrize("weights", ["rtn", "gptq"])
def test_mxint8_weights_carry_their_codes_through_rtn_and_gptq(weights):
    model = tiny_llama()
    arch = resolve(model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    q = copy.deepcopy(model)
    drain(quantize_model(q, arch, Bits.parse("mxint8-mxint8-16"), get_recipe("rtn", weights=weights), calib))
    for i in range(arch.n_layers):
        for role in arch.linears:
            lin = arch.module(q, role, i)
            enc = lin.spinscope_codes
            k = enc.codes.float().reshape(lin.weight.shape[0], -1, 32)
            scale = torch.exp2(enc.scales.float() - 127)[..., None]  # E8M0
            assert int(enc.codes.abs().max()) <= 127
            assert torch.equal(lin.weight, (k / 64 * scale).reshape(lin.weight.shape)), (role, i)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.isfinite(q(ids).logits).all()


def test_export_refuses_mxint8_with_the_formats_reason():
    with pytest.raises(
        ExportError, match="weight format mxint8 is not exported: compressed-tensors 0.20.1 has no MXINT8 scheme"
    ):
        check_exportable(get_recipe("rtn", clip="none"), Bits.parse("mxint8-16-16"))
    with pytest.raises(ExportError, match="activation format mxint8 cannot be exported: .*no MXINT8 scheme"):
        check_exportable(get_recipe("rtn", clip="none"), Bits.parse("4-mxint8-16"))
