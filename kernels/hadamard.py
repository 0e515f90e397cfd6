"""Online Hadamard transforms `x @ H_n` (normalised) for the benchmark and for GPU users of R3/R4.

Two backends, reported by `backend()`:
- "fast_hadamard_transform": Tri Dao's CUDA package (requirements-gpu.txt), used for the power-of-two part;
- "torch": our own, a Sylvester H_{2^m} split into Kronecker factors of at most 128
  (H_{2^a} (x) H_{2^b} = H_{2^(a+b)}), each applied as one small matmul along its axis.
Widths n = K * 2^m use the engine's matrices: `H_n = H_K (x) H_{2^m}` with `(K, 2^m) =
engine.rotation.hadamard.decompose(n)` (11008 = 344 * 32, 14336 = 28 * 512)
and `H_K = engine.rotation.hadamard.hadamard_matrix(K)`;
x [..., n] is viewed as [..., K, 2^m], transformed over the 2^m axis, then multiplied by H_K over the K axis.
The package's own 12N/20N/28N kernels are never used: their H_K differ from the engine's tables (BRIEF.md),
so the offline fusion would not match.

`hadamard_transform_padded` is the plain package call on a non-power-of-two width: it zero-pads to the next power
of two and truncates, which is NOT an orthogonal transform of n values; it exists only as the benchmark's
"FHT (padded)" row, the number the FLRot paper compares against.
"""

from __future__ import annotations

import functools
import importlib
import math

import torch

MAX_FACTOR_LOG2 = 7  # Sylvester factors of at most 128 x 128 per matmul


def _fht_package():
    try:
        return importlib.import_module("fast_hadamard_transform")
    except ImportError:
        return None


def backend() -> str:
    """'fast_hadamard_transform' when the CUDA package imports, else 'torch' (our Kronecker-factored matmuls)."""
    return "fast_hadamard_transform" if _fht_package() is not None else "torch"


def _engine_hadamard():
    """engine.rotation.hadamard, imported on first use (the engine owns the H_K tables)."""
    try:
        return importlib.import_module("engine.rotation.hadamard")
    except ImportError as err:
        raise ImportError("kernels.hadamard needs engine.rotation.hadamard (hadamard_matrix, decompose) for the H_K "
                          "matrices; run from the repository root so that `engine` is importable") from err


def decompose(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K * 2^m, as the engine decomposes n."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the Hadamard width must be a positive int, got {n!r}")
    k, p = _engine_hadamard().decompose(n)
    return int(k), int(p)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def _sylvester(log2n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Normalised Sylvester H_{2^log2n} [2^log2n, 2^log2n] (symmetric)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(log2n):
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(h.shape[0])).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _engine_factor(k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The engine's normalised H_K [K, K] in the compute dtype."""
    h = torch.as_tensor(_engine_hadamard().hadamard_matrix(k))
    if h.shape != (k, k):
        raise ValueError(f"engine.rotation.hadamard.hadamard_matrix({k}) returned shape {tuple(h.shape)}, "
                         f"expected ({k}, {k})")
    return h.to(dtype=dtype, device=device)


def _apply_kronecker(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x [..., prod(sizes)] @ (F_1 (x) F_2 (x) ... ), F_1 on the slowest index; one matmul per factor."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x
    for axis, f in enumerate(factors):
        inner = math.prod(sizes[axis + 1:])
        if inner == 1:  # last axis: [..., outer, A] @ F
            y = y.reshape(*lead, -1, sizes[axis]) @ f
        else:  # y[..., a', i] = sum_a F[a, a'] y[..., a, i] over [..., outer, A, inner]
            y = torch.matmul(f.transpose(0, 1), y.reshape(*lead, -1, sizes[axis], inner))
    return y.reshape(x.shape)


def _pow2_factors(p: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    m = int(math.log2(p))
    parts = [MAX_FACTOR_LOG2] * (m // MAX_FACTOR_LOG2) + ([m % MAX_FACTOR_LOG2] if m % MAX_FACTOR_LOG2 else [])
    return [_sylvester(a, dtype, str(device)) for a in parts if a > 0]


def _use_package(x: torch.Tensor, p: int, backend_name: str | None):
    """The package module when it should run this transform, else None (it zero-pads widths below 8)."""
    if backend_name not in (None, "torch", "fast_hadamard_transform"):
        raise ValueError(f"backend must be None, 'torch' or 'fast_hadamard_transform', got {backend_name!r}")
    if backend_name == "torch":
        return None
    package = _fht_package()
    if backend_name == "fast_hadamard_transform" and (package is None or not x.is_cuda):
        raise RuntimeError("backend='fast_hadamard_transform' needs the package (pip install -r "
                           "requirements-gpu.txt) and a CUDA tensor")
    usable = x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and p >= 8
    return package if usable else None


def _pow2_transform(x: torch.Tensor, p: int, backend_name: str | None = None) -> torch.Tensor:
    """x [..., p] @ H_p (normalised Sylvester), p a power of two."""
    if p == 1:
        return x
    package = _use_package(x, p, backend_name)
    if package is not None:
        return package.hadamard_transform(x.contiguous(), scale=1.0 / math.sqrt(p))
    return _apply_kronecker(x, _pow2_factors(p, x.dtype, x.device))


def hadamard_transform(x: torch.Tensor, n: int | None = None, *, backend_name: str | None = None) -> torch.Tensor:
    """Exact `x @ H_n` over the last dim (n defaults to x.shape[-1]), with the engine's H_n = H_K (x) H_{2^m}.

    backend_name: None picks backend(); "torch" forces ours; "fast_hadamard_transform" requires the package.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the Hadamard width n = {n}")
    k, p = decompose(n)
    lead = x.shape[:-1]
    y = _pow2_transform(x.reshape(*lead, k, p), p, backend_name)  # [..., K, 2^m]
    if k > 1:
        y = torch.matmul(_engine_factor(k, x.dtype, str(x.device)).transpose(0, 1), y)
    return y.reshape(x.shape)


def hadamard_transform_padded(x: torch.Tensor, *, backend_name: str | None = None) -> torch.Tensor:
    """The plain FHT over the next power of two of x's width: zero-pad, transform, truncate (not orthogonal)."""
    n = x.shape[-1]
    p = next_power_of_two(n)
    package = _use_package(x, p, backend_name)
    if package is not None and n % 8 == 0:
        return package.hadamard_transform(x.contiguous(), scale=1.0 / math.sqrt(p))  # pads internally
    padded = torch.nn.functional.pad(x, (0, p - n)) if p != n else x
    return _pow2_transform(padded, p, "torch")[..., :n]


def hadamard_transform_padded_reference(x: torch.Tensor) -> torch.Tensor:
    """float32 reference of hadamard_transform_padded: pad, the engine's FWHT over 2^m, truncate."""
    n = x.shape[-1]
    p = next_power_of_two(n)
    padded = torch.nn.functional.pad(x.float(), (0, p - n))
    return _engine_hadamard().apply_hadamard(padded, p)[..., :n]


def hadamard_transform_reference(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """float32 `x @ engine.rotation.hadamard.hadamard_matrix(n)` through the engine's own FWHT (apply_hadamard)."""
    n = x.shape[-1] if n is None else n
    return _engine_hadamard().apply_hadamard(x.float(), n)


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
