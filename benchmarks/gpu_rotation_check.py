"""Rotation at real LLaMA-2 7B shapes on a GPU (random weights: no hub here; the shapes are what matter).

    python -m benchmarks.gpu_rotation_check [--dtype float32] [--layers 32] [--out DIR]

Builds LlamaForCausalLM with LLaMA-2 7B's config on the GPU, rotates R1-R4 with random Hadamard matrices
(hidden 4096 = 2^12, intermediate 11008 = 344 * 32 via Paley I over GF(7^3), head_dim 128), and prints the
equivalence figures and timings as JSON.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--out")
    args = p.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.model.arch import resolve
    from engine.rotation.fusion import RotationConfig, equivalence, rotate

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval().requires_grad_(False)
        for layer in model.model.layers:  # random norm gains, so that folding is exercised
            layer.input_layernorm.weight.uniform_(0.5, 2.0)
            layer.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    arch = resolve(model)
    ids = torch.randint(0, 32000, (1, args.tokens), device="cuda")
    out = {
        "device": torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "layers": args.layers,
        "params_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "build_s": build_s,
        "runs": [],
    }
    for names in (["R1"], ["R4"], ["R1", "R2", "R3", "R4"]):
        rc = RotationConfig.from_names(names, "hadamard")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        rotated = rotate(model, arch, rc)
        torch.cuda.synchronize()
        rot_s = time.perf_counter() - t0
        e = equivalence(model, rotated, ids)
        out["runs"].append(
            {
                "rotation": rc.tag(),
                "rotate_s": round(rot_s, 2),
                **e,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            }
        )
        print(json.dumps(out["runs"][-1]), flush=True)
        del rotated
        torch.cuda.empty_cache()
    if args.out:
        with open(f"{args.out}/gpu_rotation_check.json", "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
