"""Export round trips on a model (issue 19): each row is built as `python -m engine eval` builds it, evaluated by the
engine, exported as a compressed-tensors checkpoint, and evaluated again in a fresh interpreter that imports no
SpinScope module (transformers, or the exported load_with_transforms.py: transformers + compressed-tensors).

    python -m benchmarks.export_roundtrip [--tokens 16384] [--window 2048] [--rotation-file F] [--json F]

Rows: W4A16 RTN (calibrated weight clipping, kept in the stored scales), W4A4KV4 QuaRot and, with --rotation-file,
W4A4KV4 with that (e.g. learned SpinQuant) rotation file; activations and KV cache without clipping (compressed-
tensors' dynamic quantizers take each token's min-max range). Prints, per row: perplexity in the engine and in the
export on the same windows, the max |logit diff| and top-1 agreement on the first window, the checkpoint's size;
for rows with quantized activations also the engine's own perplexity and top-1 agreement after nudging a third of the
embedding values by one float32 ulp (nudge_embeddings), the scale of difference rounding alone makes in such a row.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Runs in a fresh interpreter with no SpinScope on its path: plain transformers, or the exported loader
# (load_with_transforms.py: transformers + compressed-tensors). Writes logits, perplexity, the modules it saw and
# the linear weights the runtime multiplies by (decompressed by then).
DRIVER = r"""
import math, sys
import torch
directory, data_path, out_path, mode = sys.argv[1:5]
if mode == "plain":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
else:
    sys.path.insert(0, directory)
    from load_with_transforms import load
    model = load(directory, quantize_queries=mode == "ct-queries")
data = torch.load(data_path)
nll, count = 0.0, 0
with torch.no_grad():
    logits = model(data["ids"], use_cache=False).logits
    for w in data["windows"]:
        lg = model(w[None], use_cache=False).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(lg, w[1:], reduction="sum"))
        count += w.numel() - 1
torch.save({"logits": logits, "ppl": math.exp(nll / count) if count else math.nan,
            "engine": sorted(m for m in sys.modules if m == "engine" or m.startswith("engine.")),
            "weights": {n: p.detach() for n, p in model.named_parameters() if n.endswith("_proj.weight")}}, out_path)
"""


def run_isolated(python: str, script: Path, args: list, result: Path, what: str, timeout: int, env=None) -> dict:
    """Run `script` with `python` in a fresh interpreter and load the dict it saved at `result`; raises with its
    output if it failed, or if that process imported SpinScope (the dict's "engine" list of module names)."""
    proc = subprocess.run(
        [python, "-W", "ignore", str(script), *map(str, args)],
        cwd=script.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    res = torch.load(result)
    if res["engine"]:
        raise RuntimeError(f"{what}: the process imported SpinScope ({res['engine'][:3]})")
    return res


def load_elsewhere(directory: Path, ids: torch.Tensor, wins: torch.Tensor, workdir: Path, mode: str) -> dict:
    """Logits on `ids`, perplexity on `wins` (nan for none) and the linears' weights of the checkpoint at
    `directory`, computed by DRIVER in a fresh interpreter (mode "plain": transformers only; "loader":
    load_with_transforms.py; "ct-queries": the same with compressed-tensors' query quantization). Raises if that
    process imported SpinScope."""
    data, out, script = workdir / f"data-{mode}.pt", workdir / f"out-{mode}.pt", workdir / "driver.py"
    torch.save({"ids": ids, "windows": wins}, data)
    script.write_text(DRIVER)
    return run_isolated(
        sys.executable, script, [directory, data, out, mode], out, f"loading {directory} elsewhere", 3600
    )


def nudge_embeddings(model, arch, seed: int = 0) -> None:
    """Move a third of the embedding values up and a third down by one float32 ulp: a row's own sensitivity to
    rounding (a chaotic row, e.g. W4A4KV4 here, changes under this as much as between two implementations)."""
    emb = arch.module(model, "embed").weight
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb.mul_(1 + 2.0**-23 * torch.randint(-1, 2, emb.shape, generator=g).to(emb.dtype))


def main(argv=None) -> int:
    from engine.data.corpus import load_corpus, windows
    from engine.evaluate import EvalConfig, build_model, perplexity
    from engine.events import run_to_end
    from engine.export import write_checkpoint
    from engine.model.loading import load_model
    from engine.quant.recipes import Bits, get_recipe

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=2048)
    p.add_argument("--rotation-file")
    p.add_argument("--rows", default="w4a16,quarot,file", help="which rows: w4a16, quarot, file (with --rotation-file)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    handle = load_model(args.model)
    cfg = EvalConfig(tokens=args.tokens, window=args.window)
    win = min(args.window, handle.max_length, args.tokens)
    wins = windows(load_corpus(cfg.corpus), handle.tokenizer, args.tokens, win, "eval")
    wanted = set(args.rows.split(","))
    rows = {
        "W4A16 rtn": (get_recipe("rtn"), "4-16-16", "plain"),
        "W4A4KV4 quarot": (get_recipe("quarot", clip="none"), "4-4-4", "loader"),
    }
    rows = {k: v for k, v in rows.items() if {"W4A16 rtn": "w4a16", "W4A4KV4 quarot": "quarot"}[k] in wanted}
    if args.rotation_file and "file" in wanted:
        rows[f"W4A4KV4 {Path(args.rotation_file).name}"] = (
            get_recipe("rotated", rotation_file=args.rotation_file, clip="none"),
            "4-4-4",
            "loader",
        )
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (recipe, bits, mode) in rows.items():
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed)
            directory = Path(tmp) / name.replace(" ", "-")
            with handle.working_model() as model:
                model, _ = run_to_end(build_model(handle, model, recipe, Bits.parse(bits), cfg, cfg.seed))
                layers = [handle.arch.layer(model, i) for i in range(handle.arch.n_layers)]
                ppl = run_to_end(perplexity(model, wins, layers=layers))
                with torch.no_grad():
                    logits = model(wins[:1], use_cache=False).logits
                summary = write_checkpoint(handle, model, recipe, Bits.parse(bits), directory, seed=cfg.seed)
                nudged = None
                if Bits.parse(bits).quantizes("a"):  # the engine against itself, one ulp apart
                    nudge_embeddings(model, handle.arch)
                    with torch.no_grad():
                        nudged_logits = model(wins[:1], use_cache=False).logits
                    nudged = (
                        run_to_end(perplexity(model, wins, layers=layers)),
                        float((nudged_logits.argmax(-1) == logits.argmax(-1)).float().mean()),
                    )
                del model
            got = load_elsewhere(directory, wins[:1], wins, Path(tmp), mode)
            row = {
                "row": name,
                "recipe": recipe.name,
                "bits": bits,
                "clip": recipe.clip.mode,
                "loaded_by": mode,
                "ppl_engine": ppl,
                "ppl_export": got["ppl"],
                "rel_diff": got["ppl"] / ppl - 1,
                "max_abs_logit_diff": float((got["logits"] - logits).abs().max()),
                "max_abs_logit": float(logits.abs().max()),
                "top1_agreement": float((got["logits"].argmax(-1) == logits.argmax(-1)).float().mean()),
                "ppl_nudged": nudged[0] if nudged else None,
                "top1_nudged": nudged[1] if nudged else None,
                "mib": summary["bytes"] / 2**20,
                "seconds": time.perf_counter() - t0,
            }
            out.append(row)
            print(
                f"{name}: perplexity engine {ppl:.4f}, export {got['ppl']:.4f} ({row['rel_diff']:+.2%}); max |logit "
                f"diff| {row['max_abs_logit_diff']:.3g} (max |logit| {row['max_abs_logit']:.1f}), top-1 agreement "
                f"{row['top1_agreement']:.3f}; {row['mib']:.1f} MiB; {row['seconds']:.0f} s",
                flush=True,
            )
            if nudged:
                print(
                    f"  the engine nudged by one ulp: perplexity {nudged[0]:.4f} ({nudged[0] / ppl - 1:+.2%}), "
                    f"top-1 agreement {nudged[1]:.3f}",
                    flush=True,
                )
    print(f"\n{handle.name}, {int(wins.numel())} evaluation tokens in windows of {win}")
    print(
        "| row | loaded by | perplexity (engine) | perplexity (export) | difference | max abs logit diff | top-1 "
        "| engine nudged one ulp: perplexity, top-1 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in out:
        nudged = f"{r['ppl_nudged']:.3f}, {r['top1_nudged']:.3f}" if r["ppl_nudged"] else "-"
        print(
            f"| {r['row']} | {r['loaded_by']} | {r['ppl_engine']:.3f} | {r['ppl_export']:.3f} | {r['rel_diff']:+.2%} "
            f"| {r['max_abs_logit_diff']:.3g} | {r['top1_agreement']:.3f} | {nudged} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": out, "args": vars(args)}, indent=1))
    return 0 if all(math.isfinite(r["ppl_export"]) for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
