"""Time and memory of layer-wise training (engine.learn.layerwise) on ONE decoder block of a large shape, random
weights (only time and memory are measured: they depend on shapes, not on values).

    python -m benchmarks.layerwise_scale --shape llama3-8b --blocks 1 --device cuda --json F
    python -m benchmarks.layerwise_scale --shape llama3-8b/8 --device cpu --json F      # seconds, here

One block is built on the device in bfloat16 with its calibration inputs on the CPU (N windows x T tokens x hidden,
bfloat16: 128 x 2048 x 4096 = 2 GiB, as in FlatQuant), then timed as the training loop runs it: the floating-point
target pass over all windows, S Cayley/Adam steps of `batch` windows, and the pass that produces the next block's
inputs. Per block = both passes + steps_per_block x (seconds per step); the projection multiplies by 32 blocks.
Peak memory on CUDA is torch.cuda.max_memory_allocated over the whole block.

On the CPU there is no allocator peak to read, so the memory model counts bytes: the block's parameters (bf16 on the
device plus the float32 copy that trains), the tensors autograd saves for backward in one step (hooked with
torch.autograd.graph.saved_tensors_hooks, counted once per storage), and the largest transient (one step's largest
single tensor, twice). Saved tensors are split into weight-sized ones (scale with the block's parameters) and the
rest (scale with batch x tokens x hidden; inter/hidden and head_dim are the same in both shapes). Attention scores
[b, heads, T, T] are counted apart: CUDA's fused SDPA kernels keep none.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SHAPES = {  # hidden, intermediate, heads, kv heads, head_dim
    "llama3-8b": (4096, 14336, 32, 8, 128),
    "llama3-8b/8": (512, 1792, 4, 1, 128),  # every width / 8, head_dim kept: the CPU mode
    "smollm2-135m": (576, 1536, 9, 3, 64),
    "tiny": (64, 256, 2, 1, 32),  # tests
}
BLOCKS = {"llama3-8b": 32, "llama3-8b/8": 32, "smollm2-135m": 30, "tiny": 2}
BUDGET_SECONDS = 30 * 60  # the acceptance bar: 32 blocks in 30 minutes on one H100


def build_block(shape: str, device, dtype, tokens: int):
    """(arch, the decoder block on `device` in `dtype`, the keyword arguments it takes for `tokens` positions)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    from engine.model import attention
    from engine.model.arch import resolve

    hidden, inter, heads, kv, hd = SHAPES[shape]
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=1,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        max_position_embeddings=max(tokens, 8192),
        rope_theta=500000.0,
    )
    cfg._attn_implementation = attention.NAME  # q/k/v hooks (R3, KV quantizers), as the engine routes models
    with torch.device("meta"):
        arch = resolve(LlamaForCausalLM(cfg))  # shapes and roles only, nothing allocated
    torch.manual_seed(0)
    with torch.device(device):
        block = LlamaDecoderLayer(cfg, 0).to(dtype).eval().requires_grad_(False)
        for p in block.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
        rope = LlamaRotaryEmbedding(cfg)
        pos = torch.arange(tokens)[None]
        cos, sin = rope(torch.zeros(1, tokens, hidden, dtype=torch.float32), pos)
    return arch, block, {"position_embeddings": (cos, sin), "attention_mask": None, "position_ids": pos}


def saved_tensor_bytes(fn, weight_numels: set, tokens: int) -> dict:
    """Bytes autograd saves while fn() runs (each storage once): weight-sized, attention-score-sized, the rest."""
    seen, out = set(), {"weights": 0, "scores": 0, "activations": 0, "largest": 0}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            n = t.untyped_storage().nbytes()
            kind = (
                "weights"
                if t.numel() in weight_numels
                else "scores"
                if t.dim() >= 2 and t.shape[-1] == t.shape[-2] == tokens
                else "activations"
            )
            out[kind] += n
            out["largest"] = max(out["largest"], n)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=1, help="blocks built and timed (each one at a time)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--method", default="flrot", choices=["spinquant", "flrot"])
    p.add_argument("--windows", type=int, help="calibration windows (default: 128 on CUDA, 8 on the CPU)")
    p.add_argument("--tokens", type=int, help="tokens per window (default: 2048 on CUDA, 256 on the CPU)")
    p.add_argument("--batch", type=int, default=4, help="windows per step")
    p.add_argument("--steps", type=int, default=10, help="steps timed per block (the first is a warm-up)")
    p.add_argument(
        "--steps-per-block",
        type=int,
        default=128,
        help="the step budget the projection assumes (128 = 4 epochs of 128 windows at batch 4)",
    )
    p.add_argument("--no-tf32", action="store_true", help="CUDA: keep float32 matmuls in full float32")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    from torch.nn.utils import parametrize

    from engine.learn.layerwise import LayerwiseConfig, stream, train_block
    from engine.learn.rotated_network import LearnedRotations

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = cuda and not args.no_tf32
    n, t = args.windows or (128 if cuda else 8), args.tokens or (2048 if cuda else 256)
    hidden = SHAPES[args.shape][0]
    cfg = LayerwiseConfig(method=args.method, steps=args.steps, windows=n, window=t, batch=args.batch)
    g = torch.Generator().manual_seed(0)
    t_alloc = time.perf_counter()
    x = torch.randn(n, t, hidden, generator=g, dtype=torch.float32).to(torch.bfloat16)  # X_k on the CPU
    z, y = x.clone(), torch.empty_like(x)  # Z_k, Y_k
    t_alloc = time.perf_counter() - t_alloc
    rows = []
    for b in range(args.blocks):
        arch, fp_block, kwargs = build_block(args.shape, device, torch.bfloat16, t)
        rots = LearnedRotations(arch, cfg.method, min(cfg.block, arch.intermediate), cfg.seed).requires_grad_(True)
        if rots.r4 is None:
            rots.r3_fixed, rots.r4_fixed = rots.r3_fixed.to(device), rots.r4_fixed.to(device)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        on_device = fp_block.float()  # the FP block computes in float32, as train_layerwise's copy does
        stream(on_device, x, y, kwargs, cfg.batch, device, torch.float32)
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t_target = time.perf_counter() - t0
        steps, stamps = (
            train_block(on_device, arch, rots, 0, z, y, kwargs, cfg, device, torch.float32, t0, cfg.steps, 0),
            [],
        )
        while True:
            try:
                ev = next(steps)
            except StopIteration as stop:
                blk, clips, history = stop.value
                break
            if type(ev).__name__ == "Metric":
                sync()
                stamps.append(time.perf_counter())
        per_step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
        t1 = time.perf_counter()
        with parametrize.cached():
            stream(blk, z, z, kwargs, cfg.batch, device, torch.float32)
        sync()
        t_next = time.perf_counter() - t1
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        row = {
            "block": b,
            "target_pass_s": t_target,
            "next_inputs_pass_s": t_next,
            "seconds_per_step": per_step,
            "first_step_s": stamps[0] - t0 - t_target,
            "losses": [h["loss"] for h in history],
            "peak_bytes": peak,
        }
        if not cuda:  # the memory model's counts, one step
            weights = {p.numel() for p in blk.parameters()} | {
                m.parametrizations.weight.original.numel() for m in blk.modules() if hasattr(m, "parametrizations")
            }
            idx = list(range(cfg.batch))

            def one_step(blk=blk):
                from engine.learn.layerwise import run_block

                out = run_block(blk, z[idx].to(device, torch.float32), kwargs)
                ((out - y[idx].float()) ** 2).mean().backward()

            row["saved"] = saved_tensor_bytes(one_step, weights, t)
            row["param_bytes"] = sum(p.numel() for p in fp_block.parameters()) * (2 + 4)
        rows.append(row)
        del blk, on_device, fp_block
        if cuda:
            torch.cuda.empty_cache()
    r = rows[-1]
    per_block = r["target_pass_s"] + r["next_inputs_pass_s"] + args.steps_per_block * r["seconds_per_step"]
    n_blocks = BLOCKS[args.shape]
    out = {
        "shape": args.shape,
        "dims": dict(
            zip(("hidden", "intermediate", "heads", "kv_heads", "head_dim"), SHAPES[args.shape], strict=False)
        ),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "method": args.method,
        "windows": n,
        "tokens": t,
        "batch": args.batch,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "cpu_inputs_bytes": 3 * x.numel() * x.element_size(),
        "input_alloc_s": t_alloc,
        "steps_per_block": args.steps_per_block,
        "seconds_per_block": per_block,
        "projected_seconds": n_blocks * per_block,
        "projected_blocks": n_blocks,
        "max_steps_per_block_in_30min": max(
            0, int((BUDGET_SECONDS / n_blocks - r["target_pass_s"] - r["next_inputs_pass_s"]) / r["seconds_per_step"])
        ),
        "peak_bytes": r["peak_bytes"],
        "rows": rows,
    }
    if not cuda:
        out["memory_model"] = memory_model(args.shape, r, args.batch, t)
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def memory_model(
    shape: str,
    row: dict,
    batch: int,
    tokens: int,
    target: str = "llama3-8b",
    target_batch: int = 4,
    target_tokens: int = 2048,
) -> dict:
    """The CPU counts scaled to `target`: weight-sized bytes by the parameter ratio, activations by batch x tokens x
    hidden; attention scores left out (fused SDPA on CUDA keeps none) and reported apart."""
    h, i, *_ = SHAPES[shape]
    th, ti, *_ = SHAPES[target]
    params = lambda hid, inter, s: (s[2] + 2 * s[3]) * s[4] * hid + hid * s[2] * s[4] + 3 * hid * inter  # noqa: E731
    p_ratio = params(th, ti, SHAPES[target]) / params(h, i, SHAPES[shape])
    a_ratio = (target_batch * target_tokens * th) / (batch * tokens * h)
    saved = row["saved"]
    weights = (row["param_bytes"] + saved["weights"]) * p_ratio
    acts = saved["activations"] * a_ratio
    transient = 2 * saved["largest"] * max(p_ratio, a_ratio)
    return {
        "target": target,
        "param_ratio": p_ratio,
        "activation_ratio": a_ratio,
        "weights_bytes": weights,
        "activation_bytes": acts,
        "transient_bytes": transient,
        "estimated_peak_bytes": weights + acts + transient,
        "cpu_attention_scores_bytes_left_out": saved["scores"],
    }


if __name__ == "__main__":
    raise SystemExit(main())
