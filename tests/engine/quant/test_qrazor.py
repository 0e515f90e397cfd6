"""QRazor: base absmax quantization, SDR encode/decode against a bit-by-bit Python reference, effective
bits, the decompression-free product, the fake-quant entry point, and input validation."""

import pytest
import torch

from engine.quant.qrazor import (
    QRazorConfig,
    dequantize,
    effective_bits,
    flag_bits,
    qmax,
    qrazor_fake_quant,
    quantize_absmax,
    razored_dot,
    sdr_decode,
    sdr_encode,
)

# ------------------------------------------------------------------------- plain Python reference


def reference_razor_group(values: list[int], target_bits: int) -> tuple[list[int], int]:
    """One group, bit by bit on Python ints: (codes, shift)."""
    kept = target_bits - 1
    group_or = 0
    for v in values:
        group_or |= abs(v)
    msb_len = group_or.bit_length()
    shift = max(0, msb_len - kept)
    codes = []
    for v in values:
        bits = bin(abs(v))[2:].zfill(msb_len) if msb_len else ""
        kept_str = bits[: msb_len - shift]  # the top `kept` bits below the razoring point
        code = int(kept_str, 2) if kept_str else 0
        if shift and not (len(kept_str) == kept and set(kept_str) == {"1"}):
            code += int(bits[msb_len - shift])  # round to nearest: add the first dropped bit
        codes.append(-code if v < 0 else code)
    return codes, shift


def reference_encode(q: torch.Tensor, target_bits: int, group_size: int):
    rows = q.reshape(-1, q.shape[-1]).tolist()
    codes, flags = [], []
    for row in rows:
        row_codes, row_flags = [], []
        for start in range(0, len(row), group_size):
            c, s = reference_razor_group(row[start : start + group_size], target_bits)
            row_codes += c
            row_flags.append(s)
        codes.append(row_codes)
        flags.append(row_flags)
    return codes, flags


def special_groups(base_bits: int, group_size: int) -> torch.Tensor:
    """Rows of hand-picked groups: all-ones kept bits, zeros, negatives, a single nonzero, tiny values."""
    top = qmax(base_bits)
    g = group_size
    rows = [
        [top] * g,  # 0b111...1: kept bits all ones, must floor
        [-top] + [top // 2] * (g - 1),
        [0] * g,
        [0] * (g - 1) + [-top],  # single nonzero
        [0] * (g // 2) + [5] + [0] * (g - g // 2 - 1),  # single small nonzero: fits, kept exactly
        [7, -7, 3, 1] * (g // 4),  # OR fits in 3 bits: shift 0
        [(1 << (base_bits - 2)) - 1] * g,  # 0b0111..1: all ones one position lower
        [8, 15, -12, 9] * (g // 4),  # shift 1 with ties (15 -> 7 floored, 9 -> 5 rounded)
    ]
    return torch.tensor(rows, dtype=torch.int64)


def random_ints(base_bits: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random base integers with a spread of group magnitudes (some groups small, some near full range)."""
    gen = torch.Generator().manual_seed(seed)
    top = qmax(base_bits)
    q = torch.randint(-top, top + 1, (*shape[:-1], shape[-1] // 16, 16), generator=gen)
    limits = 2 ** torch.randint(0, base_bits, (*shape[:-1], shape[-1] // 16, 1), generator=gen)  # <= 2^(b-1)
    return (q.abs() % limits * torch.sign(q)).reshape(shape)


# --------------------------------------------------------------------------------------- base stage


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_base_round_trip_error_within_half_step(bits, per_channel):
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 30, 12)[:, None]
    q, scale = quantize_absmax(x, bits, per_channel=per_channel)
    assert q.dtype == torch.int64 and q.abs().max() <= qmax(bits)
    assert scale.shape == ((12, 1) if per_channel else ())
    err = (dequantize(q, scale) - x).abs()
    float32_slack = 4 * torch.finfo(torch.float32).eps * x.abs()  # rounding of x / scale and q * scale
    assert (err <= scale / 2 + float32_slack).all()
    # The absmax element lands exactly on +-qmax.
    assert q.abs().amax(dim=1 if per_channel else None).eq(qmax(bits)).all()


def test_static_absmax_clamps_outliers_and_zero_tensor_is_safe():
    x = torch.tensor([0.5, -1.0, 4.0, -9.0])
    q, scale = quantize_absmax(x, 8, absmax=1.0)
    assert q.tolist() == [64, -127, 127, -127]
    assert scale.item() == pytest.approx(1 / 127)
    q0, s0 = quantize_absmax(torch.zeros(3, 4), 8, per_channel=True)
    assert (q0 == 0).all() and torch.isfinite(s0).all()


# ---------------------------------------------------------------------------------------- SDR stage


@pytest.mark.parametrize("base_bits", [8, 16])
@pytest.mark.parametrize("group_size", [16, 8])
def test_sdr_encode_matches_bitwise_reference(base_bits, group_size):
    q = torch.cat(
        [
            special_groups(base_bits, group_size).reshape(-1, 4 * group_size),
            random_ints(base_bits, (6, 4 * group_size), seed=base_bits + group_size),
        ]
    )
    razored = sdr_encode(q, base_bits, target_bits=4, group_size=group_size)
    ref_codes, ref_flags = reference_encode(q, 4, group_size)
    assert razored.codes.tolist() == ref_codes
    assert razored.flags.tolist() == ref_flags
    assert razored.codes.abs().max() <= 7  # sign + 3 magnitude bits


@pytest.mark.parametrize("base_bits,target_bits", [(8, 4), (16, 4), (8, 3), (16, 6)])
def test_sdr_decode_matches_reference_values(base_bits, target_bits):
    q = torch.cat([special_groups(base_bits, 16), random_ints(base_bits, (5, 16), seed=7)])
    razored = sdr_encode(q, base_bits, target_bits, 16)
    decoded = razored.decode()
    ref_codes, ref_flags = reference_encode(q, target_bits, 16)
    expected = [
        [c * 2 ** flags[i // 16] for i, c in enumerate(codes)]
        for codes, flags in zip(ref_codes, ref_flags, strict=False)
    ]
    assert decoded.dtype == torch.int64 and decoded.tolist() == expected
    # Spot checks of the named cases (8-bit base, 4-bit target): 127 floors to 7 << 4 = 112, zeros stay 0,
    # groups whose OR fits in 3 bits are exact.
    if (base_bits, target_bits) == (8, 4):
        assert decoded[0].tolist() == [112] * 16
        assert decoded[2].eq(0).all() and razored.flags[2].item() == 0
        assert decoded[4].tolist() == q[4].tolist() and decoded[5].tolist() == q[5].tolist()


def test_effective_bits_and_flag_width():
    assert flag_bits(8, 4) == 3 and flag_bits(16, 4) == 4
    assert effective_bits(8, 4, 16) == 4 + 3 / 16
    assert effective_bits(16, 4, 16) == 4 + 4 / 16
    assert effective_bits(8, 4, 32) == 4 + 3 / 32
    assert QRazorConfig().effective_bits("activation") == 4 + 4 / 16
    for base_bits in (8, 16):
        # The largest shift actually produced (a group holding qmax) fits in flag_bits, and needs all of them.
        flags = sdr_encode(special_groups(base_bits, 16), base_bits, 4, 16).flags
        assert flags.max().item() == base_bits - 4
        assert flags.max().item() < 2 ** flag_bits(base_bits, 4)
        assert flags.max().item() >= 2 ** (flag_bits(base_bits, 4) - 1)
        assert sdr_encode(special_groups(base_bits, 16), base_bits).effective_bits == effective_bits(base_bits)


# ------------------------------------------------------------------------ decompression-free product


def _int_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (a[:, None, :] * w[None, :, :]).sum(dim=-1)


@pytest.mark.parametrize("a_bits,w_bits", [(16, 8), (8, 8)])
@pytest.mark.parametrize("g", [16, 8])
def test_razored_dot_equals_decoded_product(a_bits, w_bits, g):
    a = sdr_encode(random_ints(a_bits, (5, 64), seed=1), a_bits, 4, g)
    w = sdr_encode(random_ints(w_bits, (7, 64), seed=2), w_bits, 4, g)
    out = razored_dot(a.codes, a.flags, w.codes, w.flags, g)
    assert out.dtype == torch.int64 and out.shape == (5, 7)
    assert torch.equal(out, _int_matmul(a.decode(), w.decode()))
    vec = razored_dot(a.codes[0], a.flags[0], w.codes[3], w.flags[3], g)
    assert vec.shape == () and vec.item() == int((a.decode()[0] * w.decode()[3]).sum())


def test_razored_dot_with_special_groups():
    a = sdr_encode(special_groups(16, 16).reshape(2, 64), 16)
    w = sdr_encode(special_groups(8, 16).reshape(2, 64).flip(0), 8)
    assert torch.equal(razored_dot(a.codes, a.flags, w.codes, w.flags, 16), _int_matmul(a.decode(), w.decode()))


# -------------------------------------------------------------------------------------- fake quant


def test_fake_quant_weights_lie_on_razored_grid_per_channel():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(3))
    out = qrazor_fake_quant(w, 8, per_channel=True)
    assert out.shape == w.shape and out.dtype == w.dtype
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    ints = torch.round(out / scale).to(torch.int64).reshape(6, 2, 16)
    assert torch.allclose(ints.reshape(6, 32) * scale, out, atol=1e-6)
    # Within each group: one power-of-two step, at most 3 magnitude bits at that step.
    for row in ints.reshape(-1, 16):
        step = 2 ** max(0, int(row.abs().max()).bit_length() - 3)
        assert (row % step == 0).all() and (row.abs() // step <= 7).all()
    # Per-channel scales: scaling one output row scales its result and leaves the others alone.
    w2 = w.clone()
    w2[1] *= 10
    out2 = qrazor_fake_quant(w2, 8, per_channel=True)
    assert torch.allclose(out2[1], out[1] * 10, rtol=1e-5, atol=1e-6)
    assert torch.equal(out2[[0, 2, 3, 4, 5]], out[[0, 2, 3, 4, 5]])


def test_fake_quant_activation_static_absmax_and_exact_groups():
    scale = 2.0 / qmax(16)
    # Values that are small integers of the base grid (OR fits in 3 bits) survive razoring exactly.
    x = torch.tensor([[1.0, -3.0, 7.0, 0.0] * 4, [2.0, 5.0, -6.0, 4.0] * 4]) * scale
    out = qrazor_fake_quant(x, 16, absmax=2.0)
    assert torch.allclose(out, x, atol=1e-9)
    # A given static absmax clamps outliers to qmax, which then razors to 7 << 12.
    big = torch.full((1, 16), 50.0)
    assert torch.allclose(qrazor_fake_quant(big, 16, absmax=2.0), torch.full((1, 16), (7 << 12) * scale))
    # Razoring loses precision relative to the 16-bit base alone, but stays close on Gaussian data.
    x3 = torch.randn(4, 3, 64, generator=torch.Generator().manual_seed(4))
    out3 = qrazor_fake_quant(x3, 16)
    assert out3.shape == x3.shape
    rel = ((out3 - x3).norm() / x3.norm()).item()
    assert 0.0 < rel < 0.15


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(base_bits=8, target_bits=4, group_size=12), "divisible by group_size"),
        (dict(base_bits=8, target_bits=8, group_size=16), "smaller than base_bits"),
        (dict(base_bits=8, target_bits=9, group_size=16), "smaller than base_bits"),
        (dict(base_bits=1, target_bits=4, group_size=16), "base_bits must be"),
        (dict(base_bits=40, target_bits=4, group_size=16), "base_bits must be"),
        (dict(base_bits=8, target_bits=1, group_size=16), "target_bits must be"),
        (dict(base_bits=8, target_bits=4, group_size=0), "group_size must be"),
    ],
)
def test_sdr_encode_rejects_bad_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sdr_encode(torch.zeros(2, 32, dtype=torch.int64), **kwargs)


def test_bad_tensors_raise_value_errors():
    with pytest.raises(ValueError, match="integer tensor"):
        sdr_encode(torch.zeros(2, 16), 8)
    with pytest.raises(ValueError, match="above 127"):
        sdr_encode(torch.full((1, 16), 128), 8)
    with pytest.raises(ValueError, match="flags must have shape"):
        sdr_decode(torch.zeros(2, 32, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), 16)
    with pytest.raises(ValueError, match="per_channel"):
        quantize_absmax(torch.randn(2, 3, 4), 8, per_channel=True)
    with pytest.raises(ValueError, match="absmax"):
        quantize_absmax(torch.randn(4), 8, absmax=-1.0)
    with pytest.raises(ValueError, match="divisible"):
        qrazor_fake_quant(torch.randn(4, 20), 8, group_size=16)
    a = sdr_encode(torch.zeros(2, 32, dtype=torch.int64), 8)
    w = sdr_encode(torch.zeros(3, 16, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="inner dims"):
        razored_dot(a.codes, a.flags, w.codes, w.flags, 16)
    with pytest.raises(ValueError, match="a_flags must have shape"):
        razored_dot(a.codes, a.flags[:, :1], a.codes, a.flags, 16)
    with pytest.raises(ValueError, match="smaller than base_bits"):
        QRazorConfig(weight_bits=4)
    assert QRazorConfig.from_dict(QRazorConfig(group_size=32).to_dict()) == QRazorConfig(group_size=32)
