import pytest
import torch

from engine.quant.quantizers import (
    QuantSpec,
    clip_search_error,
    find_grid,
    integer_range,
    quantize_activation,
    quantize_kv,
    quantize_weight,
    search_clip_grid,
    weight_grid,
    weight_scales,
)


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def heavy_tailed(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Cubed Gaussians: a few large entries per row, where clipping pays off."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) ** 3


def weight(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- specs and input checks


@pytest.mark.parametrize("bits", [0, 1, 17])
def test_bad_bits_rejected_with_clear_message(bits):
    with pytest.raises(ValueError, match=f"bits must be between 2 and 16, got {bits}"):
        QuantSpec(bits=bits, symmetric=True)
    with pytest.raises(ValueError, match="bits must be between 2 and 16"):
        quantize_weight(weight(), bits)
    with pytest.raises(ValueError, match="bits must be between 2 and 16"):
        quantize_activation(weight(), bits)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"group_size": 0}, "group_size must be a positive int"),
        ({"group_size": -8}, "group_size must be a positive int"),
        ({"clip_ratio": 0.0}, r"clip_ratio must be in \(0, 1\]"),
        ({"clip_ratio": 1.5}, r"clip_ratio must be in \(0, 1\]"),
    ],
)
def test_bad_spec_fields_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(bits=4, symmetric=False, **kwargs)


def test_spec_round_trips_through_dict():
    spec = QuantSpec(bits=4, symmetric=False, group_size=64, clip_ratio=0.9)
    assert QuantSpec.from_dict(spec.to_dict()) == spec


def test_weight_must_be_two_dimensional():
    with pytest.raises(ValueError, match=r"2-D tensor \[out, in\]"):
        quantize_weight(torch.randn(2, 3, 4), 4)


# ---------------------------------------------------------------- weights


@pytest.mark.parametrize("bits, group_size", [(3, None), (4, None), (4, 16), (8, 24)])
def test_weight_error_at_most_half_a_step(bits, group_size):
    W = weight(cols=72)
    Wq = quantize_weight(W, bits, group_size)
    step = weight_scales(W, bits, group_size)  # [out, G]
    step_per_entry = step.repeat_interleave(group_size or W.shape[1], dim=1)[:, : W.shape[1]]
    assert ((Wq - W).abs() <= step_per_entry / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_integers_in_symmetric_range_and_odd_symmetric(bits):
    W = weight()
    maxq = 2 ** (bits - 1) - 1
    assert integer_range(bits, symmetric=True) == (-maxq, maxq)
    q = quantize_weight(W, bits) / weight_scales(W, bits)
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().abs().max() == maxq  # the absmax entry of each row lands on +-maxq
    assert torch.equal(quantize_weight(-W, bits), -quantize_weight(W, bits))
    # Odd symmetry holds with clipping too, where the reference's extra level -(maxq+1) would break it.
    assert torch.equal(quantize_weight(-W, bits, clip_search=True), -quantize_weight(W, bits, clip_search=True))


@pytest.mark.parametrize("bits, group_size", [(2, None), (3, None), (4, 8), (4, None)])
def test_distinct_levels_per_row_or_group_bounded(bits, group_size):
    W = torch.rand(8, 256, generator=torch.Generator().manual_seed(0)) * 2 - 1
    W[:, 0], W[:, 1] = 1.0, -1.0  # both ends of the range present
    Wq = quantize_weight(W, bits, group_size)
    width = group_size or W.shape[1]
    for row in Wq:
        for group in row.split(width):
            assert group.unique().numel() <= 2**bits - 1  # symmetric grid: 2^b - 1 levels
    # 256 uniform values spanning [-1, 1] fill the whole grid, so the bound is reached, not vacuous.
    if group_size is None:
        assert Wq[0].unique().numel() == 2**bits - 1


def test_each_group_has_its_own_scale():
    W = weight(rows=4, cols=40)
    W[:, 3] = 100.0  # an outlier in group 0 only
    scales = weight_scales(W, 4, group_size=16)
    assert scales.shape == (4, 3)  # 40 columns -> groups of 16, 16 and a ragged 8
    for g, cols in enumerate([slice(0, 16), slice(16, 32), slice(32, 40)]):
        assert torch.allclose(scales[:, g], W[:, cols].abs().amax(1) / 7)
    # The outlier ruins per-row RTN for the other columns but not per-group RTN.
    rest = slice(16, 40)
    per_group_err = (quantize_weight(W, 4, 16) - W)[:, rest].abs().max()
    per_row_err = (quantize_weight(W, 4) - W)[:, rest].abs().max()
    assert per_group_err < per_row_err / 5


def test_bits_16_is_identity():
    W = weight()
    assert torch.equal(quantize_weight(W, 16), W)
    assert torch.equal(quantize_weight(W, 16, group_size=8, clip_search=True), W)
    x = torch.randn(2, 5, 32)
    assert torch.equal(quantize_activation(x, 16, clip_ratio=0.9), x)
    assert torch.equal(quantize_kv(x, 16, group_size=8), x)


@pytest.mark.parametrize("bits, group_size", [(3, None), (4, None), (4, 32)])
def test_clip_search_never_worse_on_its_objective(bits, group_size):
    W = heavy_tailed(32, 128)  # heavy tails: clipping pays off on many rows
    plain = weight_grid(W, bits, group_size)
    searched = weight_grid(W, bits, group_size, clip_search=True)
    groups = W.reshape(32, -1, group_size or 128)
    plain_error = clip_search_error(groups, plain)
    searched_error = clip_search_error(groups, searched)
    assert (searched_error <= plain_error * (1 + 1e-6)).all()
    assert (searched_error < 0.95 * plain_error).any()
    assert (searched.scale <= plain.scale * (1 + 1e-6)).all()  # the search only shrinks
    Wq = quantize_weight(W, bits, group_size, clip_search=True)
    assert torch.allclose(Wq, searched.round_trip(groups).reshape(W.shape))


def test_clip_search_picks_best_shrink_of_the_grid():
    # Brute force over shrink 1.00, 0.99, ..., 0.21: the search must return the first best one per row.
    x = heavy_tailed(6, 64, seed=3)
    shrinks = [1.0 - i / 100 for i in range(80)]
    errors = torch.stack([clip_search_error(x, find_grid(x, 3, True, s)) for s in shrinks], 1)  # [6, 80]
    best = torch.tensor(shrinks)[errors.argmin(1)]
    expected_scale = x.abs().amax(1) * best / 3
    assert torch.allclose(search_clip_grid(x, 3, symmetric=True).scale.squeeze(1), expected_scale)
    assert (best < 1.0).any()
    # A row of one outlier above flat noise: clipping the outlier would cost more than it saves.
    flat = torch.cat([torch.full((1, 1), 50.0), torch.rand(1, 63)], 1)
    assert torch.allclose(search_clip_grid(flat, 3, symmetric=True).scale, torch.tensor([[50.0 / 3]]))


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: quantize_weight(x, 4, group_size=8, clip_search=True),
        lambda x: quantize_activation(x, 4, clip_ratio=0.9),
        lambda x: quantize_kv(x, 3, group_size=8),
    ],
)
def test_straight_through_gradient(fn):
    x = torch.randn(6, 32, requires_grad=True)
    g = torch.randn(6, 32)
    out = fn(x)
    assert not torch.allclose(out, x)  # the forward value is quantized
    (out * g).sum().backward()
    assert torch.equal(x.grad, g)


def test_the_integer_column_rounder_matches_quantize_weight():
    from engine.quant.formats import IntFormat

    W = heavy_tailed(12, 48)
    for clip_search in (False, True):
        rounder = IntFormat(4).column_rounder(W, search=clip_search)
        rounder.fit(W)
        by_column = torch.stack([rounder.round(W[:, j])[1] for j in range(W.shape[1])], 1)
        assert torch.equal(by_column, quantize_weight(W, 4, clip_search=clip_search))


def test_a_column_rounder_needs_fit():
    from engine.quant.formats import IntFormat

    with pytest.raises(ValueError, match="fit"):
        IntFormat(4).column_rounder(torch.randn(3, 4)).round(torch.randn(3))


def test_preserves_dtype():
    W = weight().to(torch.bfloat16)
    assert quantize_weight(W, 4).dtype == torch.bfloat16
    assert quantize_activation(W, 4).dtype == torch.bfloat16


# ---------------------------------------------------------------- activations and KV cache


def test_activation_is_per_token():
    x = torch.randn(3, 7, 32)
    xq = quantize_activation(x, 4, clip_ratio=0.9)
    for t in range(7):
        assert torch.equal(xq[1, t], quantize_activation(x[1, t : t + 1], 4, clip_ratio=0.9)[0])
    # Blowing up one token changes only that token.
    y = x.clone()
    y[0, 0] *= 1000
    yq = quantize_activation(y, 4, clip_ratio=0.9)
    assert torch.equal(yq[0, 1:], xq[0, 1:]) and torch.equal(yq[1:], xq[1:])
    assert torch.allclose(yq[0, 0], xq[0, 0] * 1000, rtol=1e-4)  # its own grid scaled with it


@pytest.mark.parametrize("bits", [3, 4])
def test_activation_asymmetric_uses_all_levels_on_positive_row(bits):
    levels = 2**bits
    row = torch.linspace(0.0, 3.0, 4 * levels).unsqueeze(0)  # all non-negative (e.g. after SiLU * up)
    asym = quantize_activation(row, bits)
    sym = quantize_activation(row, bits, symmetric=True)
    assert asym.unique().numel() == levels  # the zero point moves the grid onto [0, max]
    assert sym.unique().numel() == levels // 2  # a symmetric grid wastes its negative half
    assert (asym - row).abs().max() <= 3.0 / (levels - 1) / 2 + 1e-6
    assert (asym - row).abs().max() < (sym - row).abs().max()


def test_activation_error_bound_inside_clip_range():
    x = torch.randn(64, 48)
    bits, clip = 4, 0.8
    xq = quantize_activation(x, bits, clip_ratio=clip)
    lo = torch.clamp(x.amin(1, keepdim=True), max=0) * clip
    hi = torch.clamp(x.amax(1, keepdim=True), min=0) * clip
    step = (hi - lo) / (2**bits - 1)
    inside = (x >= lo) & (x <= hi)
    assert inside.float().mean() > 0.8
    assert ((xq - x).abs() <= step / 2 + 1e-6)[inside].all()
    assert ((xq - x).abs() > step / 2 + 1e-6)[~inside].any()  # clipped values do lose more
    grid = find_grid(x, bits, symmetric=False, shrink=clip)
    codes = grid.to_int(x)
    assert integer_range(bits, symmetric=False) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1


def near_half_steps(bits: int, rows: int = 2048, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Per-token rows whose values sit at or within a few float32 ulps of a half step of the row's own grid, where
    round(x / s + z) and round(x / s) + z can part. In the second half of the rows the step is a power of two and
    the range a whole number of steps, so the half steps are exact ties."""
    g = torch.Generator().manual_seed(seed)
    levels = 2**bits - 1
    lo, hi = -torch.rand(rows, 1, generator=g) * 4, torch.rand(rows, 1, generator=g) * 4
    exact = torch.arange(rows)[:, None] >= rows // 2
    below = torch.randint(1, levels, (rows, 1), generator=g).float()  # steps below 0
    step = torch.exp2(-torch.randint(0, 6, (rows, 1), generator=g).float())
    lo, hi = torch.where(exact, -below * step, lo), torch.where(exact, (levels - below) * step, hi)
    s = (hi - lo) / levels
    x = lo + s * (torch.randint(0, levels, (rows, d), generator=g).float() + 0.5)
    nudge = x.abs() * 2.0**-23 * torch.randint(-3, 4, (rows, d), generator=g)
    x = torch.where(exact, x, x + nudge)
    x[:, 0], x[:, 1] = lo[:, 0], hi[:, 0]  # each row's range is [lo, hi]
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_quantizer_equals_compressed_tensors_dynamic_one(bits):
    """Per-token asymmetric fake quantization equals compressed-tensors' (its calculate_qparams and fake_quantize,
    as a dynamic `token` quantizer in an exported checkpoint runs them) bit for bit, half steps included."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    x = near_half_steps(bits)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="token", dynamic=True)
    scale, zero = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    assert torch.equal(quantize_activation(x, bits), fake_quantize(x, scale, zero, args))


def test_kv_one_group_per_head():
    heads, head_dim = 3, 8
    x = torch.randn(2, 5, heads * head_dim)  # [batch, seq, heads * head_dim]
    xq = quantize_kv(x, 4, group_size=head_dim)
    per_head = quantize_activation(x.reshape(2, 5, heads, head_dim), 4).reshape(x.shape)
    assert torch.equal(xq, per_head)
    # An outlier in head 0 leaves heads 1 and 2 untouched.
    y = x.clone()
    y[..., 0] = 500.0
    assert torch.equal(quantize_kv(y, 4, head_dim)[..., head_dim:], xq[..., head_dim:])
    assert not torch.equal(quantize_activation(y, 4)[..., head_dim:], quantize_activation(x, 4)[..., head_dim:])


def test_kv_needs_group_size():
    with pytest.raises(ValueError, match="group_size"):
        quantize_kv(torch.randn(2, 8), 4, None)
