"""Fused block-diagonal rotation + per-token symmetric int8/int4 quantization (the online R4 before a 4-bit GEMM).

Output for x [..., d] rotated by blocks [n, b, b]:
- int8: `q` int8 [..., d] in [-127, 127];
- int4: `q` uint8 [..., d // 2], two values per byte: element 2k in the LOW nibble, element 2k+1 in the HIGH
  nibble, each a 4-bit two's complement in [-7, 7] (-8 is never produced: the grid is symmetric);
- `scales` float32 [..., 1] with `x @ blockdiag(B) ~= q * scales`.
Convention (shared with the reference): `absmax = max(max_j |y_j|, 1e-8)`, `q = round_half_even(y * (qmax /
absmax))` clamped to [-qmax, qmax], `scale = absmax / qmax`, with y the fp32 rotation (never rounded to fp16).

Design. A token's scale needs its whole rotated row (d = 11008 values) before any integer can be written.
No program can hold that on chip for a useful number of tokens, and a program that walked one row tile across
all 86 blocks would re-read the 2.8 MB of B per row tile (more L2 traffic than x itself) and leave most SMs
idle at L = 2048. So the work is split by (row tile, column tile of a block) like the plain kernel, and rows
are cut into chunks of about 16 MiB of x; ONE launch runs, per chunk, two stages of programs:
  phase 1: rotate each tile in registers, atomic-max the per-row |y| into an int32 buffer (fp32 bits of
           non-negative floats order like integers), then count the program done for its chunk;
  phase 2: wait for the chunk's phase-1 count, rotate the same tiles again, quantize with the finished row
           absmax, write the integers (and the scale, from column tile 0).
Programs take work by an atomic ticket in the order P1(0), P1(1), P2(0), P1(2), P2(1), ...: a phase-2 item
waits only on items with smaller tickets, which are already running, so the waits cannot deadlock, and
phase 2 of a chunk re-reads x while it is still in L2 (H100: 50 MB). The rotated tensor never touches
memory. Measured on the H100 (docs/BENCHMARKS.md) this is correct but about 1.85x a copy of x at
d = 11008, L = 8192, not yet under the copy time the issue asks for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.blockdiag import (INTERPRETER_TILE, TileConfig, _fit_config, as_rows, blockdiag_matmul_reference,
                               check_kernel_args, jit_kernel, launch_tuned, m_bucket)

QMAX = {8: 127, 4: 7}
ABSMAX_FLOOR = 1e-8  # an all-zero token gets q = 0 and a tiny scale instead of 0 / 0
L2_CHUNK_BYTES = 16 << 20  # x bytes per chunk: phase 2 re-reads them from L2 (H100: 50 MB)


def _check_bits(bits: int) -> int:
    if bits not in QMAX:
        raise ValueError(f"bits must be 4 or 8 (symmetric int4 / int8), got {bits!r}")
    return QMAX[bits]


# ----------------------------------------------------------------------------------------------------------------
# References and packing

def quantize_per_token_reference(y: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantization of y [..., d] -> (q int8 [..., d] unpacked, scales float32 [..., 1])."""
    qmax = _check_bits(bits)
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
    _check_bits(bits)
    values = unpack_int4(q) if bits == 4 else q
    return values.float() * scales


def rotate_quantize_reference(x: torch.Tensor, blocks: torch.Tensor,
                              bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: fp32 rotation, then quantize_per_token_reference; int4 packed like the kernel."""
    _check_bits(bits)
    y = blockdiag_matmul_reference(x.float(), blocks.float())
    q, scales = quantize_per_token_reference(y, bits)
    return (pack_int4(q) if bits == 4 else q), scales


# ----------------------------------------------------------------------------------------------------------------
# The kernel (plain function; compiled by jit_kernel / autotuned_kernel)

def _rotate_quant_kernel(
    x_ptr, w_ptr, q_ptr, scale_ptr,  # x [M, D], w [n, BLOCK, BLOCK], q [M, D or D/2], scale [M]
    sync_ptr,  # int32 [M + 1 + n_chunks], zeroed: row absmax (fp32 bits), ticket counter, phase-1 count per chunk
    M, D, stride_xm, stride_qm, chunk_rows, n_chunks,
    M_BUCKET,  # autotune key only
    QMAX: tl.constexpr, PACK_INT4: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    n_col_tiles = D // BLOCK_N
    per_stage = n_col_tiles * ((chunk_rows + BLOCK_M * ROW_TILES - 1) // (BLOCK_M * ROW_TILES))
    # Work goes by ticket (start order), not program id: a phase-2 item only waits on phase-1 items with smaller
    # tickets, whose programs are already running, so the waits cannot deadlock (and the interpreter, which runs
    # programs one by one in order, never waits). Stages: P1(0), P1(1), P2(0), P1(2), P2(1), ..., P2(C-1).
    ticket = tl.atomic_add(sync_ptr + M, 1)
    stage = ticket // per_stage
    item = ticket % per_stage
    half = (stage + 1) // 2
    phase1 = (stage == 0) | ((stage % 2 == 1) & (half < n_chunks))
    chunk = tl.where(stage == 0, 0, tl.where(phase1, half, half - 1))
    done_ptr = sync_ptr + M + 1 + chunk

    col_tile = item % n_col_tiles
    row_group = item // n_col_tiles
    col0 = col_tile * BLOCK_N
    k0 = (col0 // BLOCK) * BLOCK
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + (k0 // BLOCK) * BLOCK * BLOCK + offs_k[:, None] * BLOCK + (col0 - k0) + offs_n[None, :])
    if DOT_FP32:
        w = w.to(tl.float32)

    row_start = chunk * chunk_rows
    row_end = tl.minimum(row_start + chunk_rows, M)
    first = row_group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (row_end - row_start + BLOCK_M - 1) // BLOCK_M)  # no tl.cdiv: module doc
    # two loops rather than one with a branch inside: Triton's software pipeliner needs a plain loop body
    if phase1:
        for tile in range(first, last):
            rows = row_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k0 + offs_k[None, :],
                        mask=row_mask[:, None], other=0.0)
            if DOT_FP32:
                y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                y = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] fp32 rotated values
            tile_max = tl.max(tl.abs(y), axis=1)  # [BLOCK_M], >= 0, so its fp32 bits order like int32
            tl.atomic_max(sync_ptr + rows, tile_max.to(tl.int32, bitcast=True), mask=row_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's atomic_max is issued before the release below
        tl.atomic_add(done_ptr, 1, sem="release")
    else:
        # wait until every phase-1 program of this chunk has merged its row maxima
        finished = tl.atomic_add(done_ptr, 0, sem="acquire")
        while finished < per_stage:
            finished = tl.atomic_add(done_ptr, 0, sem="acquire")
        for tile in range(first, last):
            rows = row_start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            rows64 = rows.to(tl.int64)
            x = tl.load(x_ptr + rows64[:, None] * stride_xm + k0 + offs_k[None, :], mask=row_mask[:, None],
                        other=0.0)
            if DOT_FP32:
                y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                y = tl.dot(x, w)
            # an atomic read: the maxima were merged in L2 by other programs
            absmax = tl.atomic_max(sync_ptr + rows, 0, mask=row_mask, sem="relaxed").to(tl.float32, bitcast=True)
            absmax = tl.maximum(absmax, 1e-8)  # ABSMAX_FLOOR
            qmax = tl.full([BLOCK_M], QMAX, tl.float32)
            v = y * tl.math.div_rn(qmax, absmax)[:, None]  # the same IEEE ops as the reference
            # round half to even: floor, then compare the exact fraction (v - floor(v) is exact in fp32)
            r = tl.floor(v)
            frac = v - r
            r_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
            r = tl.where((frac > 0.5) | ((frac == 0.5) & r_odd), r + 1.0, r)
            q = tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int32)
            if PACK_INT4:
                even, odd = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_N // 2, 2)))  # columns 2k and 2k+1
                packed = ((even & 0x0F) | ((odd & 0x0F) << 4)).to(tl.uint8)
                offs_b = tl.arange(0, BLOCK_N // 2)
                tl.store(q_ptr + rows64[:, None] * stride_qm + col0 // 2 + offs_b[None, :], packed,
                         mask=row_mask[:, None])
            else:
                tl.store(q_ptr + rows64[:, None] * stride_qm + col0 + offs_n[None, :], q.to(tl.int8),
                         mask=row_mask[:, None])
            if col_tile == 0:
                tl.store(scale_ptr + rows, tl.math.div_rn(absmax, qmax), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher

def chunk_rows_for(d: int, element_size: int, l2_chunk_bytes: int = L2_CHUNK_BYTES) -> int:
    """Rows per chunk so that the chunks in flight (two: one in phase 1, one in phase 2) stay in L2."""
    return max(128, (l2_chunk_bytes // (d * element_size)) // 128 * 128)


def rotate_quantize(x: torch.Tensor, blocks: torch.Tensor, bits: int = 4, *, chunk_rows: int | None = None,
                    config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused rotation + per-token quantization -> (q, scales float32 [..., 1]); see the module doc.

    chunk_rows: tokens per chunk (None: about L2_CHUNK_BYTES of x, see chunk_rows_for).
    config: a fixed tile shape (None: autotuned on CUDA).
    """
    qmax = _check_bits(bits)
    _, b = check_kernel_args(x, blocks)
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError("int4 packing needs an even width")
    x2, w = as_rows(x), blocks.contiguous()
    m, d = x2.shape
    if chunk_rows is None:
        chunk_rows = chunk_rows_for(d, x2.element_size())
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    q = torch.empty((m, d // 2 if bits == 4 else d), dtype=torch.uint8 if bits == 4 else torch.int8,
                    device=x.device)
    scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    if m == 0:
        return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)
    chunk_rows = min(chunk_rows, m)
    n_chunks = triton.cdiv(m, chunk_rows)
    sync = torch.zeros((m + 1 + n_chunks,), dtype=torch.int32, device=x.device)
    interpret = not x.is_cuda
    if interpret and config is None:
        config = INTERPRETER_TILE

    def grid(meta):  # two stages (phase 1, phase 2) of per_stage programs for every chunk
        per_stage = (d // meta["BLOCK_N"]) * triton.cdiv(chunk_rows, meta["BLOCK_M"] * meta["ROW_TILES"])
        return (2 * n_chunks * per_stage,)

    args = (x2, w, q, scales, sync, m, d, x2.stride(0), q.stride(0), chunk_rows, n_chunks, m_bucket(m))
    meta = dict(QMAX=qmax, PACK_INT4=bits == 4, BLOCK=b, DOT_FP32=interpret and x.dtype == torch.bfloat16)
    if config is None:
        launch_tuned(_rotate_quant_kernel, b, grid, args, meta,
                     (m_bucket(m), d, b, chunk_rows, bits, x.dtype, x.device),
                     key=("M_BUCKET", "D", "BLOCK", "chunk_rows"), reset_to_zero=("sync_ptr",))
    else:
        config = _fit_config(config, b)
        jit_kernel(_rotate_quant_kernel)[grid](*args, **meta, **config.meta(), num_warps=config.num_warps,
                                               num_stages=config.num_stages)
    return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)


def rotate_quantize_bytes(d: int, tokens: int, block: int, bits: int, element_size: int = 2) -> int:
    """Fewest device-memory bytes: read x and the blocks once, write the integers and the scales."""
    if d % block:
        raise ValueError(f"d ({d}) must be divisible by the block size ({block})")
    return tokens * d * element_size + d * block * element_size + tokens * (d * bits // 8 + 4)
