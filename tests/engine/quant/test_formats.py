from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from engine.quant.formats import (
    ELEMENTS,
    FORMATS,
    FP8Format,
    IntFormat,
    MXFormat,
    NVFP4Format,
    e2m1_codes,
    e2m1_values,
    minifloat_codes,
    minifloat_values,
    pack_nibbles,
    parse_format,
    round_minifloat,
    unpack_nibbles,
)
from engine.quant.quantizers import QuantSpec, fake_quantize, quantize_activation, quantize_weight

ML_DTYPES = {
    "e2m1": ml_dtypes.float4_e2m1fn,
    "e2m3": ml_dtypes.float6_e2m3fn,
    "e3m2": ml_dtypes.float6_e3m2fn,
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
}
ALL_FORMATS = [*FORMATS.values(), IntFormat(4), IntFormat(4, group=128), IntFormat(8, symmetric=False)]


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def ml_round(x: np.ndarray, dtype) -> np.ndarray:
    return np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def representable(name: str) -> np.ndarray:
    """Every finite non-negative value of the format, sorted, from ml_dtypes' own bit patterns."""
    v = np.arange(2 ** ELEMENTS[name].bits, dtype=np.uint8).view(ML_DTYPES[name]).astype(np.float32)
    return np.unique(v[np.isfinite(v) & (v >= 0)])


# ---------------------------------------------------------------- element rounding and codes


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_round_minifloat_matches_ml_dtypes_including_ties(name):
    el, dtype = ELEMENTS[name], ML_DTYPES[name]
    grid = representable(name)
    assert grid[-1] == el.max_normal == float(ml_dtypes.finfo(dtype).max)
    assert math.floor(math.log2(el.max_normal)) == el.emax
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)  # exact: one more mantissa bit
    rng = np.random.default_rng(0)
    uniform = rng.uniform(-el.max_normal, el.max_normal, 20000)
    spread = rng.choice([-1, 1], 20000) * np.exp2(rng.uniform(math.log2(grid[1]) - 3, el.emax + 1, 20000))
    x = np.concatenate([grid, -grid, mids, -mids, uniform, np.clip(spread, -el.max_normal, el.max_normal)])
    x = x.astype(np.float32)
    got = round_minifloat(torch.from_numpy(x), el.exp_bits, el.man_bits, el.max_normal).numpy()
    np.testing.assert_array_equal(got, ml_round(x, dtype))
    np.testing.assert_array_equal(np.signbit(got), np.signbit(x))  # sign kept, also on values rounding to 0


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_round_minifloat_saturates(name):
    el = ELEMENTS[name]
    m = el.max_normal
    x = np.array([m * 1.01, m * 1.5, m * 2, 1e30, np.inf], np.float32)
    x = np.concatenate([x, -x])
    got = round_minifloat(torch.from_numpy(x), el.exp_bits, el.man_bits, m).numpy()
    # ml_dtypes saturates the FP4/FP6 types but gives NaN (e4m3fn) or inf (e5m2) beyond the max, so the
    # reference is the cast of the input clamped to the max normal.
    np.testing.assert_array_equal(got, ml_round(np.clip(x, -m, m), ML_DTYPES[name]))
    assert np.all(np.abs(got) == m)


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_codes_are_the_ml_dtypes_bit_patterns(name):
    el, dtype = ELEMENTS[name], ML_DTYPES[name]
    grid = representable(name)
    values = np.concatenate([grid, -grid]).astype(np.float32)
    expected = values.astype(dtype).view(np.uint8)
    codes = minifloat_codes(torch.from_numpy(values), el)
    np.testing.assert_array_equal(codes.numpy(), expected)
    back = minifloat_values(torch.from_numpy(expected), el).numpy()
    np.testing.assert_array_equal(back, values)
    np.testing.assert_array_equal(np.signbit(back), np.signbit(values))


def test_e2m1_codes_by_hand():
    v = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -6.0, -0.0])
    assert e2m1_codes(v).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 9, 15, 8]
    assert e2m1_values(torch.arange(8, dtype=torch.uint8)).tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    assert e2m1_codes(torch.tensor([7.0, -100.0, 0.25, 0.26])).tolist() == [7, 15, 0, 1]  # rounded first


def test_fp8_codes_equal_torch_float8_bits():
    x = rand(4096, scale=50).clamp(-448, 448)
    v = ELEMENTS["e4m3"].round(x)
    assert torch.equal(minifloat_codes(v, ELEMENTS["e4m3"]), x.to(torch.float8_e4m3fn).view(torch.uint8))


def test_pack_nibbles_low_first_and_round_trip():
    assert pack_nibbles(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    codes = torch.randint(0, 16, (3, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.shape == (3, 32) and packed.dtype == torch.uint8
    assert torch.equal(unpack_nibbles(packed), codes)
    for bad in (torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([1, 16], dtype=torch.uint8), torch.ones(2)):
        with pytest.raises(ValueError, match="uint8 codes in 0..15"):
            pack_nibbles(bad)


# ---------------------------------------------------------------- MX


def e8m0_bits(exponent: int) -> int:
    return int(np.array([2.0**exponent], np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8)[0])


def test_mx_scale_by_hand():
    x = torch.zeros(1, 128)
    x[0, :3] = torch.tensor([7.5, 1.0, -0.6])  # amax 7.5: shared_exp floor(log2 7.5) - 2 = 0; 7.5 saturates to 6
    x[0, 32:35] = torch.tensor([1.0, 0.3, -0.1])  # amax 1: shared_exp -2, x / 0.25 = [4, 1.2, -0.4]
    x[0, 64] = 2.0**-130  # shared_exp -132 clamps to -127; x / 2^-127 = 1/8 rounds to 0 in E2M1
    # block 3 is all zeros
    fmt = FORMATS["mxfp4"]
    enc = fmt.encode(x)
    scale_bits = enc.scales
    assert scale_bits.tolist() == [[e8m0_bits(0), e8m0_bits(-2), e8m0_bits(-127), e8m0_bits(-127)]]
    assert scale_bits.tolist() == [[127, 125, 0, 0]]
    expected = torch.zeros(1, 128)
    expected[0, :3] = torch.tensor([6.0, 1.0, -0.5])
    expected[0, 32:35] = torch.tensor([1.0, 0.25, -0.125])
    y = fmt.fake_quantize(x)
    assert torch.equal(y, expected)
    assert torch.equal(fmt.decode(enc), y)
    # MXFP8 keeps the tiny value: 2^-130 / 2^-127 = 2^-3 is an E4M3 value.
    tiny = torch.zeros(1, 32)
    tiny[0, 0] = 2.0**-130
    bits8 = FORMATS["mxfp8"].encode(tiny).scales
    assert bits8.tolist() == [[0]] and FORMATS["mxfp8"].fake_quantize(tiny)[0, 0].item() == 2.0**-130


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp8"])
def test_mx_matches_numpy_reference(name):
    fmt = FORMATS[name]
    el = ELEMENTS[fmt.element]
    x = rand(8, 256, seed=1) ** 3
    for clip in (1.0, 0.7):
        blocks = x.numpy().reshape(8, 8, 32)
        amax = np.abs(blocks).max(-1, keepdims=True).astype(np.float32) * np.float32(clip)
        scale = np.exp2(np.clip(np.floor(np.log2(amax)) - el.emax, -127, 127)).astype(np.float32)
        v = ml_round(np.clip(blocks / scale, -el.max_normal, el.max_normal), ML_DTYPES[fmt.element])
        np.testing.assert_array_equal(fmt.fake_quantize(x, clip).numpy(), (v * scale).reshape(8, 256))


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp8"])
def test_mx_idempotent(name):
    y = FORMATS[name].fake_quantize(rand(4, 96, seed=2, scale=3))
    assert torch.equal(FORMATS[name].fake_quantize(y), y)


@pytest.mark.parametrize("name", ["mxfp4", "mxfp6", "mxfp8"])
def test_mx_encode_decode_exact(name):
    fmt = FORMATS[name]
    x = rand(3, 5, 70, seed=3, scale=10)
    enc = fmt.encode(x, clip_ratio=0.9)
    codes, scale_bits = enc.codes, enc.scales
    assert codes.shape == (3, 5, 96) and codes.dtype == torch.uint8
    assert scale_bits.shape == (3, 5, 3) and scale_bits.dtype == torch.uint8
    assert torch.equal(fmt.decode(enc), fmt.fake_quantize(x, 0.9))
    if name == "mxfp8":  # codes are the float8_e4m3fn bit patterns of x / X
        scale = torch.exp2(scale_bits.float() - 127).repeat_interleave(32, -1)[..., :70]
        assert torch.equal(codes[..., :70], (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8))


# ---------------------------------------------------------------- NVFP4


def nvfp4_numpy(x: np.ndarray, g: np.float32 | None = None) -> np.ndarray:
    """The recipe step by step in float32 numpy, with ml_dtypes doing every rounding."""
    x = x.astype(np.float32)
    if g is None:
        g = np.float32(np.abs(x).max()) / np.float32(6 * 448)
    blocks = x.reshape(x.shape[0], -1, 16)
    amax = np.abs(blocks).max(-1, keepdims=True)
    s = ml_round(np.minimum(amax / (np.float32(6) * g), 448), ml_dtypes.float8_e4m3fn)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = ml_round(np.clip(blocks / (s * g), -6, 6), ml_dtypes.float4_e2m1fn)
    return np.where(s * g > 0, v * s * g, 0).astype(np.float32).reshape(x.shape)


def test_nvfp4_two_level_scale_by_hand():
    x = torch.zeros(1, 32)
    x[0, :3] = torch.tensor([2688.0, 100.0, -1.0])  # g = 2688 / 2688 = 1; s = e4m3(448) = 448; 100/448 -> 0
    x[0, 16:19] = torch.tensor([3.0, 1.0, 0.25])  # s = e4m3(3 / 6) = 0.5; values 6, 2, 0.5 of the E2M1 grid
    expected = torch.zeros(1, 32)
    expected[0, 0], expected[0, 16:19] = 2688.0, torch.tensor([3.0, 1.0, 0.25])
    fmt = FORMATS["nvfp4"]
    assert torch.equal(fmt.fake_quantize(x), expected)
    enc = fmt.encode(x)
    scales, g = enc.scales, enc.global_scale
    assert g.item() == 1.0
    assert scales.tolist() == [list(np.array([448, 0.5], np.float32).astype(ml_dtypes.float8_e4m3fn).view(np.uint8))]


def test_nvfp4_matches_numpy_reference():
    x = rand(4, 64, seed=4) ** 3
    np.testing.assert_array_equal(FORMATS["nvfp4"].fake_quantize(x).numpy(), nvfp4_numpy(x.numpy()))
    # An explicit global scale: a large block saturates its E4M3 scale at 448 and its values at 6 * 448,
    # a small block's scale rounds to 0 (below 2^-10) and dequantizes to 0.
    x = torch.zeros(2, 16)
    x[0] = torch.linspace(-5000, 6000, 16)
    x[1] = torch.linspace(-6 * 2.0**-11, 6 * 2.0**-11, 16)
    y = FORMATS["nvfp4"].fake_quantize(x, global_scale=1.0)
    np.testing.assert_array_equal(y.numpy(), nvfp4_numpy(x.numpy(), np.float32(1.0)))
    assert y[0].abs().max().item() == 6 * 448 and torch.equal(y[1], torch.zeros(16))


def test_nvfp4_encode_decode_exact():
    fmt = FORMATS["nvfp4"]
    x = rand(3, 40, seed=5, scale=7)
    for g in (None, 0.01, torch.tensor(0.003)):
        enc = fmt.encode(x, 0.8, global_scale=g)
        codes, scales, gs = enc.codes, enc.scales, enc.global_scale
        assert codes.shape == (3, 48) and scales.shape == (3, 3) and gs.dtype == torch.float32 and gs.dim() == 0
        assert torch.equal(fmt.decode(enc), fmt.fake_quantize(x, 0.8, global_scale=g))
    s = minifloat_values(scales, ELEMENTS["e4m3"])
    assert torch.equal(scales, s.to(torch.float8_e4m3fn).view(torch.uint8))
    with pytest.raises(ValueError, match="global_scale must be one finite positive number"):
        fmt.fake_quantize(x, global_scale=0.0)


# ---------------------------------------------------------------- FP8 and integers


def test_fp8_per_row_matches_torch_float8():
    x = rand(6, 50, seed=6, scale=20)
    x[2] = 0
    for clip in (1.0, 0.5):
        scale = x.abs().amax(-1, keepdim=True) * clip / 448
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        expected = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
        y = FORMATS["fp8"].fake_quantize(x, clip)
        assert torch.equal(y, expected) and torch.equal(y[2], torch.zeros(50))
    assert torch.equal(y.abs().amax(-1)[[0, 1, 3]], (scale * 448).squeeze(-1)[[0, 1, 3]])  # clipped rows saturate
    per_tensor = FP8Format(axis_per_row=False).fake_quantize(x)
    scale = x.abs().amax() / 448
    assert torch.equal(per_tensor, (x / scale).to(torch.float8_e4m3fn).float() * scale)


def test_int_format_is_the_existing_quantizer():
    W = rand(16, 300, seed=7)
    assert torch.equal(IntFormat(4).fake_quantize(W), quantize_weight(W, 4))
    assert torch.equal(IntFormat(3, group=128).fake_quantize(W), quantize_weight(W, 3, 128))
    assert torch.equal(IntFormat(8, symmetric=False).fake_quantize(W, 0.9), quantize_activation(W, 8, 0.9))
    spec = QuantSpec(bits=4, symmetric=False, group_size=64, clip_ratio=0.8)
    assert torch.equal(IntFormat(4, 64, False).fake_quantize(W, 0.8), fake_quantize(W, spec))


# ---------------------------------------------------------------- properties shared by every format


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_zeros_sign_symmetry_dtype_and_gradient(fmt):
    assert torch.equal(fmt.fake_quantize(torch.zeros(3, 64)), torch.zeros(3, 64))
    x = rand(4, 160, seed=8, scale=4)
    x[:, 32:64] = 0  # a zero block among others
    y = fmt.fake_quantize(x)
    if isinstance(fmt, (MXFormat, NVFP4Format)):
        assert torch.equal(y[:, 32:64], torch.zeros(4, 32))
    if not (isinstance(fmt, IntFormat) and not fmt.symmetric):
        assert torch.equal(fmt.fake_quantize(-x), -y)
    assert fmt.fake_quantize(x.bfloat16()).dtype == torch.bfloat16
    leaf = x.clone().requires_grad_(True)
    fmt.fake_quantize(leaf).sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(x))


@pytest.mark.parametrize("fmt", ALL_FORMATS, ids=lambda f: f.name)
def test_fake_quantization_is_decode_of_encode_bit_for_bit(fmt):
    x = rand(4, 70, seed=10, scale=3) ** 3
    for clip in (1.0, 0.85):
        enc = fmt.encode(x, clip)
        by_codes = fmt.decode(enc)
        direct = fmt.fake_quantize(x, clip)
        assert torch.equal(by_codes, direct)
        assert torch.equal(fmt.from_codes(fmt.to_codes(fmt.from_codes(enc.codes))), fmt.from_codes(enc.codes))


@pytest.mark.parametrize("fmt", [FORMATS["mxfp4"], FORMATS["mxfp8"], FORMATS["nvfp4"], IntFormat(4, group=32)])
def test_ragged_last_block_is_zero_padding(fmt):
    x = rand(5, 70, seed=9, scale=2)
    padded = torch.nn.functional.pad(x, (0, 26))
    assert torch.equal(fmt.fake_quantize(x), fmt.fake_quantize(padded)[:, :70])


def test_bits_per_value_and_names():
    listed = [FORMATS[n] for n in ("mxfp4", "mxfp6", "mxfp8", "nvfp4", "fp8")] + ALL_FORMATS[-3:]
    figures = {f.name: f.bits_per_value(4096) for f in listed}
    assert figures == {
        "mxfp4": 4.25,
        "mxfp6": 6.25,
        "mxfp8": 8.25,
        "nvfp4": 4.5,
        "fp8": 8 + 32 / 4096,
        "int4": 4 + 16 / 4096,
        "int4g128": 4.125,
        "int8a": 8 + 24 / 4096,
    }
    assert IntFormat(4, 128, symmetric=False).bits_per_value(4096) == 4 + 20 / 128
    assert IntFormat(4, 128, symmetric=False).name == "int4g128a"
    assert MXFormat("e3m2").name == "mxfp6_e3m2" and MXFormat("e2m1", 16).name == "mxfp4b16"
    assert "OCP" in MXFormat.rule and "6.3" in MXFormat.rule and "NVFP4" in NVFP4Format.rule


def test_parse_format():
    for name, fmt in FORMATS.items():
        assert parse_format(f" {name.upper()} ") == fmt
    assert parse_format("4") == IntFormat(4) and parse_format("15") == IntFormat(15)
    assert parse_format("16") is None
    assert parse_format("int4g128") == IntFormat(4, group=128)
    assert parse_format("INT3a") == IntFormat(3, symmetric=False)
    for fmt in ALL_FORMATS:
        assert parse_format(fmt.name) == fmt
    for bad in ("1", "17", "int16", "int4g0", "fp4", "", "mxfp4b16"):
        with pytest.raises(ValueError, match=r"2\.\.16.*int4g128.*mxfp4, mxfp6, mxfp8, nvfp4, fp8"):
            parse_format(bad)


def test_bad_arguments_refused():
    with pytest.raises(ValueError, match="MX element must be one of"):
        MXFormat("e9m9")
    with pytest.raises(ValueError, match="block must be a positive int"):
        NVFP4Format(0)
    with pytest.raises(ValueError, match="IntFormat bits must be 2..15"):
        IntFormat(16)
    with pytest.raises(ValueError, match="clip_ratio must be in"):
        FORMATS["mxfp4"].fake_quantize(torch.ones(32), clip_ratio=0.0)
