"""Online-rotation kernel benchmark: `python -m kernels.bench --d 4096,11008,14336 --L 1,16,128,512,2048,8192`.

For each width d and token count L it times (median of triton.testing.do_bench, microseconds, the L2 flushed
before each call; each op captured in a CUDA graph and replayed, so host time stays out: kernels/timing.py),
after checking each kernel against its reference on the same inputs:
  memcpy             x.clone(): the floor for any online rotation (read x, write x)
  fht_padded         plain FHT over the next power of two (zero-pads a width like 11008: not orthogonal)
  fht_exact          exact x @ H_d with H_d = H_K (x) H_{2^m} (FHT over 2^m, then an H_K matmul)
  triton_blockdiag   kernels.blockdiag, autotuned, block b (128 by default)
  torch_blockdiag    the same rotation as one torch bmm in x's dtype
  dense_gemm         x @ W with a dense d x d W (what an unstructured online rotation would cost)
  rotate_quant_int4  kernels.rotate_quant, rotation + per-token int4 (packed), no fp16 intermediate (two launches)
  rotate_quant_int8  the same with int8 output
  rotate_mxfp4       kernels.block_quant: rotation + MXFP4 (E2M1 + E8M0 scale per 32) in one pass
  rotate_nvfp4       the same with NVFP4 (E2M1 + E4M3 scale per 16; the FP32 global scale calibrated beforehand)
  rotate_mxfp8       the same with MXFP8 (E4M3 + E8M0 scale per 32)
  blockdiag_then_mxfp4, blockdiag_then_nvfp4   the separate way: triton_blockdiag's fp16/bf16 output, then a
                     quantize-only launch of kernels.block_quant (x read once, y written and read back)
The FHT rows use the fast_hadamard_transform package when installed, else our torch implementation; the row's
`backend` says which. GB/s counts the fewest bytes each op must move (inputs once, outputs once).

`run_benchmark` is a generator of row dicts (the Kernels page plots them as they come); without a GPU it raises
NoGPUError at call time.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from kernels import hadamard
from kernels.block_quant import (
    FORMATS,
    block_quantize_reference,
    group_mismatch,
    nvfp4_global_scale,
    rotate_in_dtype,
    rotate_quantize_mx,
    rotate_quantize_mx_bytes,
    rotate_quantize_mx_reference,
    rotate_then_quantize,
)
from kernels.blockdiag import blockdiag_matmul_reference, blockdiag_matmul_triton
from kernels.rotate_quant import rotate_quantize, rotate_quantize_bytes, rotate_quantize_reference, unpack_int4
from kernels.timing import median_us

KERNELS = (
    "memcpy",
    "fht_padded",
    "fht_exact",
    "triton_blockdiag",
    "torch_blockdiag",
    "dense_gemm",
    "rotate_quant_int4",
    "rotate_quant_int8",
    "rotate_mxfp4",
    "rotate_nvfp4",
    "rotate_mxfp8",
    "blockdiag_then_mxfp4",
    "blockdiag_then_nvfp4",
)
KERNEL_LABELS = {
    "memcpy": "memcpy (clone)",
    "fht_padded": "FHT, padded to 2^m",
    "fht_exact": "FHT, exact K*2^m",
    "triton_blockdiag": "Triton block-diagonal",
    "torch_blockdiag": "torch block-diagonal (bmm)",
    "dense_gemm": "dense GEMM",
    "rotate_quant_int4": "rotate + int4 quantize",
    "rotate_quant_int8": "rotate + int8 quantize",
    "rotate_mxfp4": "rotate + MXFP4, one pass",
    "rotate_nvfp4": "rotate + NVFP4, one pass",
    "rotate_mxfp8": "rotate + MXFP8, one pass",
    "blockdiag_then_mxfp4": "block-diagonal, then MXFP4",
    "blockdiag_then_nvfp4": "block-diagonal, then NVFP4",
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROW_FIELDS = (
    "kernel",
    "d",
    "L",
    "dtype",
    "block",
    "median_us",
    "gbps",
    "over_memcpy",
    "backend",
    "check_error",
    "timing",
)
# relative error bound (||out - ref|| / ||ref||) per dtype: one rounding of the output plus fp32 accumulation
CHECK_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
CHECK_ROWS = 256  # rows compared against the FHT and GEMM references (cheaper than all L rows)
MAX_OFF_BY_ONE = 1e-3  # rotate + quantize: fraction of integers allowed one step off the reference (quant_error)
MX_FORMATS = tuple(FORMATS)  # kernels/block_quant.py's formats


class NoGPUError(RuntimeError):
    """The benchmark times CUDA kernels; raised when torch sees no CUDA device."""


class KernelCheckError(AssertionError):
    """A kernel disagreed with its reference, so it was not timed."""


def gpu_available() -> bool:
    return torch.cuda.is_available()


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ValueError(f"--{name} takes comma-separated integers, e.g. 4096,11008; got {text!r}") from err
    return values


def validate(ds: Sequence[int], ls: Sequence[int], dtype: str, kernels: Sequence[str], block: int) -> None:
    if not ds or not ls:
        raise ValueError("give at least one width d and one token count L")
    bad_d = [d for d in ds if not isinstance(d, int) or d < 1 or d % block]
    if bad_d:
        raise ValueError(
            f"widths {bad_d} are not positive multiples of the block size {block}; "
            "LLaMA widths such as 4096, 11008 and 14336 are multiples of 128"
        )
    if any(not isinstance(n, int) or n < 1 for n in ls):
        raise ValueError(f"token counts must be positive ints, got {list(ls)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; choose from {list(KERNELS)}")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32, inf when out holds a NaN or an infinity."""
    out, ref = out.float(), ref.float()
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_blocks(n: int, b: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """n random orthogonal b x b blocks [n, b, b], contiguous (QR's Q is column-major: the kernels would copy it)."""
    q, _ = torch.linalg.qr(torch.randn(n, b, b, device=device, dtype=torch.float32))
    return q.to(dtype).contiguous()


def quant_error(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], bits: int) -> float:
    """Fraction of integers off the reference, or inf when any is off by more than 1 or a scale differs (> 1e-5
    relative). got and want as rotate_quantize returns them (int4 packed). An integer may differ by one where the
    fp32 accumulation order tips a rounding tie; a correct kernel stays within MAX_OFF_BY_ONE."""
    (q, s), (q_ref, s_ref) = got, want
    if bits == 4:
        q, q_ref = unpack_int4(q), unpack_int4(q_ref)
    if q.shape != q_ref.shape or s.shape != s_ref.shape:
        return math.inf
    diff = (q.int() - q_ref.int()).abs()
    if (diff.numel() and diff.max() > 1) or not rel_error(s, s_ref) <= 1e-5:
        return math.inf
    return float((diff > 0).float().mean()) if diff.numel() else 0.0


def quant_mismatch(
    got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], bits: int
) -> str | None:
    """None when quant_error is within MAX_OFF_BY_ONE, else what differs (for a failure message)."""
    if quant_error(got, want, bits) <= MAX_OFF_BY_ONE:
        return None
    (q, s), (q_ref, s_ref) = got, want
    if bits == 4:
        q, q_ref = unpack_int4(q), unpack_int4(q_ref)
    if q.shape != q_ref.shape or s.shape != s_ref.shape:
        return f"shapes differ: q {list(q.shape)} vs {list(q_ref.shape)}, scales {list(s.shape)} vs {list(s_ref.shape)}"
    diff = (q.int() - q_ref.int()).abs()
    return (
        f"max diff {int(diff.max())}, {float((diff > 0).float().mean()):.2e} off by one, "
        f"scale rel {rel_error(s, s_ref):.2e}"
    )


def mx_error(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor], fmt: str) -> float:
    """Fraction of microscaling groups (32 or 16 values) whose scale or any code differs from the reference; inf
    when the shapes differ. The one-pass kernel is exact for the same fp32 y, so only a group with a value within
    about 1e-6 * (|x| @ |B|) of a rounding boundary (another fp32 summation order) may differ: a correct kernel
    stays far within MAX_OFF_BY_ONE (on the H200, 4 to 42 groups in 344000)."""
    try:
        differ = group_mismatch(got, want, fmt)
    except ValueError:
        return math.inf
    return float(differ.float().mean()) if differ.numel() else 0.0


class Case:
    """Inputs and (kernel -> (run, check, bytes, backend)) for one (d, L, dtype)."""

    def __init__(self, d: int, tokens: int, dtype: torch.dtype, block: int, device: str):
        self.d, self.tokens, self.dtype, self.block = d, tokens, dtype, block
        self.x = torch.randn(tokens, d, dtype=dtype, device=device)
        self.blocks = random_blocks(d // block, block, dtype, device)
        self.element = self.x.element_size()
        self.io_bytes = 2 * tokens * d * self.element
        self.device = device
        self._dense = None
        self._global_scale = None

    def global_scale(self) -> torch.Tensor:
        """NVFP4's FP32 per-tensor scale, calibrated once on this case's rotated input (not timed)."""
        if self._global_scale is None:
            self._global_scale = nvfp4_global_scale(self.x[:CHECK_ROWS], self.blocks).to(self.device)
        return self._global_scale

    def dense(self) -> torch.Tensor:
        if self._dense is None:  # random, not orthogonal: GEMM time does not depend on the values
            self._dense = (torch.randn(self.d, self.d, device=self.device) / math.sqrt(self.d)).to(self.dtype)
        return self._dense

    def spec(self, kernel: str):
        x, blocks, e, d = self.x, self.blocks, self.element, self.d
        rows = x[:CHECK_ROWS]
        tol = CHECK_TOLERANCE[self.dtype]
        if kernel == "memcpy":
            return (x.clone, lambda out: float((out != x).any()), self.io_bytes, "torch", 0.5)
        if kernel == "fht_padded":
            return (
                lambda: hadamard.hadamard_transform_padded(x),
                lambda out: rel_error(out[:CHECK_ROWS], hadamard.hadamard_transform_padded_reference(rows)),
                self.io_bytes,
                hadamard.backend(),
                tol,
            )
        if kernel == "fht_exact":
            k, _ = hadamard.decompose(d)
            return (
                lambda: hadamard.hadamard_transform(x),
                lambda out: rel_error(out[:CHECK_ROWS], hadamard.hadamard_transform_reference(rows)),
                self.io_bytes + k * k * e,
                hadamard.backend(),
                tol,
            )
        if kernel in ("triton_blockdiag", "torch_blockdiag"):
            run = (
                (lambda: blockdiag_matmul_triton(x, blocks))
                if kernel == "triton_blockdiag"
                else (lambda: blockdiag_matmul_reference(x, blocks, compute_dtype=None))
            )
            return (
                run,
                lambda out: rel_error(out, blockdiag_matmul_reference(x, blocks)),
                self.io_bytes + d * self.block * e,
                "triton" if kernel == "triton_blockdiag" else "torch",
                tol,
            )
        if kernel == "dense_gemm":
            w = self.dense()
            return (
                lambda: x @ w,
                lambda out: rel_error(out[:CHECK_ROWS], rows.float() @ w.float()),
                self.io_bytes + d * d * e,
                "torch",
                tol,
            )
        if kernel.startswith("rotate_quant_int"):
            bits = int(kernel[len("rotate_quant_int") :])
            return (
                lambda: rotate_quantize(x, blocks, bits),
                lambda out: quant_error(out, rotate_quantize_reference(x, blocks, bits), bits),
                rotate_quantize_bytes(d, self.tokens, self.block, bits, e),
                "triton",
                MAX_OFF_BY_ONE,
            )
        fmt = kernel.rsplit("_", 1)[-1]
        if fmt in MX_FORMATS and kernel in (f"rotate_{fmt}", f"blockdiag_then_{fmt}"):
            g = self.global_scale() if fmt == "nvfp4" else None
            nbytes = rotate_quantize_mx_bytes(d, self.tokens, self.block, fmt, e)  # the fewest: the fused op's
            if kernel.startswith("rotate_"):
                return (
                    lambda: rotate_quantize_mx(x, blocks, fmt, g),
                    lambda out: mx_error(out, rotate_quantize_mx_reference(x, blocks, fmt, g), fmt),
                    nbytes,
                    "triton",
                    MAX_OFF_BY_ONE,
                )
            return (
                lambda: rotate_then_quantize(x, blocks, fmt, g),  # exact for the rounded y
                lambda out: mx_error(out, block_quantize_reference(rotate_in_dtype(x, blocks), fmt, g), fmt),
                nbytes,
                "triton",
                0.0,
            )
        raise ValueError(f"unknown kernel {kernel!r}")


def run_benchmark(
    ds: Iterable[int],
    Ls: Iterable[int],
    dtype: str = "fp16",
    kernels: Sequence[str] = KERNELS,
    *,
    block: int = 128,
    warmup_ms: int = 25,
    rep_ms: int = 100,
    graphs: bool = True,
) -> Iterator[dict]:
    """Yield one row dict (ROW_FIELDS) per (d, L, kernel); memcpy first for each (d, L).

    graphs: time CUDA-graph replays (GPU time); False: plain calls, host time included. The row's `timing` says
    which.

    Raises NoGPUError (no CUDA device) or ValueError (bad arguments) at call time; KernelCheckError while
    iterating if a kernel disagrees with its reference (it is then not timed).
    """
    ds, ls, kernels = list(ds), list(Ls), list(kernels)
    validate(ds, ls, dtype, kernels, block)
    if not gpu_available():
        raise NoGPUError(
            "no CUDA GPU is visible to torch: the kernel benchmark needs one. Recorded H100 results "
            "are in docs/BENCHMARKS.md; run `python -m kernels.bench` on a GPU machine."
        )
    return _rows(
        ds,
        ls,
        DTYPES[dtype],
        dtype,
        ["memcpy"] + [k for k in kernels if k != "memcpy"],
        "memcpy" in kernels,
        block,
        warmup_ms,
        rep_ms,
        graphs,
    )


def checked_kernel(case: Case, kernel: str):
    """Run `kernel` once on the case's inputs and compare with its reference -> (run, bytes, backend, error).

    Raises KernelCheckError when the error exceeds the kernel's tolerance (the kernel is then not timed).
    """
    run, check, nbytes, backend, tol = case.spec(kernel)
    run()  # the first call may autotune; check the output of the path that is timed
    error = check(run())
    if not error <= tol:
        raise KernelCheckError(
            f"{kernel} at d={case.d}, L={case.tokens}, {case.dtype} disagrees with its "
            f"reference: error {error:.3g} > {tol:.3g}; not timed"
        )
    return run, nbytes, backend, error


def _rows(ds, ls, torch_dtype, dtype_name, kernels, yield_memcpy, block, warmup_ms, rep_ms, graphs) -> Iterator[dict]:
    torch.manual_seed(0)
    for d in ds:
        for tokens in ls:
            case = Case(d, tokens, torch_dtype, block, "cuda")
            memcpy_us = None
            for kernel in kernels:
                run, nbytes, backend, error = checked_kernel(case, kernel)
                us, timing = median_us(run, warmup_ms, rep_ms, graph=graphs)
                memcpy_us = us if kernel == "memcpy" else memcpy_us
                if kernel == "memcpy" and not yield_memcpy:
                    continue
                yield {
                    "kernel": kernel,
                    "d": d,
                    "L": tokens,
                    "dtype": dtype_name,
                    "block": block,
                    "median_us": round(us, 2),
                    "gbps": round(nbytes / (us * 1e-6) / 1e9, 1),
                    "over_memcpy": round(us / memcpy_us, 3),
                    "backend": backend,
                    "check_error": error,
                    "timing": timing,
                }
            del case
            torch.cuda.empty_cache()


def format_row(row: dict) -> str:
    return (
        f"{row['kernel']:<18} {row['d']:>6} {row['L']:>6} {row['dtype']:>5} {row['median_us']:>10.1f} "
        f"{row['gbps']:>8.0f} {row['over_memcpy']:>7.2f}x  {row['backend']:<24} {row.get('timing', '')}"
    )


HEADER = (
    f"{'kernel':<18} {'d':>6} {'L':>6} {'dtype':>5} {'median_us':>10} {'GB/s':>8} {'/memcpy':>8}  "
    f"{'backend':<24} timing"
)


def markdown_table(rows: Sequence[dict]) -> str:
    lines = ["| kernel | d | L | dtype | median us | GB/s | x memcpy | backend |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['d']} | {r['L']} | {r['dtype']} | {r['median_us']:.1f} | "
            f"{r['gbps']:.0f} | {r['over_memcpy']:.2f} | {r['backend']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--d", default="4096,11008,14336", help="comma-separated widths")
    parser.add_argument("--L", default="1,16,128,512,2048,8192", help="comma-separated token counts")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--block", type=int, default=128, help="block size of the block-diagonal rotation")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    parser.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    parser.add_argument(
        "--eager", action="store_true", help="time plain calls instead of CUDA-graph replays (host time included)"
    )
    args = parser.parse_args(argv)
    try:
        rows = run_benchmark(
            parse_ints(args.d, "d"),
            parse_ints(args.L, "L"),
            args.dtype,
            [k for k in args.kernels.split(",") if k],
            block=args.block,
            graphs=not args.eager,
        )
    except (NoGPUError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(HEADER, flush=True)
    collected = []
    for row in rows:
        collected.append(row)
        print(format_row(row), flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=ROW_FIELDS)
            writer.writeheader()
            writer.writerows(collected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
