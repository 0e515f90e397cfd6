"""Block-diagonal rotation + microscaling quantization (MXFP4, NVFP4, MXFP8) in one pass.

Output for x [..., d] rotated by B (one [b, b] matrix shared by every block, or a per-block stack [d / b, b, b]):
- `codes` uint8: E2M1 codes two per byte (element 2i in the LOW nibble, 2i+1 in the high one; bit 3 of a code
  is the sign) for "mxfp4" / "nvfp4", [..., d / 2]; float8_e4m3fn bit patterns for "mxfp8", [..., d];
- `scales` uint8 [..., d / group]: E8M0 (shared_exp + 127) for MX (group 32), E4M3 bit patterns for NVFP4
  (group 16), whose per-tensor FP32 scale g the caller passes in.
The rules are those of engine/quant/formats.py (the formats whose `kernel` names one here), bit for bit:
- OCP MX v1.0 (section 6.3): shared_exp = floor(log2 amax) - emax_elem (e2m1: 2, e4m3: 8), -127 for an all-zero
  group, clamped to [-127, 127]; elements = x / 2^shared_exp rounded to nearest even, saturating at the max normal.
- NVFP4: s = e4m3(amax / (6 * g)) (RNE, saturating at 448); elements e2m1(x / (s * g)), all float32 in this
  order; a group with s * g == 0 gets +0 codes.
- A negative value that rounds to zero keeps its sign bit (E2M1 code 8, E4M3 0x80), as a hardware cast does.

Why one pass suffices here (kernels/rotate_quant.py needs two for a per-token scale): a scale covers one group of
32 or 16 rotated values, and a program computes whole groups. A program owns BLOCK_N output columns (a multiple of
the group) and walks ROW_TILES row tiles of BLOCK_M tokens: y = x_tile @ W_tile (fp32 accumulation), then each
group's amax, scale and codes in registers, then plain stores. W_tile is [max(b, BLOCK_N), BLOCK_N]: the columns
of B for b >= BLOCK_N, or, for b < BLOCK_N, the block-diagonal of the BLOCK_N / b blocks it spans (zeros off the
diagonal, loaded masked), so a group may span several small rotation blocks (b = 16 under MX's group of 32).
W_tile's columns are permuted so that each thread holds BLOCK_N / 4 consecutive outputs of a row (the MMA
accumulator gives a quad's lane q the columns 8 c + 2 q + p): a group's amax then needs no shuffles and its scale
is computed once, not by four lanes.
Supported: b in 16..256 (a power of two: b divides the group or the group divides b), d a multiple of b and of
the group (no ragged last group: a ValueError), fp16 / bf16 / fp32 inputs with blocks of the same dtype (fp32 dots
run in IEEE fp32, not TF32). NVFP4's g must be given: a one-pass kernel cannot see the tensor-wide amax of y, so
the caller supplies a calibrated or static one (`nvfp4_global_scale` computes amax / (6 * 448) from sample data).
Inputs are assumed finite; fp32 subnormals may be flushed on a GPU (the interpreter keeps them).
Rounding, in few instructions per value (sm_90 SASS: MXFP4 14.3, NVFP4 22.0 per value, from 22.3 and about 35):
- E8M0 exponents from the fp32 exponent field (exact at powers of two, unlike log2); MX values y * 2^-shared_exp.
- E2M1 by one magic add: a = min(|v|, 6) plus M = 2^(E - 105) * (1.5 + j 2^-23), E = max(exponent field of a,
  127), j = 2 (E - 127), rounds a to its binade's grid (step 2^(E - 128), the ulp of M) with ties to even (j is
  even), and the sum's last 3 bits are the code (the step count plus j); y's sign goes to bit 3 (exhaustive check
  on every fp32 in [0, 6]).
- NVFP4 divisions (amax / (6 g) per group, y / (s g) per value) by a correctly rounded reciprocal r per group and
  two corrections q + (y - q b) r (exact remainders by fma): the first brings q within 1 ulp, the second gives the
  IEEE quotient (Markstein's theorem), while 2^-64 <= g <= 2^64 keeps remainders far from underflow; any other g
  takes IEEE divisions (a uniform branch). On the H200, of 1.6e9 pairs (random, near midpoints, all-ones
  significands) none differed from div_rn where the quotient is in [1/8, 16] (with one correction alone neither,
  but that is not proven).
- E4M3 by the hardware's RNE saturating conversion on sm_89+ (HW_FP8), elsewhere by the 1.5 * 2^23 rint trick per
  binade (the interpreter tests that path; the GPU tests the hardware one).
Memory side: on sm_90+, 2-byte inputs with 16-byte aligned rows, x tiles come by the tensor memory accelerator
(TMA: a tensor descriptor made in the kernel, rows past M read as zeros); elsewhere, and in the interpreter, by
masked loads (USE_TMA = False forces those). The descriptor needs Triton's global-scratch allocator: `_use_tma`
installs a torch-backed one unless the caller has set one. Tiles: the autotuner picks among TILE_CANDIDATES.
Times against a copy of x, what each change gained and the variants that did not pay (one fma correction instead
of two in the NVFP4 division among them: faster, but not proven exact): docs/BENCHMARKS.md (issue 18 section).

Bit-exactness: given the same fp32 y, the codes equal the engine's (the interpreter tests check it). y itself is
an fp32 sum whose order differs between tl.dot (tensor cores on a GPU) and torch, so on general inputs a value
within about 1e-6 * (|x| @ |B|) of a rounding boundary may round the other way (`boundary_groups` with
`rotation_tolerance` finds those groups); `block_quantize` (no rotation) is always exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.blockdiag import blockdiag_matmul_reference, blockdiag_matmul_triton
from kernels.launch import (
    KERNEL_DTYPES,
    SHARED_MEMORY_BUDGET,
    SUPPORTED_BLOCKS,
    TileConfig,
    as_rows,
    check_interpreter_active,
    launch,
    launch_tuned,
    m_bucket,
    shared_memory_estimate,
    tile_grid,
    triton_interpret_requested,
)

ROTATION_BLOCKS = (16, 32, 64, 128, 256)
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
E2M1_MAX, E4M3_MAX = 6.0, 448.0
E8M0_BIAS = 127
# autotune candidates (block_m, block_n, row_tiles, num_warps, num_stages): the fastest of H200 sweeps at
# d = 11008, L = 2048 and 8192 (scratch runs of 2026-12-02), and a small tile for few tokens. 11 and 43 row tiles
# make 3 row groups at L = 2048 and 8192 (516 programs at 64 wide, 258 at 128: about one wave at 4 or 2 per SM)
TILE_CANDIDATES = (
    (64, 64, 4, 4, 3),
    (64, 64, 8, 4, 3),
    (64, 64, 11, 4, 3),
    (128, 64, 8, 8, 3),
    (64, 128, 8, 4, 3),
    (64, 128, 11, 4, 3),
    (64, 128, 43, 4, 3),
    (16, 64, 1, 4, 2),
)


@dataclass(frozen=True)
class BlockFormat:
    name: str
    kind: int  # the kernel's FMT constexpr
    group: int  # values per scale
    element: str  # "e2m1" (packed two per byte) or "e4m3"
    emax: int  # MX: exponent of the element's largest normal (OCP MX v1.0 table 1)

    @property
    def packed(self) -> bool:
        return self.element == "e2m1"


MXFP4, NVFP4, MXFP8 = 0, 1, 2
FORMATS = {
    f.name: f
    for f in (
        BlockFormat("mxfp4", MXFP4, 32, "e2m1", 2),
        BlockFormat("nvfp4", NVFP4, 16, "e2m1", 2),
        BlockFormat("mxfp8", MXFP8, 32, "e4m3", 8),
    )
}


# ----------------------------------------------------------------------------------------------------------------
# Argument checks


def check_format(fmt: str) -> BlockFormat:
    if fmt not in FORMATS:
        raise ValueError(f"unknown microscaling format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def check_global_scale(spec: BlockFormat, global_scale, device: torch.device) -> torch.Tensor | None:
    """NVFP4's g as a float32 [1] tensor on `device` (no host sync for a tensor: CUDA-graph capturable); None for MX.

    A Python number is checked (finite, > 0); a tensor only for its size, as reading its value would sync."""
    if spec.kind != NVFP4:
        if global_scale is not None:
            raise ValueError(f"{spec.name} has no global scale (its E8M0 scales are absolute); pass global_scale=None")
        return None
    if global_scale is None:
        raise ValueError(
            "nvfp4 needs global_scale (FP32, per tensor): a one-pass kernel cannot see the tensor-wide "
            "amax, so pass a calibrated or static one, e.g. nvfp4_global_scale(sample_x, blocks)"
        )
    if isinstance(global_scale, torch.Tensor):
        if global_scale.numel() != 1 or not global_scale.dtype.is_floating_point:
            raise ValueError(
                f"global_scale must be one floating-point number, got a {global_scale.dtype} tensor of "
                f"shape {list(global_scale.shape)}"
            )
        return global_scale.to(device=device, dtype=torch.float32).reshape(1)
    if isinstance(global_scale, bool) or not isinstance(global_scale, (int, float)) or not 0 < global_scale < 3.4e38:
        raise ValueError(f"global_scale must be one finite positive number, got {global_scale!r}")
    return torch.full((1,), float(global_scale), dtype=torch.float32, device=device)


def check_rotation(x: torch.Tensor, blocks: torch.Tensor, spec: BlockFormat) -> tuple[int, bool]:
    """Validate x [..., d] and blocks ([b, b], [1, b, b] or [d / b, b, b]) for the kernel; returns (b, shared)."""
    if not isinstance(x, torch.Tensor) or not isinstance(blocks, torch.Tensor):
        raise TypeError("x and blocks must be torch tensors")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if blocks.dim() not in (2, 3) or blocks.shape[-1] != blocks.shape[-2]:
        raise ValueError(f"blocks must be one [b, b] matrix or a stack [d / b, b, b], got {list(blocks.shape)}")
    b = blocks.shape[-1]
    if b not in ROTATION_BLOCKS:
        raise ValueError(f"rotation block b must be one of {ROTATION_BLOCKS}, got {b}")
    if blocks.dtype != x.dtype:
        raise ValueError(f"blocks dtype ({blocks.dtype}) must match x dtype ({x.dtype}); cast with blocks.to(x.dtype)")
    if blocks.device != x.device:
        raise ValueError(f"x is on {x.device} but blocks are on {blocks.device}")
    d = x.shape[-1] if x.dim() else 0
    if d == 0 or d % b:
        raise ValueError(f"x's last dim ({d}) must be a positive multiple of the rotation block b = {b}")
    if d % spec.group:
        raise ValueError(
            f"x's last dim ({d}) must be a multiple of {spec.name}'s group of {spec.group} "
            "(a ragged last group is not supported)"
        )
    n = 1 if blocks.dim() == 2 else blocks.shape[0]
    if n not in (1, d // b):
        raise ValueError(f"blocks must hold 1 (shared) or d / b = {d // b} matrices of size {b}, got {n}")
    return b, n == 1 and d // b != 1


def _check_device(x: torch.Tensor) -> None:
    if not x.is_cuda:
        if not triton_interpret_requested():
            raise RuntimeError(
                f"the Triton kernel needs a CUDA tensor (x is on {x.device}); set TRITON_INTERPRET=1 "
                "to run it in Triton's CPU interpreter, or use the *_reference functions"
            )
        check_interpreter_active()


# ----------------------------------------------------------------------------------------------------------------
# Tile shapes


def _k_tile(block: int, block_n: int) -> int:
    return max(block, block_n)


def block_quant_candidates(block: int, group: int, d: int, element_size: int = 2) -> tuple[TileConfig, ...]:
    """Autotune candidates: TILE_CANDIDATES (the 128-wide ones for b >= 128 only: for a smaller b they double the
    dot's depth with block-diagonal zeros, which was slower) whose width divides d; otherwise the widest power of
    two from the group to 128 that divides d; tiles over the shared-memory budget are dropped."""
    configs = [TileConfig(*c) for c in TILE_CANDIDATES if d % c[1] == 0 and (c[1] <= 64 or block >= 128)]
    if not configs:
        widths = [n for n in (16, 32, 64, 128) if n >= group and d % n == 0]
        n = widths[-1] if widths else min(max(block, group), 128)
        configs = [TileConfig(64, n, 4, 4, 3), TileConfig(16, n, 1, 4, 2)]
    fits = tuple(c for c in configs if shared_memory_estimate(block, c, element_size) <= SHARED_MEMORY_BUDGET)
    return fits or (TileConfig(16, configs[0].block_n, 1, 4, 1),)


def check_tile(config: TileConfig, block: int, group: int, d: int, element_size: int) -> TileConfig:
    if config.block_n % group or d % config.block_n:
        raise ValueError(
            f"tile block_n ({config.block_n}) must be a multiple of the group ({group}) and divide d ({d})"
        )
    if shared_memory_estimate(block, config, element_size) > SHARED_MEMORY_BUDGET:
        raise ValueError(
            f"tile {config} needs about {shared_memory_estimate(block, config, element_size) // 1024} "
            f"KiB of shared memory for block {block}; use a smaller block_m, block_n or num_stages"
        )
    return config


# ----------------------------------------------------------------------------------------------------------------
# The kernel (a plain function; compiled by kernels.launch)


def _block_quant_kernel(
    x_ptr,
    w_ptr,
    g_ptr,
    q_ptr,
    s_ptr,  # x [M, D]; w [b, b] or [D / b, b, b]; g fp32 [1]; codes; scales [M, D / G]
    M,
    D,
    stride_xm,
    stride_qm,
    stride_sm,
    M_BUCKET,  # autotune key only
    SEVEN,  # 7 as a runtime value: LLVM cannot fold the E2M1 code's bit select (below) into two ANDs and an OR
    FMT: tl.constexpr,
    GROUP: tl.constexpr,
    EMAX: tl.constexpr,
    ROTATE: tl.constexpr,  # False: quantize x itself (block_quantize)
    W_SHARED: tl.constexpr,  # one [b, b] matrix for every block
    DOT_IEEE: tl.constexpr,  # fp32 inputs: IEEE fp32 dot, not TF32
    HW_FP8: tl.constexpr,  # E4M3 rounding by the hardware's RNE saturating conversion (sm_89+), else arithmetic
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's dot cannot read bf16: upcast there (exact products)
    TMA: tl.constexpr,  # x tiles by the tensor memory accelerator (a device-side tensor descriptor; sm_90+)
):
    pid = tl.program_id(0)
    n_col_tiles = D // BLOCK_N
    col_tile = pid % n_col_tiles  # column tiles vary fastest: neighbours share the x rows in L2
    row_group = pid // n_col_tiles
    col0 = col_tile * BLOCK_N
    NG: tl.constexpr = BLOCK_N // GROUP  # scale groups per row of the tile
    offs_n = col0 + tl.arange(0, BLOCK_N)
    K_TILE: tl.constexpr = BLOCK_N * ((BLOCK - 1) // BLOCK_N + 1)  # max(BLOCK, BLOCK_N), both powers of two
    k0 = (col0 // K_TILE) * K_TILE
    offs_k = k0 + tl.arange(0, K_TILE)  # input columns feeding this output tile (offs_n without rotation)
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, D], strides=[stride_xm, 1], block_shape=[BLOCK_M, K_TILE])
    if ROTATE:
        # W_tile[k, n] = B_{n // b}[k % b, n % b] inside a rotation block, 0 across blocks (b < BLOCK_N only)
        same_block = (offs_k // BLOCK)[:, None] == (offs_n // BLOCK)[None, :]
        w_off = (offs_k % BLOCK)[:, None] * BLOCK + (offs_n % BLOCK)[None, :]
        if not W_SHARED:
            w_off += (offs_n // BLOCK)[None, :] * (BLOCK * BLOCK)
        w = tl.load(w_ptr + w_off, mask=same_block, other=0.0, eviction_policy="evict_last")
        # dot column j = 8 c + 2 q + p computes tile column q * BLOCK_N / 4 + 2 c + p: the MMA accumulator gives
        # lane q of each quad the columns 8 c + 2 q + p, so each thread then holds BLOCK_N / 4 consecutive output
        # columns of a row (a whole NVFP4 group at 64 wide): a group's amax and scale need no shuffles and are
        # computed by one lane, not four. W is loaded in order (wide loads), permuted in registers once
        w = tl.reshape(tl.permute(tl.reshape(w, (K_TILE, 4, BLOCK_N // 8, 2)), (0, 2, 1, 3)), (K_TILE, BLOCK_N))
        if DOT_FP32:
            w = w.to(tl.float32)
    if FMT == 1:
        g = tl.load(g_ptr)
        g6 = 6.0 * g  # NVFP4: E2M1's max normal times g, rounded to fp32 first (as the engine computes it)
        # divisions by a correctly rounded reciprocal (Markstein), valid while g keeps every scale and remainder
        # far from fp32 under- and overflow; any other g takes IEEE divisions (a uniform branch)
        fast = (g >= 5.421010862427522e-20) & (g <= 1.8446744073709552e19)  # 2^-64 <= g <= 2^64
        rg6 = tl.math.div_rn(1.0, g6)
    first = row_group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)  # no tl.cdiv: see kernels/blockdiag.py
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)
        if TMA:
            x = x_desc.load([tile * BLOCK_M, k0])  # rows past M read as zeros
        else:
            x = tl.load(
                x_ptr + rows64[:, None] * stride_xm + offs_k[None, :],
                mask=row_mask[:, None],
                other=0.0,
                eviction_policy="evict_first",
            )
        if ROTATE:
            if DOT_IEEE:
                y = tl.dot(x, w, input_precision="ieee")
            elif DOT_FP32:
                y = tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:
                y = tl.dot(x, w)  # fp16/bf16 products are exact in the fp32 accumulator
            # back to the tile's column order: a relabelling of registers, no data movement
            y = tl.reshape(tl.permute(tl.reshape(y, (BLOCK_M, BLOCK_N // 8, 4, 2)), (0, 2, 1, 3)), (BLOCK_M, BLOCK_N))
        else:
            y = x.to(tl.float32)
        yg = tl.reshape(y, (BLOCK_M, NG, GROUP))
        amax = tl.max(tl.abs(yg), axis=2)  # [BLOCK_M, NG]
        if FMT == 1:
            # NVFP4 block scale s = e4m3(amax / (6 g)), RNE with subnormals, saturating at 448
            if fast:
                t = amax * rg6
                t = tl.fma(tl.fma(-t, g6, amax), rg6, t)
                t = tl.fma(tl.fma(-t, g6, amax), rg6, t)  # = amax / g6 (see v below); an overflow gives NaN:
                t = tl.minimum(t, 448.0)  # min ignores NaN, and anything above 448 saturates anyway
            else:
                t = tl.math.div_rn(amax, g6)
            if HW_FP8:
                s8 = t.to(tl.float8e4nv)  # cvt.rn.satfinite
                s_code = s8.to(tl.uint8, bitcast=True).to(tl.int32)
                s = s8.to(tl.float32)
            else:
                # step = 2^(e - 3) with e = max(floor(log2 t), -6) from the fp32 exponent field (exact at powers of
                # two), rint by the 1.5 * 2^23 trick (t / step < 16; the launcher turns fp fusion off)
                e = tl.maximum(((t.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
                s = (t * ((130 - e) << 23).to(tl.float32, bitcast=True) + 12582912.0) - 12582912.0
                s = tl.minimum(s * ((124 + e) << 23).to(tl.float32, bitcast=True), 448.0)
                sb = s.to(tl.int32, bitcast=True)  # E4M3 bits: exponent bias 7 (fp32 field - 120), 3 mantissa bits
                s_code = tl.where(s >= 0.015625, (((sb >> 23) - 120) << 3) | ((sb >> 20) & 7), (s * 512.0).to(tl.int32))
            scale = s * g
            ok = scale > 0  # a group whose s * g is 0 dequantizes to 0: +0 codes
            b = tl.where(ok, scale, 1.0)
            if fast:
                # v = y / b from one correctly rounded reciprocal per group (see the module doc); a group that is
                # not ok gets r = 0, so v = +-0
                r = tl.where(ok, tl.math.div_rn(1.0, b), 0.0)[:, :, None]
                b3 = b[:, :, None]
                q = yg * r
                q = tl.fma(tl.fma(-q, b3, yg), r, q)  # within 1 ulp of y / b
                v = tl.fma(tl.fma(-q, b3, yg), r, q)  # = y / b (Markstein's theorem)
            else:
                v = tl.where(ok[:, :, None], tl.math.div_rn(yg, b[:, :, None]), 0.0)  # IEEE division, as the engine's
            sign_shift = tl.where(ok, 28, 31)[:, :, None].to(tl.uint32)  # 31: the sign bit leaves the code
        else:
            # OCP MX v1.0: shared_exp = floor(log2 amax) - emax, clamped to [-127, 127]; an all-zero (or fp32
            # subnormal) amax reads -127 from the exponent field, which the clamp maps where the engine puts it
            e = ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            shared = tl.minimum(tl.maximum(e - EMAX, -127), 127)
            s_code = shared + 127  # E8M0
            # y / 2^shared as y * 2^-shared: exact (shared <= 125 for finite amax, so 2^-shared is a normal)
            v = yg * ((127 - shared) << 23).to(tl.float32, bitcast=True)[:, :, None]
            sign_shift = 28
        if FMT == 2:
            # MXFP8 element: E4M3 RNE saturating at 448, as the NVFP4 scale above
            if HW_FP8:
                code = v.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)  # keeps the sign of -0
            else:
                sign = (v.to(tl.int32, bitcast=True) >> 31) & 1
                a = tl.abs(v)
                e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
                r = (a * ((130 - e) << 23).to(tl.float32, bitcast=True) + 12582912.0) - 12582912.0
                r = tl.minimum(r * ((124 + e) << 23).to(tl.float32, bitcast=True), 448.0)
                rb = r.to(tl.int32, bitcast=True)
                code = tl.where(
                    r >= 0.015625, (((rb >> 23) - 120) << 3) | ((rb >> 20) & 7), (r * 512.0).to(tl.int32)
                ) | (sign << 7)
            tl.store(
                q_ptr + rows64[:, None] * stride_qm + offs_n[None, :],
                tl.reshape(code, (BLOCK_M, BLOCK_N)).to(tl.uint8),
                mask=row_mask[:, None],
            )
        else:
            # E2M1 (grid 0, .5, 1, 1.5, 2, 3, 4, 6 = codes 0..7), RNE saturating at 6, by one magic add: a =
            # min(|v|, 6) in binade E = max(fp32 exponent field, 127) has grid step 2^(E - 128), the ulp of
            # M = 2^(E - 105) * (1.5 + j 2^-23) with j = 2 (E - 127). a + M rounds a to that grid (RNE: j is even,
            # so the parity of the sum's last bit is that of the step count k) and its last 3 bits are k + j, the
            # code (k + j <= 7 as a <= 6). Checked against the thresholds on every fp32 in [0, 6].
            a = tl.minimum(tl.abs(v), 6.0)  # NaN (NVFP4 overflow) -> 6: min ignores NaN
            e = tl.maximum(a.to(tl.int32, bitcast=True) >> 23, 127)
            t = a + (e * 0x800002 + 188743426).to(tl.float32, bitcast=True)  # 188743426 = (22 << 23) + 2^22 - 254
            sign = (yg.to(tl.uint32, bitcast=True) >> sign_shift).to(tl.int32)  # y's sign (that of v) at bit 3
            # code bits 0-2 from t, bit 3 from the sign (a negative value rounding to 0 keeps it)
            code = ((t.to(tl.int32, bitcast=True) ^ sign) & SEVEN) ^ sign  # one LOP3
            even, odd = tl.split(tl.reshape(code, (BLOCK_M, BLOCK_N // 2, 2)))  # columns 2i and 2i + 1
            packed = (even + (odd << 4)).to(tl.uint8)  # element 2i in the low nibble (an add: one IMAD)
            tl.store(
                q_ptr + rows64[:, None] * stride_qm + col0 // 2 + tl.arange(0, BLOCK_N // 2)[None, :],
                packed,
                mask=row_mask[:, None],
            )
        tl.store(
            s_ptr + rows64[:, None] * stride_sm + col0 // GROUP + tl.arange(0, NG)[None, :],
            s_code.to(tl.uint8),
            mask=row_mask[:, None],
        )


# ----------------------------------------------------------------------------------------------------------------
# Launchers

TUNE_KEY = ("M_BUCKET", "D", "BLOCK", "FMT", "ROTATE", "W_SHARED")  # the autotuner's own cache key (plus dtypes)


def _hardware_fp8(x: torch.Tensor) -> bool:
    return x.is_cuda and torch.cuda.get_device_capability(x.device) >= (8, 9)


USE_TMA = True  # False: x tiles by plain loads on every GPU


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(x2: torch.Tensor) -> bool:
    """TMA loads of x: on sm_90+, 2-byte inputs with 16-byte aligned rows. A device-side tensor descriptor needs
    Triton's global-scratch allocator; one backed by torch is installed here unless the caller set another."""
    if not (
        USE_TMA
        and x2.is_cuda
        and x2.element_size() == 2
        and torch.cuda.get_device_capability(x2.device)[0] >= 9
        and x2.data_ptr() % 16 == 0
        and (x2.stride(0) * 2) % 16 == 0
    ):
        return False
    try:  # Triton keeps the allocator in a private module: if it moves, plain loads rather than a failed launch
        from triton.runtime import _allocation

        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):
        return False
    if unset:
        triton.set_allocator(_scratch)
    return True


def _launch(
    x: torch.Tensor,
    w: torch.Tensor | None,
    spec: BlockFormat,
    g: torch.Tensor | None,
    block: int,
    shared: bool,
    config: TileConfig | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = as_rows(x)
    m, d = x2.shape
    codes = torch.empty((m, d // 2 if spec.packed else d), dtype=torch.uint8, device=x.device)
    scales = torch.empty((m, d // spec.group), dtype=torch.uint8, device=x.device)
    lead = x.shape[:-1]
    if m:
        rotate = w is not None
        tile_block = block if rotate else spec.group
        element = x.element_size()
        if config is None and not x.is_cuda:
            config = TileConfig(16, min(max(tile_block, spec.group), 128), 2, 4, 1)  # interpreter: small, fixed
        if config is not None:
            config = check_tile(config, tile_block, spec.group, d, element)
        meta = {
            "FMT": spec.kind,
            "GROUP": spec.group,
            "EMAX": spec.emax,
            "ROTATE": rotate,
            "W_SHARED": shared,
            "DOT_IEEE": x.dtype == torch.float32,
            "HW_FP8": _hardware_fp8(x),
            "BLOCK": tile_block,
            "DOT_FP32": not x.is_cuda and x.dtype == torch.bfloat16,
            "TMA": _use_tma(x2),
        }
        if x.is_cuda:
            meta["enable_fp_fusion"] = False  # no FMA: each rounding step must see the fp32 result of the one before
        args = (
            x2,
            w if rotate else x2,
            g if g is not None else x2,
            codes,
            scales,
            m,
            d,
            x2.stride(0),
            codes.stride(0),
            scales.stride(0),
            m_bucket(m),
            7,
        )
        if config is not None:
            launch(_block_quant_kernel, tile_grid(m, d, config.meta()), args, {**meta, **config.launch_kwargs()})
        else:  # keyed by format and mode too: the autotuner's cache would otherwise share one winner among them
            launch_tuned(
                _block_quant_kernel,
                tile_block,
                lambda meta: (tile_grid(m, d, meta),),
                args,
                meta,
                tune_key=(m_bucket(m), d, tile_block, spec.name, rotate, shared, x.dtype, x.device),
                key=TUNE_KEY,
                configs=block_quant_candidates(tile_block, spec.group, d, element),
            )
    return codes.reshape(*lead, codes.shape[-1]), scales.reshape(*lead, scales.shape[-1])


def rotate_quantize_mx(
    x: torch.Tensor, blocks: torch.Tensor, fmt: str = "mxfp4", global_scale=None, *, config: TileConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One-pass Triton y = x @ blockdiag(B) then microscaling quantization of y -> (codes, scales); see the module doc.

    blocks: [b, b] (or [1, b, b]) shared by every block, or [d / b, b, b]; fmt: "mxfp4", "nvfp4" or "mxfp8";
    global_scale: NVFP4's per-tensor FP32 g (a float, or a one-element tensor: not validated then, to stay
    sync-free), None for MX. config: a fixed tile (None: autotuned on CUDA, a small fixed tile when interpreted).
    """
    spec = check_format(fmt)
    b, shared = check_rotation(x, blocks, spec)
    g = check_global_scale(spec, global_scale, x.device)
    _check_device(x)
    w = blocks.reshape(-1, b, b)[: 1 if shared else None].contiguous()
    return _launch(x, w, spec, g, b, shared, config)


def block_quantize(
    x: torch.Tensor, fmt: str = "mxfp4", global_scale=None, *, config: TileConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization of x itself, no rotation (the second launch of a separate rotate-then-quantize)."""
    spec = check_format(fmt)
    if not isinstance(x, torch.Tensor) or x.dtype not in INPUT_DTYPES:
        raise ValueError(f"x must be a float16, bfloat16 or float32 tensor, got {getattr(x, 'dtype', type(x))}")
    d = x.shape[-1] if x.dim() else 0
    if d == 0 or d % spec.group:
        raise ValueError(f"x's last dim ({d}) must be a positive multiple of {spec.name}'s group of {spec.group}")
    g = check_global_scale(spec, global_scale, x.device)
    _check_device(x)
    return _launch(x, None, spec, g, spec.group, False, config)


def rotate_in_dtype(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """y = x @ blockdiag(B) rounded to x's dtype: kernels.blockdiag, or a torch bmm for what it does not take
    (b = 16, fp32). blocks: [b, b], [1, b, b] or [d / b, b, b]."""
    b = blocks.shape[-1]
    stack = blocks.reshape(-1, b, b).expand(x.shape[-1] // b, b, b).contiguous()
    if b in SUPPORTED_BLOCKS and x.dtype in KERNEL_DTYPES:
        return blockdiag_matmul_triton(x, stack)
    return blockdiag_matmul_reference(x, stack, compute_dtype=None)


def rotate_then_quantize(
    x: torch.Tensor, blocks: torch.Tensor, fmt: str = "mxfp4", global_scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-launch comparison: rotate_in_dtype, then block_quantize of that y (exact for the rounded y)."""
    check_rotation(x, blocks, check_format(fmt))
    return block_quantize(rotate_in_dtype(x, blocks), fmt, global_scale)


def rotate_quantize_mx_bytes(
    d: int, tokens: int, block: int, fmt: str, element_size: int = 2, shared: bool = False
) -> int:
    """Fewest device-memory bytes: read x and the blocks once, write the codes and the scales."""
    spec = check_format(fmt)
    code_bytes = d // 2 if spec.packed else d
    w_bytes = block * block * (1 if shared else d // block) * element_size
    return tokens * (d * element_size + code_bytes + d // spec.group) + w_bytes


# ----------------------------------------------------------------------------------------------------------------
# Torch references (kernels/ imports no engine.quant module: tests/kernels/test_imports.py. These follow the same
# rules as engine/quant/formats.py, and tests/kernels/test_block_quant.py checks them against its encoders)


def _signbit(v: torch.Tensor) -> torch.Tensor:
    return torch.signbit(v).to(torch.uint8)


def _e4m3_bits(v: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn bits of v, RNE with subnormals, saturating at 448 (torch's cast would give NaN above)."""
    return v.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _e2m1_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes 0..15 of v: RNE on the grid 0, .5, 1, 1.5, 2, 3, 4, 6 (ties to the even code), saturating."""
    a = v.abs()
    mag = sum(
        ((a > t) if strict else (a >= t)).to(torch.uint8)
        for t, strict in (
            (0.25, True),
            (0.75, False),
            (1.25, True),
            (1.75, False),
            (2.5, True),
            (3.5, False),
            (5.0, True),
        )
    )
    return mag | (_signbit(v) << 3)


def block_quantize_reference(
    y: torch.Tensor, fmt: str = "mxfp4", global_scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch quantization of y [..., d] (as float32) -> (codes, scales) laid out like the kernel's."""
    spec = check_format(fmt)
    y = y.float()
    d = y.shape[-1]
    if d % spec.group:
        raise ValueError(f"the last dim ({d}) must be a multiple of {spec.name}'s group of {spec.group}")
    groups = y.reshape(*y.shape[:-1], d // spec.group, spec.group)
    amax = groups.abs().amax(-1, keepdim=True)
    if spec.kind == NVFP4:
        g = check_global_scale(spec, global_scale, y.device).reshape(())
        s = _e4m3_bits(amax / (E2M1_MAX * g))  # NVFP4: s = e4m3(amax / (6 g))
        scale = s.view(torch.float8_e4m3fn).float() * g
        ok = scale > 0
        v = torch.where(ok, groups / torch.where(ok, scale, 1.0), 0.0)
        scale_codes = s.squeeze(-1)
    else:  # OCP MX v1.0 section 6.3
        check_global_scale(spec, global_scale, y.device)
        floor_log2 = torch.frexp(amax).exponent - 1
        shared = torch.where(amax > 0, floor_log2 - spec.emax, -E8M0_BIAS).clamp(-127, 127)
        v = groups / torch.exp2(shared.float())
        scale_codes = (shared + E8M0_BIAS).squeeze(-1).to(torch.uint8)
    codes = (_e2m1_codes(v) if spec.packed else _e4m3_bits(v)).flatten(-2)
    if spec.packed:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale_codes


def rotate_reference(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """fp32 y = x @ blockdiag(B) for blocks [b, b] (shared), [1, b, b] or [d / b, b, b]."""
    b = blocks.shape[-1]
    n = x.shape[-1] // b
    w = blocks.reshape(-1, b, b).float()
    y = torch.einsum("...nk,nkj->...nj", x.float().reshape(*x.shape[:-1], n, b), w.expand(n, b, b))
    return y.reshape(x.shape)


def rotate_quantize_mx_reference(
    x: torch.Tensor, blocks: torch.Tensor, fmt: str = "mxfp4", global_scale=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of rotate_quantize_mx: the rotation in fp32, then block_quantize_reference."""
    spec = check_format(fmt)
    check_rotation(x, blocks, spec)
    return block_quantize_reference(rotate_reference(x, blocks), fmt, global_scale)


def nvfp4_global_scale(x: torch.Tensor, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """A calibrated NVFP4 g from sample data: amax(|x @ blockdiag(B)|) / (6 * 448) (1 if all zero), float32 0-dim."""
    y = rotate_reference(x, blocks) if blocks is not None else x.float()
    amax = y.abs().amax()
    return torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax))


# ----------------------------------------------------------------------------------------------------------------
# Checking helpers (tests, kernels/bench.py, benchmarks/gpu_block_quant.py)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., k] -> E2M1 codes uint8 [..., 2k] (element 2i from the low nibble)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def group_mismatch(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], fmt: str
) -> torch.Tensor:
    """bool [..., d / group]: the groups whose scale or any code differs between two (codes, scales) results."""
    spec = check_format(fmt)
    (c, s), (c_ref, s_ref) = got, want
    if c.shape != c_ref.shape or s.shape != s_ref.shape:
        raise ValueError(
            f"shapes differ: codes {list(c.shape)} vs {list(c_ref.shape)}, scales {list(s.shape)} vs "
            f"{list(s_ref.shape)}"
        )
    if spec.packed:
        c, c_ref = unpack_fp4(c), unpack_fp4(c_ref)
    codes_differ = (c != c_ref).reshape(*s.shape, spec.group).any(-1)
    return codes_differ | (s != s_ref)


def rotation_tolerance(x: torch.Tensor, blocks: torch.Tensor, rel: float = 1e-6) -> torch.Tensor:
    """rel * (|x| @ blockdiag|B|): the scale of the fp32 rounding errors of y = x @ blockdiag(B) in any summation
    order (tensor cores included). With cancellation it can exceed rel * |y| many times over."""
    return rel * rotate_reference(x.abs(), blocks.abs())


def boundary_groups(y: torch.Tensor, fmt: str, global_scale=None, tol: torch.Tensor | float = 1e-6) -> torch.Tensor:
    """bool [..., d / group]: groups of y whose codes or scale change when y moves by +tol or -tol, i.e. where a
    value (or the amax) sits within tol of a rounding boundary. tol: an absolute tolerance per element (e.g.
    rotation_tolerance(x, blocks)), or a float: that fraction of |y|. A kernel whose fp32 rotation sums in another
    order than torch's may differ from the reference only in such groups."""
    y = y.float()
    tol = tol * y.abs() if isinstance(tol, float) else tol
    base = block_quantize_reference(y, fmt, global_scale)
    return group_mismatch(block_quantize_reference(y + tol, fmt, global_scale), base, fmt) | group_mismatch(
        block_quantize_reference(y - tol, fmt, global_scale), base, fmt
    )


def exact_rotation_inputs(
    rows: int, d: int, block: int, dtype: torch.dtype, shared: bool, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [rows, d], blocks) whose fp32 rotation is exact in any summation order, so the kernel's y equals torch's.

    x: integers in [-64, 64] times 2^k (k from -6 to 4 per row; every input dtype holds them exactly); row 1 is all
    zero, row 2 holds outliers 31 * 2^10 = 31744 (with k = 0). blocks: +-1 times 2^-j (j from 0 to 2 per block),
    first row all +1 so that a zero input sums to +0 in any order. Every product is a multiple of 2^-8 and every
    partial sum stays below 2^22 of those steps, so fp32 holds it exactly. Exact ties are frequent (small
    integers), which exercises round-half-to-even.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-64, 65, (rows, d), generator=gen).float()
    k = torch.randint(-6, 5, (rows, 1), generator=gen).float()
    if rows > 1:
        x[1] = 0.0
    if rows > 2:
        k[2] = 0.0
        x[2, torch.randperm(d, generator=gen)[: max(1, d // 32)]] = 31744.0 * torch.where(
            torch.rand(max(1, d // 32), generator=gen) < 0.5, -1.0, 1.0
        )
    x = x * torch.exp2(torch.where(x.abs() > 64, 0.0, k))
    n = 1 if shared else d // block
    signs = torch.where(torch.rand(n, block, block, generator=gen) < 0.5, -1.0, 1.0)
    signs[:, 0] = 1.0
    blocks = signs * torch.exp2(-torch.randint(0, 3, (n, 1, 1), generator=gen).float())
    blocks = blocks[0] if shared else blocks
    return x.to(dtype).to(device), blocks.to(dtype).to(device)
