import pytest
import torch

from engine.learn.cayley import CayleySGD
from engine.rotation.orthogonal import (
    BlockDiagonalRotation,
    FullRotation,
    divisors_near,
    orthogonality_error,
    qr_orthonormalize,
    random_orthogonal,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_random_orthogonal_is_orthogonal_and_reproducible():
    first = random_orthogonal(24, batch=(3,), generator=generator(0))
    again = random_orthogonal(24, batch=(3,), generator=generator(0))
    assert first.shape == (3, 24, 24)
    assert torch.equal(first, again)
    assert orthogonality_error(first).max() < 1e-6
    assert not torch.allclose(first[0], first[1])


def test_qr_orthonormalize_keeps_an_orthogonal_matrix_and_repairs_drift():
    x = random_orthogonal(16, generator=generator(1), dtype=torch.float64)
    torch.testing.assert_close(qr_orthonormalize(x), x, rtol=0, atol=1e-12)
    drifted = x + 1e-4 * torch.randn(16, 16, generator=generator(2), dtype=torch.float64)
    repaired = qr_orthonormalize(drifted)
    assert orthogonality_error(drifted) > 1e-5
    assert orthogonality_error(repaired) < 1e-12
    assert (repaired - x).abs().max() < 1e-3  # the sign fix keeps it next to the drifted matrix


@pytest.mark.parametrize("init", ["identity", "random"])
def test_block_diagonal_forward_and_inverse_match_the_dense_matrix(init):
    rotation = BlockDiagonalRotation(96, 32, init, generator=generator(3))
    x = torch.randn(2, 5, 96, generator=generator(4))
    dense = rotation.matrix()
    assert dense.shape == (96, 96)
    torch.testing.assert_close(rotation(x), x @ dense)
    torch.testing.assert_close(rotation.inverse(x), x @ dense.T)
    torch.testing.assert_close(rotation.inverse(rotation(x)), x, rtol=0, atol=1e-5)
    assert orthogonality_error(dense) < 1e-5


def test_block_diagonal_matrix_is_zero_off_the_blocks():
    rotation = BlockDiagonalRotation(12, 4, "random", generator=generator(5))
    dense = rotation.matrix()
    for i in range(3):
        for j in range(3):
            tile = dense[4 * i : 4 * i + 4, 4 * j : 4 * j + 4]
            if i == j:
                assert torch.equal(tile, rotation.blocks[i].detach())
            else:
                assert torch.count_nonzero(tile) == 0


def test_flrot_widths():
    assert BlockDiagonalRotation(1536, 128).n_blocks == 12
    assert BlockDiagonalRotation(64, 64).n_blocks == 1
    with pytest.raises(ValueError, match=r"^width 1536 is not divisible by block 100; divisors near it: .*96.*128"):
        BlockDiagonalRotation(1536, 100)
    assert divisors_near(1536, 100) == [48, 64, 96, 128]  # the four divisors of 2^9 * 3 closest to 100


def test_from_dense_round_trip_and_rejections():
    rotation = BlockDiagonalRotation(48, 16, "random", generator=generator(6))
    rebuilt = BlockDiagonalRotation.from_dense(rotation.matrix().detach(), 16)
    assert torch.equal(rebuilt.blocks.detach(), rotation.blocks.detach())
    dense = random_orthogonal(48, generator=generator(7))
    with pytest.raises(ValueError, match="not block-diagonal"):
        BlockDiagonalRotation.from_dense(dense, 16)
    with pytest.raises(ValueError, match="square"):
        BlockDiagonalRotation.from_dense(torch.zeros(48, 32), 16)
    with pytest.raises(ValueError, match="not divisible"):
        BlockDiagonalRotation.from_dense(rotation.matrix().detach(), 10)
    not_orthogonal = 2 * rotation.matrix().detach()
    with pytest.raises(ValueError, match="not orthogonal"):
        BlockDiagonalRotation.from_dense(not_orthogonal, 16)


def test_given_blocks_are_checked():
    good = random_orthogonal(8, batch=(4,), generator=generator(8))
    assert torch.equal(BlockDiagonalRotation(32, 8, blocks=good).blocks.detach(), good)
    with pytest.raises(ValueError, match="shape"):
        BlockDiagonalRotation(32, 8, blocks=good[:3])
    with pytest.raises(ValueError, match="not orthogonal"):
        BlockDiagonalRotation(32, 8, blocks=good * 1.1)
    with pytest.raises(ValueError, match="unknown init"):
        BlockDiagonalRotation(32, 8, "hadamard")
    with pytest.raises(ValueError, match="wide"):
        BlockDiagonalRotation(32, 8)(torch.zeros(3, 16))


def test_gradient_of_blocks_equals_the_diagonal_blocks_of_the_dense_gradient():
    rotation = BlockDiagonalRotation(24, 8, "random", generator=generator(9))
    x = torch.randn(7, 24, generator=generator(10))
    weights = torch.randn(7, 24, generator=generator(11))
    (weights * rotation(x)).sum().backward()
    dense = rotation.matrix().detach().requires_grad_(True)
    (weights * (x @ dense)).sum().backward()
    for k in range(3):
        torch.testing.assert_close(rotation.blocks.grad[k], dense.grad[8 * k : 8 * k + 8, 8 * k : 8 * k + 8])


def fit_rotation(module, target_matrix, steps=150, seed=12):
    """Fit module so that module(x) matches x @ target_matrix; returns (initial loss, final loss)."""
    optimizer = CayleySGD(module.parameters(), lr=1.5)
    data = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(32, target_matrix.shape[0], generator=data)
        loss = ((module(x) - x @ target_matrix) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


@pytest.mark.slow
def test_block_diagonal_rotation_trains_under_cayley_sgd_and_stays_orthogonal():
    target_blocks = random_orthogonal(8, batch=(4,), generator=generator(13))
    target = BlockDiagonalRotation(32, 8, blocks=target_blocks).matrix().detach()
    rotation = BlockDiagonalRotation(32, 8, "random", generator=generator(14))
    # a Cayley step never changes a block's determinant: start each block in its target's component
    flip = torch.sign(torch.linalg.det(target_blocks)) * torch.sign(torch.linalg.det(rotation.blocks.detach()))
    with torch.no_grad():
        rotation.blocks[:, :, 0] *= flip[:, None]
    first, last = fit_rotation(rotation, target)
    assert last < 1e-3 * first
    assert orthogonality_error(rotation.blocks).max() < 1e-5


def test_full_rotation_has_the_same_interface_and_trains():
    rotation = FullRotation(20, "random", generator=generator(15))
    x = torch.randn(3, 20, generator=generator(16))
    torch.testing.assert_close(rotation(x), x @ rotation.matrix())
    torch.testing.assert_close(rotation.inverse(rotation(x)), x, rtol=0, atol=1e-5)
    rebuilt = FullRotation.from_dense(rotation.matrix().detach())
    assert torch.equal(rebuilt.weight.detach(), rotation.weight.detach())
    with pytest.raises(ValueError, match="not orthogonal"):
        FullRotation.from_dense(torch.randn(20, 20, generator=generator(17)))
    with pytest.raises(ValueError, match="unknown init"):
        FullRotation(20, "hadamard")

    target = random_orthogonal(20, generator=generator(18))
    if torch.linalg.det(target) * torch.linalg.det(rotation.weight.detach()) < 0:
        target[:, 0] = -target[:, 0]
    first, last = fit_rotation(rotation, target)
    assert last < 1e-3 * first
    assert orthogonality_error(rotation.weight) < 1e-5


def test_low_precision_input_uses_the_input_dtype():
    rotation = BlockDiagonalRotation(16, 8, "random", generator=generator(19))
    x = torch.randn(4, 16, generator=generator(20)).to(torch.bfloat16)
    out = rotation(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), x.float() @ rotation.matrix().detach(), rtol=0.02, atol=0.02)
