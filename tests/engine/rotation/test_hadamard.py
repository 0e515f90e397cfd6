import math

import pytest
import torch

from engine.rotation.hadamard import (
    UnsupportedWidthError,
    apply_hadamard,
    block_diagonal_hadamard,
    decompose,
    hadamard_matrix,
    paley1,
    paley2,
    random_hadamard,
    random_orthogonal,
    supported,
    sylvester,
)

# hidden, intermediate and head_dim widths of SmolLM2-135M, Llama-2/3, Mistral 7B, Qwen2 0.5B/1.5B/7B
MODEL_WIDTHS = sorted(
    {
        576,
        1536,
        64,
        4096,
        5120,
        8192,
        11008,
        13824,
        28672,
        128,
        14336,
        896,
        3584,
        4864,
        8960,
        18944,
    }
)
# widths whose full matrix is cheap to multiply out in a test (n^3 flops)
CHEAP_MODEL_WIDTHS = [n for n in MODEL_WIDTHS if n <= 1536]
# every supported width up to 32768 whose K factor is at most 1024 (663 widths: all supported n <= 1024,
# 302 of the 454 supported multiples of 64, every model width). A larger K costs K^2 to build; one is tested below.
SWEEP_WIDTHS = [n for n in range(1, 32769) if supported(n) and decompose(n)[0] <= 1024]
# multiples of 4 for which no Paley I/II factor exists (92, 156, 172 are Williamson-type orders)
UNSUPPORTED_WIDTHS = [6, 10, 30, 92, 116, 156, 172, 3776, 4672, 32576]


def max_orthogonality_error(h: torch.Tensor) -> float:
    return (h @ h.T - torch.eye(h.shape[0], dtype=h.dtype)).abs().max().item()


def test_model_widths_are_supported_with_expected_factors():
    assert all(supported(n) for n in MODEL_WIDTHS)
    assert decompose(576) == (36, 16)  # Paley II, q = 17
    assert decompose(1536) == (12, 128)  # Paley I, q = 11
    assert decompose(11008) == (344, 32)  # Paley I over GF(7^3): H_172 has no Paley construction
    assert decompose(14336) == (28, 512)
    assert decompose(4096) == (1, 4096)
    for n in SWEEP_WIDTHS:
        k, p = decompose(n)
        assert k * p == n and p & (p - 1) == 0
        # the largest power of two: no K / 2^i would do (if it were supported, its own K would divide n)
        assert k == 1 or not any(supported(k >> i) for i in range(1, (k & -k).bit_length()))


@pytest.mark.parametrize("n", sorted({decompose(n)[0] for n in MODEL_WIDTHS} - {1}))
def test_every_model_k_factor_is_orthogonal_with_entries_pm_one_over_sqrt_k(n):
    h = hadamard_matrix(n)
    assert decompose(n) == (n, 1)
    assert max_orthogonality_error(h) < 1e-10
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)


@pytest.mark.parametrize("q", [3, 7, 11, 19, 27, 43, 107, 139, 243, 343])
def test_paley1_including_prime_power_fields(q):
    h = paley1(q)
    assert h.shape == (q + 1, q + 1) and max_orthogonality_error(h) < 1e-10
    assert torch.allclose(h.abs() * math.sqrt(q + 1), torch.ones_like(h), rtol=0, atol=1e-12)


@pytest.mark.parametrize("q", [5, 9, 13, 17, 25, 37, 49, 73, 81, 125])
def test_paley2_including_prime_power_fields(q):
    h = paley2(q)
    assert h.shape == (2 * q + 2, 2 * q + 2) and max_orthogonality_error(h) < 1e-10
    assert torch.allclose(h.abs() * math.sqrt(2 * q + 2), torch.ones_like(h), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [(paley1, 13), (paley1, 15), (paley1, 1), (paley2, 11), (paley2, 21), (paley2, 2.0)])
def test_paley_rejects_wrong_q(bad):
    constructor, q = bad
    with pytest.raises(ValueError, match="prime power"):
        constructor(q)


def test_sylvester_is_symmetric_orthogonal_and_rejects_non_powers_of_two():
    h = sylvester(256)
    assert torch.equal(h, h.T) and max_orthogonality_error(h) < 1e-10
    with pytest.raises(UnsupportedWidthError, match="12"):
        sylvester(12)


@pytest.mark.parametrize("n", CHEAP_MODEL_WIDTHS + [12, 20, 52, 100, 344, 688])
def test_full_matrix_orthogonal_entries_and_apply_matches(n):
    h = hadamard_matrix(n)
    assert max_orthogonality_error(h) < 1e-10
    assert torch.allclose(h.abs(), torch.full_like(h, 1 / math.sqrt(n)), rtol=0, atol=1e-15)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(apply_hadamard(x), x @ h, rtol=0, atol=1e-12)
    assert torch.allclose(apply_hadamard(x, transpose=True), x @ h.T, rtol=0, atol=1e-12)


def test_apply_matches_matrix_for_every_supported_width_up_to_256():
    for n in [n for n in range(1, 257) if supported(n)]:
        x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
        assert torch.allclose(apply_hadamard(x), x @ hadamard_matrix(n), rtol=0, atol=1e-12), n


@pytest.mark.slow
def test_apply_preserves_norm_and_inverts_on_every_swept_width():
    gen = torch.Generator().manual_seed(0)
    for n in SWEEP_WIDTHS:
        x = torch.randn(2, n, dtype=torch.float64, generator=gen)
        y = apply_hadamard(x)
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0), n
        assert torch.allclose(apply_hadamard(y, transpose=True), x, rtol=0, atol=1e-10), n
        assert n == 1 or not torch.allclose(y, x, atol=1e-3), n  # it did transform


@pytest.mark.parametrize("n", [2044, 6608])  # Paley II q = 1021; Paley I q = 6607 (6608 = 413 * 16)
def test_large_k_factor_preserves_norm_and_inverts(n):
    # no smaller K works for these widths, so H_K is the whole n x n Paley matrix
    assert decompose(n) == (n, 1)
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = apply_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)
    assert torch.allclose(apply_hadamard(y, transpose=True), x, rtol=0, atol=1e-10)


def test_apply_with_smaller_n_is_block_diagonal_and_keeps_low_precision_dtype():
    x = torch.randn(4, 5, 3 * 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = x @ block_diagonal_hadamard(3 * 64, 64)
    assert torch.allclose(apply_hadamard(x, 64), expected, rtol=0, atol=1e-12)
    half = apply_hadamard(x[0].to(torch.bfloat16), 64)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.double(), expected[0], atol=0.05)
    with pytest.raises(ValueError, match="dividing"):
        apply_hadamard(x, 100)
    with pytest.raises(ValueError, match="floating"):
        apply_hadamard(torch.ones(4, dtype=torch.long))


def test_block_diagonal_hadamard_structure():
    h = block_diagonal_hadamard(48, 12)
    assert max_orthogonality_error(h) < 1e-10
    assert torch.equal(h[12:24, 12:24], hadamard_matrix(12)) and torch.all(h[:12, 12:] == 0)
    with pytest.raises(ValueError, match="dividing"):
        block_diagonal_hadamard(48, 7)
    with pytest.raises(UnsupportedWidthError, match="6"):
        block_diagonal_hadamard(48, 6)


def test_random_hadamard_orthogonal_signed_and_seeded():
    a, b = random_hadamard(576, seed=3), random_hadamard(576, seed=3)
    assert torch.equal(a, b) and max_orthogonality_error(a) < 1e-10
    assert not torch.equal(a, random_hadamard(576, seed=4))
    signs = (a / hadamard_matrix(576))[0]  # H @ diag(s): each column of H times +-1
    assert torch.allclose(signs.abs(), torch.ones(576, dtype=torch.float64))
    assert 0 < (signs > 0).sum() < 576
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(random_hadamard(64, seed=g1), random_hadamard(64, seed=g2))


@pytest.mark.slow
def test_random_orthogonal_orthogonal_seeded_and_sign_fixed():
    q = random_orthogonal(200, seed=5)
    assert max_orthogonality_error(q) < 1e-10 and torch.equal(q, random_orthogonal(200, seed=5))
    assert not torch.equal(q, random_orthogonal(200, seed=6))
    assert random_orthogonal(8, seed=1, dtype=torch.float32).dtype == torch.float32
    # Haar: Q[0, 0] is symmetric about 0 (raw Householder QR makes it one-signed)
    corner = torch.tensor([random_orthogonal(3, seed=s)[0, 0].item() for s in range(400)])
    assert corner.mean().abs() < 0.15 and 0.1 < (corner > 0).float().mean() < 0.9


@pytest.mark.parametrize("n", UNSUPPORTED_WIDTHS)
def test_unsupported_widths_raise_with_width_reason_and_alternatives(n):
    assert not supported(n)
    with pytest.raises(UnsupportedWidthError) as info:
        hadamard_matrix(n)
    message = str(info.value)
    assert f"width {n}:" in message and "block_diagonal_hadamard" in message
    assert ("multiple of 4" in message) == (n % 4 != 0)
    below, above = (int(w) for w in message.split("Nearest supported widths: ")[1].split(";")[0].split(" and "))
    assert below < n < above and supported(below) and supported(above)
    assert all(not supported(m) for m in range(below + 1, above) if m != n)
    with pytest.raises(UnsupportedWidthError, match=str(n)):
        apply_hadamard(torch.zeros(2, n))


@pytest.mark.parametrize("bad", [0, -8, 64.0, True])
def test_non_positive_int_widths_rejected(bad):
    assert not supported(bad)
    with pytest.raises(UnsupportedWidthError, match="positive int"):
        decompose(bad)
