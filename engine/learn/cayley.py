"""Cayley SGD on the orthogonal group (SpinQuant; Li, Fuxin, Todorovic, ICLR 2020).

Each parameter is a square orthogonal matrix X [n, n] or a batch of them [nb, b, b] (every block its own
manifold point: FLRot's block-diagonal R3/R4). With Euclidean gradient G and descent direction D:

    D <- momentum * D - G                       (momentum 0, SpinQuant's setting, gives D = -G)
    W_hat = D X^T - 1/2 X (X^T D X^T),  W = W_hat - W_hat^T          (skew-symmetric, [n, n])
    a = min(lr, 1 / (||W||_1 + eps))
    X' = (I - a/2 W)^-1 (I + a/2 W) X           (Cayley transform: orthogonal for any skew W)

Sign convention: the brief writes the buffer as `M <- momentum M + G` and feeds M straight into W_hat;
with the Cayley step as written that climbs the loss. Like the reference code we feed the descent
direction D (their `V = momentum V - G`), so the first-order step is X + a W X = X - a/2 (G - X G^T X).
||W||_1 is the max column sum, as in the reference; the cap on `a` keeps ||a/2 W||_1 <= 1/2, so the
fixed-point iterations below contract.

Momentum transport (kept simple): after a step the buffer is replaced by the tangent vector W X' at
the new point, whose skew part at X' is W again (the reference stores W times the old point).
When ||W||_1 > 1/lr the step is normalised (a ||W||_1 = 1): very large gradients then make fixed-size
moves, so scale the loss (e.g. a mean, not a sum) for the cap to fall back to lr near an optimum.
Nesterov and weight decay are not offered: they are not used for rotations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from engine.rotation.orthogonal import default_orthogonality_tolerance, orthogonality_error, qr_orthonormalize

EXACT_SOLVE_MAX_N = 1024  # up to this size an n x n solve is cheap; it is also where we compute in float64


def cayley_skew(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The skew-symmetric generator W [..., n, n] of the step from orthogonal X along the direction D.

    For square X, X X^T = I turns W_hat = D X^T - 1/2 X (X^T D X^T) into 1/2 D X^T, so
    W = 1/2 (D X^T - X D^T): the same matrix for one matmul instead of three.
    """
    dxt = direction @ x.mT
    return 0.5 * (dxt - dxt.mT)


def cayley_step(
    x: torch.Tensor,
    direction: torch.Tensor,
    lr: float,
    *,
    exact: bool = True,
    fixed_point_iters: int = 5,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cayley step from orthogonal X [..., n, n] along D [..., n, n]; returns (X', W).

    exact: X' = (I - A)^-1 (I + A) X with A = a/2 W, computed as 2 (I - A)^-1 X - X (one solve, no
    matmul); otherwise start from X + a W X and iterate Y <- X + A (X + Y), which converges to the
    same X' because ||A||_1 <= 1/2.
    """
    skew = cayley_skew(x, direction)
    norm = torch.linalg.matrix_norm(skew, ord=1)  # [...]: max column sum per block
    step = torch.clamp(1.0 / (norm + eps), max=lr)[..., None, None]
    half = 0.5 * step * skew  # A = a/2 W
    if exact:
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return 2.0 * torch.linalg.solve(eye - half, x) - x, skew
    y = x + 2.0 * (half @ x)
    for _ in range(fixed_point_iters):
        y = x + half @ (x + y)
    return y, skew


class CayleySGD(torch.optim.Optimizer):
    """SGD that keeps square orthogonal parameters ([n, n] or batches [nb, b, b]) exactly orthogonal.

    lr: step cap (SpinQuant uses 1.5 with cosine decay; torch's LR schedulers work on it).
    momentum: 0 (SpinQuant) or in [0, 1); see the module docstring for the transport.
    exact: True solves the Cayley step, False uses fixed-point iterations; None picks the solve for
        n <= 1024.
    qr_every: re-orthonormalise by sign-fixed QR before every `qr_every`-th step (0 never), which
        removes the drift from writing back in a low-precision dtype.
    compute_dtype: None computes in float64 for n <= 1024, else in the parameter's dtype with a
        float32 floor. Results are written back in the parameter's dtype.
    ortho_tol: largest |X^T X - I| entry accepted at construction; None scales with the dtype's eps.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1.5,
        momentum: float = 0.0,
        *,
        exact: bool | None = None,
        fixed_point_iters: int = 5,
        qr_every: int = 10,
        eps: float = 1e-8,
        compute_dtype: torch.dtype | None = None,
        ortho_tol: float | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if fixed_point_iters < 1:
            raise ValueError(f"fixed_point_iters must be at least 1, got {fixed_point_iters}")
        if qr_every < 0:
            raise ValueError(f"qr_every must be >= 0 (0 disables QR), got {qr_every}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if compute_dtype is not None and compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be None, torch.float32 or torch.float64, got {compute_dtype}")
        self.ortho_tol = ortho_tol  # read by add_param_group, which the base constructor calls
        defaults = dict(
            lr=lr,
            momentum=momentum,
            exact=exact,
            fixed_point_iters=fixed_point_iters,
            qr_every=qr_every,
            eps=eps,
            compute_dtype=compute_dtype,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking each parameter is a square orthogonal matrix or a batch of them."""
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch rejects sets itself, with its own message
            params = list(params)  # a generator can be read only once
        for index, param in enumerate(params):
            self._check_param(param, index)
        super().add_param_group({**param_group, "params": params})

    def _check_param(self, param: torch.Tensor, index: int) -> None:
        shape = tuple(param.shape)
        if not param.is_floating_point():
            raise ValueError(f"parameter {index} has dtype {param.dtype}; CayleySGD needs a floating dtype")
        if param.ndim not in (2, 3) or shape[-1] != shape[-2]:
            raise ValueError(
                f"parameter {index} has shape {shape}; CayleySGD needs a square matrix [n, n] or a batch "
                "of square blocks [n_blocks, b, b] (use another optimizer for ordinary weights)"
            )
        tol = default_orthogonality_tolerance(param.dtype) if self.ortho_tol is None else self.ortho_tol
        error = orthogonality_error(param).max().item()
        if not error <= tol:  # also catches NaN
            raise ValueError(
                f"parameter {index} of shape {shape} is not orthogonal: max |X^T X - I| = {error:.3g} > "
                f"tolerance {tol:.3g}; initialise it orthogonal (identity, Hadamard, random_orthogonal)"
            )

    @staticmethod
    def _compute_dtype(param: torch.Tensor, requested: torch.dtype | None) -> torch.dtype:
        if requested is not None:
            return requested
        if param.shape[-1] <= EXACT_SOLVE_MAX_N:
            return torch.float64
        return torch.promote_types(param.dtype, torch.float32)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Cayley step for every parameter with a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("CayleySGD does not support sparse gradients")
                self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict) -> None:
        state = self.state[param]
        state["step"] = state.get("step", 0) + 1
        n = param.shape[-1]
        dtype = self._compute_dtype(param, group["compute_dtype"])
        x = param.detach().to(dtype)  # [..., n, n]
        grad = param.grad.detach().to(dtype)
        if not torch.isfinite(grad).all():
            raise ValueError(
                f"non-finite gradient for the parameter of shape {tuple(param.shape)}; it was left unchanged "
                "(lower the loss scale or skip this batch)"
            )
        if group["qr_every"] and state["step"] % group["qr_every"] == 0:
            x = qr_orthonormalize(x)

        momentum = group["momentum"]
        buffer = state.get("momentum_buffer")
        direction = -grad if buffer is None or momentum == 0 else momentum * buffer.to(dtype) - grad
        exact = group["exact"] if group["exact"] is not None else n <= EXACT_SOLVE_MAX_N
        x_new, skew = cayley_step(
            x,
            direction,
            group["lr"],
            exact=exact,
            fixed_point_iters=group["fixed_point_iters"],
            eps=group["eps"],
        )
        if momentum != 0:
            state["momentum_buffer"] = skew @ x_new  # tangent at X'; its skew generator there is W again
        param.copy_(x_new.to(param.dtype))
