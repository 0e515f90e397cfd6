"""Experiment: where the cluster kernel's time goes (clock64 trace of thread 0 in CTAs 0 and 15)."""
import os
import shutil
import subprocess

import torch

from kernels import rotate_quant_cluster as rqc

print("ncu:", shutil.which("ncu"), "nsys:", shutil.which("nsys"), flush=True)
ext = rqc.extension()
d, L = 11008, 8192
w = torch.linalg.qr(torch.randn(d // 128, 128, 128, device="cuda"))[0].half().contiguous()
x = torch.randn(L, d, dtype=torch.float16, device="cuda")
q = torch.empty((L, d // 2), dtype=torch.uint8, device="cuda")
s = torch.empty((L,), dtype=torch.float32, device="cuda")
names = ["top->pair0 ready", "pair0->pair1 ready", "pair1->pair2 ready", "pair2 ready->compute done",
         "compute done->max in smem", "cluster.sync+remote", "quantize+store"]
for clusters, pf in ((7, 0), (7, 2), (1, 0), (1, 2)):
    os.environ["SPINSCOPE_RQC_CLUSTERS"] = str(clusters)
    os.environ["SPINSCOPE_RQC_PREFETCH"] = str(pf)
    tr = torch.zeros(2 * 8 * 41, dtype=torch.int64, device="cuda")
    for _ in range(3):
        ext.rotate_quant_cluster_trace(x, w, q, s, 4, tr)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    ext.rotate_quant_cluster_trace(x, w, q, s, 4, tr)
    end.record()
    torch.cuda.synchronize()
    print(f"\nclusters={clusters} prefetch={pf}: {start.elapsed_time(end) * 1e3:.0f} us (event)", flush=True)
    for cta in range(2):
        t = tr[cta * 328:(cta + 1) * 328].cpu().tolist()
        n = int(t[1])
        ev = [t[8 + i * 8: 16 + i * 8] for i in range(min(n, 40))]
        total = t[2] - t[0]
        print(f"  CTA {0 if cta == 0 else 15}: {n} bands, total {total} clk, prologue {ev[0][0] - t[0]} clk")
        import statistics
        for k in range(7):
            a, b = k, k + 1
            vals = [e[b] - e[a] for e in ev[1:] if e[a] and e[b]]
            if vals:
                print(f"    {names[k]:<28} median {statistics.median(vals):7.0f} clk  max {max(vals):7.0f}")
        gaps = [ev[i + 1][0] - ev[i][7] for i in range(len(ev) - 1)]
        if gaps:
            print(f"    {'end->next top':<28} median {statistics.median(gaps):7.0f} clk")
if shutil.which("ncu"):
    del os.environ["SPINSCOPE_RQC_CLUSTERS"]
    del os.environ["SPINSCOPE_RQC_PREFETCH"]
    r = subprocess.run(["ncu", "--kernel-name", "regex:rotate_quant_cluster", "--launch-count", "1", "--section",
                        "SpeedOfLight", "--section", "WarpStateStats", "--section", "MemoryWorkloadAnalysis",
                        "python3", "-c", "import torch\nfrom kernels import rotate_quant_cluster as rqc\n"
                        "x=torch.randn(8192,11008,dtype=torch.float16,device='cuda')\n"
                        "w=torch.linalg.qr(torch.randn(86,128,128,device='cuda'))[0].half().contiguous()\n"
                        "q=torch.empty((8192,5504),dtype=torch.uint8,device='cuda');s=torch.empty(8192,device='cuda')\n"
                        "rqc.rotate_quantize_cluster(x,w,q,s,4);torch.cuda.synchronize()"],
                       capture_output=True, text=True, timeout=240)
    print(r.stdout[-6000:], r.stderr[-2000:])
