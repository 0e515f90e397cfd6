"""Time SpinQuant's recipe on a GPU: 100 Cayley-SGD steps over 800 windows of 2048 tokens (batch 8 per step), on a
random-weight model with SmolLM2-135M's shapes (the 98 MB model file cannot travel to the GPU machine; the time
per step depends on shapes, not on weight values).

    python -m benchmarks.gpu_spinquant_time [--steps 100] [--method spinquant] [--dtype float32]
    torchrun --nproc_per_node 2 -m benchmarks.gpu_spinquant_time ...   # DDP over two GPUs (NCCL), same global batch
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from engine.events import Done, Metric


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", type=int, default=800)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--method", default="spinquant")
    p.add_argument("--out")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.learn import distributed
    from engine.learn.spinquant import TrainConfig, train
    from engine.model.arch import resolve

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    info = distributed.init_from_env()  # under torchrun: one process per GPU, NCCL
    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(info.device if info.distributed else "cuda"):
        model = LlamaForCausalLM(cfg).eval().requires_grad_(False)  # same seed: the same weights on every rank
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, cfg.vocab_size, (args.windows, args.window), generator=g)
    eval_wins = torch.randint(0, cfg.vocab_size, (1, 512), generator=g)
    tcfg = TrainConfig(
        method=args.method,
        bits="4-4-4",
        steps=args.steps,
        windows=args.windows,
        window=args.window,
        batch=args.batch,
        eval_every=0,
        checkpoint_every=0,
    )
    t0 = time.perf_counter()
    first = None
    for ev in train(model, resolve(model), calib, eval_wins, tcfg):
        if isinstance(ev, Metric) and ev.name == "loss":
            if first is None:
                first = time.perf_counter() - t0
            if ev.step % 10 == 0 and info.is_main:
                print(f"step {ev.step} loss {ev.value:.4f} {time.perf_counter() - t0:.1f}s", flush=True)
        if isinstance(ev, Done):
            break
    total = time.perf_counter() - t0
    out = {
        "device": torch.cuda.get_device_name(),
        "processes": info.world_size,
        "method": args.method,
        "steps": args.steps,
        "windows": args.windows,
        "window": args.window,
        "batch": args.batch,
        "total_s": round(total, 1),
        "first_step_s": round(first or 0, 1),
        "s_per_step_after_first": round((total - (first or 0)) / max(args.steps - 1, 1), 3),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1),
    }
    distributed.shutdown()
    if not info.is_main:
        return 0
    print(json.dumps(out))
    if args.out:
        with open(f"{args.out}/gpu_spinquant_time.json", "w") as f:
            json.dump(out, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
