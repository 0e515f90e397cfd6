"""Trainable orthogonal rotations: a dense one (R1, R2) and a block-diagonal one (FLRot's R3/R4).

Both hold their matrix as a plain `nn.Parameter` that starts orthogonal; they stay orthogonal because
`engine.learn.cayley.CayleySGD` moves them along the orthogonal group, not through a parametrisation.
Both apply on the last dimension as a right multiplication, `x @ R`, like every rotation in the brief.
"""

from __future__ import annotations

import torch
from torch import nn

INITS = ("identity", "random")


def orthogonality_error(x: torch.Tensor) -> torch.Tensor:
    """Largest |X^T X - I| entry of a square matrix [n, n] or of each block of [nb, n, n] (computed in float64)."""
    x64 = x.detach().to(torch.float64)
    eye = torch.eye(x64.shape[-1], dtype=torch.float64, device=x64.device)
    return (x64.mT @ x64 - eye).abs().amax(dim=(-2, -1))


def default_orthogonality_tolerance(dtype: torch.dtype) -> float:
    """How far from orthogonal a stored matrix may be: rounding to a 16-bit dtype alone costs ~eps."""
    return max(1e-4, 16 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-4


def qr_orthonormalize(x: torch.Tensor) -> torch.Tensor:
    """Nearest-in-spirit orthogonal matrix by QR with sign(diag R) > 0, so an orthogonal X maps to itself.

    x: [..., n, n] in a floating dtype; returns the Q factor with the same shape and dtype.
    """
    q, r = torch.linalg.qr(x)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)  # scale column j of Q by the sign of R[j, j]


def random_orthogonal(
    n: int,
    *,
    batch: tuple[int, ...] = (),
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Haar-distributed orthogonal matrices [*batch, n, n]: QR of a Gaussian matrix with the sign fix."""
    if n < 1:
        raise ValueError(f"an orthogonal matrix needs n >= 1, got {n}")
    gen_device = generator.device if generator is not None else "cpu"
    gaussian = torch.randn(*batch, n, n, generator=generator, dtype=torch.float64, device=gen_device)
    return qr_orthonormalize(gaussian).to(dtype=dtype, device=device)


def divisors_near(width: int, block: int, count: int = 4) -> list[int]:
    """The `count` divisors of `width` closest to `block`, in increasing order (for error messages)."""
    divisors = [d for d in range(1, width + 1) if width % d == 0]
    nearest = sorted(divisors, key=lambda d: (abs(d - block), d))[:count]
    return sorted(nearest)


def check_block_divides(width: int, block: int) -> int:
    """Number of blocks of size `block` in `width`; ValueError naming nearby divisors if it does not divide."""
    if width < 1 or block < 1:
        raise ValueError(f"width and block must be positive, got width {width} and block {block}")
    if width % block:
        near = ", ".join(str(d) for d in divisors_near(width, block))
        raise ValueError(f"width {width} is not divisible by block {block}; divisors near it: {near}")
    return width // block


def _check_orthogonal(matrix: torch.Tensor, what: str, tol: float | None) -> None:
    tol = default_orthogonality_tolerance(matrix.dtype) if tol is None else tol
    error = orthogonality_error(matrix).max().item()
    if not error <= tol:  # also catches NaN
        raise ValueError(
            f"{what} is not orthogonal: max |X^T X - I| = {error:.3g} > tolerance {tol:.3g}; "
            "pass an orthogonal matrix (e.g. from random_orthogonal or a QR factor)"
        )


class BlockDiagonalRotation(nn.Module):
    """x @ blockdiag(B_1, ..., B_nb) on the last dimension, with the blocks trained as one parameter.

    `blocks` is an nn.Parameter [n_blocks, block, block]; each block is its own point on the orthogonal
    group, so CayleySGD treats the batch as n_blocks independent manifolds.
    """

    def __init__(
        self,
        width: int,
        block: int,
        init: str = "identity",
        *,
        blocks: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        n_blocks = check_block_divides(width, block)
        self.width, self.block, self.n_blocks = width, block, n_blocks
        if blocks is not None:
            if tuple(blocks.shape) != (n_blocks, block, block):
                raise ValueError(
                    f"given blocks have shape {tuple(blocks.shape)}; width {width} with block {block} "
                    f"needs shape ({n_blocks}, {block}, {block})"
                )
            _check_orthogonal(blocks, "a given block", None)
            initial = blocks.detach().clone().to(dtype=dtype, device=device)
        elif init == "identity":
            initial = torch.eye(block, dtype=dtype, device=device).expand(n_blocks, block, block).clone()
        elif init == "random":
            initial = random_orthogonal(block, batch=(n_blocks,), generator=generator, dtype=dtype, device=device)
        else:
            raise ValueError(f"unknown init {init!r}; use one of {INITS} or pass blocks=")
        self.blocks = nn.Parameter(initial)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor, block: int, *, tol: float = 1e-6) -> BlockDiagonalRotation:
        """Take the diagonal blocks of a dense block-diagonal orthogonal matrix [width, width]."""
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"from_dense needs a square matrix, got shape {tuple(matrix.shape)}")
        width = matrix.shape[0]
        n_blocks = check_block_divides(width, block)
        # [nb, b, nb, b]; entry (i, :, j, :) is block row i, block column j
        tiled = matrix.detach().reshape(n_blocks, block, n_blocks, block)
        index = torch.arange(n_blocks, device=matrix.device)
        diagonal = tiled[index, :, index, :]  # [nb, b, b]
        off_diagonal = tiled.clone()
        off_diagonal[index, :, index, :] = 0
        largest = off_diagonal.abs().max().item() if n_blocks > 1 else 0.0
        if largest > tol:
            raise ValueError(
                f"the matrix is not block-diagonal with block {block}: an off-block entry is {largest:.3g} "
                f"(> {tol:.3g}); use FullRotation for a dense rotation or pick the block it was built with"
            )
        return cls(width, block, blocks=diagonal, dtype=matrix.dtype, device=matrix.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> x @ blockdiag [..., width]."""
        self._check_width(x)
        if x.is_cuda:  # the Triton kernel (fp16/bf16) with autograd; it falls back to torch elsewhere
            from kernels.blockdiag import blockdiag_rotate, kernel_applies

            if kernel_applies(x, self.blocks):
                return blockdiag_rotate(x, self.blocks)
        grouped = x.reshape(*x.shape[:-1], self.n_blocks, self.block)  # [..., nb, b]
        rotated = torch.einsum("...nb,nbc->...nc", grouped, self.blocks.to(x.dtype))
        return rotated.reshape(x.shape)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> x @ blockdiag^T, which undoes forward."""
        self._check_width(x)
        grouped = x.reshape(*x.shape[:-1], self.n_blocks, self.block)  # [..., nb, c]
        rotated = torch.einsum("...nc,nbc->...nb", grouped, self.blocks.to(x.dtype))
        return rotated.reshape(x.shape)

    def matrix(self) -> torch.Tensor:
        """The dense block-diagonal matrix [width, width] (differentiable)."""
        return torch.block_diag(*self.blocks.unbind(0))

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.width:
            raise ValueError(f"input last dimension is {x.shape[-1]}, this rotation is {self.width} wide")

    def extra_repr(self) -> str:
        return f"width={self.width}, block={self.block}, n_blocks={self.n_blocks}"


class FullRotation(nn.Module):
    """x @ R on the last dimension with one dense orthogonal parameter `weight` [width, width]."""

    def __init__(
        self,
        width: int,
        init: str = "identity",
        *,
        matrix: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.width = width
        if matrix is not None:
            if tuple(matrix.shape) != (width, width):
                raise ValueError(f"given matrix has shape {tuple(matrix.shape)}; expected ({width}, {width})")
            _check_orthogonal(matrix, "the given matrix", None)
            initial = matrix.detach().clone().to(dtype=dtype, device=device)
        elif init == "identity":
            initial = torch.eye(width, dtype=dtype, device=device)
        elif init == "random":
            initial = random_orthogonal(width, generator=generator, dtype=dtype, device=device)
        else:
            raise ValueError(f"unknown init {init!r}; use one of {INITS} or pass matrix=")
        self.weight = nn.Parameter(initial)

    @classmethod
    def from_dense(cls, matrix: torch.Tensor) -> FullRotation:
        """Wrap a dense orthogonal matrix [width, width] (copied)."""
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"from_dense needs a square matrix, got shape {tuple(matrix.shape)}")
        return cls(matrix.shape[0], matrix=matrix, dtype=matrix.dtype, device=matrix.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> x @ R."""
        self._check_width(x)
        return x @ self.weight.to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., width] -> x @ R^T, which undoes forward."""
        self._check_width(x)
        return x @ self.weight.to(x.dtype).mT

    def matrix(self) -> torch.Tensor:
        """The rotation matrix [width, width] (the parameter itself)."""
        return self.weight

    def _check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.width:
            raise ValueError(f"input last dimension is {x.shape[-1]}, this rotation is {self.width} wide")

    def extra_repr(self) -> str:
        return f"width={self.width}"
