"""Streaming statistics: known distributions, streaming equals batch, the sink split, bounded reservoirs and memory."""

import pytest
import torch

from engine.observe.stats import (
    NORM_SAMPLE,
    SAMPLE_ROWS,
    SURFACE_CHANNELS,
    SURFACE_TOKENS,
    TOP_TOKENS,
    Moments,
    SiteAccumulator,
    _Reservoir,
    empty_moments,
    pool_channels,
    token_moments,
)

# Pearson kurtosis of each distribution, and a tolerance of several standard errors for ~250k samples.
DISTRIBUTIONS = {"gaussian": (3.0, 0.1), "laplace": (6.0, 0.5), "uniform": (1.8, 0.05)}


def sample(dist: str, shape: tuple, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gaussian":
        return torch.randn(shape, generator=g)
    if dist == "laplace":  # the difference of two unit exponentials is a unit Laplace
        return torch.empty(shape).exponential_(generator=g) - torch.empty(shape).exponential_(generator=g)
    return torch.rand(shape, generator=g) * 2 - 1


def skewed(shape: tuple, seed: int = 0) -> torch.Tensor:
    """Exponential values (skewed, so M3 is far from zero) with per-channel scales and large offsets."""
    c = shape[-1]
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape).exponential_(generator=g) * torch.logspace(-1, 1, c) + torch.linspace(-50, 50, c)


def ref_moments(x: torch.Tensor) -> dict:
    """One-shot float64 reference per channel of x [N, C]."""
    x = x.double()
    d = x - x.mean(0)
    m2, m3, m4 = (d**2).sum(0), (d**3).sum(0), (d**4).sum(0)
    return {"n": x.shape[0], "mean": x.mean(0), "m2": m2, "m3": m3, "m4": m4, "kurt": x.shape[0] * m4 / m2**2}


def ref_pooled(x: torch.Tensor) -> tuple[float, float, float]:
    """(mean, variance, kurtosis) of all values of x taken together, in float64."""
    v = x.double().flatten()
    d = v - v.mean()
    var = (d**2).mean()
    return float(v.mean()), float(var), float((d**4).mean() / var**2)


def ref_token_kurtosis(x: torch.Tensor) -> torch.Tensor:
    """Kurtosis across channels of each row of x [N, C], float64."""
    d = x.double() - x.double().mean(1, keepdim=True)
    return (d**4).mean(1) / (d**2).mean(1) ** 2


def assert_rel(a, b, rtol: float):
    torch.testing.assert_close(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=rtol, atol=0.0
    )


# ---- known distributions ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_whole_tensor_and_per_token_kurtosis_match_the_distribution(dist):
    target, tol = DISTRIBUTIONS[dist]
    x = sample(dist, (4, 32, 2048))  # 4 windows of 32 tokens, 2048 channels: 262k values
    acc = SiteAccumulator(2048)
    acc.update(x, torch.zeros(4, 32, dtype=torch.long), 0)
    s = acc.scalars()
    assert s["kurt_tensor"] == pytest.approx(target, abs=tol)
    assert s["kurt_tensor_nosink"] == pytest.approx(target, abs=tol)
    assert s["kurt_token_mean"] == pytest.approx(target, abs=tol)
    assert s["kurt_token_mean_nosink"] == pytest.approx(target, abs=tol)
    # The pooled moments of the raw Moments agree with the accumulator's view.
    assert Moments.of(x.reshape(-1, 2048)).pooled()[3] == pytest.approx(s["kurt_tensor"], rel=1e-6)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_per_channel_kurtosis_matches_the_distribution(dist):
    target, tol = DISTRIBUTIONS[dist]
    x = sample(dist, (60000, 4), seed=1)  # 60k samples per channel: each channel alone is within tolerance
    kurt = Moments.of(x).kurtosis()
    assert kurt.shape == (4,)
    assert torch.all((kurt - target).abs() < 2 * tol), kurt
    assert float(kurt.mean()) == pytest.approx(target, abs=tol)


def test_token_moments_match_float64_reference():
    x = skewed((50, 300))
    kurt, norm = token_moments(x)
    assert_rel(kurt, ref_token_kurtosis(x), 1e-4)
    assert_rel(norm, x.double().norm(dim=1), 1e-5)


# ---- streaming equals batch ------------------------------------------------------------------------------------


def test_merge_of_uneven_chunks_equals_one_shot():
    x = skewed((1000, 12), seed=2)
    m = empty_moments(12)
    start = 0
    for size in (1, 7, 100, 3, 250, 1, 638):
        m = m.merge(Moments.of(x[start : start + size]))
        start += size
    assert start == 1000
    ref = ref_moments(x)
    assert m.n == ref["n"]
    assert_rel(m.mean, ref["mean"], 1e-6)
    assert_rel(m.m2, ref["m2"], 1e-5)
    assert_rel(m.m3, ref["m3"], 1e-4)
    assert_rel(m.m4, ref["m4"], 1e-4)
    assert_rel(m.kurtosis(), ref["kurt"], 1e-4)
    assert_rel(m.variance(), ref["m2"] / 1000, 1e-5)
    n, mean, var, kurt = m.pooled()
    rmean, rvar, rkurt = ref_pooled(x)
    assert n == x.numel()
    assert mean == pytest.approx(rmean, rel=1e-6)
    assert var == pytest.approx(rvar, rel=1e-5)
    assert kurt == pytest.approx(rkurt, rel=1e-4)


def test_constant_channel_has_finite_kurtosis():
    x = torch.randn(100, 3, generator=torch.Generator().manual_seed(8))
    x[:, 1] = 2.5  # a dead channel: no spread at all
    kurt = Moments.of(x).kurtosis()
    assert torch.isfinite(kurt).all() and kurt[1] == 0


def test_merge_with_empty_is_identity():
    m = Moments.of(skewed((20, 3)))
    for merged in (empty_moments(3).merge(m), m.merge(empty_moments(3))):
        assert merged.n == m.n and torch.equal(merged.m4, m.m4)


def test_site_accumulator_streamed_in_uneven_chunks_equals_one_shot():
    b, t, c = 7, 19, 12
    x = skewed((b, t, c), seed=3)
    ids = torch.randint(0, 1000, (b, t), generator=torch.Generator().manual_seed(0))
    acc = SiteAccumulator(c)
    for lo, hi in ((0, 1), (1, 4), (4, 5), (5, 7)):
        acc.update(x[lo:hi], ids[lo:hi], window_index=lo)

    body, sink = x[:, 1:].reshape(-1, c), x[:, 0]
    every = x.reshape(-1, c)
    for got, want in (
        (acc.body, ref_moments(body)),
        (acc.sink, ref_moments(sink)),
        (acc.moments(include_sink=True), ref_moments(every)),
    ):
        assert got.n == want["n"]
        assert_rel(got.mean, want["mean"], 1e-6)
        assert_rel(got.m2, want["m2"], 1e-5)
        assert_rel(got.m3, want["m3"], 1e-4)
        assert_rel(got.m4, want["m4"], 1e-4)

    s = acc.scalars()
    for tag, part in (("", every), ("_nosink", body)):
        _, var, kurt = ref_pooled(part)
        tok = ref_token_kurtosis(part)
        assert s[f"var{tag}"] == pytest.approx(var, rel=1e-5)
        assert s[f"kurt_tensor{tag}"] == pytest.approx(kurt, rel=1e-4)
        assert s[f"kurt_token_mean{tag}"] == pytest.approx(float(tok.mean()), rel=1e-4)
        assert s[f"kurt_token_max{tag}"] == pytest.approx(float(tok.max()), rel=1e-4)
        assert s[f"absmax{tag}"] == float(part.abs().max())

    arrays = acc.tensors()
    assert torch.equal(arrays["absmax"], every.abs().amax(0))
    assert torch.equal(arrays["absmax_nosink"], body.abs().amax(0))
    assert_rel(arrays["kurt_channel"], ref_moments(every)["kurt"].float(), 1e-4)

    # Top tokens: the 8 largest-norm tokens of all windows, with their absmax, window, position and token id.
    norms = every.double().norm(dim=1)
    order = norms.topk(TOP_TOKENS).indices
    top = arrays["top_tokens"].double()
    assert top.shape == (TOP_TOKENS, 5)
    assert_rel(top[:, 0], norms[order], 1e-5)
    assert torch.equal(top[:, 1], every[order].abs().amax(1).double())
    assert torch.equal(top[:, 2], (order // t).double())
    assert torch.equal(top[:, 3], (order % t).double())
    assert torch.equal(top[:, 4], ids.reshape(-1)[order].double())
    # Fewer body tokens than the norm reservoir holds: the median is exact.
    assert s["median_token_norm"] == pytest.approx(float(body.double().norm(dim=1).median()), rel=1e-5)


# ---- the attention-sink split ----------------------------------------------------------------------------------


def test_huge_value_at_position_zero_shows_only_in_the_with_sink_views():
    b, t, c = 4, 16, 32
    x = torch.randn(b, t, c, generator=torch.Generator().manual_seed(4))
    x[:, 0, 5] = 1e4  # position 0 of every window: the sink
    acc = SiteAccumulator(c)
    acc.update(x, torch.zeros(b, t, dtype=torch.long), 0)
    s = acc.scalars()
    assert s["absmax"] == 1e4 and s["absmax_nosink"] < 10
    assert s["kurt_tensor"] > 50 and s["kurt_tensor_nosink"] == pytest.approx(3.0, abs=0.6)
    assert s["kurt_token_max"] > 20 and s["kurt_token_max_nosink"] < 10
    assert s["kurt_token_mean"] > s["kurt_token_mean_nosink"] + 1  # 4 of 64 tokens have kurtosis ~30
    assert s["var"] > 100 * s["var_nosink"]
    assert s["sink_norm_mean"] > 1e3 > 100 * s["median_token_norm"]
    arrays = acc.tensors()
    assert arrays["absmax"][5] == 1e4 and arrays["absmax_nosink"][5] < 10
    assert torch.all(arrays["top_tokens"][:b, 3] == 0)  # the b sink tokens lead the top-norm list
    rows = arrays["samples"]  # the last column flags sink rows
    assert torch.equal(rows[:, -1] == 1, rows[:, 5] == 1e4)


# ---- bounded reservoirs and memory -----------------------------------------------------------------------------


def test_reservoir_is_bounded_without_replacement_and_uniform_over_the_stream():
    cap, length, bins, trials = 32, 2000, 10, 100
    counts = torch.zeros(bins)
    chunks = [1, 13, 50, 200, 7, 300]
    for trial in range(trials):
        res, gen = _Reservoir(cap), torch.Generator().manual_seed(trial)
        start, i = 0, 0
        while start < length:
            size = min(chunks[i % len(chunks)], length - start)
            res.add(torch.arange(start, start + size, dtype=torch.float32).unsqueeze(1), gen)
            assert res.rows.shape[0] <= cap and res.keys.numel() == res.rows.shape[0]
            start, i = start + size, i + 1
        kept = res.rows[:, 0].long()
        assert kept.numel() == cap and kept.unique().numel() == cap  # full, no row twice
        counts += torch.bincount(kept * bins // length, minlength=bins).float()
    expected = cap * trials / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 27.9, counts  # the 99.9% point of chi-square with 9 degrees of freedom


def _state_bytes(acc: SiteAccumulator) -> int:
    total = 0
    for v in vars(acc).values():
        if isinstance(v, torch.Tensor):
            total += v.nelement() * v.element_size()
        elif isinstance(v, Moments):
            total += sum(t.nelement() * t.element_size() for t in (v.mean, v.m2, v.m3, v.m4))
        elif isinstance(v, _Reservoir):
            total += v.keys.nelement() * v.keys.element_size()
            total += 0 if v.rows is None else v.rows.nelement() * v.rows.element_size()
    return total


def test_accumulator_memory_stops_growing_at_its_caps():
    c, t = 16, 64
    acc = SiteAccumulator(c)
    g = torch.Generator().manual_seed(5)
    ids = torch.zeros(1, t, dtype=torch.long)
    for i in range(40):  # 40 * 63 body tokens > NORM_SAMPLE: every reservoir is full
        acc.update(torch.randn(1, t, c, generator=g), ids, i)
    full = _state_bytes(acc)
    for i in range(40, 120):
        acc.update(torch.randn(1, t, c, generator=g), ids, i)
    assert _state_bytes(acc) == full
    assert acc.norms.rows.shape == (NORM_SAMPLE, 1)
    assert acc.samples.rows.shape == (SAMPLE_ROWS, c + 1)
    assert acc.top.shape == (TOP_TOKENS, 5)
    assert acc.surface.shape == (min(t, SURFACE_TOKENS), c)
    assert acc.body.n == 120 * (t - 1) and acc.sink.n == 120


def test_surface_is_the_pooled_first_window_of_a_wide_site():
    c = 3000
    x = torch.randn(2, 80, c, generator=torch.Generator().manual_seed(6))
    acc = SiteAccumulator(c)
    acc.update(x, torch.zeros(2, 80, dtype=torch.long), 0)
    surface = acc.tensors()["surface"]
    assert surface.shape[0] == SURFACE_TOKENS and surface.shape[1] <= SURFACE_CHANNELS
    assert float(surface.float().max()) == pytest.approx(float(x[0, :SURFACE_TOKENS].abs().max()), rel=1e-2)


def test_pool_channels_keeps_every_maximum():
    c, k_max = 3000, 1024
    a = torch.rand(5, c, generator=torch.Generator().manual_seed(7))
    a[2, 1234] = 50.0
    pooled = pool_channels(a, k_max)
    k = -(-c // k_max)  # channels per bin
    assert pooled.shape == (5, -(-c // k)) and pooled.shape[1] <= k_max
    assert float(pooled.max()) == 50.0 and float(pooled[2, 1234 // k]) == 50.0
    for j in range(pooled.shape[1]):  # each bin is the max of its own channels
        assert torch.equal(pooled[:, j], a[:, j * k : (j + 1) * k].amax(1))
    narrow = torch.rand(3, 100)
    assert pool_channels(narrow, k_max) is narrow
