"""engine.quant.gptq.gptq_quantize against a slow textbook GPTQ loop written here (Frantar et al. 2022).

The reference works in float64 on the explicit inverse Hessian, one column at a time (no blocks, no lazy batch
updates, no Cholesky factor): H <- H + damp * mean(diag H) * I, Hinv = H^-1, and for each column j in turn
    q_j = quant(w_j),  err = (w_j - q_j) / Hinv[j, j],  w[:, later] -= err * Hinv[j, later],
    Hinv <- Hinv - Hinv[:, j] Hinv[j, :] / Hinv[j, j]          (drop j: the inverse of H without row/col j).
Its grid is written here too, from engine.quant.quantizers' documented convention: symmetric per row,
scale = absmax / (2^(b-1) - 1) (1 for an all-zero row), q = scale * clamp(round(w / scale), -maxq, maxq).
Which weights a grid is fitted on follows gptq_quantize's docstring: whole rows once (no groups); each group when
the loop reaches its first column, on the weights as updated so far (groups); once per contiguous group on the
original weights (act_order + groups, "static groups"). Dead columns (diag H = 0) are zeroed and get diag H = 1.

The engine runs in float32, so values are compared with atol = 1e-4 * max|W|, and the integer codes (on the
reference's scales) must agree exactly: the data are checked to hold no near-tie of the rounding (TIE_MARGIN), so
a float32 vs float64 difference cannot flip a code, and any code that differs is a real disagreement.
"""

import pytest
import torch

from engine.quant.gptq import gptq_quantize

OUT, IN, N = 16, 64, 256
# Every reference rounding must be at least this far (in grid steps) from a .5 tie. The engine's float32 drift
# from the float64 reference is below 1.5e-5 grid steps on these layers, so no code can flip by rounding noise.
TIE_MARGIN = 5e-5


def make_layer(seed: int, dead: tuple = ()):
    """W [out, in] and H = X X^T for inputs X [in, n] with correlated channels and three 15x outlier channels;
    the channels in `dead` are always zero (diag H = 0)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    mixing = torch.randn(IN, IN, generator=g, dtype=torch.float64) * torch.logspace(0, -1.5, IN, dtype=torch.float64)
    X = mixing @ torch.randn(IN, N, generator=g, dtype=torch.float64)
    X[[5, 20, 41]] *= 15.0
    X[list(dead)] = 0.0
    return W.float(), (X @ X.T).float()


def row_scale(cols: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row symmetric scale [out] of the columns cols [out, k]: absmax / maxq, 1 for an all-zero row."""
    scale = cols.abs().amax(dim=1) / (2 ** (bits - 1) - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple:
    """(dequantized w, distance of w / scale to the nearest rounding tie) for one column w [out]."""
    maxq = 2 ** (bits - 1) - 1
    x = w / scale
    frac = x - torch.floor(x)
    unclamped = (x.abs() < maxq).all()  # a clamped value cannot flip
    margin = (frac - 0.5).abs().min().item() if unclamped else float("inf")
    return scale * torch.clamp(torch.round(x), -maxq, maxq), margin


def reference_gptq(W, H, bits, group_size=None, damp=0.01, act_order=False):
    """Textbook GPTQ in float64; returns (Q, per-entry scale, smallest rounding-tie margin)."""
    W = W.double().clone()
    H = H.double().clone()
    n = W.shape[1]
    for j in range(n):
        if H[j, j] == 0:  # dead input channel
            H[j, j] = 1.0
            W[:, j] = 0.0
    H = H + damp * torch.diagonal(H).mean() * torch.eye(n, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    order = list(range(n))
    if act_order:
        order = sorted(range(n), key=lambda j: -H[j, j].item())  # decreasing diag H (stable for ties)
    if group_size is None:
        fixed_scale = row_scale(W, bits)
    elif act_order:
        static = {g: row_scale(W[:, g : g + group_size], bits) for g in range(0, n, group_size)}

    Q = torch.zeros_like(W)
    S = torch.zeros_like(W)
    margin = float("inf")
    for t, j in enumerate(order):
        if group_size is None:
            scale = fixed_scale
        elif act_order:
            scale = static[j - j % group_size]
        elif j % group_size == 0:
            scale = row_scale(W[:, j : j + group_size], bits)  # the group as updated so far
        Q[:, j], m = round_to_grid(W[:, j], scale, bits)
        S[:, j] = scale
        margin = min(margin, m)
        d = Hinv[j, j]
        err = (W[:, j] - Q[:, j]) / d
        later = order[t + 1 :]
        W[:, later] -= err[:, None] * Hinv[j, later][None, :]
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d
    return Q, S, margin


def code_agreement(Q_engine, Q_ref, S_ref) -> float:
    """Fraction of entries whose integer code (on the reference's scales) is the same."""
    return (torch.round(Q_engine.double() / S_ref) == torch.round(Q_ref / S_ref)).double().mean().item()


def assert_matches_reference(W, Q_engine, ref):
    Q_ref, S_ref, margin = ref
    assert margin > TIE_MARGIN, f"test data has a near-tie ({margin:.1e}); pick another seed"
    assert Q_engine.dtype == W.dtype and Q_engine.shape == W.shape
    assert code_agreement(Q_engine, Q_ref, S_ref) == 1.0
    atol = 1e-4 * W.abs().max().item()
    diff = (Q_engine.double() - Q_ref).abs().max().item()
    assert diff <= atol, f"max |engine - reference| = {diff:.2e} > {atol:.2e}"


CASES = [  # (bits, group_size, act_order, block)
    (4, None, False, 128),
    (4, None, False, 8),
    (3, None, False, 8),
    (4, 16, False, 128),
    (4, 16, False, 8),
    (4, 16, False, 12),  # a group straddles two blocks: its grid needs the pending lazy update
    (4, 24, False, 16),  # ragged last group (64 = 24 + 24 + 16)
    (4, None, True, 128),
    (4, None, True, 8),
    (4, 16, True, 128),
    (4, 16, True, 12),
    (3, 24, True, 8),
]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bits,group_size,act_order,block", CASES)
def test_gptq_matches_textbook_loop(seed, bits, group_size, act_order, block):
    W, H = make_layer(seed)
    Q = gptq_quantize(W, H, bits, group_size=group_size, block=block, act_order=act_order)
    assert_matches_reference(W, Q, reference_gptq(W, H, bits, group_size, act_order=act_order))


@pytest.mark.parametrize("group_size,act_order", [(None, False), (16, False), (16, True)])
def test_gptq_dead_columns_match_textbook_loop(group_size, act_order):
    W, H = make_layer(2, dead=(0, 17, 63))
    Q = gptq_quantize(W, H, 4, group_size=group_size, block=8, act_order=act_order)
    assert (Q[:, [0, 17, 63]] == 0).all()
    assert_matches_reference(W, Q, reference_gptq(W, H, 4, group_size, act_order=act_order))


def test_gptq_damp_changes_result_and_reference_follows():
    W, H = make_layer(3)
    low = gptq_quantize(W, H, 4, damp=0.01, block=8)
    high = gptq_quantize(W, H, 4, damp=0.5, block=8)
    ref_low = reference_gptq(W, H, 4, damp=0.01)
    ref_high = reference_gptq(W, H, 4, damp=0.5)
    assert_matches_reference(W, low, ref_low)
    assert_matches_reference(W, high, ref_high)
    # damp matters, and the comparison sees it: the wrong damp's reference disagrees on many codes.
    assert (low != high).double().mean().item() > 0.05
    assert code_agreement(low, ref_high[0], ref_high[1]) < 0.95
    with pytest.raises(AssertionError):
        assert_matches_reference(W, low, ref_high)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_output_error_below_rtn(seed):
    W, H = make_layer(seed)
    W64, H64 = W.double(), H.double()
    scale = row_scale(W64, 4)[:, None]
    rtn = scale * torch.clamp(torch.round(W64 / scale), -7, 7)
    Q = gptq_quantize(W, H, 4, block=8).double()

    def proxy_loss(Wq):  # tr((W - Q) H (W - Q)^T) = ||(W - Q) X||_F^2
        E = W64 - Wq
        return torch.trace(E @ H64 @ E.T).item()

    assert proxy_loss(Q) < 0.8 * proxy_loss(rtn)
