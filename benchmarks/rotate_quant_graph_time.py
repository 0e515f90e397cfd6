"""Device time of rotate + quantize against a copy of its input, free of host time (GPU only).

    python -m benchmarks.rotate_quant_graph_time [--d 4096,11008,14336] [--L 1,16,128,512,2048,8192]
        [--against FILE.py] [--out DIR]

Each op is timed as a CUDA-graph replay under do_bench (kernels/timing.py): GPU time, gaps between an op's
launches included, none of its Python. Every rotate-quantize op is checked against the reference first.

--against: another implementation of `rotate_quantize(x, blocks, bits)` (a file, e.g. an earlier version from
git: `git show 09310fa:kernels/rotate_quant.py > /tmp/grouped.py`), timed side by side in the same run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

from kernels.bench import quant_mismatch, random_blocks
from kernels.blockdiag import blockdiag_matmul_triton
from kernels.rotate_quant import rotate_quantize, rotate_quantize_reference
from kernels.timing import median_us


def load_other(path: str):
    spec = importlib.util.spec_from_file_location("other_rotate_quant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rotate_quantize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rotate_quant_graph_time")
    parser.add_argument("--d", default="4096,11008,14336")
    parser.add_argument("--L", default="1,16,128,512,2048,8192")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--against", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    other = load_other(args.against) if args.against else None
    rows, failures = [], 0
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    print(f"{'d':>6} {'L':>5} {'op':<22} {'us':>8} {'x memcpy':>9}")
    for d in (int(v) for v in args.d.split(",")):
        blocks = random_blocks(d // 128, 128, torch.float16, "cuda")
        for tokens in (int(v) for v in args.L.split(",")):
            x = torch.randn(tokens, d, dtype=torch.float16, device="cuda")
            x[:, 7] *= 40.0  # an outlier channel
            copy = torch.empty_like(x)
            ops = {
                "memcpy": (lambda: copy.copy_(x), None, None),
                "triton_blockdiag": (lambda: blockdiag_matmul_triton(x, blocks), None, None),
            }
            for bits in (int(v) for v in args.bits.split(",")):
                want = rotate_quantize_reference(x, blocks, bits)
                ops[f"rotate_int{bits}"] = (lambda bits=bits: rotate_quantize(x, blocks, bits), want, bits)
                if other is not None:
                    ops[f"rotate_int{bits} (against)"] = (lambda bits=bits: other(x, blocks, bits), want, bits)
            memcpy = None
            for name, (fn, want, bits) in ops.items():
                if want is not None:
                    problem = quant_mismatch(fn(), want, bits)
                    if problem:
                        print(f"{d:>6} {tokens:>5} {name:<22} FAILED the check: {problem}", flush=True)
                        failures += 1
                        continue
                us = median_us(fn, 10, 60)[0]
                memcpy = memcpy or us
                rows.append({"d": d, "L": tokens, "op": name, "us": round(us, 2), "over_memcpy": round(us / memcpy, 3)})
                print(f"{d:>6} {tokens:>5} {name:<22} {us:8.1f} {us / memcpy:9.2f}", flush=True)
            x = copy = None  # free the GPU memory before the next size
            torch.cuda.empty_cache()
    with open(os.path.join(args.out, "rotate_quant_graph_time.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
