import math
import os

import pytest
import torch

from engine.learn.cayley import CayleySGD, cayley_skew, cayley_step
from engine.rotation.orthogonal import random_orthogonal

SLOW = os.environ.get("SPINSCOPE_SLOW_TESTS") == "1"


def frobenius_orthogonality_error(x: torch.Tensor) -> float:
    """Largest ||X^T X - I||_F over the blocks, measured in float64 on the stored values."""
    x64 = x.detach().to(torch.float64)
    eye = torch.eye(x64.shape[-1], dtype=torch.float64)
    return torch.linalg.matrix_norm(x64.mT @ x64 - eye).max().item()


def run_random_linear_loss(x: torch.nn.Parameter, optimizer: CayleySGD, steps: int, seed: int) -> None:
    """Each step a fresh random loss <C_t, X>, so the iterate keeps moving (step capped by 1/||W||)."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        target = torch.randn(x.shape, generator=generator)
        optimizer.zero_grad()
        (target * x).sum().backward()
        optimizer.step()


def procrustes_problem(n: int, seed: int):
    """A, B [n, n] with well-spread singular values, the SVD solution X*, and a start in X*'s component."""
    generator = torch.Generator().manual_seed(seed)
    spread = torch.diag(torch.linspace(1.0, 2.0, n, dtype=torch.float64))
    a = random_orthogonal(n, generator=generator, dtype=torch.float64) @ spread
    a = a @ random_orthogonal(n, generator=generator, dtype=torch.float64)
    x_true = random_orthogonal(n, generator=generator, dtype=torch.float64)
    b = a @ x_true + 0.05 * torch.randn(n, n, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a.T @ b)
    solution = u @ vh  # argmin over orthogonal X of ||A X - B||_F
    start = random_orthogonal(n, generator=generator, dtype=torch.float64)
    if torch.det(start) * torch.det(solution) < 0:  # Cayley steps never leave det's sign
        start[:, 0] = -start[:, 0]
    return a, b, solution, start


def procrustes_loss(a, x, b):
    return ((a @ x - b) ** 2).sum() / a.shape[0]


# (block shape, steps): the CPU suite keeps each case to about a second; SPINSCOPE_SLOW_TESTS=1 runs 500.
ORTHOGONALITY_CASES = [((64,), 500), ((576,), 500 if SLOW else 25), ((12, 128), 500 if SLOW else 60)]


@pytest.mark.slow
@pytest.mark.parametrize("shape,steps", ORTHOGONALITY_CASES, ids=["64", "576", "12x128"])
def test_float32_iterate_stays_orthogonal(shape, steps):
    n = shape[-1]
    x = torch.nn.Parameter(random_orthogonal(n, batch=shape[:-1], generator=torch.Generator().manual_seed(0)))
    start = x.detach().clone()
    optimizer = CayleySGD([x], lr=1.5)
    run_random_linear_loss(x, optimizer, steps, seed=1)
    assert x.dtype == torch.float32
    moved = torch.linalg.matrix_norm(x.detach() - start) / math.sqrt(n)  # relative to ||X||_F
    assert moved.min() > 0.1  # it really moved
    assert frobenius_orthogonality_error(x) < 1e-5


def test_one_step_reduces_procrustes_loss():
    a, b, _, start = procrustes_problem(16, seed=2)
    x = torch.nn.Parameter(start.clone())
    loss_before = procrustes_loss(a, x, b)
    loss_before.backward()
    CayleySGD([x], lr=0.01).step()
    assert procrustes_loss(a, x.detach(), b) < loss_before.item() - 1e-4


def test_many_steps_reach_the_svd_procrustes_solution():
    a, b, solution, start = procrustes_problem(16, seed=3)
    x = torch.nn.Parameter(start.clone())
    optimizer = CayleySGD([x], lr=1.5)
    for _ in range(200):
        optimizer.zero_grad()
        procrustes_loss(a, x, b).backward()
        optimizer.step()
    assert torch.linalg.matrix_norm(x.detach() - solution) < 1e-6
    assert procrustes_loss(a, x.detach(), b) - procrustes_loss(a, solution, b) < 1e-9


def test_skew_generator_matches_the_general_stiefel_formula():
    generator = torch.Generator().manual_seed(4)
    x = random_orthogonal(10, generator=generator, dtype=torch.float64)
    direction = torch.randn(10, 10, generator=generator, dtype=torch.float64)
    w_hat = direction @ x.T - 0.5 * x @ (x.T @ direction @ x.T)
    skew = cayley_skew(x, direction)
    torch.testing.assert_close(skew, w_hat - w_hat.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(skew, -skew.T, rtol=0, atol=0)


def test_exact_and_fixed_point_solves_agree():
    generator = torch.Generator().manual_seed(5)
    x = random_orthogonal(32, batch=(3,), generator=generator, dtype=torch.float64)
    direction = torch.randn(3, 32, 32, generator=generator, dtype=torch.float64)
    exact, _ = cayley_step(x, direction, lr=1e-3, exact=True)
    iterated, _ = cayley_step(x, direction, lr=1e-3, exact=False)
    assert (exact - x).abs().max() > 1e-4
    torch.testing.assert_close(iterated, exact, rtol=0, atol=1e-12)
    # at the norm cap the contraction is 1/2 per iteration: enough iterations still converge
    exact_big, _ = cayley_step(x, direction, lr=10.0, exact=True)
    iterated_big, _ = cayley_step(x, direction, lr=10.0, exact=False, fixed_point_iters=60)
    torch.testing.assert_close(iterated_big, exact_big, rtol=0, atol=1e-10)


def test_fixed_point_optimizer_stays_orthogonal():
    x = torch.nn.Parameter(random_orthogonal(48, generator=torch.Generator().manual_seed(6)))
    optimizer = CayleySGD([x], lr=0.05, exact=False)
    run_random_linear_loss(x, optimizer, 200, seed=7)
    assert frobenius_orthogonality_error(x) < 1e-5


def test_momentum_stays_orthogonal_and_descends():
    x = torch.nn.Parameter(random_orthogonal(64, generator=torch.Generator().manual_seed(8)))
    optimizer = CayleySGD([x], lr=1.5, momentum=0.9)
    run_random_linear_loss(x, optimizer, 300, seed=9)
    assert optimizer.state[x]["momentum_buffer"].shape == x.shape
    assert frobenius_orthogonality_error(x) < 1e-5

    a, b, solution, start = procrustes_problem(16, seed=10)
    y = torch.nn.Parameter(start.clone())
    optimizer = CayleySGD([y], lr=0.2, momentum=0.5)
    initial = procrustes_loss(a, y, b).item()
    for _ in range(150):
        optimizer.zero_grad()
        procrustes_loss(a, y, b).backward()
        optimizer.step()
    optimum = procrustes_loss(a, solution, b).item()
    assert procrustes_loss(a, y.detach(), b).item() - optimum < 1e-3 * (initial - optimum)


def test_low_precision_parameter_is_written_back_in_its_dtype():
    x = torch.nn.Parameter(random_orthogonal(32, generator=torch.Generator().manual_seed(11), dtype=torch.bfloat16))
    optimizer = CayleySGD([x], lr=0.1)
    run_random_linear_loss(x, optimizer, 30, seed=12)
    assert x.dtype == torch.bfloat16
    assert frobenius_orthogonality_error(x) < 0.1  # bf16 rounding alone is ~2e-2 here


@pytest.mark.parametrize(
    "tensor,message",
    [
        (torch.randn(4, 6), "square"),
        (torch.randn(8), "square"),
        (torch.eye(4).expand(2, 2, 4, 4).clone(), "square"),
        (torch.eye(5) * 2.0, "not orthogonal"),
        (torch.eye(3, dtype=torch.int64), "floating"),
    ],
    ids=["non-square", "vector", "4d", "scaled", "integer"],
)
def test_rejects_parameters_that_are_not_orthogonal_squares(tensor, message):
    with pytest.raises(ValueError, match=message):
        CayleySGD([torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point())])


def test_rejects_a_bad_block_in_a_batch_and_in_a_later_group():
    blocks = random_orthogonal(8, batch=(3,))
    blocks[1, 0, 0] += 0.01
    with pytest.raises(ValueError, match="not orthogonal"):
        CayleySGD([torch.nn.Parameter(blocks)])
    optimizer = CayleySGD([torch.nn.Parameter(torch.eye(4))])
    with pytest.raises(ValueError, match="square"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, 4))]})


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"momentum": 1.0}, {"qr_every": -1}, {"fixed_point_iters": 0}])
def test_rejects_bad_hyperparameters(kwargs):
    with pytest.raises(ValueError):
        CayleySGD([torch.nn.Parameter(torch.eye(4))], **kwargs)


def test_non_finite_gradient_raises_and_leaves_parameter_unchanged():
    x = torch.nn.Parameter(torch.eye(4))
    x.grad = torch.full((4, 4), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        CayleySGD([x]).step()
    assert torch.equal(x.detach(), torch.eye(4))


def test_cosine_schedule_lowers_the_step_cap():
    x = torch.nn.Parameter(random_orthogonal(16, generator=torch.Generator().manual_seed(13)))
    optimizer = CayleySGD([x], lr=1.5)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=0.0)
    generator = torch.Generator().manual_seed(14)
    lrs, moves = [], []
    for _ in range(11):
        lrs.append(optimizer.param_groups[0]["lr"])
        before = x.detach().clone()
        optimizer.zero_grad()
        # a small gradient, so 1/||W|| stays above lr and lr alone sets the step length
        (1e-3 * torch.randn(16, 16, generator=generator) * x).sum().backward()
        optimizer.step()
        schedule.step()
        moves.append((x.detach() - before).norm().item())
    expected = [0.75 * (1 + math.cos(math.pi * t / 10)) for t in range(11)]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert all(later < earlier for earlier, later in zip(lrs[:10], lrs[1:], strict=False))
    assert moves[-1] < 1e-12 < moves[0]  # lr reached 0: the last step does not move X
    assert moves[8] < moves[1]
