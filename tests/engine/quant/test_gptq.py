import pytest
import torch

from engine.quant.gptq import HessianAccumulator, gptq_quantize
from engine.quant.quantizers import quantize_weight, weight_scales


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def correlated_inputs(n: int = 1024, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs X [n, d] like LLM activations: strongly correlated channels (a mixing matrix whose rows
    decay from 1 to 0.01, so a few directions dominate) and three channels 20x larger than the rest."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d).unsqueeze(1)
    X = torch.randn(n, d, generator=g) @ mixing
    X[:, [3, d // 3, d - 5]] *= 20.0
    return X


def layer_and_hessian(out: int = 256, d: int = 128, seed: int = 0):
    W = torch.randn(out, d, generator=torch.Generator().manual_seed(seed + 1)) / d**0.5
    X = correlated_inputs(d=d, seed=seed)
    acc = HessianAccumulator(d)
    acc.add_batch(X)
    return W, X, acc.hessian


def output_error(X, W, Wq) -> float:
    return torch.linalg.norm(X @ W.T - X @ Wq.T).item()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn_on_layer_output(bits, group_size):
    W, X, H = layer_and_hessian()
    rtn = output_error(X, W, quantize_weight(W, bits, group_size))
    gptq = output_error(X, W, gptq_quantize(W, H, bits, group_size=group_size, block=48))
    assert gptq < 0.8 * rtn


@pytest.mark.parametrize("act_order, clip_search", [(True, False), (False, True), (True, True)])
def test_gptq_variants_beat_rtn(act_order, clip_search):
    W, X, H = layer_and_hessian(seed=2)
    for group_size in (None, 32):
        rtn = output_error(X, W, quantize_weight(W, 4, group_size, clip_search=clip_search))
        Wq = gptq_quantize(W, H, 4, group_size=group_size, clip_search=clip_search, act_order=act_order)
        assert output_error(X, W, Wq) < 0.8 * rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_lies_on_the_rtn_grid_without_groups(act_order):
    # Without groups the grid is fitted once on W, so every entry is scale_row * integer in [-maxq, maxq].
    W, _, H = layer_and_hessian()
    bits, maxq = 3, 3
    Wq = gptq_quantize(W, H, bits, act_order=act_order)
    q = Wq / weight_scales(W, bits)
    assert torch.allclose(q, q.round(), atol=1e-4)
    assert q.round().abs().max() <= maxq
    assert not torch.equal(Wq, quantize_weight(W, bits))  # the errors were propagated


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_groups_have_at_most_2b_minus_1_levels(act_order):
    W, _, H = layer_and_hessian(d=96)
    Wq = gptq_quantize(W, H, 3, group_size=32, act_order=act_order)
    for row in Wq[:16]:
        for group in row.split(32):
            assert group.unique().numel() <= 7


def test_gptq_with_diagonal_hessian_is_rtn():
    # No correlation between inputs: nothing to compensate, GPTQ reduces to round-to-nearest.
    W = torch.randn(32, 64)
    H = torch.diag(torch.rand(64) + 0.5)
    assert torch.allclose(gptq_quantize(W, H, 4), quantize_weight(W, 4))
    assert torch.allclose(gptq_quantize(W, H, 4, group_size=16), quantize_weight(W, 4, 16))
    assert torch.allclose(gptq_quantize(W, H, 4, group_size=16, act_order=True), quantize_weight(W, 4, 16))


def test_gptq_block_size_does_not_change_result():
    W, _, H = layer_and_hessian(d=96)
    reference = gptq_quantize(W, H, 4, group_size=32, block=96)
    for block in (1, 20, 128):
        assert torch.allclose(gptq_quantize(W, H, 4, group_size=32, block=block), reference, atol=1e-5)


def test_gptq_dead_columns():
    W, X, _ = layer_and_hessian(d=64)
    X[:, [5, 9]] = 0.0  # channels that never fire
    acc = HessianAccumulator(64)
    acc.add_batch(X)
    Wq = gptq_quantize(W, acc.hessian, 4)
    assert torch.isfinite(Wq).all()
    assert (Wq[:, [5, 9]] == 0).all()
    assert output_error(X, W, Wq) < output_error(X, W, quantize_weight(W, 4))


def test_gptq_bits_16_and_dtype():
    W, _, H = layer_and_hessian(d=64)
    assert torch.equal(gptq_quantize(W, H, 16), W)
    Wq = gptq_quantize(W.to(torch.bfloat16), H, 4)
    assert Wq.dtype == torch.bfloat16 and Wq.shape == W.shape


def test_gptq_rejects_bad_inputs():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"H must be \[in, in\]"):
        gptq_quantize(W, torch.eye(8), 4)
    with pytest.raises(ValueError, match="2-D weight"):
        gptq_quantize(torch.randn(16), torch.eye(16), 4)
    with pytest.raises(ValueError, match="bits must be between 2 and 16, got 17"):
        gptq_quantize(W, torch.eye(16), 17)
    with pytest.raises(ValueError, match="damp must be positive"):
        gptq_quantize(W, torch.eye(16), 4, damp=0.0)
    with pytest.raises(ValueError, match="not positive definite"):
        gptq_quantize(W, -torch.eye(16), 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hessian_accumulator_is_running_mean_of_2_xtx(dtype):
    X = torch.randn(2 * 5 + 7, 12, dtype=torch.float64)
    acc = HessianAccumulator(12, dtype=dtype)
    acc.add_batch(X[:10].reshape(2, 5, 12).float())  # [batch, seq, in]
    acc.add_batch(X[10:].float())  # [tokens, in]
    assert acc.num_samples == 17
    assert acc.hessian.dtype == dtype
    expected = 2 * X.float().double().T @ X.float().double() / 17
    assert torch.allclose(acc.hessian.double(), expected, atol=1e-5)


def test_hessian_accumulator_checks():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="add_batch"):
        _ = acc.hessian
    with pytest.raises(ValueError, match="end in 4 features"):
        acc.add_batch(torch.randn(3, 5))
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        HessianAccumulator(4, dtype=torch.float16)
