"""SpinScope command line: python -m engine capture|... (the same generators the pages run)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from engine.events import Done, Progress
from engine.quant.clipping import CLIP_MODES


def _progress_line(ev: Progress) -> None:
    bar = "#" * int(30 * ev.job_fraction)
    print(f"\r[{bar:<30}] {ev.stage} {ev.done}/{ev.total} {ev.status()}", end="", file=sys.stderr, flush=True)


class Stopped(KeyboardInterrupt):
    """Ctrl-C inside a verb that keeps what it finished: the message says what was kept and how to resume."""


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


def load(args):
    """load_model with the placement flags (--max-memory, --offload-disk); prints the plan when dispatched."""
    from engine.model.loading import load_model

    handle = load_model(
        args.model,
        dtype=args.dtype,
        max_memory=getattr(args, "max_memory", None),
        offload_disk=getattr(args, "offload_disk", False),
    )
    if handle.dispatched:
        print(f"placement: {handle.placement.summary()}", file=sys.stderr)
        for note in handle.placement.notes:
            print(f"  note: {note}", file=sys.stderr)
    return handle


def write_json(path: str | None, payload: dict) -> None:
    """--json FILE: the same figures the table prints, in full precision, written atomically."""
    if not path:
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    os.replace(tmp, path)
    print(f"wrote {path}", file=sys.stderr)


def cmd_plan(args) -> int:
    """Print where each block would go and the bytes per device, without loading any weight."""
    import pandas as pd

    from engine.model.loading import plan_model

    plan = plan_model(args.model, args.dtype, args.max_memory, args.offload_disk)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(pd.DataFrame(plan.rows()).to_string(index=False))
    print(f"\n{plan.summary()}")
    for note in plan.notes:
        print(f"note: {note}")
    write_json(
        args.json,
        {
            "model": args.model,
            "summary": plan.summary(),
            "devices": plan.device_bytes,
            "rows": plan.rows(),
            "notes": list(plan.notes),
        },
    )
    return 0


def cmd_capture(args) -> int:
    import pandas as pd

    from engine.observe.capture import CaptureConfig, capture_job

    cfg = CaptureConfig(tokens=args.tokens, window=args.window)  # validates before the model loads
    t0 = time.perf_counter()
    handle = load(args)
    print(f"model: {handle.name} ({handle.note}) loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    done = drain(capture_job(handle, args.corpus, cfg, use_cache=not args.no_cache))
    res = done.result
    print(
        f"corpus: {res.meta['corpus_label']}; {res.meta['tokens']} tokens in {res.meta['n_windows']} windows of "
        f"{res.meta['window']}; {'from cache' if done.cached else f'{done.seconds:.1f}s'}"
    )
    print(
        "Residual stream per layer. kurt_token = kurtosis across channels of each token, mean over tokens "
        "(sink = first token of each window excluded); kurt_tensor = kurtosis of all values; Gaussian = 3. "
        "massive = largest token norm / median token norm."
    )
    t = res.table[res.table.site == "resid_attn"].set_index("layer")
    view = pd.DataFrame(
        {
            "kurt_token": t.kurt_token_mean_nosink,
            "kurt_token_max": t.kurt_token_max_nosink,
            "kurt_tensor": t.kurt_tensor,
            "kurt_tensor_nosink": t.kurt_tensor_nosink,
            "absmax": t.absmax,
            "absmax_nosink": t.absmax_nosink,
            "massive": t.massive_ratio,
        }
    )
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(view.to_string(float_format=lambda v: f"{v:.1f}"))
    write_json(args.json, {"meta": res.meta, "table": res.table.to_dict(orient="records")})
    return 0


def cmd_rotate(args) -> int:
    import pandas as pd

    from engine.observe.capture import CaptureConfig
    from engine.observe.compare import compare_job
    from engine.rotation.fusion import RotationConfig, equivalence, logits, rotate

    rot = RotationConfig.from_names(args.rotations.split(","), args.kind, seed=args.seed, file=args.file)
    cap = CaptureConfig(tokens=args.tokens, window=args.window, sqnr_bits=(4, 8))
    handle = load(args)
    rows = []
    if args.check:  # each rotation alone, then all together
        from engine.data.corpus import load_corpus, windows

        ids = windows(load_corpus(args.corpus), handle.tokenizer, 256, 256, "eval")
        singles = [r for r in ("r1", "r2", "r3", "r4") if getattr(rot, r) != "none"]
        ref = logits(handle.model, ids)
        for name in singles + (["all"] if len(singles) > 1 else []):
            cfg = rot if name == "all" else RotationConfig(**{name: getattr(rot, name)}, seed=rot.seed, file=rot.file)
            with handle.working_model() as model:  # a copy, or a dispatched model itself (reloaded after)
                e = equivalence(None, rotate(model, handle.arch, cfg, inplace=True), ids, reference=ref)
            rows.append({"rotation": cfg.tag(), "max_abs_logit_diff": e["max_abs_logit_diff"], "kl_nats": e["kl"]})
        print(f"Equivalence on {ids.numel()} evaluation tokens ({handle.dtype}); max |logit| {e['max_abs_logit']:.1f}:")
        print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    done = drain(compare_job(handle, args.corpus, rot, cap))
    c = done.result
    b = c.before.table.set_index(["layer", "site"])
    a = c.after.table.set_index(["layer", "site"])
    down = next(s for s in c.before.sites if s.startswith("down_in"))  # a mixture's first expert: down_in[expert0]
    res = pd.DataFrame(
        {
            "tok_kurt_before": b.xs("resid_attn", level="site").kurt_token_mean_nosink,
            "tok_kurt_after": a.xs("resid_attn", level="site").kurt_token_mean_nosink,
            "tensor_kurt_before": b.xs("resid_attn", level="site").kurt_tensor_nosink,
            "tensor_kurt_after": a.xs("resid_attn", level="site").kurt_tensor_nosink,
            "tensor_kurt_sink_before": b.xs("resid_attn", level="site").kurt_tensor,
            "tensor_kurt_sink_after": a.xs("resid_attn", level="site").kurt_tensor,
            "down_in_sqnr4_before": b.xs(down, level="site").sqnr4,
            "down_in_sqnr4_after": a.xs(down, level="site").sqnr4,
        }
    )
    print(f"Rotation {rot.tag()}: max |logit diff| {c.check['max_abs_logit_diff']:.2e}, KL {c.check['kl']:.2e} nats")
    print(
        "Residual stream entering attention: per-token kurtosis (mean over tokens, sink excluded), whole-tensor "
        "kurtosis without and with the sink tokens; down_proj input 4-bit per-token RTN SQNR in dB. A rotation "
        "mixes channels, not tokens: massive tokens keep the whole-tensor kurtosis high."
    )
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(res.to_string(float_format=lambda v: f"{v:.1f}"))
    write_json(
        args.json,
        {
            "rotation": rot.tag(),
            "settings": rot.to_dict(),
            "check": c.check,
            "check_each": rows,
            "down_site": down,
            "table": res.reset_index().to_dict(orient="records"),
        },
    )
    return 0


def cmd_eval(args) -> int:
    import pandas as pd

    from engine.evaluate import EvalConfig, eval_table_job
    from engine.quant.recipes import Bits, get_recipe

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip()) if args.tasks else ()
    if tasks:
        from engine.data.tasks import check_request

        check_request(list(tasks), args.limit)
    cfg = EvalConfig(
        tokens=args.tokens,
        window=args.window,
        tasks=tasks,
        limit=args.limit,
        seed=args.seed,
        calib_tokens=args.calib_tokens,
        corpus=args.corpus,
    )
    runs = [
        (get_recipe(r, weights=args.weights, rotation_file=args.rotation_file, clip=args.clip), Bits.parse(b))
        for r in args.recipe.split(",")
        for b in args.bits.split(",")
    ]  # all validated before the model loads
    handle = load(args)

    def table(rows: list[dict]) -> str:  # whitespace-separated columns: 'piqa acc' prints as piqa_acc
        df = pd.DataFrame(rows)
        cols = [
            "recipe",
            "weights",
            "bits",
            "clip",
            "ppl",
            "seconds",
            "cached",
            *[c for c in df.columns if c.endswith((" acc", " acc_norm"))],
        ]
        return (
            df[cols]
            .rename(columns=lambda c: c.replace(" ", "_"))
            .to_string(index=False, float_format=lambda v: f"{v:.4g}")
        )

    rows = []
    try:
        for ev in eval_table_job(handle, runs, cfg, use_cache=not args.no_cache):
            if isinstance(ev, Progress):
                if ev.partial is None:
                    _progress_line(ev)
                else:  # a run finished: its row at once
                    rows = ev.partial
                    print(file=sys.stderr)
                    print(table(ev.partial[-1:]), flush=True)
            elif isinstance(ev, Done):
                rows = ev.result
    except KeyboardInterrupt:
        raise Stopped(
            f"{len(rows)} of {len(runs)} runs had finished"
            + (" and are cached: the same command computes only the rest" if rows and not args.no_cache else "")
        ) from None
    r = rows[-1]
    print(
        f"\nperplexity on {r['tokens']} evaluation tokens of {r['corpus']} (windows of {r['window']}); "
        f"zero-shot limit {cfg.limit} documents per task"
    )
    print(table(rows))
    write_json(
        args.json,
        {"rows": rows, "tokens": r["tokens"], "window": r["window"], "corpus": r["corpus"], "limit": cfg.limit},
    )
    return 0


def cmd_matrix(args) -> int:
    import pandas as pd

    from engine.evaluate import EvalConfig
    from engine.matrix import MatrixConfig, matrix_job

    split = lambda text: tuple(t.strip() for t in text.split(",") if t.strip())  # noqa: E731
    mcfg = MatrixConfig(
        formats=split(args.formats), rotations=split(args.rotations), kv=args.kv, weights=args.weights, clip=args.clip
    )  # every name validated before the model loads
    cfg = EvalConfig(tokens=args.tokens, window=args.window, calib_tokens=args.calib_tokens, seed=args.seed)
    handle = load(args)
    cells = []
    try:
        for ev in matrix_job(handle, mcfg, cfg, use_cache=not args.no_cache):
            if isinstance(ev, Progress):
                if ev.partial is None:
                    _progress_line(ev)
                else:
                    cells = ev.partial
                    c = cells[-1]
                    print(file=sys.stderr)
                    print(
                        f"{c['format']:>8} x {c['rotation']:<12} perplexity {c['ppl']:.4g}"
                        + (" (cached)" if c["cached"] else ""),
                        flush=True,
                    )
            elif isinstance(ev, Done):
                cells = ev.result
    except KeyboardInterrupt:
        kept = " and are cached: the same command computes only the rest" if cells and not args.no_cache else ""
        raise Stopped(f"{len(cells)} of {len(mcfg.runs())} cells had finished{kept}") from None
    table = pd.DataFrame(cells).pivot(index="format", columns="rotation", values="ppl")
    table = table.loc[list(mcfg.formats), list(mcfg.rotations)]
    print(
        f"\nperplexity on {cells[0]['tokens']} evaluation tokens, weights {args.weights} and activations in the "
        f"row's format, KV cache {args.kv}, clipping {args.clip}; columns: R1/R4 (R2, R3 random Hadamard when "
        "rotated)"
    )
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    write_json(
        args.json,
        {
            "cells": cells,
            "formats": list(mcfg.formats),
            "rotations": list(mcfg.rotations),
            "kv": args.kv,
            "weights": args.weights,
            "clip": args.clip,
            "tokens": cells[0]["tokens"],
        },
    )
    return 0


def cmd_export(args) -> int:
    """Build one row as `eval` does and write it as a compressed-tensors checkpoint (engine.export)."""
    from engine.evaluate import EvalConfig
    from engine.export import check_destination, check_exportable, export_job
    from engine.quant.recipes import Bits, get_recipe

    recipe = get_recipe(args.recipe, weights=args.weights, rotation_file=args.rotation_file, clip=args.clip)
    bits = Bits.parse(args.bits)
    check_exportable(recipe, bits)  # every refusal that needs no model comes before it loads
    check_destination(args.out, args.force)
    cfg = EvalConfig(seed=args.seed, calib_tokens=args.calib_tokens, corpus=args.corpus)
    handle = load(args)
    try:
        r = drain(export_job(handle, recipe, bits, args.out, cfg, force=args.force)).result
    except KeyboardInterrupt:
        raise Stopped(f"nothing was written to {args.out}") from None
    print(
        f"wrote {r['out']}: {r['recipe']} {r['bits']} ({r['weights']} weights, clip {r['clip']}, rotation "
        f"{r['rotation']}), {r['bytes'] / 2**20:.1f} MiB in {r['seconds']:.1f}s"
    )
    for note in r["notes"]:
        print(f"note: {note}")
    write_json(args.json, r)
    return 0


def cmd_optimize(args) -> int:
    """Train rotations (SpinQuant or FLRot); under torchrun every process takes its share of each step's windows,
    DDP averages the gradients, and only rank 0 prints and writes files. --mode layerwise: one block at a time."""
    if args.mode == "layerwise":
        return optimize_layerwise(args)
    if args.clip is not None:
        raise ValueError("--clip applies to --mode layerwise; end-to-end training uses fixed clips (A 0.9, KV 0.95)")
    from engine.learn import distributed

    info = distributed.init_from_env()
    say = print if info.is_main else (lambda *a, **k: None)
    try:
        from engine.events import Metric
        from engine.learn.spinquant import TrainConfig, train_job
        from engine.model.loading import load_model

        cfg = TrainConfig(
            method=args.method,
            bits=args.bits,
            steps=args.steps,
            windows=args.windows,
            window=args.window,
            batch=args.batch,
            lr=1.5 if args.lr is None else args.lr,
            block=args.block,
            seed=args.seed,
            eval_every=args.eval_every,
            corpus=args.corpus,
            permute=args.permute,
        )
        distributed.local_batch(cfg.batch, info.world_size, info.rank)  # refuse before the model loads
        t0 = time.perf_counter()
        handle = load_model(args.model, dtype=args.dtype, device=info.device if info.distributed else None)
        say(
            f"model: {handle.name} loaded in {time.perf_counter() - t0:.1f}s; {cfg.method} at {cfg.bits}, "
            f"{cfg.steps} steps of {cfg.batch} windows x {cfg.window} tokens over {info.world_size} process(es)",
            flush=True,
        )
        done, trained, step = None, 0, 0
        try:
            for ev in train_job(handle, cfg, resume=not args.no_resume):
                step = ev.done if isinstance(ev, Progress) and ev.stage == "optimize" else step

                if isinstance(ev, Metric) and ev.name == "loss":
                    trained, step = trained + 1, ev.step
                    say(
                        f"step {ev.step}/{cfg.steps}  loss {ev.value:.4f}  lr {ev.extra['lr']:.4f}  "
                        f"{ev.extra['seconds']:.1f}s",
                        flush=True,
                    )
                elif isinstance(ev, Metric) and ev.name == "ppl":
                    say(
                        f"step {ev.step}/{cfg.steps}  quick perplexity {ev.value:.2f} ({cfg.eval_tokens} evaluation "
                        "tokens)",
                        flush=True,
                    )
                elif isinstance(ev, Done):
                    done = ev
        except KeyboardInterrupt:  # train() saved the finished steps on its way out
            raise Stopped(
                f"after step {step} of {cfg.steps}: the checkpoint of step {step} is saved, the same "
                f"command resumes at step {step + 1}"
                if step
                else "before the first step finished: nothing was saved"
            ) from None
        if not trained:
            say(f"nothing to train: the checkpoint already holds all {cfg.steps} steps (--no-resume starts over)")
        say(f"rotations: {done.result.path}")
        if info.is_main:
            state = done.result.state
            write_json(
                args.json,
                {
                    "path": done.result.path,
                    "finished": done.result.finished,
                    "config": cfg.to_dict(),
                    "history": state.history,
                    "ppl": state.ppl,
                    "kurtosis": state.kurtosis,
                },
            )
        return 0
    except ValueError as e:  # rank 0's goes to main(); the others say theirs too, since torchrun stops every
        if not info.is_main:  # process once one exits (rank 0 may not get to print) and an error may be one rank's
            print(f"error on rank {info.rank}: {e}", file=sys.stderr)
            return 2
        raise
    finally:
        distributed.shutdown()


def optimize_layerwise(args) -> int:
    """Layer-wise training (engine.learn.layerwise): each block's transforms on its quantized predecessors' outputs."""
    from engine.events import Metric
    from engine.learn.layerwise import LayerwiseConfig, layerwise_job

    cfg = LayerwiseConfig(
        method=args.method,
        bits=args.bits,
        steps=args.steps,
        windows=args.windows,
        window=args.window,
        batch=args.batch,
        block=args.block,
        seed=args.seed,
        corpus=args.corpus,
        clip=args.clip or "learned",
        **({} if args.lr is None else {"lr": args.lr}),
    )
    from engine.model.loading import load_model

    t0 = time.perf_counter()
    handle = load_model(args.model, dtype=args.dtype, device="cpu")  # in CPU memory: blocks go to the GPU one by one
    print(
        f"model: {handle.name} loaded in {time.perf_counter() - t0:.1f}s; layer-wise {cfg.method} at {cfg.bits}, "
        f"{cfg.steps} steps per block of {cfg.batch} windows x {cfg.window} tokens, clip {cfg.clip}",
        flush=True,
    )
    done = None
    try:
        for ev in layerwise_job(handle, cfg, use_cache=not args.no_resume):
            if isinstance(ev, Progress):
                _progress_line(ev)
            elif isinstance(ev, Metric) and ev.name == "block_mse":
                print(
                    f"\rblock {ev.step + 1}/{handle.arch.n_layers}  MSE {ev.extra['first_loss']:.4g} (first step) -> "
                    f"{ev.value:.4g} (all windows, trained)",
                    flush=True,
                )
            elif isinstance(ev, Done):
                done = ev
    except KeyboardInterrupt:
        raise Stopped("layer-wise training keeps no partial file; the same command starts over") from None
    r = done.result
    print(f"rotations: {r.path}{' (cached)' if done.cached else ''}; {r.seconds:.1f}s")
    write_json(
        args.json,
        {
            "path": r.path,
            "finished": True,
            "mode": "layerwise",
            "config": r.config,
            "history": r.history,
            "blocks": r.blocks,
            "train_seconds": r.seconds,
            "peak_bytes": r.peak_bytes,
        },
    )
    return 0


def cmd_prepare(args) -> int:
    """Make the offline assets ready: the default model converted to safetensors, the corpus readable."""
    from engine.data.corpus import WIKI, load_corpus
    from engine.model.loading import default_model_dir

    t0 = time.perf_counter()
    path = default_model_dir()
    corpus = load_corpus(WIKI)
    print(
        f"default model ready at {path}; corpus: {corpus.label} "
        f"({len(corpus.splits['calib'])} calibration / {len(corpus.splits['eval'])} evaluation articles) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return 0


def placement_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-memory",
        help="dispatch the model over devices within these budgets, e.g. "
        "cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB (accelerate's device_map='auto')",
    )
    parser.add_argument(
        "--offload-disk", action="store_true", help="let what does not fit the budgets go to disk (cache/offload; slow)"
    )


def build_parser() -> argparse.ArgumentParser:
    from engine.quant.formats import FORMATS  # the registry: help texts list every named format

    p = argparse.ArgumentParser(prog="python -m engine", description="SpinScope engine")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("capture", help="capture activation statistics and print the per-layer table")
    c.add_argument("--model", default="default", help="'default', a local model directory or a cached HF id")
    c.add_argument("--corpus", default="wiki", help="'wiki', a UTF-8 text file or a WikiText-2 directory")
    c.add_argument("--tokens", type=int, default=2048, help="token budget")
    c.add_argument("--window", type=int, default=512, help="tokens per window")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--no-cache", action="store_true", help="recompute even if cached")
    placement_args(c)
    c.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    c.set_defaults(func=cmd_capture)
    r = sub.add_parser("rotate", help="rotate, check equivalence, and print before/after kurtosis and SQNR")
    r.add_argument("--model", default="default")
    r.add_argument("--corpus", default="wiki")
    r.add_argument("--rotations", default="R1,R2,R3,R4", help="comma-separated subset of R1,R2,R3,R4")
    r.add_argument("--kind", default="hadamard", choices=["hadamard", "orthogonal", "file"])
    r.add_argument("--file", help="rotation file (SpinQuant layout) for --kind file")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tokens", type=int, default=2048)
    r.add_argument("--window", type=int, default=512)
    r.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    r.add_argument("--check", action="store_true", help="also check each rotation alone")
    placement_args(r)
    r.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    r.set_defaults(func=cmd_rotate)
    e = sub.add_parser("eval", help="perplexity (and zero-shot tasks) of recipes at W-A-KV bit settings")
    e.add_argument("--model", default="default")
    e.add_argument("--corpus", default="wiki")
    e.add_argument("--recipe", default="fp", help="comma-separated: fp, rtn, quarot, rotated, qrazor")
    e.add_argument("--bits", default="16-16-16", help="comma-separated W-A-KV, e.g. 4-4-4,4-16-16")
    e.add_argument("--weights", choices=["rtn", "gptq"], help="weight quantizer (default: the recipe's, RTN)")
    e.add_argument("--rotation-file", help="for recipe 'rotated': a SpinQuant-layout rotation file")
    e.add_argument(
        "--clip",
        choices=CLIP_MODES,
        default="calibrated",
        help="clip ratios: calibrated per layer on the calibration split and kept only where they lower "
        "the quantized model's loss on calibration windows (default; never worse than none there), "
        "fixed (weight search, A 0.9, KV 0.95: QuaRot's), or none",
    )
    e.add_argument("--tokens", type=int, default=16384, help="evaluation tokens for perplexity")
    e.add_argument("--window", type=int, default=2048)
    e.add_argument("--tasks", default="", help="comma-separated zero-shot tasks, e.g. piqa,arc_easy")
    e.add_argument("--limit", type=int, default=200, help="documents per task")
    e.add_argument("--calib-tokens", type=int, default=8192, help="GPTQ calibration tokens")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    e.add_argument("--no-cache", action="store_true")
    placement_args(e)
    e.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    e.set_defaults(func=cmd_eval)
    mx = sub.add_parser("matrix", help="what-if matrix: perplexity of number formats (rows) x rotations (columns)")
    mx.add_argument("--model", default="default")
    mx.add_argument(
        "--formats",
        default="4,mxfp4,nvfp4,fp8",
        help=f"comma-separated: a bit width (integers) or a format ({', '.join(FORMATS)}, int4g128) for "
        "weights and activations",
    )
    mx.add_argument(
        "--rotations",
        default="none,hadamard,block16,block32,block128,block32p",
        help="comma-separated R1/R4: none, hadamard, block<b>, block<b>p (R4 permuted), file:<path>",
    )
    mx.add_argument("--kv", default="16", help="the KV cache's bit width or format in every cell")
    mx.add_argument("--weights", choices=["rtn", "gptq"], default="rtn")
    mx.add_argument("--clip", choices=CLIP_MODES, default="calibrated")
    mx.add_argument("--tokens", type=int, default=4096, help="evaluation tokens for perplexity")
    mx.add_argument("--window", type=int, default=1024)
    mx.add_argument("--calib-tokens", type=int, default=2048)
    mx.add_argument("--seed", type=int, default=0)
    mx.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    mx.add_argument("--no-cache", action="store_true")
    mx.add_argument("--json", metavar="FILE", help="also write the cells to this JSON file")
    mx.set_defaults(func=cmd_matrix)
    x = sub.add_parser("export", help="write one row (recipe at W-A-KV bits) as a compressed-tensors checkpoint")
    x.add_argument("--model", default="default")
    x.add_argument("--corpus", default="wiki", help="calibration text (GPTQ, calibrated clipping)")
    x.add_argument("--recipe", required=True, help="rtn, quarot or rotated")
    x.add_argument("--bits", required=True, help="W-A-KV, e.g. 4-16-16 or 4-4-4")
    x.add_argument("--weights", choices=["rtn", "gptq"], help="weight quantizer (default: the recipe's, RTN)")
    x.add_argument("--rotation-file", help="for recipe 'rotated': a SpinQuant-layout rotation file")
    x.add_argument(
        "--clip",
        choices=CLIP_MODES,
        default="calibrated",
        help="as for eval; quantized activations or KV cache need none (dynamic quantizers cannot clip)",
    )
    x.add_argument("--calib-tokens", type=int, default=8192, help="GPTQ calibration tokens")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    x.add_argument("--out", required=True, metavar="DIR", help="the model directory to write")
    x.add_argument("--force", action="store_true", help="replace DIR if it holds an earlier export")
    x.add_argument("--json", metavar="FILE", help="also write the summary to this JSON file")
    x.set_defaults(func=cmd_export)
    o = sub.add_parser(
        "optimize",
        help="learn rotations (SpinQuant R1/R2, FLRot also R3/R4) by Cayley SGD; "
        "runs under torchrun --nproc-per-node N with DDP",
    )
    o.add_argument("--model", default="default")
    o.add_argument("--corpus", default="wiki")
    o.add_argument("--method", default="spinquant", help="spinquant (R1, R2) or flrot (R1-R4, R4 block-diagonal)")
    o.add_argument("--bits", default="4-4-4", help="W-A-KV of the fake quantizers while training: 4-4-4 or 16-4-4")
    o.add_argument("--steps", type=int, default=20, help="optimizer steps (layer-wise: per block)")
    o.add_argument("--windows", type=int, default=20, help="calibration windows")
    o.add_argument("--window", type=int, default=256, help="tokens per window")
    o.add_argument("--batch", type=int, default=1, help="windows per step, over all processes (a multiple of N)")
    o.add_argument(
        "--lr",
        type=float,
        help="Cayley SGD step cap, cosine-decayed (default 1.5; layer-wise 0.1, on a loss normalised to 1)",
    )
    o.add_argument("--block", type=int, default=128, help="FLRot's R4 block size")
    o.add_argument(
        "--permute",
        action="store_true",
        help="FLRot: deal the down_proj input channels over R4's blocks by their calibration magnitude "
        "before learning the blocks (fused exactly; saved in the rotation file)",
    )
    o.add_argument("--eval-every", type=int, default=5, help="quick perplexity every N steps (0: never)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    o.add_argument(
        "--no-resume",
        action="store_true",
        help="start over instead of continuing a checkpoint (layer-wise: instead of reusing a finished run)",
    )
    o.add_argument(
        "--mode",
        choices=["end-to-end", "layerwise"],
        default="end-to-end",
        help="end-to-end: the next-token loss through the whole model (default); layerwise: one block at a "
        "time, the MSE of its output against floating point (R1 stays a random Hadamard)",
    )
    o.add_argument(
        "--clip",
        choices=["learned", "fixed", "none"],
        help="layer-wise only: clip ratios learned per site (from A 0.9, KV 0.95; default), fixed at those, or none",
    )
    o.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    o.set_defaults(func=cmd_optimize)
    pl = sub.add_parser("plan", help="where each block of a model would go within memory budgets, before loading")
    pl.add_argument("--model", default="default")
    pl.add_argument("--dtype", default="float16", choices=["float32", "bfloat16", "float16"])
    placement_args(pl)
    pl.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    pl.set_defaults(func=cmd_plan)
    sub.add_parser("prepare", help="convert the default model once and check the offline corpus").set_defaults(
        func=cmd_prepare
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # every user-facing error in the engine is a ValueError subclass
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nstopped; {e if isinstance(e, Stopped) else 'nothing partial was cached'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
