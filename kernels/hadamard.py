"""Online Hadamard transforms `x @ H_n` (normalised) for the benchmark and for GPU users of R3/R4.

Two backends, reported by `backend()`:
- "fast_hadamard_transform": Tri Dao's CUDA package (requirements-gpu.txt), used for the power-of-two part, and
  only once it has passed `check_package` (below);
- "torch": our own, a Sylvester H_{2^m} split into Kronecker factors of at most 128
  (H_{2^a} (x) H_{2^b} = H_{2^(a+b)}), each applied as one small matmul along its axis.
Widths n = K * 2^m use the engine's matrices: `H_n = H_K (x) H_{2^m}` with `(K, 2^m) =
engine.rotation.hadamard.decompose(n)` (11008 = 344 * 32, 14336 = 28 * 512)
and `H_K = engine.rotation.hadamard.hadamard_matrix(K)`;
x [..., n] is viewed as [..., K, 2^m], transformed over the 2^m axis, then multiplied by H_K over the K axis.
The package's own 12N/20N/28N kernels are never used: their H_K differ from the engine's tables
so the offline fusion would not match.

The package is checked before it is ever used: the first time `backend()` (or any transform) finds it importable,
`check_package` runs the exact transform (n = 256, and 768 = 12 * 64 through H_12) and the padded one (width 768)
with the package against the engine's own FWHT on a small random input, in float32 and float16. If it disagrees,
or fails, a RuntimeWarning says so and every transform falls back to the torch backend (`package_status()` keeps
the reason). The verdict is kept per imported package object.

Imports: the H_K tables, the Sylvester factors and the reference FWHT come from engine.rotation.hadamard, a leaf
module of the engine (it imports only torch); that is the one engine module any kernels module imports
(kernels/launch.py's doc).

`hadamard_transform_padded` is the plain package call on a non-power-of-two width: it zero-pads to the next power
of two and truncates, which is NOT an orthogonal transform of n values; it exists only as the benchmark's
"FHT (padded)" row, the number the FLRot paper compares against.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings

import torch

from engine.rotation import hadamard as engine_hadamard  # H_K, Sylvester and the reference FWHT (a leaf module)

MAX_FACTOR_LOG2 = 7  # Sylvester factors of at most 128 x 128 per matmul
PACKAGE = "fast_hadamard_transform"
CHECK_WIDTHS = (256, 768)  # exact transforms checked: a power of two, and 12 * 64 (the package's 64, H_12's table)
CHECK_PADDED_WIDTH = 768  # the package zero-pads it to 1024 itself (hadamard_transform_padded's path)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 3e-3}  # relative error against the engine's fp32 FWHT
CHECK_DEVICE: str | None = None  # where check_package runs; None: "cuda" (the package is a CUDA extension)
_PACKAGE_CHECKS: dict[object, str | None] = {}  # imported package module -> None (passed) or why it failed


def _import_package():
    try:
        return importlib.import_module(PACKAGE)
    except ImportError:
        return None


def _fht_package():
    """The package module when it imports and has passed check_package, else None (after a warning, once)."""
    package = _import_package()
    if package is None:
        return None
    if package not in _PACKAGE_CHECKS:
        device = CHECK_DEVICE or ("cuda" if torch.cuda.is_available() else None)
        if device is None:
            return None  # no CUDA: the package cannot run, so it is neither checked nor used
        problem = _PACKAGE_CHECKS[package] = check_package(package, device)
        if problem is not None:
            warnings.warn(
                f"{PACKAGE} failed its check against the engine's Hadamard transform ({problem}); using "
                "the torch backend instead. Reinstall it for this GPU (requirements-gpu.txt) to use it.",
                RuntimeWarning,
                stacklevel=2,
            )
    return package if _PACKAGE_CHECKS[package] is None else None


def package_status() -> str:
    """One line for reports: not installed, not checked (no CUDA), passed, or the reason it was rejected."""
    package = _import_package()
    if package is None:
        return f"{PACKAGE} not installed"
    _fht_package()
    if package not in _PACKAGE_CHECKS:
        return f"{PACKAGE} installed but not usable here (no CUDA device)"
    problem = _PACKAGE_CHECKS[package]
    return f"{PACKAGE} passed its check against the engine" if problem is None else f"{PACKAGE} rejected: {problem}"


def backend() -> str:
    """'fast_hadamard_transform' when the CUDA package imports and has passed check_package, else 'torch' (our
    Kronecker-factored matmuls)."""
    return PACKAGE if _fht_package() is not None else "torch"


def check_package(package, device: str) -> str | None:
    """None when `package.hadamard_transform` gives the engine's transforms on small inputs on `device`, else why not.

    It runs the exact transform of CHECK_WIDTHS (the package over the 2^m axis, as hadamard_transform runs it) and
    the padded transform of CHECK_PADDED_WIDTH, in float32 and float16, against the engine's float32 FWHT.
    """
    generator = torch.Generator().manual_seed(0)
    try:
        for dtype, tol in CHECK_TOLERANCE.items():
            for n in CHECK_WIDTHS:
                x = torch.randn(4, n, generator=generator).to(device=device, dtype=dtype)
                error = _relative_error(_exact_transform(x, n, package), hadamard_transform_reference(x.cpu()))
                if not error <= tol:
                    return f"exact transform, n = {n}, {dtype}: relative error {error:.3g} > {tol:g}"
            x = torch.randn(4, CHECK_PADDED_WIDTH, generator=generator).to(device=device, dtype=dtype)
            error = _relative_error(_padded_transform(x, package), hadamard_transform_padded_reference(x.cpu()))
            if not error <= tol:
                return f"padded transform, width {CHECK_PADDED_WIDTH}, {dtype}: relative error {error:.3g} > {tol:g}"
    except Exception as err:  # noqa: BLE001 - a package that cannot run on this machine is rejected, not fatal
        return f"it raised {err!r:.300}"
    return None


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().float().cpu()
    if out.shape != ref.shape:
        return math.inf
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def decompose(n: int) -> tuple[int, int]:
    """(K, 2^m) with n = K * 2^m, as the engine decomposes n."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"the Hadamard width must be a positive int, got {n!r}")
    k, p = engine_hadamard.decompose(n)
    return int(k), int(p)


def is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@functools.lru_cache(maxsize=32)
def _sylvester(log2n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The engine's normalised Sylvester H_{2^log2n} [2^log2n, 2^log2n] (symmetric), in the compute dtype."""
    return engine_hadamard.sylvester(1 << log2n).to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=32)
def _engine_factor(k: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The engine's normalised H_K [K, K] in the compute dtype."""
    h = torch.as_tensor(engine_hadamard.hadamard_matrix(k))
    if h.shape != (k, k):
        raise ValueError(
            f"engine.rotation.hadamard.hadamard_matrix({k}) returned shape {tuple(h.shape)}, expected ({k}, {k})"
        )
    return h.to(dtype=dtype, device=device)


def _apply_kronecker(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x [..., prod(sizes)] @ (F_1 (x) F_2 (x) ... ), F_1 on the slowest index; one matmul per factor."""
    sizes = [f.shape[0] for f in factors]
    lead = x.shape[:-1]
    y = x
    for axis, f in enumerate(factors):
        inner = math.prod(sizes[axis + 1 :])
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
    if backend_name not in (None, "torch", PACKAGE):
        raise ValueError(f"backend must be None, 'torch' or '{PACKAGE}', got {backend_name!r}")
    if backend_name == "torch":
        return None
    package = _fht_package()
    if backend_name == PACKAGE and (package is None or not x.is_cuda):
        raise RuntimeError(
            f"backend='{PACKAGE}' needs the package (pip install -r requirements-gpu.txt), a CUDA "
            f"tensor, and the package passing its check against the engine ({package_status()})"
        )
    return package if _package_applies(x, p) else None


def _package_applies(x: torch.Tensor, p: int) -> bool:
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) and p >= 8


def _pow2_transform(x: torch.Tensor, p: int, package=None) -> torch.Tensor:
    """x [..., p] @ H_p (normalised Sylvester), p a power of two; by `package` when given, else our matmuls."""
    if p == 1:
        return x
    if package is not None:
        return package.hadamard_transform(x.contiguous(), scale=1.0 / math.sqrt(p))
    return _apply_kronecker(x, _pow2_factors(p, x.dtype, x.device))


def _exact_transform(x: torch.Tensor, n: int, package) -> torch.Tensor:
    """x [..., n] @ H_K (x) H_{2^m}: the 2^m axis by `package` (None: ours; below 8 always ours), then H_K."""
    k, p = decompose(n)
    lead = x.shape[:-1]
    y = _pow2_transform(x.reshape(*lead, k, p), p, package if p >= 8 else None)  # [..., K, 2^m]
    if k > 1:
        y = torch.matmul(_engine_factor(k, x.dtype, str(x.device)).transpose(0, 1), y)
    return y.reshape(x.shape)


def _padded_transform(x: torch.Tensor, package) -> torch.Tensor:
    """Zero-pad x's width to the next power of two, transform, truncate: by `package` (it pads itself) or ours."""
    n = x.shape[-1]
    p = next_power_of_two(n)
    if package is not None and n % 8 == 0:
        return package.hadamard_transform(x.contiguous(), scale=1.0 / math.sqrt(p))  # pads internally
    padded = torch.nn.functional.pad(x, (0, p - n)) if p != n else x
    return _pow2_transform(padded, p)[..., :n]


def hadamard_transform(x: torch.Tensor, n: int | None = None, *, backend_name: str | None = None) -> torch.Tensor:
    """Exact `x @ H_n` over the last dim (n defaults to x.shape[-1]), with the engine's H_n = H_K (x) H_{2^m}.

    backend_name: None picks backend(); "torch" forces ours; "fast_hadamard_transform" requires the package.
    """
    n = x.shape[-1] if n is None else n
    if x.shape[-1] != n:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the Hadamard width n = {n}")
    _, p = decompose(n)
    return _exact_transform(x, n, _use_package(x, p, backend_name))


def hadamard_transform_padded(x: torch.Tensor, *, backend_name: str | None = None) -> torch.Tensor:
    """The plain FHT over the next power of two of x's width: zero-pad, transform, truncate (not orthogonal)."""
    return _padded_transform(x, _use_package(x, next_power_of_two(x.shape[-1]), backend_name))


def hadamard_transform_padded_reference(x: torch.Tensor) -> torch.Tensor:
    """float32 reference of hadamard_transform_padded: pad, the engine's FWHT over 2^m, truncate."""
    n = x.shape[-1]
    p = next_power_of_two(n)
    padded = torch.nn.functional.pad(x.float(), (0, p - n))
    return engine_hadamard.apply_hadamard(padded, p)[..., :n]


def hadamard_transform_reference(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """float32 `x @ engine.rotation.hadamard.hadamard_matrix(n)` through the engine's own FWHT (apply_hadamard)."""
    n = x.shape[-1] if n is None else n
    return engine_hadamard.apply_hadamard(x.float(), n)


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
