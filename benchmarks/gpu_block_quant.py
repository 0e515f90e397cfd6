"""One-pass rotate + microscaling quantize (kernels/block_quant.py) on a GPU: bit-exactness, then time against a copy.

    python -m benchmarks.gpu_block_quant [--d 11008] [--L 2048,8192] [--cases mxfp4:32,nvfp4:16,mxfp4:128,nvfp4:128]
        [--skip-checks] [--out DIR]

1. Checks (every case, plus mxfp8:32) against engine/quant/formats.py's encoders (MXFormat / NVFP4Format.encode and
   pack_nibbles) of the fp32 rotation:
   - exactly, on inputs whose fp32 rotation is exact in any summation order (kernels.block_quant.exact_rotation_inputs:
     small integers times powers of two with outliers that saturate, +-1 blocks), per-block and shared matrices;
   - exactly, block_quantize (no rotation) of that y;
   - on random fp16 inputs with random orthogonal blocks: tl.dot sums in another order than torch, so a group may
     differ only where y is within 1e-6 * (|x| @ |B|) of a rounding boundary (boundary_groups with
     rotation_tolerance); any other is a failure.
2. Times each case at width d, for each L, fp16, as CUDA-graph replays under do_bench with the L2 flushed
   (kernels/timing.py): memcpy (a copy of the input), the one-pass kernel, and the separate way (the rotation in
   fp16 by kernels.blockdiag, or a torch bmm for b = 16 which it does not take, then a quantize-only launch).
   Prints a markdown table with each time over memcpy's; GB/s counts the fewest bytes (x and the blocks read once,
   codes and scales written once) for every row of a case.
Writes gpu_block_quant.json to --out (default: $OUT when set, else nothing). Exit status: 0, 1 when a check
failed or a case could not run (the rest still runs), 2 without a usable GPU or on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

DEFAULT_CASES = "mxfp4:32,nvfp4:16,mxfp4:128,nvfp4:128"


def parse_cases(text: str) -> list[tuple[str, int]]:
    from kernels.block_quant import FORMATS, ROTATION_BLOCKS

    cases = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        fmt, _, block = part.partition(":")
        if fmt not in FORMATS or not block.isdigit() or int(block) not in ROTATION_BLOCKS:
            raise ValueError(
                f"--cases takes FORMAT:BLOCK items with FORMAT in {list(FORMATS)} and BLOCK in "
                f"{ROTATION_BLOCKS}, e.g. mxfp4:32,nvfp4:16; got {part!r}"
            )
        cases.append((fmt, int(block)))
    if not cases:
        raise ValueError("--cases is empty")
    return cases


def engine_encode(y: torch.Tensor, fmt: str, g=None) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.quant.formats import FORMATS

    return FORMATS[fmt].kernel_encode(y, g)


def random_stack(n: int, b: int, dtype=torch.float16) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, b, b, device="cuda"))
    return q.to(dtype).contiguous()


def check_case(fmt: str, block: int, d: int) -> list[dict]:
    """The checks of one (format, block) at width d; one result dict per check."""
    from kernels.block_quant import (
        block_quantize,
        boundary_groups,
        exact_rotation_inputs,
        group_mismatch,
        nvfp4_global_scale,
        rotate_quantize_mx,
        rotate_reference,
        rotation_tolerance,
    )

    results = []
    for rows, shared in ((300, False), (77, True)):
        x, blocks = exact_rotation_inputs(rows, d, block, torch.float16, shared, seed=block + rows, device="cuda")
        y = rotate_reference(x, blocks)
        g = nvfp4_global_scale(torch.cat([x[:2], x[3:]]), blocks) if fmt == "nvfp4" else None  # row 2 saturates
        want = engine_encode(y, fmt, g)
        for name, got in (
            ("exact inputs", rotate_quantize_mx(x, blocks, fmt, g)),
            ("quantize only", block_quantize(y, fmt, g)),
        ):
            differ = group_mismatch(got, want, fmt)
            results.append(
                {
                    "check": f"{name}, {'shared' if shared else 'per-block'}",
                    "rows": rows,
                    "groups": differ.numel(),
                    "differ": int(differ.sum()),
                    "ok": not bool(differ.any()),
                }
            )
    x = torch.randn(1024, d, dtype=torch.float16, device="cuda")
    x[:, 7] *= 40.0  # an outlier channel
    blocks = random_stack(d // block, block)
    y = rotate_reference(x, blocks)
    g = nvfp4_global_scale(x, blocks) if fmt == "nvfp4" else None
    differ = group_mismatch(rotate_quantize_mx(x, blocks, fmt, g), engine_encode(y, fmt, g), fmt)
    unexplained = int((differ & ~boundary_groups(y, fmt, g, rotation_tolerance(x, blocks))).sum())
    results.append(
        {
            "check": "random orthogonal (may differ only at rounding boundaries)",
            "rows": 1024,
            "groups": differ.numel(),
            "differ": int(differ.sum()),
            "unexplained": unexplained,
            "ok": unexplained == 0,
        }
    )
    return results


def time_case(x: torch.Tensor, fmt: str, block: int, memcpy_us: float, warmup_ms: int, rep_ms: int) -> list[dict]:
    from kernels.block_quant import (
        block_quantize_reference,
        group_mismatch,
        nvfp4_global_scale,
        rotate_in_dtype,
        rotate_quantize_mx,
        rotate_quantize_mx_bytes,
        rotate_then_quantize,
    )
    from kernels.launch import SUPPORTED_BLOCKS
    from kernels.timing import median_us

    tokens, d = x.shape
    blocks = random_stack(d // block, block)
    g = nvfp4_global_scale(x[:256], blocks).cuda() if fmt == "nvfp4" else None  # calibrated once, not timed
    nbytes = rotate_quantize_mx_bytes(d, tokens, block, fmt, x.element_size())
    separate = ("blockdiag" if block in SUPPORTED_BLOCKS else "torch bmm") + ", then quantize"
    ops = {
        "one pass": lambda: rotate_quantize_mx(x, blocks, fmt, g),
        separate: lambda: rotate_then_quantize(x, blocks, fmt, g),
    }
    # the separate way is exact for its own fp16 y: check it (the one-pass kernel is checked in check_case)
    differ = group_mismatch(ops[separate](), block_quantize_reference(rotate_in_dtype(x, blocks), fmt, g), fmt)
    if differ.any():
        raise AssertionError(f"{fmt} b={block}: rotate-then-quantize differs in {int(differ.sum())} groups")
    rows = []
    for op, fn in ops.items():
        us = median_us(fn, warmup_ms, rep_ms)[0]
        rows.append(
            {
                "d": d,
                "L": tokens,
                "format": fmt,
                "block": block,
                "op": op,
                "us": round(us, 2),
                "over_memcpy": round(us / memcpy_us, 3),
                "gbps": round(nbytes / (us * 1e-6) / 1e9, 1),
            }
        )
        print(f"  {fmt} b={block} L={tokens} {op}: {us:.1f} us ({us / memcpy_us:.2f}x memcpy)", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| d | L | format | block | op | median us | x memcpy | GB/s |", "|---|---|---|---|---|---|---|---|"]
    lines += [
        f"| {r['d']} | {r['L']} | {r['format']} | {r['block']} | {r['op']} | {r['us']:.1f} | "
        f"{r['over_memcpy']:.2f} | {r['gbps']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_block_quant", description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=11008, help="width (a multiple of every case's block and group)")
    parser.add_argument("--L", default="2048,8192", help="comma-separated token counts")
    parser.add_argument("--cases", default=DEFAULT_CASES, help="FORMAT:BLOCK items, e.g. " + DEFAULT_CASES)
    parser.add_argument("--skip-checks", action="store_true", help="time only")
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_block_quant.json ($OUT)")
    args = parser.parse_args(argv)
    try:
        cases = parse_cases(args.cases)
        ls = [int(v) for v in args.L.split(",") if v.strip()]
        if not ls or min(ls) < 1:
            raise ValueError(f"--L takes positive token counts, got {args.L!r}")
        from kernels.block_quant import FORMATS

        bad = [f"{f}:{b}" for f, b in cases if args.d < 1 or args.d % b or args.d % FORMATS[f].group]
        if bad:
            raise ValueError(f"--d {args.d} must be a positive multiple of the block and group of {bad}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set; unset it to run the kernels on the GPU", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA GPU is visible to torch; this benchmark needs one", file=sys.stderr)
        return 2
    import triton

    out = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "d": args.d,
        "dtype": "fp16",
        "checks": [],
        "timings": [],
        "errors": [],
    }
    print(f"{out['device']} | torch {out['torch']} | triton {out['triton']}", flush=True)
    torch.manual_seed(0)
    started = time.perf_counter()
    if not args.skip_checks:
        check_cases = cases + ([("mxfp8", 32)] if ("mxfp8", 32) not in cases else [])
        for fmt, block in check_cases:
            try:
                for result in check_case(fmt, block, args.d):
                    out["checks"].append({"format": fmt, "block": block, "d": args.d, **result})
                    print(
                        f"check {fmt} b={block}: {result['check']}: {result['differ']} of {result['groups']} "
                        f"groups differ -> {'ok' if result['ok'] else 'FAILED'}",
                        flush=True,
                    )
            except Exception as err:  # noqa: BLE001 - report, go on with the next case
                traceback.print_exc()
                out["errors"].append(f"check {fmt} b={block}: {type(err).__name__}: {err}")
        print(f"checks done in {time.perf_counter() - started:.0f} s", flush=True)
    from kernels.timing import median_us

    for tokens in ls:
        x = torch.randn(tokens, args.d, dtype=torch.float16, device="cuda")
        x[:, 7] *= 40.0
        copy = torch.empty_like(x)
        memcpy_us = median_us(lambda: copy.copy_(x), args.warmup_ms, args.rep_ms)[0]  # noqa: B023 - used at once
        out["timings"].append(
            {
                "d": args.d,
                "L": tokens,
                "format": "-",
                "block": 0,
                "op": "memcpy",
                "us": round(memcpy_us, 2),
                "over_memcpy": 1.0,
                "gbps": round(2 * x.numel() * x.element_size() / (memcpy_us * 1e-6) / 1e9, 1),
            }
        )
        print(f"L={tokens}: memcpy {memcpy_us:.1f} us", flush=True)
        for fmt, block in cases:
            try:
                out["timings"] += time_case(x, fmt, block, memcpy_us, args.warmup_ms, args.rep_ms)
            except Exception as err:  # noqa: BLE001 - report, go on with the next case
                traceback.print_exc()
                out["errors"].append(f"time {fmt} b={block} L={tokens}: {type(err).__name__}: {err}")
        x = copy = None
        torch.cuda.empty_cache()
    out["seconds"] = round(time.perf_counter() - started, 1)
    failed = [c for c in out["checks"] if not c["ok"]]
    print("\n" + markdown(out["timings"]))
    print(
        f"\n{len(out['checks']) - len(failed)} of {len(out['checks'])} checks passed; {len(out['errors'])} errors; "
        f"{out['seconds']} s"
    )
    for line in out["errors"]:
        print("error:", line)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_block_quant.json"), "w") as f:
            json.dump(out, f, indent=1)
    return 1 if failed or out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
