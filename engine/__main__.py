"""SpinScope command line: python -m engine capture|... (the same generators the pages run)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from engine.events import Done, Progress


def _progress_line(ev: Progress) -> None:
    bar = "#" * int(30 * ev.fraction)
    print(f"\r[{bar:<30}] {ev.stage} {ev.done}/{ev.total} {ev.seconds:6.1f}s {ev.message}",
          end="", file=sys.stderr, flush=True)


def drain(events):
    """Print progress to stderr, return the Done event."""
    done = None
    for ev in events:
        if isinstance(ev, Progress):
            _progress_line(ev)
        elif isinstance(ev, Done):
            done = ev
    print(file=sys.stderr)
    return done


def cmd_capture(args) -> int:
    import pandas as pd

    from engine.capture import CaptureConfig, capture_job
    from engine.models import load_model

    cfg = CaptureConfig(tokens=args.tokens, window=args.window)  # validates before the model loads
    t0 = time.perf_counter()
    handle = load_model(args.model, dtype=args.dtype)
    print(f"model: {handle.name} ({handle.note}) loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    done = drain(capture_job(handle, args.corpus, cfg, use_cache=not args.no_cache))
    res = done.result
    print(f"corpus: {res.meta['corpus_label']}; {res.meta['tokens']} tokens in {res.meta['n_windows']} windows of "
          f"{res.meta['window']}; {'from cache' if done.cached else f'{done.seconds:.1f}s'}")
    print("Residual stream per layer. kurt_token = kurtosis across channels of each token, mean over tokens "
          "(sink = first token of each window excluded); kurt_tensor = kurtosis of all values; Gaussian = 3. "
          "massive = largest token norm / median token norm.")
    t = res.table[res.table.site == "resid_attn"].set_index("layer")
    view = pd.DataFrame({
        "kurt_token": t.kurt_token_mean_nosink, "kurt_token_max": t.kurt_token_max_nosink,
        "kurt_tensor": t.kurt_tensor, "kurt_tensor_nosink": t.kurt_tensor_nosink,
        "absmax": t.absmax, "absmax_nosink": t.absmax_nosink, "massive": t.massive_ratio,
    })
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(view.to_string(float_format=lambda v: f"{v:.1f}"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": res.meta, "table": res.table.to_dict(orient="records")}, f, indent=1, default=str)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    """Make the offline assets ready: the default model converted to safetensors, the corpus readable."""
    from engine.data import WIKI, load_corpus
    from engine.models import default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    corpus = load_corpus(WIKI)
    print(f"default model ready at {path}; corpus: {corpus.label} "
          f"({len(corpus.splits['calib'])} calibration / {len(corpus.splits['eval'])} evaluation articles) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine", description="SpinScope engine")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="capture activation statistics and print the per-layer table")
    c.add_argument("--model", default="default", help="'default', a local model directory or a cached HF id")
    c.add_argument("--corpus", default="wiki", help="'wiki', a UTF-8 text file or a WikiText-2 directory")
    c.add_argument("--tokens", type=int, default=2048, help="token budget")
    c.add_argument("--window", type=int, default=512, help="tokens per window")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--json", help="also write the full table and metadata to this file")
    c.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    c.set_defaults(func=cmd_capture)
    sub.add_parser("prepare", help="convert the default model once and check the offline corpus").set_defaults(
        func=cmd_prepare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # every user-facing error in the engine is a ValueError subclass
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nstopped; nothing was cached", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
