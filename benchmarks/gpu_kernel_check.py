"""One GPU run for issue 7: check every kernel, sweep tile shapes, run the benchmark, print the verdicts.

    python -m benchmarks.gpu_kernel_check --out DIR [--fht-src DIR] [--no-sweep] [--profile] [--d ...] [--L ...]

Order: correctness checks, the benchmark, the profile, the tile sweeps.

--fht-src: a checkout of Dao-AILab/fast-hadamard-transform (csrc/ and fast_hadamard_transform/); it is built
for this GPU with torch's extension loader (for a machine without network; users with one pip-install
requirements-gpu.txt instead). Results go to DIR as CSV files and a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import platform
import sys
import time
from datetime import UTC, datetime

import torch
from triton.runtime.errors import OutOfResources

from kernels import bench, blockdiag, hadamard, launch
from kernels.bench import quant_mismatch, random_blocks, rel_error
from kernels.blockdiag import blockdiag_matmul_reference, blockdiag_matmul_triton, blockdiag_rotate
from kernels.launch import SUPPORTED_BLOCKS, TileConfig, rotate_quant_configs, tile_configs
from kernels.rotate_quant import rotate_quantize, rotate_quantize_reference
from kernels.timing import median_us

# The brief's H100 numbers for Dao's FHT at d = 11008 (padded to 16384), fp16, microseconds
BRIEF_FHT_11008 = {1: 9.0, 512: 22.2, 2048: 66.6, 8192: 240.7}
EXTRA_SWEEP_TILES = (  # block-diagonal tiles beyond the autotune candidates (b = 128)
    TileConfig(128, 128, 16, 8, 4),
    TileConfig(64, 128, 32, 4, 4),
    TileConfig(128, 128, 2, 8, 3),
    TileConfig(32, 128, 6, 4, 3),
    TileConfig(16, 128, 8, 4, 3),
    TileConfig(16, 128, 4, 4, 3),
    TileConfig(64, 128, 4, 4, 2),
    TileConfig(64, 128, 4, 4, 4),
    TileConfig(64, 128, 2, 4, 2),
    TileConfig(64, 64, 4, 4, 3),
    TileConfig(128, 64, 2, 4, 3),
    TileConfig(32, 64, 4, 4, 3),
)
EXTRA_ROTATE_TILES = (  # rotate-quantize tiles beyond its autotune candidates
    TileConfig(64, 128, 2, 4, 3),
    TileConfig(128, 128, 2, 8, 3),
    TileConfig(32, 128, 8, 4, 4),
    TileConfig(64, 128, 4, 8, 3),
)


def build_fast_hadamard_transform(src: str) -> str:
    """Compile the package's CUDA extension for this GPU and make `import fast_hadamard_transform` work."""
    from torch.utils.cpp_extension import load

    major, minor = torch.cuda.get_device_capability()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    flags = [
        "-O3",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "--use_fast_math",
    ]
    build_dir = os.path.join(src, "build_jit")
    os.makedirs(build_dir, exist_ok=True)
    module = load(
        "fast_hadamard_transform_cuda",
        sources=[
            os.path.join(src, "csrc", "fast_hadamard_transform.cpp"),
            os.path.join(src, "csrc", "fast_hadamard_transform_cuda.cu"),
        ],
        extra_cflags=["-O3"],
        extra_cuda_cflags=flags,
        build_directory=build_dir,
        verbose=False,
    )
    sys.modules["fast_hadamard_transform_cuda"] = module
    package_dir = os.path.join(src, "fast_hadamard_transform")  # the package's Python part, from src
    spec = importlib.util.spec_from_file_location(
        "fast_hadamard_transform", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    sys.modules["fast_hadamard_transform"] = package = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package)
    return hadamard.backend()


def _poison_next_allocation(numel: int) -> None:
    """Fill the allocator's next block with NaN so an output element the kernel never writes shows up."""
    poison = torch.full((numel,), float("nan"), dtype=torch.float16, device="cuda")
    del poison


def check_correctness() -> list[str]:
    """Every kernel against its reference on fresh random inputs; returns failure messages.

    Autotuning is exercised on the benchmark's path (fp16, b = 128); elsewhere a fixed tile keeps compiles few.
    """
    failures = []
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
    fixed = TileConfig(64, 128, 4, 4, 3)
    for b in SUPPORTED_BLOCKS:
        for dtype in (torch.float16, torch.bfloat16):
            for shape in ((1, 11008), (3, 5, 11008), (1000, 11008), (4097, 4096), (7, 2 * b)):
                x = torch.randn(*shape, dtype=dtype, device="cuda")
                # QR's Q as it comes (column-major), so the launcher's copy to contiguous blocks is exercised too
                blocks = torch.linalg.qr(torch.randn(shape[-1] // b, b, b, device="cuda"))[0].to(dtype)
                config = None if (b == 128 and dtype == torch.float16) else fixed
                _poison_next_allocation(x.numel())
                error = rel_error(
                    blockdiag_matmul_triton(x, blocks, config=config), blockdiag_matmul_reference(x, blocks)
                )
                if not error <= tol[dtype]:
                    failures.append(f"blockdiag b={b} {dtype} {shape} {config}: rel error {error:.3g}")
        if b != 128:  # the other blocks' candidates share the kernel body; compiling them all costs a minute
            continue
        # every autotune candidate and sweep tile, not only the winner, must compute the same function
        x = torch.randn(300, 4 * b, dtype=torch.float16, device="cuda")
        blocks = torch.randn(4, b, b, device="cuda").half() / math.sqrt(b)
        ref = blockdiag_matmul_reference(x, blocks)
        for config in dict.fromkeys(tile_configs(b) + list(EXTRA_SWEEP_TILES)):
            _poison_next_allocation(x.numel())
            try:
                error = rel_error(blockdiag_matmul_triton(x, blocks, config=config), ref)
            except OutOfResources as err:
                print(f"  b={b} {config.name()}: {err}")  # the autotuner skips these itself
                continue
            if not error <= tol[torch.float16]:
                failures.append(f"blockdiag b={b} fp16 {config}: rel error {error:.3g}")
    # a strided input (row stride > d)
    big = torch.randn(64, 1024, dtype=torch.float16, device="cuda")
    x, blocks = big[:, :512], torch.randn(4, 128, 128, device="cuda").half() / 11.3
    error = rel_error(blockdiag_matmul_triton(x, blocks), blockdiag_matmul_reference(x, blocks))
    if not error <= 2e-3:
        failures.append(f"blockdiag strided input: rel error {error:.3g}")

    failures += check_rotate_quantize()

    # the engine hook's gradients against autograd through the fp32 reference
    x = torch.randn(4, 33, 1024, device="cuda", dtype=torch.float16, requires_grad=True)
    blocks = random_blocks(8, 128, torch.float32, "cuda").requires_grad_(True)
    grad_out = torch.randn(4, 33, 1024, device="cuda", dtype=torch.float16)
    (blockdiag_rotate(x, blocks) * grad_out).sum().backward()
    x_ref, blocks_ref = x.detach().float().requires_grad_(True), blocks.detach().clone().requires_grad_(True)
    (blockdiag_matmul_reference(x_ref, blocks_ref) * grad_out.float()).sum().backward()
    for name, got, want in (("dx", x.grad, x_ref.grad), ("dB", blocks.grad, blocks_ref.grad)):
        if not rel_error(got, want) <= 3e-3:
            failures.append(f"blockdiag_rotate {name}: rel error {rel_error(got, want):.3g}")

    for d in (576, 1536, 4096, 11008, 14336):
        x = torch.randn(64, d, device="cuda", dtype=torch.float16)
        names = ["torch"] + (["fast_hadamard_transform"] if hadamard.backend() != "torch" else [])
        try:
            ref = hadamard.hadamard_transform_reference(x)
            for name in names:
                error = rel_error(hadamard.hadamard_transform(x, backend_name=name), ref)
                if not error <= 2e-3:
                    failures.append(f"hadamard_transform d={d} backend {name}: rel error {error:.3g}")
        except Exception as err:  # noqa: BLE001 - report and go on with the other checks
            failures.append(f"hadamard_transform d={d}: {err!r:.300}")
    return failures


def check_fast_launch() -> bool:
    """kernels.launch.launch's direct calls of the compiled kernel give the same bytes as triton.jit's dispatch."""
    x = torch.randn(1000, 11008, dtype=torch.float16, device="cuda")
    blocks = random_blocks(86, 128, torch.float16, "cuda")
    try:
        outputs = []
        for fast in (False, True, True):  # the first fast call compiles, the second replays
            launch.FAST_LAUNCH = fast
            outputs.append(
                (
                    blockdiag_matmul_triton(x, blocks, config=TileConfig(64, 128, 4, 4, 3)),
                    rotate_quantize(x, blocks, 4, config=TileConfig(64, 128, 4, 4, 3)),
                )
            )
        same = all(
            torch.equal(a, b)
            for out in outputs[1:]
            for a, b in zip((out[0], *out[1]), (outputs[0][0], *outputs[0][1]), strict=False)
        )
    except Exception as err:  # noqa: BLE001
        print(f"fast launch FAILED: {err!r:.1000}")
        same = False
    launch.FAST_LAUNCH = same
    print(f"fast launch {'matches' if same else 'DISABLED (differs from)'} triton.jit's dispatch", flush=True)
    return same


def check_rotate_quantize(quick: bool = False) -> list[str]:
    """rotate_quantize against the reference quantization of the reference rotation, each case called twice (a
    row maximum left over from the first call would shrink the second call's integers)."""
    failures = []
    fixed = TileConfig(64, 128, 4, 4, 3)
    cases = [
        (bits, torch.float16, 128, shape, None)
        for bits in (4, 8)
        for shape in ((1, 11008), (3, 37, 11008), (5000, 11008))
    ]  # autotuned
    cases += [(4, torch.bfloat16, 128, (777, 4096), fixed)]
    cases += (
        []
        if quick
        else [
            (4, torch.float16, 128, (2048, 11008), config)
            for config in rotate_quant_configs(128) + list(EXTRA_ROTATE_TILES)
        ]
    )
    cases += (
        []
        if quick
        else [(bits, torch.bfloat16, 128, shape, fixed) for bits in (4, 8) for shape in ((3, 37, 11008), (777, 4096))]
    )
    cases += (
        []
        if quick
        else [
            (8, torch.float16, 128, (33, 4096), None),
            (4, torch.float16, 32, (513, 4096), TileConfig(64, 32, 2, 4, 2)),
            (4, torch.float16, 32, (513, 11008), None),
            (4, torch.float16, 256, (1000, 14336), TileConfig(64, 128, 1, 8, 1)),
            (8, torch.float16, 64, (100, 4096), TileConfig(32, 64, 2, 4, 2)),
        ]
    )
    for bits, dtype, b, shape, config in cases:
        x = torch.randn(*shape, dtype=dtype, device="cuda")
        x[..., 7] *= 40.0  # an outlier channel, as in real activations
        blocks = random_blocks(shape[-1] // b, b, dtype, "cuda")
        want = rotate_quantize_reference(x, blocks, bits)
        for call in (1, 2):
            try:
                problem = quant_mismatch(rotate_quantize(x, blocks, bits, config=config), want, bits)
            except OutOfResources as err:
                problem = f"out of resources: {err}"
            if problem:
                failures.append(f"rotate_quant int{bits} {dtype} b={b} {shape} {config} call {call}: {problem}")
    return failures


def _time(fn, warmup: int = 10, rep: int = 40) -> float:
    return median_us(fn, warmup, rep)[0]  # a CUDA-graph replay: no host time in the sweep


def sweep(
    out_dir: str, d: int = 11008, ls=(512, 2048, 8192), ops=("blockdiag", "rotate"), extra: bool = True
) -> list[dict]:
    """Time fixed tile shapes of the block-diagonal kernel and of rotate + int4 (b = 128, fp16);
    extra: also the tiles beyond the autotune candidates (each one more compile)."""
    rows = []
    extra_tiles = list(EXTRA_SWEEP_TILES) if extra else []
    extra_rotate = list(EXTRA_ROTATE_TILES) if extra else []
    for tokens in ls:
        x = torch.randn(tokens, d, dtype=torch.float16, device="cuda")
        blocks = random_blocks(d // 128, 128, torch.float16, "cuda")
        rows.append({"op": "memcpy", "L": tokens, "tile": "", "us": _time(x.clone)})
        if "blockdiag" in ops:
            for tile in dict.fromkeys(tile_configs(128) + extra_tiles):
                try:
                    us = _time(lambda: blockdiag_matmul_triton(x, blocks, config=tile))
                except (OutOfResources, ValueError):  # a tile too large for shared memory
                    continue
                rows.append({"op": "blockdiag", "L": tokens, "tile": tile.name(), "us": us})
            best = min((r for r in rows if r["op"] == "blockdiag" and r["L"] == tokens), key=lambda r: r["us"])
            tile = next(t for t in dict.fromkeys(tile_configs(128) + extra_tiles) if t.name() == best["tile"])
            blockdiag.X_EVICTION_POLICY = ""  # the same best tile without the L2 hints on x
            try:
                us = _time(lambda: blockdiag_matmul_triton(x, blocks, config=tile))
            finally:
                blockdiag.X_EVICTION_POLICY = "evict_first"
            rows.append({"op": "blockdiag_no_hint", "L": tokens, "tile": best["tile"], "us": us})
            rows.append(
                {
                    "op": "blockdiag_autotuned",
                    "L": tokens,
                    "tile": "",
                    "us": _time(lambda: blockdiag_matmul_triton(x, blocks)),
                }
            )
        if "rotate" in ops and tokens >= 2048:
            want = rotate_quantize_reference(x, blocks, 4)
            for tile in rotate_quant_configs(128) + extra_rotate + [None]:
                try:
                    problem = quant_mismatch(rotate_quantize(x, blocks, 4, config=tile), want, 4)
                    if problem:
                        print(f"  FAIL rotate int4 L={tokens} {tile}: {problem}")
                        continue
                    us = _time(lambda: rotate_quantize(x, blocks, 4, config=tile))
                except (OutOfResources, ValueError) as err:
                    print(f"  rotate int4 {tile}: {err!r:.200}")
                    continue
                name = "autotuned" if tile is None else tile.name()
                rows.append({"op": "rotate_int4", "L": tokens, "tile": name, "us": us})
        x = None  # free the GPU memory before the next size
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["op", "L", "tile", "us"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n== sweep (d = {d}, fp16; do_bench median us of CUDA-graph replays; best 5 per op and L)")
    for tokens in ls:
        memcpy = next(r["us"] for r in rows if r["op"] == "memcpy" and r["L"] == tokens)
        for op in dict.fromkeys(r["op"] for r in rows if r["L"] == tokens and r["op"] != "memcpy"):
            best = sorted((r for r in rows if r["op"] == op and r["L"] == tokens), key=lambda r: r["us"])[:5]
            print(
                f"L={tokens:<5} {op:<20} memcpy {memcpy:6.1f} | "
                + " | ".join(f"{r['tile']} {r['us']:.1f} ({r['us'] / memcpy:.2f})" for r in best),
                flush=True,
            )
    return rows


def profile(d: int = 11008, ls=(1, 512, 2048, 8192)) -> None:
    """Device time per kernel (torch profiler, L2 flushed before each call as do_bench does) and host time per call."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    print(f"\n== profile (d = {d}, fp16): host us per call (no sync) | device us per call of each kernel")
    for tokens in ls:
        x = torch.randn(tokens, d, dtype=torch.float16, device="cuda")
        blocks = random_blocks(d // 128, 128, torch.float16, "cuda")
        fns = {
            "memcpy": x.clone,
            "triton_blockdiag": lambda: blockdiag_matmul_triton(x, blocks),
            "rotate_quant_int4": lambda: rotate_quantize(x, blocks, 4),
        }
        for name, fn in fns.items():
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                fn()
            host_us = (time.perf_counter() - start) / 50 * 1e6
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    flush.zero_()
                    fn()
                torch.cuda.synchronize()
            parts = []
            for event in prof.key_averages():
                total = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
                if event.count and total and "fill" not in event.key.lower():
                    parts.append(f"{event.key[:38]} x{event.count} {total / event.count:.1f}")
            print(f"L={tokens:<5} {name:<18} host {host_us:6.1f} | " + " | ".join(parts), flush=True)


def verdicts(rows: list[dict]) -> list[str]:
    """Issue 7's acceptance lines at d = 11008, fp16, from benchmark rows."""

    def us(kernel, tokens):
        hit = [r for r in rows if r["kernel"] == kernel and r["L"] == tokens and r["d"] == 11008]
        return hit[0]["median_us"] if hit else None

    lines = []
    for tokens in sorted({r["L"] for r in rows if r["d"] == 11008}):
        tri, mem = us("triton_blockdiag", tokens), us("memcpy", tokens)
        if tri is None or mem is None:
            continue
        fht_pad, fht_exact = us("fht_padded", tokens), us("fht_exact", tokens)
        quant = us("rotate_quant_int4", tokens)
        parts = [f"L={tokens}: triton {tri} us = {tri / mem:.2f}x memcpy"]
        if tokens >= 512:
            parts.append("PASS" if tri <= 1.15 * mem else "FAIL" + " (<= 1.15x memcpy)")
        for name, ref in (
            ("FHT padded (here)", fht_pad),
            ("FHT exact (here)", fht_exact),
            ("FHT Dao (brief)", BRIEF_FHT_11008.get(tokens)),
        ):
            if ref:
                parts.append(f"{name} {ref} us: {ref / tri:.2f}x faster")
        if quant is not None:
            parts.append(
                f"rotate+int4 {quant} us = {quant / mem:.2f}x memcpy"
                + (" PASS" if quant < mem else " FAIL") * (tokens >= 2048)
            )
        lines.append("; ".join(parts))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kernel_check")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--fht-src", default=None)
    parser.add_argument("--no-checks", action="store_true")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer compiles: rotate-quantize checks only, sweeps over the autotune candidates",
    )
    parser.add_argument("--sweep-L", default="512,2048,8192")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--sweep", default="blockdiag,rotate", help="which sweeps: blockdiag,rotate")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--no-bench", action="store_true")
    parser.add_argument("--d", default="4096,11008,14336")
    parser.add_argument("--L", default="1,16,128,512,2048,8192")
    parser.add_argument("--kernels", default=",".join(bench.KERNELS))
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warmup per benchmark row")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per benchmark row")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check here (this script is for the GPU machine)")
        return 2
    os.makedirs(args.out, exist_ok=True)
    import triton

    print(
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC | {torch.cuda.get_device_name()} | torch "
        f"{torch.__version__} | triton {triton.__version__} | python {platform.python_version()}",
        flush=True,
    )

    kernels = args.kernels.split(",")
    start = time.time()
    if torch.cuda.is_available():
        check_fast_launch()
    failures = [] if args.no_checks else check_rotate_quantize(quick=True) if args.quick else check_correctness()
    verdict = "skipped" if args.no_checks else f"{len(failures)} FAILED" if failures else "all passed"
    print(f"correctness: {verdict} ({time.time() - start:.0f} s)", flush=True)
    for line in failures:
        print("  FAIL", line)
    if args.fht_src:
        start = time.time()
        try:
            print(
                f"fast_hadamard_transform built: backend {build_fast_hadamard_transform(args.fht_src)} "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
        except Exception as err:  # noqa: BLE001 - the package is optional; say why and go on with ours
            print(f"fast_hadamard_transform build failed after {time.time() - start:.0f} s: {err!r:.500}")
    print(f"Hadamard backend: {hadamard.backend()} ({hadamard.package_status()})", flush=True)
    if not args.no_bench:
        run_bench(args, kernels)
    if args.profile:
        profile()
    if not args.no_sweep:
        start = time.time()
        sweep(args.out, ls=bench.parse_ints(args.sweep_L, "sweep-L"), ops=args.sweep.split(","), extra=not args.quick)
        print(f"sweep took {time.time() - start:.0f} s", flush=True)
    return 1 if failures else 0


def run_bench(args, kernels: list[str]) -> list[dict]:
    """kernels.bench rows, written to bench.csv as they come (a run cut short still leaves its rows)."""
    start = time.time()
    rows = []
    print("\n== benchmark\n" + bench.HEADER, flush=True)
    with open(os.path.join(args.out, "bench.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=bench.ROW_FIELDS)
        writer.writeheader()
        for row in bench.run_benchmark(
            bench.parse_ints(args.d, "d"),
            bench.parse_ints(args.L, "L"),
            "fp16",
            kernels,
            warmup_ms=args.warmup_ms,
            rep_ms=args.rep_ms,
        ):
            rows.append(row)
            writer.writerow(row)
            f.flush()
            print(bench.format_row(row), flush=True)
    print(f"benchmark took {time.time() - start:.0f} s")
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write(bench.markdown_table(rows) + "\n")
    print("\n== acceptance (d = 11008, fp16, block 128)")
    for line in verdicts(rows):
        print(line)
    return rows


if __name__ == "__main__":
    sys.exit(main())
