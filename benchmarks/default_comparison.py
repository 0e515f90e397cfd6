"""Where the default comparison's time goes: Evaluate's quick mode (4096 evaluation tokens in windows of 1024),
fp, rtn and quarot at 4-4-4 with RTN weights, from a cold cache, against a plain forward over the same tokens.

    python -m benchmarks.default_comparison [--bits 4-4-4] [--recipes fp,rtn,quarot] [--clip calibrated,fixed]

Prints, per run and phase: seconds, events, and the longest gap between two progress events (the issue's target:
2 s on an idle machine), then the whole comparison as a multiple of the plain forward (target: 10x), once per
clipping setting: `--clip calibrated,fixed` puts the calibrated clip ratios' phases (calibrate, weights, clips) beside
today's fixed setting (the weight clipping search) in one run.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from engine.data.corpus import load_corpus, windows
from engine.evaluate import EvalConfig, eval_job
from engine.events import Done
from engine.model.loading import load_model
from engine.quant.recipes import get_recipe

QUICK = dict(tokens=4096, window=1024, limit=50, calib_tokens=2048)  # app/views/evaluate.py MODES["quick"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--bits", default="4-4-4")
    p.add_argument("--recipes", default="fp,rtn,quarot")
    p.add_argument("--clip", default="calibrated", help="comma-separated clipping settings: calibrated, fixed, none")
    args = p.parse_args(argv)
    handle = load_model(args.model)
    cfg = EvalConfig(
        tokens=QUICK["tokens"], window=QUICK["window"], limit=QUICK["limit"], calib_tokens=QUICK["calib_tokens"]
    )
    wins = windows(load_corpus(cfg.corpus), handle.tokenizer, cfg.tokens, cfg.window, "eval")
    t0 = time.perf_counter()
    with torch.no_grad():
        for w in wins:
            handle.model(w.unsqueeze(0), use_cache=False)
    forward = time.perf_counter() - t0
    print(
        f"model {handle.name}, {wins.numel()} evaluation tokens in windows of {cfg.window}, "
        f"{torch.get_num_threads()} threads; plain forward {forward:.1f} s"
    )
    print(f"{'run':<30}{'phase':<12}{'seconds':>9}{'events':>8}{'longest gap (s)':>17}")
    totals = {}
    with tempfile.TemporaryDirectory() as cold:  # a cold cache: nothing is served from earlier runs
        os.environ["SPINSCOPE_CACHE"] = cold
        (Path(cold) / "models").symlink_to(Path(handle.source).parent, target_is_directory=True)
        for clip in args.clip.split(","):
            total = 0.0
            for name in args.recipes.split(","):
                recipe = get_recipe(name, clip=clip)
                label = f"{name} {args.bits} ({clip} clip)" if recipe.quantize else f"{name} 16-16-16"
                phases: dict[str, list] = {}  # stage -> [first event time, last event time, events, longest gap]
                start = last = time.perf_counter()
                for ev in eval_job(handle, recipe, args.bits, cfg, use_cache=False):
                    now = time.perf_counter()
                    if not isinstance(ev, Done):
                        ph = phases.setdefault(ev.stage, [last, now, 0, 0.0])
                        ph[1], ph[2], ph[3] = now, ph[2] + 1, max(ph[3], now - last)
                    last = now
                run_s = time.perf_counter() - start
                total += run_s
                for stage, (first, end, n, gap) in phases.items():
                    print(f"{label:<30}{stage:<12}{end - first:>9.1f}{n:>8}{gap:>17.1f}")
                print(f"{label:<30}{'(run)':<12}{run_s:>9.1f}")
            totals[clip] = total
    for clip, total in totals.items():
        print(
            f"whole comparison, {clip} clip: {total:.1f} s = {total / forward:.1f}x the plain forward (target <= 10x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
