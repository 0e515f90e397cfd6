"""kernels.rotate_quant: int4 packing, the per-token quantizer, and the two-step kernel (interpreted on the CPU)."""

import os

import pytest
import torch

from kernels.blockdiag import SUPPORTED_BLOCKS, TileConfig
from kernels.rotate_quant import (
    QMAX,
    dequantize,
    pack_int4,
    quantize_per_token_reference,
    rotate_quant_configs,
    rotate_quantize,
    rotate_quantize_reference,
    row_absmax,
    unpack_int4,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernel in Triton's CPU interpreter (TRITON_INTERPRET=1)"
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)


def random_blocks(n, b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, b, b, generator=g))[0].to(dtype)


def test_int4_nibble_order_low_then_high():
    packed = pack_int4(torch.tensor([1, -2, 7, -8], dtype=torch.int8))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [0x01 | 0xE0, 0x07 | 0x80]  # element 2k low nibble, 2k+1 high (two's complement)


def test_int4_round_trip_every_value_and_shape():
    values = torch.arange(-8, 8, dtype=torch.int8)
    q = values[torch.randint(0, 16, (3, 5, 64))]
    packed = pack_int4(q)
    assert packed.shape == (3, 5, 32)
    assert torch.equal(unpack_int4(packed), q)
    all_bytes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    assert torch.equal(pack_int4(unpack_int4(all_bytes)), all_bytes)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(3, dtype=torch.int8), "even"),
        (torch.tensor([8, 0], dtype=torch.int8), r"\[-8, 7\]"),
        (torch.zeros(2, dtype=torch.int32), "int8"),
    ],
)
def test_pack_rejects_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(bad)


@pytest.mark.parametrize("bits", [4, 8])
def test_reference_quantizer_is_symmetric_per_token(bits):
    y = torch.randn(6, 256) * torch.logspace(-2, 2, 6)[:, None]  # rows of very different scale
    y[2] = 0.0
    q, scales = quantize_per_token_reference(y, bits)
    qmax = QMAX[bits]
    assert q.dtype == torch.int8 and scales.shape == (6, 1)
    nonzero = [0, 1, 3, 4, 5]
    assert torch.equal(q[nonzero].abs().amax(dim=1), torch.full((5,), qmax, dtype=torch.int8))
    assert torch.equal(q[2], torch.zeros(256, dtype=torch.int8)) and torch.isfinite(scales).all()
    # round to nearest: dequantization error at most half a step
    assert ((q.float() * scales - y).abs() <= scales / 2 + 1e-6).all()


def test_quantizer_rejects_other_bit_widths():
    with pytest.raises(ValueError, match="4 or 8"):
        quantize_per_token_reference(torch.randn(2, 8), 3)


@interpreted
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16 dot upcast in the interpreter only
@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
def test_kernel_equals_reference_quantization_of_reference_rotation(block, dtype, bits):
    torch.manual_seed(block + bits)
    x = torch.randn(3, 13, 2 * block).to(dtype)
    x[1, 2, 3] = 60.0  # an outlier token
    blocks = random_blocks(2, block, dtype)
    q, scales = rotate_quantize(x, blocks, bits)  # 39 tokens: two row groups of the interpreter's 32-row tiles
    q_ref, scales_ref = rotate_quantize_reference(x, blocks, bits)
    assert q.shape == q_ref.shape == (3, 13, block if bits == 4 else 2 * block)
    assert q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert scales.shape == (3, 13, 1)
    assert torch.allclose(scales, scales_ref, rtol=1e-6, atol=0)
    values, values_ref = (unpack_int4(q), unpack_int4(q_ref)) if bits == 4 else (q, q_ref)
    diff = (values.int() - values_ref.int()).abs()
    # fp32 accumulation order may tip a value sitting on a rounding boundary by one step: allow 1 %
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01


@interpreted
def test_kernel_zero_token_and_fixed_tile():
    x = torch.randn(20, 256, dtype=torch.float16)
    x[4] = 0.0
    blocks = random_blocks(2, 128, torch.float16)
    q, scales = rotate_quantize(x, blocks, 8, config=TileConfig(16, 64, 2))
    assert torch.equal(q[4], torch.zeros(256, dtype=torch.int8))
    assert torch.isfinite(scales).all() and scales[4, 0] > 0
    y = x.float() @ torch.block_diag(*blocks.float().unbind(0))
    err = (dequantize(q, scales, 8) - y).abs()
    assert (err <= scales / 2 + 1e-3).all()


@interpreted
def test_each_call_starts_from_fresh_row_maxima():
    # the row maxima are merged by atomic max: a maximum left from an earlier call would shrink this call's
    # integers, so run a large-valued input, then a small one
    blocks = random_blocks(2, 64, torch.float16)
    big = torch.randn(40, 128, dtype=torch.float16) * 100
    small = torch.randn(40, 128, dtype=torch.float16)
    rotate_quantize(big, blocks, 4)
    q, scales = rotate_quantize(small, blocks, 4, config=TileConfig(16, 32, 1))
    q_ref, scales_ref = rotate_quantize_reference(small, blocks, 4)
    assert torch.allclose(scales, scales_ref, rtol=1e-6, atol=0)
    assert (unpack_int4(q).int() - unpack_int4(q_ref).int()).abs().max() <= 1


@interpreted
def test_fixed_tile_wider_than_the_block_is_clipped():
    x = torch.randn(21, 192, dtype=torch.float16)
    blocks = random_blocks(3, 64, torch.float16)
    q, scales = rotate_quantize(x, blocks, 4, config=TileConfig(16, 128, 1))  # 128 columns > b = 64
    q_ref, scales_ref = rotate_quantize_reference(x, blocks, 4)
    assert torch.allclose(scales, scales_ref, rtol=1e-6, atol=0)
    assert (unpack_int4(q).int() - unpack_int4(q_ref).int()).abs().max() <= 1


@interpreted
def test_row_absmax_is_step_one_alone():
    # the public step 1 (benchmarks/rotate_quant_floor_probe.py times it): fp32 max |x @ blockdiag(B)| per token
    x = torch.randn(2, 19, 256, dtype=torch.float16)
    blocks = random_blocks(2, 128, torch.float16)
    want = (x.float() @ torch.block_diag(*blocks.float().unbind(0))).abs().amax(-1).reshape(-1)
    out = row_absmax(x, blocks)
    assert out.dtype == torch.int32 and out.shape == (38,)
    assert torch.allclose(out.view(torch.float32), want, rtol=1e-5)
    # into a buffer: atomic max keeps the larger value, so a repeated call changes nothing
    buffer = torch.zeros(38, dtype=torch.int32)
    buffer[0] = torch.tensor([1e4], dtype=torch.float32).view(torch.int32)
    row_absmax(x, blocks, config=TileConfig(16, 64, 1), out=buffer)
    row_absmax(x, blocks, config=TileConfig(16, 64, 1), out=buffer)
    assert buffer.view(torch.float32)[0] == 1e4 and torch.allclose(buffer.view(torch.float32)[1:], want[1:], rtol=1e-5)
    with pytest.raises(ValueError, match="int32"):
        row_absmax(x, blocks, out=torch.zeros(38))


def test_quant_mismatch_names_what_differs():
    from kernels.bench import MAX_OFF_BY_ONE, quant_error, quant_mismatch

    x = torch.randn(64, 128)
    blocks = random_blocks(1, 128, torch.float32)
    want = rotate_quantize_reference(x, blocks, 8)
    assert quant_error(want, want, 8) == 0.0 and quant_mismatch(want, want, 8) is None
    q, s = want
    one_off = q.clone()
    one_off[0, 0] += 1 if one_off[0, 0] < 127 else -1
    assert quant_error((one_off, s), want, 8) == 1 / q.numel() <= MAX_OFF_BY_ONE
    assert quant_mismatch((one_off, s), want, 8) is None  # one integer of 8192 off by one: a rounding tie
    two_off = q.clone()
    two_off[3, 5] += 2 if two_off[3, 5] < 0 else -2
    assert "max diff" in quant_mismatch((two_off, s), want, 8)
    assert "scale rel" in quant_mismatch((q, s * 1.01), want, 8)


@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
def test_candidates_fit_the_block_and_shared_memory(block):
    configs = rotate_quant_configs(block)
    assert configs and any(c.row_tiles == 1 for c in configs) and any(c.row_tiles > 1 for c in configs)
    for config in configs:
        assert config.block_n == min(block, 128) and block % config.block_n == 0
        assert (block * config.block_n + config.num_stages * config.block_m * block) * 2 <= 200 * 1024


@needs_gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_kernel_matches_reference(bits):
    x = torch.randn(2, 1500, 11008, dtype=torch.float16, device="cuda")
    blocks = random_blocks(86, 128, torch.float16).cuda()
    q, scales = rotate_quantize(x, blocks, bits)
    q_ref, scales_ref = rotate_quantize_reference(x, blocks, bits)
    values, values_ref = (unpack_int4(q), unpack_int4(q_ref)) if bits == 4 else (q, q_ref)
    diff = (values.int() - values_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
    assert torch.allclose(scales, scales_ref, rtol=1e-5)
