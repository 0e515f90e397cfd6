"""Block rotations: block-diagonal random Hadamard R1 and R4 of 16 to 256 (a ragged last block where the width asks
for one) are orthogonal and leave the network's function unchanged, and a permuted block R4 deals each layer's
outlier channels out over the blocks, fused exactly into gate/up rows and down_proj columns."""

import pytest
import torch

from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.rotation.fusion import RotationConfig, deal_channels, equivalence, rotate
from engine.rotation.hadamard import hadamard_matrix, random_block_hadamard


@pytest.mark.parametrize("n, block, sizes", [(128, 32, [32] * 4), (576, 128, [128] * 4 + [64]), (64, 16, [16] * 4)])
def test_block_hadamard_is_orthogonal_block_diagonal_with_random_signs(n, block, sizes):
    r = random_block_hadamard(n, block, seed=3)
    assert torch.allclose(r @ r.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    start = 0
    for b in sizes:  # each diagonal block is +-H_b column by column; nothing outside the blocks
        blk = r[start : start + b, start : start + b]
        assert torch.allclose(blk.abs(), hadamard_matrix(b).abs())
        assert torch.count_nonzero(r[start : start + b]) == b * b
        start += b
    assert not torch.equal(r, random_block_hadamard(n, block, seed=4))  # the signs follow the seed


def test_a_block_that_leaves_an_impossible_remainder_is_refused():
    with pytest.raises(ValueError, match="last block would be 6 wide"):
        random_block_hadamard(70, 32)


def test_dealing_puts_the_largest_channels_in_different_blocks():
    g = torch.Generator().manual_seed(0)
    magnitude = torch.rand(128, generator=g)
    outliers = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12])  # all in the first block of 32 before dealing
    magnitude[outliers] = 100 + torch.arange(8.0)
    perm = deal_channels(magnitude, 32)
    assert sorted(perm.tolist()) == list(range(128))  # a permutation
    blocks = [set(perm[b * 32 : (b + 1) * 32].tolist()) for b in range(4)]
    assert [len(blk & set(outliers.tolist())) for blk in blocks] == [2, 2, 2, 2]  # every block gets its share
    means = [float(magnitude[perm[b * 32 : (b + 1) * 32]].mean()) for b in range(4)]
    assert max(means) - min(means) < 0.1 * max(means)


@pytest.mark.parametrize("r1, r4", [("block16", "block32"), ("block32", "block32p"), ("hadamard", "block64p")])
def test_block_and_permuted_rotations_leave_the_logits_unchanged(r1, r4):
    model = tiny_llama(hidden=64, intermediate=128)
    arch = resolve(model)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    calib = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    cfg = RotationConfig(r1=r1, r2="hadamard", r3="hadamard", r4=r4)
    rotated = rotate(model, arch, cfg, calib=calib)
    assert equivalence(model, rotated, ids)["max_abs_logit_diff"] < 1e-4
    down = arch.module(rotated, "down", 0)
    assert down.spinscope_r4.blocks is not None  # online R4 runs as blocks (the one-pass kernel's form)
    if r4.endswith("p"):
        gate0, gate1 = arch.module(model, "gate", 0).weight, arch.module(rotated, "gate", 0).weight
        assert not torch.equal(gate0, gate1)  # the rows really were permuted (and R1 folded in)


def test_a_permuted_r4_needs_calibration_and_only_fits_r4():
    model = tiny_llama()
    with pytest.raises(ValueError, match="give calibration windows"):
        rotate(model, resolve(model), RotationConfig(r4="block32p"))
    with pytest.raises(ValueError, match="fused exactly only for R4"):
        RotationConfig(r1="block32p")
