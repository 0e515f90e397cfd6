"""A model larger than its GPU budget: LLaMA-2 7B shapes in float16, dispatched over one GPU and CPU memory.

    python -m benchmarks.gpu_dispatch_check [--gpu-budget 8GiB] [--layers 32] [--out DIR]
    python -m benchmarks.gpu_dispatch_check --max-memory cuda:0=8GiB,cuda:1=8GiB,cpu=100GiB   # over two GPUs

Random weights with LLaMA-2 7B's shapes (no hub here) are saved once as safetensors; engine.model.loading.load_model
then loads them with max_memory (the GPU takes what fits in the budget, the rest stays in CPU memory and is streamed
in for each forward). Checked: the dispatched model's logits against the same model wholly on the GPU, and its R1-R4
rotation (in place, inside ModelHandle.working_model) against the same rotation on the GPU copy and against its own
unrotated logits. The GPU copy is the saved model loaded back whole on the GPU. Prints JSON lines as it goes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch


def log(out, **row):
    print(json.dumps(row), flush=True)
    if out:
        with open(f"{out}/dispatch_check.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


def save_random_llama(path: str, layers: int, device: str) -> torch.nn.Module:
    """LLaMA-2 7B config, random fp16 weights on the GPU (norm gains U(0.5, 2)), saved with a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 2.0)
    model.eval().requires_grad_(False)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(32000)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gpu-budget", default="8GiB")
    p.add_argument("--cpu-budget", default="100GiB")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu"],
        help="cpu: a dry run of the script (CPU memory then disk offload)",
    )
    p.add_argument(
        "--max-memory",
        default=None,
        help="the whole budget string (overrides the two above), e.g. "
        "cuda:0=8GiB,cuda:1=8GiB,cpu=100GiB to shard the model over two GPUs",
    )
    p.add_argument("--out")
    args = p.parse_args(argv)
    from engine.model.arch import resolve
    from engine.model.loading import load_model
    from engine.rotation.fusion import RotationConfig, logit_agreement, logits, rotate

    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    rot = RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard")
    ids = torch.randint(0, 32000, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    path = tempfile.mkdtemp(prefix="llama7b-")
    t0 = time.perf_counter()
    gpu = save_random_llama(path, args.layers, args.device)
    log(
        args.out,
        stage="saved",
        seconds=round(time.perf_counter() - t0, 1),
        device=torch.cuda.get_device_name() if cuda else "cpu",
        torch=torch.__version__,
        params_billion=round(sum(q.numel() for q in gpu.parameters()) / 1e9, 2),
    )
    del gpu  # the reference is the saved model loaded back whole on one device (buffers such as RoPE's as loaded)
    single = load_model(path, "float16", device=args.device)
    gpu = single.model
    t0 = time.perf_counter()
    ref = logits(gpu, ids)
    log(args.out, stage="single-device forward", seconds=round(time.perf_counter() - t0, 2))
    t0 = time.perf_counter()
    rotate(gpu, resolve(gpu), rot, inplace=True)
    sync()
    gpu_rotated = logits(gpu, ids)
    log(
        args.out,
        stage="gpu copy rotated",
        seconds=round(time.perf_counter() - t0, 1),
        **logit_agreement(ref, gpu_rotated),
    )
    del gpu, single
    if cuda:
        torch.cuda.empty_cache()
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)

    t0 = time.perf_counter()
    budget = args.max_memory or (
        f"cuda:0={args.gpu_budget},cpu={args.cpu_budget}" if cuda else f"cpu={args.cpu_budget}"
    )
    handle = load_model(path, "float16", max_memory=budget, offload_disk=not cuda)
    plan = handle.placement
    log(
        args.out,
        stage="dispatched load",
        seconds=round(time.perf_counter() - t0, 1),
        summary=plan.summary(),
        devices=plan.devices,
        blocks_per_device={
            str(d): sum(1 for v in plan.device_map.values() if v == d) for d in dict.fromkeys(plan.device_map.values())
        },
        gpu_allocated_gib=[round(torch.cuda.memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())]
        if cuda
        else None,
    )
    t0 = time.perf_counter()
    before = logits(handle.model, ids)
    log(
        args.out,
        stage="dispatched forward",
        seconds=round(time.perf_counter() - t0, 2),
        vs_gpu_copy=logit_agreement(ref, before),
    )
    with handle.working_model() as model:
        t0 = time.perf_counter()
        rotate(model, handle.arch, rot, inplace=True)
        sync()
        seconds = time.perf_counter() - t0
        after = logits(model, ids)
        log(
            args.out,
            stage="dispatched rotated in place",
            seconds=round(seconds, 1),
            equivalence=logit_agreement(before, after),
            vs_gpu_copy_rotated=logit_agreement(gpu_rotated, after),
            peak_gpu_gib=[
                round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(torch.cuda.device_count())
            ]
            if cuda
            else None,
        )
        t0 = time.perf_counter()
    log(
        args.out,
        stage="reloaded after the job",
        seconds=round(time.perf_counter() - t0, 1),
        back_to_original=logit_agreement(before, logits(handle.model, ids)),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
