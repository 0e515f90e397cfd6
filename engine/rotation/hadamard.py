"""Hadamard matrices for rotations (QuaRot, SpinQuant): constructions, fast application, random variants.

Every public matrix is normalised, `H @ H.T = I` (entries +-1/sqrt(n)), float64 unless asked otherwise.
A width n is built as `H = H_K (x) H_P` (Kronecker, H_K the left factor) with `n = K * P`, `P = 2^m`
Sylvester and `H_K` a Paley matrix (K = 1 when n is a power of two):
- Paley I:  q a prime power, q = 3 mod 4, order q + 1;
- Paley II: q a prime power, q = 1 mod 4, order 2(q + 1).
Prime powers q = p^k use GF(p^k) arithmetic (e.g. 11008 = 344 * 32 with 344 = 7^3 + 1), so no matrix is stored.
Index convention of the Kronecker order: position i = a * P + b, a in [0, K), b in [0, P).
"""

from __future__ import annotations

import functools
import math

import torch

Seed = int | torch.Generator | None


class UnsupportedWidthError(ValueError):
    """No Hadamard matrix of this width can be built here; the message says why and what would work."""


# ---------------------------------------------------------------- number theory and GF(p^k)


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p^k and p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _poly_rem(a: list[int], b: list[int], p: int) -> list[int]:
    """Remainder of a by monic b over GF(p); coefficients low to high."""
    a = [c % p for c in a]
    for shift in range(len(a) - len(b), -1, -1):
        lead = a[shift + len(b) - 1]
        if lead:
            for i, c in enumerate(b):
                a[shift + i] = (a[shift + i] - lead * c) % p
    return a[: len(b) - 1]


def _monic_polys(p: int, degree: int):
    """All monic polynomials of this degree over GF(p), coefficients low to high."""
    for code in range(p**degree):
        yield [(code // p**i) % p for i in range(degree)] + [1]


@functools.cache
def _irreducible_poly(p: int, k: int) -> tuple[int, ...]:
    """The first monic irreducible polynomial of degree k over GF(p) (trial division by lower degrees)."""
    for f in _monic_polys(p, k):
        if f[0] == 0:
            continue  # divisible by x
        if all(any(_poly_rem(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic_polys(p, d)):
            return tuple(f)
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # cannot happen


def _field_digits(p: int, k: int) -> torch.Tensor:
    """(q, k) base-p digits of the element codes 0..q-1; code c is the polynomial sum_i digit_i x^i."""
    codes = torch.arange(p**k)
    return torch.stack([(codes // p**i) % p for i in range(k)], dim=1)


def _quadratic_character(p: int, k: int) -> torch.Tensor:
    """(q,) chi over GF(p^k) by element code: 0 at 0, +1 on nonzero squares, -1 elsewhere."""
    q, digits = p**k, _field_digits(p, k)
    f = _irreducible_poly(p, k)
    prod = torch.zeros(q, 2 * k - 1, dtype=torch.long)  # (q, 2k-1) coefficients of x * x
    for i in range(k):
        for j in range(k):
            prod[:, i + j] += digits[:, i] * digits[:, j]
    for deg in range(2 * k - 2, k - 1, -1):  # x^deg = -x^(deg-k) * sum_{i<k} f_i x^i  (mod f)
        lead = prod[:, deg] % p
        for i in range(k):
            prod[:, deg - k + i] -= lead * f[i]
    square_codes = ((prod[:, :k] % p) * p ** torch.arange(k)).sum(dim=1)
    chi = -torch.ones(q, dtype=torch.long)
    chi[square_codes] = 1
    chi[0] = 0
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) int8 Q[i, j] = chi(a_i - a_j) over GF(q); antisymmetric for q = 3 mod 4, symmetric for 1 mod 4."""
    p, k = _prime_power(q)
    digits, chi = _field_digits(p, k), _quadratic_character(p, k).to(torch.int8)
    out = torch.empty(q, q, dtype=torch.int8)
    rows = max(1, 2**22 // q)  # row chunks keep the int64 codes to ~32 MB at any q
    for start in range(0, q, rows):
        block = digits[start : start + rows]
        diff_codes = torch.zeros(block.shape[0], q, dtype=torch.long)
        for i in range(k):  # subtraction is digit-wise mod p
            diff_codes += ((block[:, None, i] - digits[None, :, i]) % p) * p**i
        out[start : start + rows] = chi[diff_codes]
    return out


# ---------------------------------------------------------------- unnormalised +-1 constructions (int8)


def _sylvester_pm1(n: int) -> torch.Tensor:
    """(n, n) Sylvester matrix, H[i, j] = (-1)^popcount(i & j); symmetric."""
    h = torch.ones(1, 1, dtype=torch.int8)
    h2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int8)
    while h.shape[0] < n:
        h = torch.kron(h2, h)
    return h


def _check_paley_q(q: int, residue: int, name: str, order: str) -> None:
    if not isinstance(q, int) or isinstance(q, bool) or _prime_power(q) is None or q % 4 != residue:
        raise ValueError(
            f"{name} needs a prime power q = {residue} mod 4 (order {order}); got q = {q!r}. "
            f"Use hadamard_matrix(n) to pick a construction for a width n."
        )


def _paley1_pm1(q: int) -> torch.Tensor:
    """(q+1, q+1) Paley I: I + [[0, 1^T], [-1, Q]]."""
    h = torch.empty(q + 1, q + 1, dtype=torch.int8)
    h[0, 1:], h[1:, 0], h[1:, 1:] = 1, -1, _jacobsthal(q)
    h.diagonal().fill_(1)  # Q has zeros on its diagonal (chi(0) = 0)
    return h


def _paley2_pm1(q: int) -> torch.Tensor:
    """(2(q+1), 2(q+1)) Paley II: conference C = [[0, 1^T], [1, Q]]; 0 -> [[1,-1],[-1,-1]], +-1 -> +-H_2."""
    c = torch.empty(q + 1, q + 1, dtype=torch.int8)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    c[0, 0] = 0
    h = torch.kron(c, torch.tensor([[1, 1], [1, -1]], dtype=torch.int8))
    zero_block = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int8)
    for r in range(2):  # the 2x2 diagonal blocks, where C is 0
        for s in range(2):
            h[r::2, s::2].diagonal().fill_(zero_block[r, s].item())
    return h


def _paley_source(k: int) -> tuple[int, int] | None:
    """(1, q) or (2, q) if order k has a Paley I or Paley II construction (Paley I preferred), else None."""
    if _prime_power(k - 1) is not None and (k - 1) % 4 == 3:
        return 1, k - 1
    if k % 2 == 0 and _prime_power(k // 2 - 1) is not None and (k // 2 - 1) % 4 == 1:
        return 2, k // 2 - 1
    return None


_CACHED_FACTOR_MAX = 4096  # int8 K x K up to 16 MB each; larger factors are rebuilt on each call


def _factor_pm1(k: int) -> torch.Tensor:
    """(k, k) int8 +-1 H_K for a K that decompose() returns. Do not mutate: it may be cached."""
    return _cached_factor_pm1(k) if k <= _CACHED_FACTOR_MAX else _build_factor_pm1(k)


@functools.lru_cache(maxsize=32)
def _cached_factor_pm1(k: int) -> torch.Tensor:
    return _build_factor_pm1(k)


def _build_factor_pm1(k: int) -> torch.Tensor:
    if k == 1:
        return torch.ones(1, 1, dtype=torch.int8)
    kind, q = _paley_source(k)
    return _paley1_pm1(q) if kind == 1 else _paley2_pm1(q)


# ---------------------------------------------------------------- widths


def _find_decomposition(n: int) -> tuple[int, int] | None:
    if n & (n - 1) == 0:
        return 1, n
    power = (n & -n).bit_length() - 1
    odd = n >> power
    for j in range(2, power + 1):  # smallest K = odd * 2^j first, i.e. the largest power-of-two part
        if _paley_source(odd << j) is not None:
            return odd << j, 1 << (power - j)
    return None


def _nearest_supported(n: int, step: int) -> int | None:
    m = n + step
    while m >= 1:
        if _find_decomposition(m) is not None:
            return m
        m += step
    return None


def _unsupported_message(n: int) -> str:
    power = n & -n
    odd = n // power
    if power < 4:
        why = f"a Hadamard matrix of order n > 2 needs n to be a multiple of 4 ({n} = {odd} * {power})"
    else:
        candidates = ", ".join(str(odd * 2**j) for j in range(2, power.bit_length()))
        why = (
            f"{n} = {odd} * {power} and none of the K factors {candidates} has a known construction "
            f"(Paley I: q + 1, Paley II: 2(q + 1), q a prime power)"
        )
    below, above = _nearest_supported(n, -1), _nearest_supported(n, +1)
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    block = max(d for d in divisors if _find_decomposition(d) is not None)
    return (
        f"no Hadamard matrix of width {n}: {why}. Nearest supported widths: {below} and {above}; "
        f"or use block_diagonal_hadamard({n}, block={block}) (the largest supported block dividing {n}; "
        f"the largest power of two dividing it is {power})."
    )


def decompose(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K * 2^m and H_K constructible (K = 1 or a Paley order), with the smallest such K.

    K is a few hundred at most for the model widths, but can reach n (e.g. 6608 = 6607 + 1): building H_K then
    costs K^2 and apply_hadamard n * K per row.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UnsupportedWidthError(f"Hadamard width must be a positive int; got {n!r}.")
    found = _find_decomposition(n)
    if found is None:
        raise UnsupportedWidthError(_unsupported_message(n))
    return found


def supported(n: int) -> bool:
    """Whether hadamard_matrix(n) and apply_hadamard on width n work."""
    try:
        decompose(n)
    except UnsupportedWidthError:
        return False
    return True


# ---------------------------------------------------------------- normalised matrices


def sylvester(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) normalised Sylvester Hadamard matrix, n = 2^m; symmetric."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n & (n - 1):
        raise UnsupportedWidthError(f"sylvester needs n = 2^m; got {n!r}. Use hadamard_matrix(n) for n = K * 2^m.")
    return _sylvester_pm1(n).to(dtype) / math.sqrt(n)


def paley1(q: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(q+1, q+1) normalised Paley I matrix, q a prime power with q = 3 mod 4."""
    _check_paley_q(q, 3, "paley1", "q + 1")
    return _paley1_pm1(q).to(dtype) / math.sqrt(q + 1)


def paley2(q: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(2(q+1), 2(q+1)) normalised Paley II matrix, q a prime power with q = 1 mod 4."""
    _check_paley_q(q, 1, "paley2", "2(q + 1)")
    return _paley2_pm1(q).to(dtype) / math.sqrt(2 * (q + 1))


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) normalised H_K (x) H_(2^m) with (K, 2^m) = decompose(n)."""
    k, p = decompose(n)
    return torch.kron(_factor_pm1(k).to(dtype), _sylvester_pm1(p).to(dtype)) / math.sqrt(n)


def block_diagonal_hadamard(n: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) block-diagonal matrix of n / block copies of hadamard_matrix(block)."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 1 or not isinstance(n, int) or n % block:
        raise ValueError(f"block must be a positive int dividing n; got n = {n!r}, block = {block!r}.")
    return torch.kron(torch.eye(n // block, dtype=dtype), hadamard_matrix(block, dtype))


def random_block_hadamard(n: int, block: int, seed: Seed = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) block-diagonal Hadamard of `block` x `block` blocks with random signs (BRQ, QuTLASS): orthogonal, and
    when n is not a multiple of block the last block is the (supported) remainder, e.g. 576 = 4 x 128 + 64."""
    if not isinstance(block, int) or isinstance(block, bool) or block < 2:
        raise ValueError(f"block must be an int >= 2; got {block!r}.")
    sizes = [block] * (n // block) + ([n % block] if n % block else [])
    if not supported(sizes[-1]):
        raise ValueError(
            f"a block Hadamard of {block} does not fit width {n}: the last block would be "
            f"{sizes[-1]} wide, a size with no Hadamard matrix; choose a block that divides {n}"
        )
    h = torch.block_diag(*[hadamard_matrix(b, dtype) for b in sizes])
    signs = torch.randint(0, 2, (n,), generator=_generator(seed)) * 2 - 1
    return h * signs.to(dtype)


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    elif isinstance(seed, int) and not isinstance(seed, bool):
        gen.manual_seed(seed)
    else:
        raise ValueError(f"seed must be None, an int or a torch.Generator; got {seed!r}.")
    return gen


def random_hadamard(n: int, seed: Seed = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) H @ diag(s) with random signs s (QuaRot); orthogonal."""
    h = hadamard_matrix(n, dtype)
    signs = torch.randint(0, 2, (n,), generator=_generator(seed)) * 2 - 1
    return h * signs.to(dtype)  # column j times s_j


def random_orthogonal(n: int, seed: Seed = None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(n, n) Haar-random orthogonal matrix, seeded like random_hadamard (sampled by engine.rotation.orthogonal)."""
    from engine.rotation.orthogonal import random_orthogonal as haar

    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}.")
    return haar(n, generator=_generator(seed), dtype=dtype)


# ---------------------------------------------------------------- fast application


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) over the last dim (2^m): y @ H_(2^m)."""
    lead, size = y.shape[:-1], y.shape[-1]
    h = 1
    while h < size:  # butterfly pairing indices i and i ^ h; (..., size/2h, 2, h)
        pairs = y.reshape(*lead, size // (2 * h), 2, h)
        a, b = pairs[..., 0, :], pairs[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).reshape(*lead, size)
        h *= 2
    return y


def apply_hadamard(x: torch.Tensor, n: int | None = None, *, transpose: bool = False) -> torch.Tensor:
    """x @ H (or x @ H.T) over the last dim with H = hadamard_matrix(n), without building H.

    O(d log d) FWHT over the 2^m part plus a K x K matmul. n defaults to d = x.shape[-1]; a smaller n
    dividing d transforms each block of n values, i.e. x @ block_diagonal_hadamard(d, n).
    float16/bfloat16 inputs are computed in float32 and returned in their own dtype.
    """
    if not x.is_floating_point():
        raise ValueError(f"apply_hadamard needs a floating-point tensor; got {x.dtype}.")
    d = x.shape[-1]
    n = d if n is None else n
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or d % n:
        raise ValueError(f"n must be a positive int dividing the last dim {d}; got {n!r}.")
    k, p = decompose(n)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    # (..., d/n, K, P): position a * P + b inside each block of n, as in H_K (x) H_P
    y = _fwht(x.to(compute).reshape(*x.shape[:-1], d // n, k, p))
    if k > 1:
        h_k = _factor_pm1(k).to(device=x.device, dtype=compute)
        # x @ (H_K (x) H_P) = H_K^T X H_P on the (K, P) view; the transpose uses H_K X H_P
        y = (h_k if transpose else h_k.T) @ y
    return (y / math.sqrt(n)).reshape(x.shape).to(x.dtype)
