"""Block-diagonal rotation + per-token symmetric int8/int4 quantization (the online R4 before a 4-bit GEMM).

Output for x [..., d] rotated by blocks [n, b, b]:
- int8: `q` int8 [..., d] in [-127, 127];
- int4: `q` uint8 [..., d // 2], two values per byte: element 2k in the LOW nibble, element 2k+1 in the HIGH
  nibble, each a 4-bit two's complement in [-7, 7] (-8 is never produced: the grid is symmetric);
- `scales` float32 [..., 1] with `x @ blockdiag(B) ~= q * scales`.
Convention (shared with the reference): `absmax = max(max_j |y_j|, 1e-8)`, `q = round_half_even(y * (qmax /
absmax))` clamped to [-qmax, qmax], `scale = absmax / qmax`, with y the fp32 rotation (never rounded to fp16).

Design: two plain launches, no program ever waits on another. A token's scale needs its whole rotated row
(d = 11008 values) before any integer can be written, while tensor-core efficiency needs a program to keep
one B tile [b, 128] on chip and stream many rows through it, so the columns of one row belong to d / 128
different programs.
  1. `_row_absmax_kernel`: rotate, and merge each row's max |y| into an int32 buffer by atomic max (the fp32
     bits of non-negative floats order like integers). Writes nothing else; x is read with the default L2
     policy so that step 2 finds part of it there.
  2. `_quantize_kernel`: rotate again (the same tl.dot, so the same fp32 y), quantize with the finished row
     maxima, write the integers and (from column tile 0) the scales. It walks the row groups in reverse, so
     it starts on the rows step 1 read last, which are still in L2.
x is read twice (once from L2 where it fits), integers written once. Both steps are idempotent (max, plain
stores), so the autotuner may repeat either, and a stopped call leaves nothing behind for the next one.
This replaced a one-launch design whose column tiles synchronized through L2 atomics and waited for each other
(x read once): on the H100 it was slower (207 vs 177 us at d = 11008, L = 8192, 61 vs 59 us at L = 2048) and
needed a deadlock argument; docs/BENCHMARKS.md has the measurements and why neither reaches a copy's time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.blockdiag import blockdiag_matmul_reference
from kernels.launch import (  # noqa: F401 - rotate_quant_configs: re-exported (the candidates live in launch)
    TileConfig,
    as_rows,
    check_kernel_args,
    launch_options,
    launch_tiled,
    m_bucket,
    rotate_quant_candidates,
    rotate_quant_configs,
)

QMAX = {8: 127, 4: 7}
ABSMAX_FLOOR = 1e-8  # an all-zero token gets q = 0 and a tiny scale instead of 0 / 0


def check_bits(bits: int) -> int:
    """qmax of a supported bit width (4 or 8); raise otherwise."""
    if bits not in QMAX:
        raise ValueError(f"bits must be 4 or 8 (symmetric int4 / int8), got {bits!r}")
    return QMAX[bits]


# ----------------------------------------------------------------------------------------------------------------
# References and packing


def quantize_per_token_reference(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of y [..., d] -> (q int8 [..., d] unpacked, scales float32 [..., 1])."""
    qmax = check_bits(bits)
    y = y.float()
    absmax = y.abs().amax(dim=-1, keepdim=True).clamp_min(ABSMAX_FLOOR)
    q = torch.round(y * (qmax / absmax)).clamp(-qmax, qmax).to(torch.int8)
    return q, absmax / qmax


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [..., d] in [-8, 7] -> uint8 [..., d // 2]; element 2k low nibble, element 2k+1 high nibble."""
    if q.dtype != torch.int8:
        raise ValueError(f"pack_int4 takes int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {q.shape[-1]}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"int4 values must lie in [-8, 7], got [{int(q.min())}, {int(q.max())}]")
    bits = q.view(torch.uint8) & 0x0F  # two's complement low nibble
    return bits[..., 0::2] | (bits[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., d // 2] -> int8 [..., d] in [-8, 7] (inverse of pack_int4)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 takes uint8 bytes, got {packed.dtype}")
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=-1).to(torch.int8)  # [..., d // 2, 2]
    nibbles = torch.where(nibbles >= 8, nibbles - 16, nibbles)  # sign-extend
    return nibbles.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 values q * scales; q as returned by rotate_quantize (packed when bits == 4)."""
    check_bits(bits)
    values = unpack_int4(q) if bits == 4 else q
    return values.float() * scales


def rotate_quantize_reference(
    x: torch.Tensor, blocks: torch.Tensor, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: fp32 rotation, then quantize_per_token_reference; int4 packed like the kernel."""
    check_bits(bits)
    y = blockdiag_matmul_reference(x.float(), blocks.float())
    q, scales = quantize_per_token_reference(y, bits)
    return (pack_int4(q) if bits == 4 else q), scales


# ----------------------------------------------------------------------------------------------------------------
# The kernels (plain functions; compiled by kernels.launch) and the prologue they share


@triton.jit  # decorated at import, as Triton's own tl functions are: TRITON_INTERPRET must be set before that
def column_tile(w_ptr, pid, D, BLOCK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program `pid`'s place in both steps' grid (also the floor probe's, benchmarks/rotate_quant_floor_probe.py):
    (column tiles per row group, its column tile, first output column col0, first input column k0 of its block,
    its B tile w [BLOCK, BLOCK_N] of w [n, BLOCK, BLOCK], kept in L2 for every row group). Column tiles vary
    fastest, so neighbouring programs share the x rows."""
    n_col_tiles = D // BLOCK_N
    col_tile = pid % n_col_tiles
    col0 = col_tile * BLOCK_N
    k0 = (col0 // BLOCK) * BLOCK
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(
        w_ptr + (k0 // BLOCK) * BLOCK * BLOCK + offs_k[:, None] * BLOCK + (col0 - k0) + offs_n[None, :],
        eviction_policy="evict_last",
    )
    return n_col_tiles, col_tile, col0, k0, w


def _row_absmax_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,  # x [M, D], w [n, BLOCK, BLOCK], absmax int32 [M] (fp32 bits), zero on entry
    M,
    D,
    stride_xm,
    M_BUCKET,  # autotune key only
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_tiles, col_tile, col0, k0, w = column_tile(w_ptr, pid, D, BLOCK, BLOCK_N)
    group = pid // n_col_tiles
    offs_k = tl.arange(0, BLOCK)
    if DOT_FP32:
        w = w.to(tl.float32)
    first = group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)  # no tl.cdiv: see kernels/blockdiag.py
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        x = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k0 + offs_k[None, :], mask=row_mask[:, None], other=0.0
        )  # default L2 policy: step 2 re-reads it
        if DOT_FP32:
            y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            y = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] fp32
        tile_max = tl.max(tl.abs(y), axis=1)  # >= 0, so its fp32 bits order like int32
        tl.atomic_max(absmax_ptr + rows, tile_max.to(tl.int32, bitcast=True), mask=row_mask, sem="relaxed")


def _quantize_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    q_ptr,
    scale_ptr,  # absmax from step 1; q [M, D or D/2], scale [M]
    M,
    D,
    stride_xm,
    stride_qm,
    M_BUCKET,  # autotune key only
    QMAX: tl.constexpr,
    PACK_INT4: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_tiles, col_tile, col0, k0, w = column_tile(w_ptr, pid, D, BLOCK, BLOCK_N)
    group = tl.num_programs(0) // n_col_tiles - 1 - pid // n_col_tiles  # last rows first: step 1 left them in L2
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    if DOT_FP32:
        w = w.to(tl.float32)
    first = group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        x = tl.load(
            x_ptr + rows64[:, None] * stride_xm + k0 + offs_k[None, :],
            mask=row_mask[:, None],
            other=0.0,
            eviction_policy="evict_first",
        )  # its last use
        if DOT_FP32:
            y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            y = tl.dot(x, w)
        absmax = tl.load(absmax_ptr + rows, mask=row_mask, other=0).to(tl.float32, bitcast=True)
        absmax = tl.maximum(absmax, 1e-8)  # ABSMAX_FLOOR
        qmax = tl.full([BLOCK_M], QMAX, tl.float32)
        v = y * tl.math.div_rn(qmax, absmax)[:, None]  # the same IEEE ops as the reference
        # round half to even without conversion instructions (a floor-based version was ALU-bound): adding
        # 1.5 * 2^23 leaves rint(v) in the low mantissa bits for |v| < 2^22 (here |v| <= qmax); the launcher
        # turns fp fusion off, so v is rounded to fp32 before the add, as in the reference
        q = (v + 12582912.0).to(tl.int32, bitcast=True) - 0x4B400000
        q = tl.minimum(tl.maximum(q, -QMAX), QMAX)
        if PACK_INT4:
            even, odd = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_N // 2, 2)))  # columns 2k and 2k+1
            packed = ((even & 0x0F) | ((odd & 0x0F) << 4)).to(tl.uint8)
            offs_b = tl.arange(0, BLOCK_N // 2)
            tl.store(q_ptr + rows64[:, None] * stride_qm + col0 // 2 + offs_b[None, :], packed, mask=row_mask[:, None])
        else:
            tl.store(
                q_ptr + rows64[:, None] * stride_qm + col0 + offs_n[None, :], q.to(tl.int8), mask=row_mask[:, None]
            )
        if col_tile == 0:
            tl.store(scale_ptr + rows, tl.math.div_rn(absmax, qmax), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher


def row_absmax(
    x: torch.Tensor, blocks: torch.Tensor, *, config: TileConfig | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Step 1 alone: merge max_j |(x @ blockdiag(blocks))_j| of each token into `out` (int32 [M], the fp32 bits).

    out: zeros when None; an existing buffer keeps the larger of its value and the new maximum (atomic max), so a
    repeated call leaves it unchanged. `out.view(torch.float32)` reads the maxima. rotate_quantize runs this step
    then the quantize step; benchmarks/rotate_quant_floor_probe.py times it alone.
    """
    _, b = check_kernel_args(x, blocks)
    x2 = as_rows(x)
    if out is None:
        out = torch.zeros((x2.shape[0],), dtype=torch.int32, device=x.device)
    elif out.shape != (x2.shape[0],) or out.dtype != torch.int32 or out.device != x.device:
        raise ValueError(
            f"out must be int32 [{x2.shape[0]}] on {x.device}, got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if x2.shape[0]:
        _launch_step(_row_absmax_kernel, x, x2, blocks.contiguous(), (out,), b, None, config)
    return out


def _launch_step(
    kernel,
    x: torch.Tensor,
    x2: torch.Tensor,
    w: torch.Tensor,
    buffers: tuple,
    b: int,
    bits: int | None,
    config: TileConfig | None,
    out_stride: tuple = (),
    extra: dict | None = None,
) -> None:
    """Launch one step over x2 [M, D]: args (x2, w, *buffers, M, D, x2's row stride, *out_stride, M bucket)."""
    m, d = x2.shape
    meta, config = launch_options(x, b, config)
    if x.is_cuda:
        meta["enable_fp_fusion"] = False  # no y * s + c fused into one FMA: the rounding must see fp32 y * s
    args = (x2, w, *buffers, m, d, x2.stride(0), *out_stride, m_bucket(m))
    # both steps are idempotent, so the autotuner's repeated trial runs are harmless
    launch_tiled(
        kernel,
        b,
        m,
        d,
        args,
        {**meta, **(extra or {})},
        config,
        tune_key=(m_bucket(m), d, b, bits, x.dtype, x.device),
        configs=rotate_quant_candidates(b),
    )


def rotate_quantize(
    x: torch.Tensor, blocks: torch.Tensor, bits: int = 4, *, config: TileConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton rotation + per-token quantization -> (q, scales float32 [..., 1]); see the module doc.

    config: one tile shape for both steps (None: each step autotuned on CUDA; a small fixed tile when interpreted).
    """
    qmax = check_bits(bits)
    _, b = check_kernel_args(x, blocks)
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError("int4 packing needs an even width")
    x2, w = as_rows(x), blocks.contiguous()
    m, d = x2.shape
    q = torch.empty((m, d // 2 if bits == 4 else d), dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)
    scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    if m == 0:
        return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)
    absmax = torch.zeros((m,), dtype=torch.int32, device=x.device)
    _launch_step(_row_absmax_kernel, x, x2, w, (absmax,), b, bits, config)
    _launch_step(
        _quantize_kernel,
        x,
        x2,
        w,
        (absmax, q, scales),
        b,
        bits,
        config,
        out_stride=(q.stride(0),),
        extra={"QMAX": qmax, "PACK_INT4": bits == 4},
    )
    return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)


def rotate_quantize_bytes(d: int, tokens: int, block: int, bits: int, element_size: int = 2) -> int:
    """Fewest device-memory bytes: read x and the blocks once, write the integers and the scales."""
    if d % block:
        raise ValueError(f"d ({d}) must be divisible by the block size ({block})")
    return tokens * d * element_size + d * block * element_size + tokens * (d * bits // 8 + 4)
