"""kernels.blockdiag: the Triton kernel (interpreted on the CPU) against the torch reference and a dense matmul."""

import os

import pytest
import torch

from kernels.blockdiag import (
    SUPPORTED_BLOCKS,
    TileConfig,
    _BlockdiagRotation,
    blockdiag_matmul,
    blockdiag_matmul_reference,
    blockdiag_matmul_triton,
    blockdiag_rotate,
    kernel_applies,
    tile_configs,
)

# ||out - ref|| / ||ref|| for one rounding of the output (fp16: 2^-11, bf16: 2^-8) plus accumulation order
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernel in Triton's CPU interpreter (TRITON_INTERPRET=1)"
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)


def rel_error(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def random_blocks(n, b, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, b, b, generator=g))[0].to(dtype)


def dense_reference(x, blocks):
    return x.double() @ torch.block_diag(*blocks.double().unbind(0))


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])  # bf16 dot upcast in the interpreter only
@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
def test_kernel_matches_dense_blockdiag_on_odd_leading_shape(block, dtype):
    torch.manual_seed(block)
    x = torch.randn(3, 5, 2 * block).to(dtype)
    blocks = random_blocks(2, block, dtype)
    y = blockdiag_matmul_triton(x, blocks)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_error(y, dense_reference(x, blocks)) < TOLERANCE[dtype]
    assert rel_error(blockdiag_matmul_reference(x, blocks), dense_reference(x, blocks)) < TOLERANCE[dtype]


@interpreted
@pytest.mark.parametrize("config", [TileConfig(16, 32, 1), TileConfig(16, 64, 3), TileConfig(32, 128, 2)])
def test_fixed_tiles_cover_every_row_and_column(config):
    # 37 rows leave a partial row tile; 3 blocks of 128 with 32- or 64-wide column tiles exercise the offsets
    torch.manual_seed(1)
    x = torch.randn(37, 384, dtype=torch.float16)
    blocks = random_blocks(3, 128, torch.float16)
    y = blockdiag_matmul_triton(x, blocks, config=config)
    assert torch.isfinite(y).all()
    assert rel_error(y, dense_reference(x, blocks)) < TOLERANCE[torch.float16]


@interpreted
def test_strided_rows_and_single_token():
    torch.manual_seed(2)
    wide = torch.randn(9, 512, dtype=torch.float16)
    x = wide[:, :256]  # row stride 512 > width 256
    blocks = random_blocks(4, 64, torch.float16)
    assert rel_error(blockdiag_matmul_triton(x, blocks), dense_reference(x, blocks)) < 2e-3
    one = torch.randn(256, dtype=torch.float16)  # a single token without a leading dim
    assert rel_error(blockdiag_matmul_triton(one, blocks), dense_reference(one, blocks)) < 2e-3


def test_dispatch_uses_reference_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(4, 64, dtype=torch.float16)
    blocks = random_blocks(2, 32, torch.float16)
    assert torch.equal(blockdiag_matmul(x, blocks), blockdiag_matmul_reference(x, blocks))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        blockdiag_matmul_triton(x, blocks)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda x, b: (x[..., :-32], b), "last dim"),
        (lambda x, b: (x.float(), b.float()), "float16 or bfloat16"),
        (lambda x, b: (x, b.bfloat16()), "must match"),
        (lambda x, b: (x, b[:, :, :16]), r"\[n_blocks, b, b\]"),
        (lambda x, b: (torch.randn(2, 96).half(), torch.randn(2, 48, 48).half()), "block sizes"),
    ],
)
def test_launcher_rejects_bad_arguments(bad, match):
    x, blocks = bad(torch.randn(2, 64).half(), random_blocks(2, 32, torch.float16))
    with pytest.raises(ValueError, match=match):
        blockdiag_matmul_triton(x, blocks)


@pytest.mark.parametrize("block", SUPPORTED_BLOCKS)
def test_autotune_candidates_fit_the_block(block):
    configs = tile_configs(block)
    assert configs
    for config in configs:
        assert block % config.block_n == 0
        # fp16 B tile [b, block_n] plus num_stages x tiles [block_m, b] within one SM's shared memory (227 KiB)
        assert (block * config.block_n + config.num_stages * config.block_m * block) * 2 <= 200 * 1024


def test_tile_config_name_lists_every_field():  # benchmarks.gpu_kernel_check's sweep tables
    assert TileConfig(64, 128, 4, 8, 3).name() == "m64n128r4w8s3"


def test_tile_config_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(block_m=24, block_n=128, row_tiles=1)


@interpreted
def test_autograd_function_gradients_match_dense():
    # the engine hook's Triton forward/backward (run here by the interpreter) against float64 autograd
    torch.manual_seed(3)
    x = torch.randn(2, 7, 128, dtype=torch.float16, requires_grad=True)
    blocks = random_blocks(2, 64, torch.float16).requires_grad_(True)
    grad_out = torch.randn(2, 7, 128, dtype=torch.float16)
    (_BlockdiagRotation.apply(x, blocks) * grad_out).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    b64 = blocks.detach().double().requires_grad_(True)
    (dense_reference(x64, b64) * grad_out.double()).sum().backward()
    assert rel_error(x.grad, x64.grad) < 2e-3
    assert rel_error(blocks.grad, b64.grad) < 2e-3


def test_blockdiag_rotate_on_cpu_is_differentiable_reference():
    x = torch.randn(5, 96, requires_grad=True)
    blocks = random_blocks(3, 32, torch.float32).requires_grad_(True)
    assert not kernel_applies(x, blocks)
    y = blockdiag_rotate(x, blocks)
    assert torch.allclose(y.double(), dense_reference(x.detach(), blocks.detach()), atol=1e-5)
    y.square().sum().backward()
    assert blocks.grad is not None and blocks.grad.shape == blocks.shape
    # an orthogonal rotation keeps the norm, so d||xR||^2/dx = 2x
    assert torch.allclose(x.grad, 2 * x.detach(), atol=1e-4)


@needs_gpu
def test_gpu_autotuned_kernel_matches_reference():
    x = torch.randn(3, 513, 11008, dtype=torch.float16, device="cuda")
    blocks = random_blocks(86, 128, torch.float16).cuda()
    assert kernel_applies(x, blocks)
    assert rel_error(blockdiag_matmul(x, blocks), blockdiag_matmul_reference(x, blocks)) < 2e-3


def test_fast_launch_key_separates_what_triton_specializes_on():
    # kernels.launch.launch replays a compiled kernel only for arguments Triton would compile the same way
    from kernels.launch import specialization

    base = torch.zeros(64, dtype=torch.float16)
    assert specialization(base) == specialization(torch.ones(64, dtype=torch.float16))
    assert specialization(base) != specialization(base[1:])  # 2-byte offset: not 16-byte aligned
    assert specialization(base) != specialization(torch.zeros(64, dtype=torch.bfloat16))
    assert specialization(11008) == specialization(4096) != specialization(11009)  # % 16
    assert specialization(1) != specialization(3)  # Triton turns an int equal to 1 into a constant
    assert specialization(1 << 31) != specialization(1 << 30)  # i64 beyond int32
