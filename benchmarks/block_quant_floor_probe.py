"""What bounds the one-pass MX kernel (kernels/block_quant.py) against a copy: memory floors measured (GPU only).

    python -m benchmarks.block_quant_floor_probe [--d 11008] [--L 2048,4096,8192] [--out DIR]

The kernel reads 2 bytes per value and writes about 0.53 (E2M1 codes and a scale per group), 0.63x a copy's
bytes. Beside a copy of x and the kernel itself (autotuned, MXFP4 b = 32 and NVFP4 b = 16), two probe kernels move
exactly those bytes with almost no arithmetic (codes = 4 bits of each fp16, scale = the group amax's exponent):
  stream      x read as one flat array, CHUNK contiguous values per step, a grid-stride loop: a copy's access
              pattern, about as well as a Triton kernel that must move these bytes can hope to do
  tiles       x read as the kernel reads it: [BLOCK_M, BLOCK_N] boxes by TMA, each program a column stripe of
              BLOCK_N values walking its row tiles, the same stores: the floor of the kernel's tiling
If `stream` does not get far under a copy's time, a kernel that also rotates and rounds will not. Each is a CUDA-graph
replay under do_bench with the L2 flushed (kernels/timing.py). The probes are not the product's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

STREAM_SHAPES = ((4096, 8), (4096, 16), (8192, 8))  # (CHUNK values per step, programs per SM)
TILE_SHAPES = ((64, 64), (16, 256), (32, 256), (32, 128), (128, 64))  # (BLOCK_M, BLOCK_N)


@triton.jit
def _stream_kernel(x_ptr, q_ptr, s_ptr, N, CHUNK: tl.constexpr, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    for c in range(pid, N // CHUNK, tl.num_programs(0)):
        start = c * CHUNK  # int32: the probe sizes stay below 2^31 values
        x = tl.load(x_ptr + start + tl.arange(0, CHUNK))
        amax = tl.max(tl.abs(tl.reshape(x.to(tl.float32), (CHUNK // GROUP, GROUP))), axis=1)
        nibble = (x.to(tl.int16, bitcast=True).to(tl.int32) >> 11) & 0xF
        even, odd = tl.split(tl.reshape(nibble, (CHUNK // 2, 2)))
        tl.store(q_ptr + start // 2 + tl.arange(0, CHUNK // 2), (even + (odd << 4)).to(tl.uint8))
        tl.store(
            s_ptr + start // GROUP + tl.arange(0, CHUNK // GROUP),
            ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8),
        )


@triton.jit
def _tiles_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    D,
    stride_xm,
    stride_qm,
    stride_sm,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROW_TILES: tl.constexpr,
):
    pid = tl.program_id(0)
    n_col_tiles = D // BLOCK_N
    col0 = (pid % n_col_tiles) * BLOCK_N
    first = (pid // n_col_tiles) * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, D], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_N])
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None]
        rows64 = rows.to(tl.int64)
        x = x_desc.load([tile * BLOCK_M, col0])
        amax = tl.max(tl.abs(tl.reshape(x.to(tl.float32), (BLOCK_M, BLOCK_N // GROUP, GROUP))), axis=2)
        nibble = (x.to(tl.int16, bitcast=True).to(tl.int32) >> 11) & 0xF
        even, odd = tl.split(tl.reshape(nibble, (BLOCK_M, BLOCK_N // 2, 2)))
        tl.store(
            q_ptr + rows64[:, None] * stride_qm + col0 // 2 + tl.arange(0, BLOCK_N // 2)[None, :],
            (even + (odd << 4)).to(tl.uint8),
            mask=mask,
        )
        tl.store(
            s_ptr + rows64[:, None] * stride_sm + col0 // GROUP + tl.arange(0, BLOCK_N // GROUP)[None, :],
            ((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF).to(tl.uint8),
            mask=mask,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.block_quant_floor_probe", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--d", type=int, default=11008)
    parser.add_argument("--L", default="2048,4096,8192")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for block_quant_floor_probe.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("error: needs a CUDA GPU and TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    from benchmarks.gpu_block_quant import random_stack
    from kernels.block_quant import _use_tma, nvfp4_global_scale, rotate_quantize_mx
    from kernels.timing import median_us

    d, sms = args.d, torch.cuda.get_device_properties(0).multi_processor_count
    widths = [n for _, n in TILE_SHAPES] + [32]
    if d < 1 or any(d % n for n in widths):
        print(f"error: --d must be a positive multiple of {max(widths)} (the probes' tile widths)", file=sys.stderr)
        return 2
    rows = []

    def record(tokens, op, us, memcpy):
        rows.append({"L": tokens, "op": op, "us": round(us, 2), "over_memcpy": round(us / memcpy, 3)})
        print(f"  L={tokens} {op}: {us:.1f} us ({us / memcpy:.3f}x memcpy)", flush=True)

    print(f"{torch.cuda.get_device_name()} | triton {triton.__version__} | d = {d}, fp16, group 32 (probes)")
    torch.manual_seed(0)
    for tokens in (int(v) for v in args.L.split(",")):
        if tokens * d >= 2**31 or any(tokens * d % chunk for chunk, _ in STREAM_SHAPES):
            print(
                f"error: L = {tokens} must make L * d a multiple of every stream step ({STREAM_SHAPES}) and below "
                "2^31 (the stream probe has no ragged last step and indexes in int32)",
                file=sys.stderr,
            )
            return 2
        x = torch.randn(tokens, d, dtype=torch.float16, device="cuda")
        x[:, 7] *= 40.0
        _use_tma(x)  # installs the allocator that device-side tensor descriptors need
        copy = torch.empty_like(x)
        memcpy = median_us(lambda: copy.copy_(x), 10, 60)[0]  # noqa: B023 - timed at once
        record(tokens, "memcpy", memcpy, memcpy)
        codes = torch.empty(tokens, d // 2, dtype=torch.uint8, device="cuda")
        scales = torch.empty(tokens, d // 32, dtype=torch.uint8, device="cuda")
        for chunk, per_sm in STREAM_SHAPES:
            grid = (min(sms * per_sm, x.numel() // chunk),)
            us = median_us(
                lambda: _stream_kernel[grid](x, codes, scales, x.numel(), CHUNK=chunk, GROUP=32),  # noqa: B023
                10,
                60,
            )[0]
            record(tokens, f"stream chunk {chunk}, {per_sm} programs/SM", us, memcpy)
        for block_m, block_n in TILE_SHAPES:
            row_tiles_total = triton.cdiv(tokens, block_m)
            row_tiles = triton.cdiv(row_tiles_total * (d // block_n), sms * 4)  # about 4 programs per SM
            grid = (triton.cdiv(row_tiles_total, row_tiles) * (d // block_n),)
            us = median_us(
                lambda: _tiles_kernel[grid](  # noqa: B023
                    x,
                    codes,
                    scales,
                    tokens,
                    d,
                    x.stride(0),
                    codes.stride(0),
                    scales.stride(0),
                    GROUP=32,
                    BLOCK_M=block_m,
                    BLOCK_N=block_n,
                    ROW_TILES=row_tiles,
                    num_warps=4,
                    num_stages=3,
                ),
                10,
                60,
            )[0]
            record(tokens, f"tiles {block_m} x {block_n}, {row_tiles} row tiles", us, memcpy)
        for fmt, block in (("mxfp4", 32), ("nvfp4", 16)):
            w = random_stack(d // block, block)
            g = nvfp4_global_scale(x[:256], w).cuda() if fmt == "nvfp4" else None
            us = median_us(lambda: rotate_quantize_mx(x, w, fmt, g), 10, 60)[0]  # noqa: B023
            record(tokens, f"kernel {fmt} b={block} (autotuned)", us, memcpy)
        x = copy = codes = scales = None
        torch.cuda.empty_cache()
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "block_quant_floor_probe.json"), "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "d": d, "rows": rows},
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
