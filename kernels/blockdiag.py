"""Block-diagonal rotation `y = x @ blockdiag(B_1..B_n)` as a Triton kernel (FLRot's online R3/R4).

x is [..., d] with d = n * b; the blocks are one tensor [n, b, b] (same dtype as x); output block j is
`x[..., j*b:(j+1)*b] @ B_j`. The op moves the same bytes as a copy of x, and a b x b matmul per block is cheap
on tensor cores, so a kernel that streams x once can approach the copy time (docs/BENCHMARKS.md).

Kernel shape: a program owns one output column tile of one block (BLOCK_N columns of B_j, loaded once and kept
on chip) and walks ROW_TILES consecutive row tiles of BLOCK_M tokens, so B is read about once per program and
x exactly once overall; fp16/bf16 operands, fp32 accumulation (tensor-core `tl.dot`).

CPU runs: with TRITON_INTERPRET=1 set before `triton` is first imported (Triton's own tl.max / tl.cdiv are
decorated at import), the kernels run in Triton's CPU interpreter; the CPU tests run the same kernel bodies
that way. Our kernels are jitted at first launch, so importing this module early does no harm.

Tile shapes, argument checks and the launchers are shared with kernels/rotate_quant.py and live in
kernels/launch.py; `TileConfig`, `SUPPORTED_BLOCKS` and `tile_configs` are re-exported here for callers of
`blockdiag_matmul_triton(..., config=TileConfig(...))`.
"""

from __future__ import annotations

import torch
import triton.language as tl

from kernels.launch import (  # noqa: F401 - TileConfig, tile_configs: re-exported (see the module doc)
    KERNEL_DTYPES,
    SUPPORTED_BLOCKS,
    TileConfig,
    as_rows,
    check_blocks,
    check_kernel_args,
    launch_options,
    launch_tiled,
    m_bucket,
    tile_configs,
    triton_interpret_requested,
)

X_EVICTION_POLICY = "evict_first"  # L2 hint for the x tiles, read once; the B tiles are marked evict_last
DEFAULT_BLOCK = 128


# ----------------------------------------------------------------------------------------------------------------
# The kernel (plain function; compiled by kernels.launch)


def _blockdiag_kernel(
    x_ptr,
    w_ptr,
    y_ptr,  # x [M, D], w [n, BLOCK, BLOCK], y [M, D]; last dims contiguous
    M,
    D,
    stride_xm,
    stride_ym,
    M_BUCKET,  # autotune key only
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's dot cannot read bf16: upcast there (exact products)
    X_EVICTION: tl.constexpr,  # L2 hint for x, streamed once (X_EVICTION_POLICY); "" for the default policy
):
    pid = tl.program_id(0)
    n_col_tiles = D // BLOCK_N
    col_tile = pid % n_col_tiles  # column tiles vary fastest: neighbours share the x rows in L2
    row_group = pid // n_col_tiles
    col0 = col_tile * BLOCK_N  # first output column
    k0 = (col0 // BLOCK) * BLOCK  # first input column of this block
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)

    # B_j[:, col0-k0 : col0-k0+BLOCK_N]  [BLOCK, BLOCK_N], read once, reused for every row tile
    w = tl.load(
        w_ptr + (k0 // BLOCK) * BLOCK * BLOCK + offs_k[:, None] * BLOCK + (col0 - k0) + offs_n[None, :],
        eviction_policy="evict_last",
    )  # every row group reads it
    if DOT_FP32:
        w = w.to(tl.float32)

    first = row_group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)  # no tl.cdiv: see module doc
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)  # M * D can pass 2^31
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + k0 + offs_k[None, :],
            mask=row_mask[:, None],
            other=0.0,
            eviction_policy=X_EVICTION,
        )
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] fp32
        tl.store(
            y_ptr + rows64[:, None] * stride_ym + col0 + offs_n[None, :],
            acc.to(y_ptr.dtype.element_ty),
            mask=row_mask[:, None],
        )


# ----------------------------------------------------------------------------------------------------------------
# Launcher and reference


def blockdiag_matmul_triton(x: torch.Tensor, blocks: torch.Tensor, *, config: TileConfig | None = None) -> torch.Tensor:
    """Triton y = x @ blockdiag(blocks); autotuned unless `config` fixes the tile shape."""
    _, b = check_kernel_args(x, blocks)
    x2, w = as_rows(x), blocks.contiguous()
    m, d = x2.shape
    y = torch.empty((m, d), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(x.shape)
    meta, config = launch_options(x, b, config)
    meta["X_EVICTION"] = X_EVICTION_POLICY  # read at each call: benchmarks.gpu_kernel_check times the tile without it
    launch_tiled(
        _blockdiag_kernel,
        b,
        m,
        d,
        (x2, w, y, m, d, x2.stride(0), y.stride(0), m_bucket(m)),
        meta,
        config,
        tune_key=(m_bucket(m), d, b, x.dtype, x.device),
    )
    return y.reshape(x.shape)


def blockdiag_matmul_reference(
    x: torch.Tensor, blocks: torch.Tensor, *, compute_dtype: torch.dtype | None = torch.float32
) -> torch.Tensor:
    """Torch y = x @ blockdiag(blocks), computed in compute_dtype (None: x's dtype, one batched matmul)."""
    n, b = check_blocks(x, blocks)
    dtype = compute_dtype or x.dtype
    # [..., n, b] x [n, b, b] -> [..., n, b]; einsum lowers to one bmm over the n blocks
    y = torch.einsum("...nk,nkj->...nj", x.reshape(*x.shape[:-1], n, b).to(dtype), blocks.to(dtype))
    return y.reshape(x.shape).to(x.dtype)


def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """y = x @ blockdiag(blocks): Triton on CUDA (or under TRITON_INTERPRET=1), the torch reference elsewhere."""
    if x.is_cuda or triton_interpret_requested():
        return blockdiag_matmul_triton(x, blocks)
    return blockdiag_matmul_reference(x, blocks)


# ----------------------------------------------------------------------------------------------------------------
# Engine hook (online R3/R4): differentiable, any device and dtype


def kernel_applies(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """True when the Triton kernel can run this rotation: CUDA, fp16/bf16 activations, a supported block."""
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and blocks.dim() == 3
        and blocks.shape[-1] in SUPPORTED_BLOCKS
        and blocks.shape[-1] == blocks.shape[-2]
    )


class _BlockdiagRotation(torch.autograd.Function):
    """Triton forward; backward dx = dy @ blockdiag(B)^T (the same kernel), dB_j = x_j^T dy_j in fp32."""

    @staticmethod
    def forward(ctx, x, blocks):
        ctx.save_for_backward(x, blocks)
        return blockdiag_matmul_triton(x, blocks)

    @staticmethod
    def backward(ctx, grad_y):
        x, blocks = ctx.saved_tensors
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = blockdiag_matmul_triton(grad_y.contiguous(), blocks.transpose(1, 2).contiguous())
        if ctx.needs_input_grad[1]:
            n, b = blocks.shape[0], blocks.shape[1]
            xs = x.reshape(-1, n, b).float()  # [M, n, b]
            gs = grad_y.reshape(-1, n, b).float()
            grad_blocks = torch.einsum("mnk,mnj->nkj", xs, gs).to(blocks.dtype)
        return grad_x, grad_blocks


def blockdiag_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Engine entry for online R3/R4: `x @ blockdiag(blocks)` with autograd.

    Uses the Triton kernel when `kernel_applies` (blocks are cast to x's dtype; gradients flow back to the
    original blocks), otherwise the torch reference in float32, returned in x's dtype.
    """
    check_blocks(x, blocks)
    if kernel_applies(x, blocks):
        return _BlockdiagRotation.apply(x, blocks.to(x.dtype))
    return blockdiag_matmul_reference(x, blocks)
