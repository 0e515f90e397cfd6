"""FLRot (learned R1-R3 and a block-diagonal R4, optionally after the channel permutation) against SpinQuant
(learned R1 and R2) at W4A4KV4 on the default model: the same steps, windows, seed and evaluation.

    python -m benchmarks.flrot_vs_spinquant [--steps 20] [--windows 20] [--window 256] [--block 128] [--tokens 4096]

Trains each method (checkpoints are cached: a rerun resumes or reuses them), then evaluates every learned rotation
beside QuaRot (its step 0) with RTN weights, both with the clips training used (fixed: A 0.9, KV 0.95, no weight
search) and calibrated per layer. Prints one table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

from engine.evaluate import EvalConfig, eval_job
from engine.events import Done
from engine.learn.spinquant import TrainConfig, learned_recipe, train_job
from engine.model.loading import load_model
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import get_recipe


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--json")
    args = p.parse_args(argv)
    handle = load_model(args.model)
    base = TrainConfig(
        bits="4-4-4", steps=args.steps, windows=args.windows, window=args.window, block=args.block, eval_every=0
    )
    learned = {}
    for label, cfg in (
        ("spinquant", replace(base, method="spinquant")),
        ("flrot", replace(base, method="flrot")),
        ("flrot + permuted R4", replace(base, method="flrot", permute=True)),
    ):
        t0 = time.perf_counter()
        result = [ev for ev in train_job(handle, cfg) if isinstance(ev, Done)][-1].result
        losses = [h["loss"] for h in result.state.history]
        print(
            f"trained {label}: {len(losses)} steps in {time.perf_counter() - t0:.0f} s, loss {losses[0]:.3f} -> "
            f"{losses[-1]:.3f}; {result.path}",
            flush=True,
        )
        learned[label] = learned_recipe(result.path, cfg.method)
    ecfg = EvalConfig(tokens=args.tokens, window=min(1024, args.tokens), calib_tokens=2048)
    rows = []
    for clip in ("fixed", "calibrated"):
        recipes = {"quarot (step 0)": get_recipe("quarot"), **learned}
        for label, recipe in recipes.items():
            recipe = replace(recipe, clip=ClipPolicy(clip, weight_range_search=False))
            r = [ev for ev in eval_job(handle, recipe, "4-4-4", ecfg) if isinstance(ev, Done)][-1].result
            rows.append({"rotations": label, "clip": clip, "ppl": r["ppl"], "tokens": r["tokens"]})
            print(f"{label:<22} {clip:<11} perplexity {r['ppl']:.3f}", flush=True)
    print(f"\nW4A4KV4, RTN weights, {rows[0]['tokens']} evaluation tokens; {args.steps} steps of {args.window} tokens")
    for r in rows:
        print(f"| {r['rotations']} | {r['clip']} | {r['ppl']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "args": vars(args)}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
