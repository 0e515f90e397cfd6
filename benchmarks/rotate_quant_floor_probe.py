"""What bounds rotate + quantize's first step on a GPU: time it against a read-only kernel (GPU only).

    python -m benchmarks.rotate_quant_floor_probe [--d 11008] [--L 2048,8192]

Three variants of `kernels.rotate_quant`'s step 1 at several tile shapes, each a CUDA-graph replay under
do_bench (kernels/timing.py), beside a copy of x:
  read      load x, max |x| per row, atomic max: the cost of reading x once, no rotation
  step 1    the real step 1, `kernels.rotate_quant.row_absmax` (load x, rotate with tl.dot, max |y| per row,
            atomic max) at the same tile
  stores    step 1 with the per-(row, column tile) maxima stored plainly instead of merged by atomics
`read` and `stores` are probe kernels defined here (variants the product does not run); `step 1` is not a copy.
If `read` alone costs most of a copy, no kernel that must read x before it can write its integers gets far
below the copy (docs/BENCHMARKS.md, "Why neither reaches a copy's time").
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl

from kernels.bench import random_blocks
from kernels.launch import TileConfig
from kernels.rotate_quant import column_tile, row_absmax
from kernels.timing import median_us

PROBE_MODES = {"read": 2, "stores": 1}  # _probe_kernel's MODE; "step 1" runs row_absmax itself
TILES = ((64, 4, 4, 3), (64, 8, 4, 4), (128, 2, 8, 3), (64, 4, 8, 3), (32, 8, 4, 4), (64, 16, 4, 4), (128, 4, 4, 3))


@triton.jit
def _probe_kernel(
    x_ptr,
    w_ptr,
    absmax_ptr,
    part_ptr,
    M,
    D,
    stride_xm,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
    MODE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_tiles, col_tile, col0, k0, w = column_tile(w_ptr, pid, D, BLOCK, BLOCK_N)  # step 1's own prologue
    group = pid // n_col_tiles
    offs_k = tl.arange(0, BLOCK)
    for i in range(0, ROW_TILES):
        rows = (group * ROW_TILES + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = rows < M
        x = tl.load(
            x_ptr + rows.to(tl.int64)[:, None] * stride_xm + k0 + offs_k[None, :], mask=mask[:, None], other=0.0
        )
        if MODE == 2:  # read: no rotation, atomic max as step 1
            tile_max = tl.max(tl.abs(x.to(tl.float32)), axis=1)
            tl.atomic_max(absmax_ptr + rows, tile_max.to(tl.int32, bitcast=True), mask=mask, sem="relaxed")
        else:  # stores: step 1's rotation, plain stores instead of the atomic max
            tile_max = tl.max(tl.abs(tl.dot(x, w)), axis=1)
            tl.store(part_ptr + rows * n_col_tiles + col_tile, tile_max, mask=mask)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rotate_quant_floor_probe")
    parser.add_argument("--d", type=int, default=11008)
    parser.add_argument("--L", default="2048,8192")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    d = args.d
    w = random_blocks(d // 128, 128, torch.float16, "cuda")
    print(f"{torch.cuda.get_device_name()} | d = {d}, fp16, block 128 | median us (x memcpy)")
    for tokens in (int(v) for v in args.L.split(",")):
        x = torch.randn(tokens, d, dtype=torch.float16, device="cuda")
        absmax = torch.zeros(tokens, dtype=torch.int32, device="cuda")
        part = torch.zeros(tokens * (d // 128), dtype=torch.float32, device="cuda")
        copy = torch.empty_like(x)
        memcpy = median_us(lambda: copy.copy_(x), 10, 60)[0]
        print(f"L = {tokens}: memcpy {memcpy:.1f}; torch x.amax() {median_us(x.amax, 10, 60)[0]:.1f}")
        for tile in TILES:
            block_m, row_tiles, warps, stages = tile
            grid = (triton.cdiv(tokens, block_m * row_tiles) * (d // 128),)
            config = TileConfig(block_m, 128, row_tiles, warps, stages)

            def probe(mode, grid=grid, block_m=block_m, row_tiles=row_tiles, warps=warps, stages=stages):
                return lambda: _probe_kernel[grid](
                    x,
                    w,
                    absmax,
                    part,
                    tokens,
                    d,
                    x.stride(0),
                    BLOCK=128,
                    BLOCK_M=block_m,
                    BLOCK_N=128,
                    ROW_TILES=row_tiles,
                    MODE=mode,
                    num_warps=warps,
                    num_stages=stages,
                )

            runs = {
                "read": probe(PROBE_MODES["read"]),
                "step 1": lambda config=config: row_absmax(x, w, config=config, out=absmax),
                "stores": probe(PROBE_MODES["stores"]),
            }
            cells = []
            for name, run in runs.items():
                us = median_us(run, 10, 60)[0]
                cells.append(f"{name} {us:6.1f} ({us / memcpy:.2f})")
            print(f"  m{block_m} r{row_tiles} w{warps} s{stages}: " + " | ".join(cells), flush=True)
        x = copy = part = None  # free the GPU memory before the next size
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
