"""Fused block-diagonal rotation + per-token symmetric int8/int4 quantization (the online R4 before a 4-bit GEMM).

Output for x [..., d] rotated by blocks [n, b, b]:
- int8: `q` int8 [..., d] in [-127, 127];
- int4: `q` uint8 [..., d // 2], two values per byte: element 2k in the LOW nibble, element 2k+1 in the HIGH
  nibble, each a 4-bit two's complement in [-7, 7] (-8 is never produced: the grid is symmetric);
- `scales` float32 [..., 1] with `x @ blockdiag(B) ~= q * scales`.
Convention (shared with the reference): `absmax = max(max_j |y_j|, 1e-8)`, `q = round_half_even(y * (qmax /
absmax))` clamped to [-qmax, qmax], `scale = absmax / qmax`, with y the fp32 rotation (never rounded to fp16).

Design. A token's scale needs its whole rotated row (d = 11008 values) before any integer can be written, but
tensor-core efficiency needs a program to reuse its B tile [b, 128] over many rows, so programs own (row
group, output column tile) like the plain kernel, and the column tiles of one row group agree on the row
maxima through memory. One launch (`fused`, the GPU path):
  1. a program rotates its tile(s) of x, atomic-maxes the per-row |y| into an int32 buffer (fp32 bits of
     non-negative floats order like integers) and counts itself done for its row group;
  2. it waits until all d / 128 column tiles of its row group are done (they run at the same time, see below),
     then quantizes with the finished row maxima and writes the integers (and the scales, from column tile 0).
With one row tile per program (the usual winner) the rotated tile [block_m, 128] fp32 stays in registers
across the wait, so x is read once from memory: 2 B/elem read + 0.5 (int4) written, against a copy's 4. With
more row tiles the program rotates them again in step 2, re-reading x from L2 a few microseconds later.
The waits cannot deadlock: programs take work by an atomic ticket in start order, a row group's programs have
consecutive tickets, and a group (d / block_n programs) fits on the GPU at once (the launcher checks that it is
at most the number of SMs), so the lowest unfinished group always has, or gets, all its programs running.
The interpreter runs programs one by one, so there (and for groups wider than the GPU) the two steps run as
two launches (`fused=False`), the same kernel body with PHASE 1 then 2.
The sync buffer is cached per device and left zeroed by the kernel itself (the last program of a row group
clears its maxima and counters, the last program overall the ticket), which saves a memset launch per call;
calls on one device must therefore not overlap on two streams.
Measured on the H100 (docs/BENCHMARKS.md): correct, and faster than the chunked two-phase version it replaced
(device time 60 vs 70 us at d = 11008, L = 2048), but still 1.7 to 1.9x a copy of x: the group waits leave
programs idle with no loads in flight, so at L = 8192 it is no faster than two plain launches (reading x twice).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels.blockdiag import (INTERPRETER_TILE, SHARED_MEMORY_BUDGET, TileConfig, _fit_config, as_rows,
                               blockdiag_matmul_reference, check_kernel_args, launch, launch_tuned, m_bucket,
                               shared_memory_estimate)

QMAX = {8: 127, 4: 7}
ABSMAX_FLOOR = 1e-8  # an all-zero token gets q = 0 and a tiny scale instead of 0 / 0
# Autotune candidates (block_m, row_tiles, num_warps, num_stages); output tiles are min(b, 128) wide. With one row
# tile per program the fused launch keeps the rotated tile in registers; with more it rotates twice (L2 re-read).
_TILE_CANDIDATES = ((64, 1, 4, 1), (128, 1, 8, 1), (32, 1, 4, 1), (64, 2, 4, 2), (128, 2, 8, 2), (64, 4, 4, 3))
FUSED_LAUNCH = True  # False: always two launches (a switch for tests of the fallback and for diagnosis)
SPLIT_TILE = TileConfig(block_m=64, block_n=128, row_tiles=4, num_warps=4, num_stages=3)  # two-launch fallback


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
    sync_ptr,  # int32, zero on entry and on exit: [M] row absmax (fp32 bits), [G] done, [G] finished, ticket, total
    M, D, stride_xm, stride_qm,
    M_BUCKET,  # autotune key only
    QMAX: tl.constexpr, PACK_INT4: tl.constexpr,
    PHASE: tl.constexpr,  # 0: both steps in one launch (GPU); 1 / 2: step 1 / step 2 alone (two launches)
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    n_col_tiles = D // BLOCK_N
    n_row_tiles = (M + BLOCK_M - 1) // BLOCK_M  # no tl.cdiv: see kernels/blockdiag.py's module doc
    n_groups = (n_row_tiles + ROW_TILES - 1) // ROW_TILES
    absmax_ptr = sync_ptr
    done_ptr = sync_ptr + M
    finished_ptr = done_ptr + n_groups
    ticket_ptr = finished_ptr + n_groups  # [2]: start ticket, programs finished
    if PHASE == 0:
        item = tl.atomic_add(ticket_ptr, 1)  # start order, so a row group's programs run together
    else:
        item = tl.program_id(0)
    col_tile = item % n_col_tiles
    group = item // n_col_tiles
    col0 = col_tile * BLOCK_N
    k0 = (col0 // BLOCK) * BLOCK
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    w = tl.load(w_ptr + (k0 // BLOCK) * BLOCK * BLOCK + offs_k[:, None] * BLOCK + (col0 - k0) + offs_n[None, :],
                eviction_policy="evict_last")  # [BLOCK, BLOCK_N], shared by every row group: keep it in L2
    if DOT_FP32:
        w = w.to(tl.float32)
    first = group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, n_row_tiles)
    HOLD_Y: tl.constexpr = PHASE == 0 and ROW_TILES == 1  # the rotated tile stays in registers across the wait

    # step 1: rotate, merge the per-row |y| maxima
    seen = tl.zeros([BLOCK_M], tl.int32)  # what the atomics returned (>= 0 on valid rows)
    if HOLD_Y:
        rows = first * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k0 + offs_k[None, :], mask=row_mask[:, None],
                    other=0.0, eviction_policy="evict_first")  # read once
        if DOT_FP32:
            y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            y = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] fp32
        tile_max = tl.max(tl.abs(y), axis=1)  # [BLOCK_M], >= 0, so its fp32 bits order like int32
        seen = tl.atomic_max(absmax_ptr + rows, tile_max.to(tl.int32, bitcast=True), mask=row_mask, sem="relaxed")
    elif PHASE != 2:
        for tile in range(first, last):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k0 + offs_k[None, :],
                        mask=row_mask[:, None], other=0.0, eviction_policy="evict_last")  # step 2 re-reads it
            if DOT_FP32:
                y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                y = tl.dot(x, w)
            tile_max = tl.max(tl.abs(y), axis=1)
            old = tl.atomic_max(absmax_ptr + rows, tile_max.to(tl.int32, bitcast=True), mask=row_mask, sem="relaxed")
            seen = tl.maximum(seen, old)
    if PHASE == 0:
        # min(max(seen), 0) is 0, but computing it needs every thread's atomic to have returned from L2, so no
        # peer can see this program counted before its maxima are merged (a barrier alone does not wait for them)
        tl.atomic_add(done_ptr + group, 1 + tl.minimum(tl.max(seen, axis=0), 0), sem="release")
        n_done = tl.atomic_add(done_ptr + group, 0, sem="acquire")
        while n_done < n_col_tiles:  # the group's other column tiles are running now (module doc)
            n_done = tl.atomic_add(done_ptr + group, 0, sem="acquire")

    # step 2: quantize with the finished row maxima
    if PHASE != 1:
        for tile in range(first, last):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
            row_mask = rows < M
            rows64 = rows.to(tl.int64)
            if not HOLD_Y:
                x = tl.load(x_ptr + rows64[:, None] * stride_xm + k0 + offs_k[None, :], mask=row_mask[:, None],
                            other=0.0, eviction_policy="evict_first")
                if DOT_FP32:
                    y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
                else:
                    y = tl.dot(x, w)
            # an atomic read: the maxima were merged in L2 by other programs
            absmax = tl.atomic_max(absmax_ptr + rows, 0, mask=row_mask, sem="relaxed").to(tl.float32, bitcast=True)
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
                tl.store(q_ptr + rows64[:, None] * stride_qm + col0 // 2 + offs_b[None, :], packed,
                         mask=row_mask[:, None])
            else:
                tl.store(q_ptr + rows64[:, None] * stride_qm + col0 + offs_n[None, :], q.to(tl.int8),
                         mask=row_mask[:, None])
            if col_tile == 0:
                tl.store(scale_ptr + rows, tl.math.div_rn(absmax, qmax), mask=row_mask)

        # leave the sync buffer zeroed for the next call
        tl.debug_barrier()  # every thread has read its maxima
        n_finished = tl.atomic_add(finished_ptr + group, 1, sem="acq_rel")
        if n_finished == n_col_tiles - 1:  # the row group's last program: no peer reads its maxima any more
            for tile in range(first, last):
                rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
                tl.store(absmax_ptr + rows, tl.zeros([BLOCK_M], tl.int32), mask=rows < M)
            tl.store(done_ptr + group, 0)
            tl.store(finished_ptr + group, 0)
        if PHASE == 0:
            if tl.atomic_add(ticket_ptr + 1, 1, sem="acq_rel") == tl.num_programs(0) - 1:  # the last program
                tl.store(ticket_ptr, 0)
                tl.store(ticket_ptr + 1, 0)


# ----------------------------------------------------------------------------------------------------------------
# Launcher

@functools.lru_cache(maxsize=None)
def _candidates(block: int) -> tuple[TileConfig, ...]:
    block_n = min(block, 128)
    configs = (TileConfig(block_m, block_n, row_tiles, warps, stages)
               for block_m, row_tiles, warps, stages in _TILE_CANDIDATES)
    return tuple(c for c in configs if shared_memory_estimate(block, c) <= SHARED_MEMORY_BUDGET)


def rotate_quant_configs(block: int) -> list[TileConfig]:
    """Autotune candidates of the fused launch for block size b (output tiles min(b, 128) wide)."""
    return list(_candidates(block))


_SYNC_BUFFERS: dict[torch.device, torch.Tensor] = {}


def sync_buffer(device: torch.device, numel: int) -> torch.Tensor:
    """The zeroed int32 buffer the kernel synchronises through, at least numel long (the kernel re-zeroes it)."""
    buffer = _SYNC_BUFFERS.get(device)
    if buffer is None or buffer.numel() < numel:
        size = max(numel, 2 * buffer.numel()) if buffer is not None else numel
        buffer = _SYNC_BUFFERS[device] = torch.zeros(size, dtype=torch.int32, device=device)
    return buffer


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def rotate_quantize(x: torch.Tensor, blocks: torch.Tensor, bits: int = 4, *, config: TileConfig | None = None,
                    fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton fused rotation + per-token quantization -> (q, scales float32 [..., 1]); see the module doc.

    config: a fixed tile shape (None: autotuned on CUDA for the fused launch).
    fused: one launch that waits across column tiles (None: on CUDA when a row group fits on the GPU);
      False: two launches (step 1, then step 2), as in the interpreter.
    """
    qmax = _check_bits(bits)
    _, b = check_kernel_args(x, blocks)
    if bits == 4 and x.shape[-1] % 2:
        raise ValueError("int4 packing needs an even width")
    x2, w = as_rows(x), blocks.contiguous()
    m, d = x2.shape
    q = torch.empty((m, d // 2 if bits == 4 else d), dtype=torch.uint8 if bits == 4 else torch.int8,
                    device=x.device)
    scales = torch.empty((m,), dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    if m == 0:
        return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)
    interpret = not x.is_cuda
    config = _fit_config(config, b) if config is not None else None  # e.g. a 128-wide tile for b = 64
    candidates = (config,) if config is not None else _candidates(b)
    widest_group = d // min(c.block_n for c in candidates)  # programs that must run at once
    can_fuse = FUSED_LAUNCH and x.is_cuda and widest_group <= _sm_count(x.device)
    if fused is None:
        fused = can_fuse
    elif fused and not can_fuse:
        raise ValueError(f"a fused launch needs a CUDA tensor, FUSED_LAUNCH set, and at most one column tile per "
                         f"SM (here {widest_group}); use fused=False (two launches) or wider tiles")
    if not fused and config is None:
        config = INTERPRETER_TILE if interpret else SPLIT_TILE
        config = _fit_config(config, b)
    sync = sync_buffer(x.device, m + 2 * triton.cdiv(m, 16) + 2)  # block_m >= 16: at most cdiv(m, 16) groups

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]) * (d // meta["BLOCK_N"])

    args = (x2, w, q, scales, sync, m, d, x2.stride(0), q.stride(0), m_bucket(m))
    meta = dict(QMAX=qmax, PACK_INT4=bits == 4, BLOCK=b, DOT_FP32=interpret and x.dtype == torch.bfloat16)
    if not interpret:
        meta["enable_fp_fusion"] = False  # no y * s + c fused into one FMA: the rounding must see fp32 y * s
    for phase in (0,) if fused else (1, 2):
        if config is None:  # fused: every trial run is a whole call, so the autotuner may repeat it
            launch_tuned(_rotate_quant_kernel, b, lambda meta: (grid(meta),), args, dict(meta, PHASE=phase),
                         (m_bucket(m), d, b, bits, x.dtype, x.device), key=("M_BUCKET", "D", "BLOCK", "QMAX"),
                         configs=candidates)
        else:
            launch(_rotate_quant_kernel, grid(config.meta()), args, {**meta, "PHASE": phase,
                                                                      **config.launch_kwargs()})
    return q.reshape(*lead, q.shape[-1]), scales.reshape(*lead, 1)


def rotate_quantize_bytes(d: int, tokens: int, block: int, bits: int, element_size: int = 2) -> int:
    """Fewest device-memory bytes: read x and the blocks once, write the integers and the scales."""
    if d % block:
        raise ValueError(f"d ({d}) must be divisible by the block size ({block})")
    return tokens * d * element_size + d * block * element_size + tokens * (d * bits // 8 + 4)
