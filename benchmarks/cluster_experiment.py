"""Experiment: the CUDA cluster rotate + quantize kernel on the GPU: build, check, time."""
import os
import sys
import time

import torch

from kernels import rotate_quant_cluster as rqc
from kernels.gpu_check import _quant_mismatch
from kernels.rotate_quant import rotate_quantize, rotate_quantize_reference
from kernels.timing import median_us

t = time.time()
ext = rqc.extension()
print("build:", "ok" if ext else rqc.build_error(), f"{time.time() - t:.0f} s", flush=True)
if ext is None:
    sys.exit(1)


def run(x, w, bits):
    x2 = x.reshape(-1, x.shape[-1])
    m, d = x2.shape
    q = torch.empty((m, d // 2 if bits == 4 else d), dtype=torch.uint8 if bits == 4 else torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    rqc.rotate_quantize_cluster(x2, w, q, s, bits)
    return q, s.unsqueeze(-1)


torch.manual_seed(0)
bad = 0
for d in (11008, 4096, 128, 12288):
    w = torch.linalg.qr(torch.randn(d // 128, 128, 128, device="cuda"))[0].half().contiguous()
    for L in (1, 17, 300, 2048):
        x = torch.randn(L, d, dtype=torch.float16, device="cuda")
        x[:, 7] *= 40
        if L == 300:
            x[5] = 0
        for bits in (4, 8):
            want = rotate_quantize_reference(x, w, bits)
            for call in (1, 2):
                p = _quant_mismatch(run(x, w, bits), want, bits)
                if p:
                    bad += 1
                    print(f"FAIL d={d} L={L} int{bits} call {call}: {p}", flush=True)
print("checks:", "all passed" if not bad else f"{bad} failed", "| max active clusters:", ext.max_active_clusters(),
      flush=True)
d = 11008
w = torch.linalg.qr(torch.randn(d // 128, 128, 128, device="cuda"))[0].half().contiguous()
for L in (2048, 8192):
    x = torch.randn(L, d, dtype=torch.float16, device="cuda")
    y = torch.empty_like(x)
    mem = median_us(lambda: y.copy_(x), 10, 60)[0]
    want = rotate_quantize_reference(x, w, 4)
    for pf in (0, 1, 2, 3):
        os.environ["SPINSCOPE_RQC_PREFETCH"] = str(pf)
        p = _quant_mismatch(run(x, w, 4), want, 4)
        us = median_us(lambda: run(x, w, 4), 10, 60)[0]
        print(f"L={L} prefetch={pf}: {us:.1f} us ({us / mem:.2f}x memcpy) check {p or 'ok'}", flush=True)
    del os.environ["SPINSCOPE_RQC_PREFETCH"]
for L in (1, 512, 2048, 8192):
    x = torch.randn(L, d, dtype=torch.float16, device="cuda")
    x[:, 7] *= 40
    y = torch.empty_like(x)
    want = rotate_quantize_reference(x, w, 4)
    p = _quant_mismatch(run(x, w, 4), want, 4)
    mem = median_us(lambda: y.copy_(x), 10, 60)[0]
    clu = median_us(lambda: run(x, w, 4), 10, 60)[0]
    tri = median_us(lambda: rotate_quantize(x, w, 4), 10, 60)[0]
    clu8 = median_us(lambda: run(x, w, 8), 10, 60)[0]
    print(f"d={d} L={L}: memcpy {mem:.1f} | cluster int4 {clu:.1f} ({clu / mem:.2f}x) int8 {clu8:.1f} "
          f"({clu8 / mem:.2f}x) | triton int4 {tri:.1f} ({tri / mem:.2f}x) | check {p or 'ok'}", flush=True)
