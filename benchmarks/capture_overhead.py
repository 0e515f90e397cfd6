"""Capture and perplexity evaluation vs a plain forward pass on the same tokens, measured side by side.

    python -m benchmarks.capture_overhead [--tokens 2048] [--window 512] [--repeats 2]
    python -m benchmarks.capture_overhead --model moe   # a random Mixtral (8 experts, top-2) with the default
                                                        # model's tokenizer: one down_in site per expert

Prints a table of seconds and ratios (targets: capture <= 1.5x, fp perplexity evaluation <= 1.3x).
Runs alternate (forward, capture, eval, forward, ...) so machine load affects all alike; medians are reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.data.corpus import load_corpus, windows
from engine.evaluate import perplexity
from engine.events import run_to_end
from engine.model.loading import load_model
from engine.observe.capture import CaptureConfig, capture


def plain_forward(model, wins):
    with torch.no_grad():
        for w in wins:
            model(w.unsqueeze(0), use_cache=False)


def tiny_moe_dir() -> str:
    """A random-weight Mixtral (4 layers, hidden 256, 8 experts of width 512, top-2) saved once to a temp dir."""
    import tempfile

    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=2048,
    )
    path = tempfile.mkdtemp(prefix="spinscope-moe-")
    MixtralForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    h = load_model(tiny_moe_dir() if args.model == "moe" else args.model)
    wins = windows(load_corpus("wiki"), h.tokenizer, args.tokens, args.window, "eval")
    cfg = CaptureConfig(tokens=args.tokens, window=args.window)
    plain_forward(h.model, wins[:1])  # warm-up
    times = {"forward": [], "capture": [], "perplexity": []}
    for _ in range(args.repeats):
        for name, fn in (
            ("forward", lambda: plain_forward(h.model, wins)),
            ("capture", lambda: run_to_end(capture(h.model, h.arch, wins, cfg))),
            ("perplexity", lambda: run_to_end(perplexity(h.model, wins))),
        ):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["forward"])
    print(
        f"model {h.name}, {wins.numel()} tokens in windows of {args.window}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"{'job':<12}{'seconds':>10}{'x forward':>12}  target")
    for name, target in (("forward", ""), ("capture", "<= 1.5"), ("perplexity", "<= 1.3")):
        t = statistics.median(times[name])
        print(f"{name:<12}{t:>10.2f}{t / base:>12.2f}  {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
