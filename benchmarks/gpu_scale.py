"""Every job at real model sizes on one device: seconds, peak memory and tokens per second per phase, beside the
peak the memory model predicts (engine.memory).

    python -m benchmarks.gpu_scale --sizes 135m,1.5b,8b,30b-a3b [--device cpu|cuda] [--phases ...] --json F

Models are built with random weights from the published config.json values of SmolLM2-135M, Qwen2.5-1.5B,
LLaMA-3-8B and Qwen3-30B-A3B (no hub here), directly on the device in bfloat16 (float32 on a CPU), and read
random token ids (a corpus file of ids, tokenized by splitting): time and memory depend on the shapes only, never
on the weights or the text, so these figures hold for the real models; their quality numbers (perplexity, the
rotation's logits check) mean nothing.

Each phase runs the engine's own job, as the pages and `python -m engine` run it, uncached:
  load       the model built on the device, experts unfused (engine.model.experts), as load_model ends
  capture    engine.observe.capture.capture_job over --tokens tokens (and one plain forward of the same windows)
  rotate     engine.observe.compare.compare_job: R1-R4 random Hadamard on a working copy, the logits check, a
             one-window capture before and after
  calibrate  engine.evaluate.build_model of rtn at 4-4-4 with calibrated clips (calibration inputs, clip search)
  gptq       engine.evaluate.build_model of rtn with GPTQ weights at 4-16-16 (every linear)
  eval       engine.evaluate.eval_table_job: fp, rtn and quarot at 4-4-4 with calibrated clips (the default
             comparison, calibration included)
  matrix     engine.matrix.matrix_job: one cell, mxfp4 x block32
  export     engine.export.export_job: quarot at 4-4-4 (no clipping: dynamic quantizers cannot clip) written to a
             temporary directory, removed after

peak_bytes: on a GPU torch.cuda.max_memory_allocated after a reset (the weights included); on a CPU the model's
parameter bytes plus the rise of the process's resident set over the phase (its high-water mark VmHWM, reset through
/proc/self/clear_refs, minus its resident set at the start), since the resident set also holds what the allocator
kept of earlier work (building SmolLM2-135M's shapes left half its weights' size there); load: the rise over the
resident set before the build. start_bytes: what was held as the phase started (the RSS beyond that baseline).
A phase that fails (out of memory included) records its error and the next phase runs; a phase the
memory model predicts will not fit is not started, and its row says why; --max-seconds skips what is left once
spent. The JSON is rewritten (atomically) after every row, so a run stopped early keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.events import run_to_end

PHASES = ("capture", "rotate", "calibrate", "gptq", "eval", "matrix", "export")
ROW_KEYS = ("size", "phase", "seconds", "peak_bytes", "weights_bytes", "tokens_per_s")
SHAPES_NOTE = (
    "random weights and random token ids: time and memory depend on the shapes only (the real models' "
    "figures are the same); perplexities and logits checks of random weights mean nothing"
)


def _rope(theta: float) -> dict:
    return {"rope_type": "default", "rope_theta": theta}


def model_config(size: str):
    """The transformers config of a size: the published config.json values (tiny sizes: for tests)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3MoeConfig

    if size == "tiny":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
        )
    if size == "tiny-moe":
        return Qwen3MoeConfig(
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            vocab_size=512,
            max_position_embeddings=2048,
        )
    if size == "135m":  # HuggingFaceTB/SmolLM2-135M
        return LlamaConfig(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters=_rope(100000.0),
        )
    if size == "1.5b":  # Qwen/Qwen2.5-1.5B
        return Qwen2Config(
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            rope_parameters=_rope(1000000.0),
        )
    if size == "8b":  # meta-llama/Meta-Llama-3-8B
        return LlamaConfig(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters=_rope(500000.0),
        )
    if size == "30b-a3b":  # Qwen/Qwen3-30B-A3B
        return Qwen3MoeConfig(
            hidden_size=2048,
            intermediate_size=6144,
            moe_intermediate_size=768,
            num_hidden_layers=48,
            num_attention_heads=32,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=128,
            num_experts_per_tok=8,
            norm_topk_prob=True,
            vocab_size=151936,
            max_position_embeddings=40960,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            rope_parameters=_rope(1000000.0),
        )
    raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")


SIZES = ("tiny", "tiny-moe", "135m", "1.5b", "8b", "30b-a3b")


class RandomIds:
    """A tokenizer of a corpus written as token ids (see corpus_file): each whitespace-separated number is one
    token. What the engine's jobs ask of a tokenizer: __call__, len(), name_or_path, save_pretrained."""

    def __init__(self, vocab: int):
        self.vocab = vocab
        self.name_or_path = f"random-ids-{vocab}"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [int(w) for w in text.split()]}

    def __len__(self) -> int:
        return self.vocab

    def save_pretrained(self, directory) -> None:
        (Path(directory) / "RANDOM_TOKEN_IDS.txt").write_text(
            "this model was built with random weights and read random token ids; it has no tokenizer\n"
        )


def corpus_file(directory: Path, vocab: int, calib_tokens: int, eval_tokens: int, seed: int = 0) -> str:
    """A text file of random token ids in paragraphs, long enough for both splits (engine.data.corpus groups
    paragraphs into ~4000-character articles and puts every 5th in the evaluation split)."""
    g = torch.Generator().manual_seed(seed)
    digits = len(str(vocab - 1)) + 1
    need = int(1.3 * max(5 * eval_tokens, 1.25 * calib_tokens)) + 50 * 4000 // digits
    ids = torch.randint(0, vocab, (need,), generator=g).tolist()
    per = 200
    text = "\n\n".join(" ".join(map(str, ids[i : i + per])) for i in range(0, len(ids), per))
    path = directory / f"random-ids-{vocab}.txt"
    path.write_text(text)
    return str(path)


# ---- measurement ----------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Meter:
    """Peak memory of one phase: CUDA's allocator statistics, or the process's resident-set high-water mark."""

    def __init__(self, device: str):
        self.device = device
        self.baseline = self.rss_start = self.held = 0
        if device == "cpu":
            self.method = (
                "the model's parameter bytes plus the rise of the process's resident set over the phase "
                "(VmHWM, reset at its start, minus VmRSS then; load: over the RSS before the build)"
            )
        else:
            self.method = "torch.cuda.max_memory_allocated after torch.cuda.reset_peak_memory_stats (weights included)"

    def set_baseline(self) -> None:
        if self.device == "cpu":
            self._trim()
            self.baseline = _status_kib("VmRSS") * 1024

    @staticmethod
    def _trim() -> None:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so RSS drops with it

    def start(self, held: int = 0) -> None:
        """Reset the peak. held: the tensor bytes held now (the model's parameters), which on a CPU replace the
        resident set at the start: that also holds the allocator's leftovers, which no phase made."""
        self.held = held
        if self.device == "cpu":
            self._trim()
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.rss_start = _status_kib("VmRSS") * 1024 if held else self.baseline
        else:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def current(self) -> int:
        """What is held now: allocated GPU memory, or the RSS beyond the baseline."""
        if self.device == "cpu":
            return _status_kib("VmRSS") * 1024 - self.baseline
        return int(torch.cuda.memory_allocated())

    def peak(self) -> int:
        if self.device == "cpu":
            return self.held + _status_kib("VmHWM") * 1024 - self.rss_start
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated())

    def capacity(self) -> int:
        """What the phase may use: the GPU memory the allocator holds or can get; on a CPU the available RAM plus
        what this process already holds beyond its baseline."""
        if self.device == "cpu":
            avail = (
                next(
                    int(line.split()[1])
                    for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable:")
                )
                * 1024
            )
            return avail + _status_kib("VmRSS") * 1024 - self.baseline
        free, _ = torch.cuda.mem_get_info()
        return int(free + torch.cuda.memory_reserved())


def device_name(device: str) -> str:
    if device == "cpu":
        import platform

        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    p = torch.cuda.get_device_properties(0)
    return f"{p.name} ({p.total_memory / 2**30:.1f} GiB)"


# ---- the model -------------------------------------------------------------------------------------------------------
def build(config, name: str, device: str, dtype: str, tokenizer):
    """A ModelHandle of random weights of this config, built on `device` in `dtype` (no float32 copy first), experts
    unfused as engine.model.loading.load_model leaves them."""
    from transformers import AutoModelForCausalLM

    from engine.model.arch import resolve
    from engine.model.experts import unfuse_experts
    from engine.model.loading import ModelHandle

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.eval().requires_grad_(False)
    unfuse_experts(model)
    return ModelHandle(
        name=f"random-{name}",
        model=model,
        tokenizer=tokenizer,
        arch=resolve(model),
        fingerprint=f"random-{name}-{dtype}",
        note=f"random weights of {name} shapes ({SHAPES_NOTE})",
        dtype=dtype,
        device=device,
        source="",
    )


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the phases: each runs the engine's job to its end and returns (tokens through the model, details) -------------


def phase_capture(handle, s):
    from engine.observe.capture import CaptureConfig, capture_job
    from engine.observe.stats import state_bytes_bound

    cfg = CaptureConfig(tokens=s.tokens, window=s.capture_window)
    res = run_to_end(capture_job(handle, s.corpus, cfg, use_cache=False))
    kept = {}
    for key, t in res.arrays.items():
        layer_site = key.rsplit(".", 1)[0]
        kept[layer_site] = kept.get(layer_site, 0) + t.numel() * t.element_size()
    widest = int(res.table.channels.max())
    return int(res.meta["tokens"]), {
        "capture_seconds": res.meta["seconds"],
        "windows": res.meta["n_windows"],
        "kept_bytes_all_sites": sum(kept.values()),
        "kept_bytes_max_site_layer": max(kept.values()),
        "bound_bytes_widest_site": state_bytes_bound(widest),
        "sites_x_layers": len(kept),
    }


def plain_forward_seconds(handle, s) -> float:
    """One forward of the capture windows without hooks (what capture's 2x target compares against)."""
    from engine.data.corpus import load_corpus, windows

    wins = windows(load_corpus(s.corpus), handle.tokenizer, s.tokens, s.capture_window, "calib")
    sync = torch.cuda.synchronize if handle.device != "cpu" else (lambda: None)
    with torch.no_grad():
        handle.model(wins[:1].to(handle.device), use_cache=False)  # warm-up
        sync()
        t0 = time.perf_counter()
        for w in wins:
            handle.model(w.unsqueeze(0).to(handle.device), use_cache=False)
        sync()
    return time.perf_counter() - t0


def phase_rotate(handle, s):
    from engine.observe.capture import CaptureConfig
    from engine.observe.compare import compare_job
    from engine.rotation.fusion import RotationConfig

    rot = RotationConfig.from_names(["R1", "R2", "R3", "R4"], "hadamard")
    window = s.capture_window
    cap = CaptureConfig(tokens=window, window=window, sqnr_bits=(4, 8))
    c = run_to_end(compare_job(handle, s.corpus, rot, cap, check_tokens=s.check_tokens, use_cache=False))
    return s.check_tokens + 2 * window, {
        "rotation": rot.tag(),
        **{k: c.check[k] for k in ("max_abs_logit_diff", "kl", "max_abs_logit")},
        "check_dtype": handle.dtype,
    }


def _build_only(handle, s, recipe, bits):
    from engine.evaluate import build_model

    with handle.working_model() as model:
        _, plan = run_to_end(build_model(handle, model, recipe, bits, s.eval_config(), 0))
        del model
    return plan


def phase_calibrate(handle, s):
    from engine.quant.calibrate import KV_TOKENS, WINDOWS
    from engine.quant.recipes import Bits, get_recipe

    plan = _build_only(handle, s, get_recipe("rtn", clip="calibrated"), Bits.parse("4-4-4"))
    n = min(s.calib_tokens // s.calib_window, max(WINDOWS, -(-KV_TOKENS // s.calib_window)))
    return n * s.calib_window, {"activation_clips": len(plan.activations), "weight_rows_searched": len(plan.weights)}


def phase_gptq(handle, s):
    from engine.quant.recipes import Bits, get_recipe

    _build_only(handle, s, get_recipe("rtn", weights="gptq"), Bits.parse("4-16-16"))
    return s.calib_tokens // s.calib_window * s.calib_window, {
        "linears": handle.arch.n_layers * len(handle.arch.linears)
    }


def phase_eval(handle, s):
    from engine.evaluate import eval_table_job

    runs = [("fp", "16-16-16"), ("rtn", "4-4-4"), ("quarot", "4-4-4")]
    rows = run_to_end(eval_table_job(handle, runs, s.eval_config(), use_cache=False))
    return sum(r["tokens"] for r in rows), {
        f"{r['recipe']} {r['bits']}": {"ppl": r["ppl"], "seconds": r["seconds"]} for r in rows
    }


def phase_matrix(handle, s):
    from dataclasses import replace

    from engine.matrix import MatrixConfig, matrix_job

    cfg = replace(s.eval_config(), tokens=s.matrix_tokens, window=min(1024, s.matrix_tokens))
    cells = run_to_end(
        matrix_job(handle, MatrixConfig(formats=("mxfp4",), rotations=("block32",)), cfg, use_cache=False)
    )
    return cells[0]["tokens"], {"cell": "mxfp4 x block32", "ppl": cells[0]["ppl"]}


def phase_export(handle, s):
    from engine.export import export_job
    from engine.quant.recipes import Bits, get_recipe

    out = Path(tempfile.mkdtemp(prefix="gpu-scale-export-")) / "model"
    try:
        r = run_to_end(export_job(handle, get_recipe("quarot", clip="none"), Bits.parse("4-4-4"), out, s.eval_config()))
        return 0, {"bytes_written": r["bytes"], "files": len(r["files"])}
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)


RUNNERS = {
    "capture": phase_capture,
    "rotate": phase_rotate,
    "calibrate": phase_calibrate,
    "gptq": phase_gptq,
    "eval": phase_eval,
    "matrix": phase_matrix,
    "export": phase_export,
}


class Settings:
    """Token budgets and windows of one run (the engine's defaults on a GPU, small ones on a CPU)."""

    def __init__(
        self,
        device: str,
        tokens: int | None = None,
        eval_tokens: int | None = None,
        matrix_tokens: int | None = None,
        calib_tokens: int | None = None,
        corpus: str = "",
    ):
        cpu = device == "cpu"
        self.tokens = tokens or (512 if cpu else 2048)
        self.eval_tokens = eval_tokens or (512 if cpu else 16384)
        self.matrix_tokens = matrix_tokens or (256 if cpu else 4096)
        self.calib_tokens = calib_tokens or (512 if cpu else 8192)
        self.calib_window = min(128 if cpu else 512, self.calib_tokens)
        self.capture_window = min(256 if cpu else 512, self.tokens)
        self.check_tokens = min(128 if cpu else 256, self.eval_tokens)
        self.corpus = corpus

    @classmethod
    def from_args(cls, args) -> Settings:
        return cls(args.device, args.tokens, args.eval_tokens, args.matrix_tokens, args.calib_tokens)

    def eval_config(self):
        from engine.evaluate import EvalConfig

        return EvalConfig(
            tokens=self.eval_tokens,
            window=min(2048, self.eval_tokens),
            calib_tokens=self.calib_tokens,
            calib_window=self.calib_window,
            corpus=self.corpus,
        )

    def windows(self):
        from engine.memory import Windows

        return Windows(
            capture=self.capture_window,
            eval=min(2048, self.eval_tokens),
            matrix=min(1024, self.matrix_tokens),
            calib=self.calib_window,
            calib_tokens=self.calib_tokens,
            check=self.check_tokens,
        )

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "corpus"}


# ---- the run ---------------------------------------------------------------------------------------------------------
class Report:
    """The JSON {"device", ..., "rows"} rewritten atomically after every row, and a printed line per row."""

    def __init__(self, path: str | None, header: dict):
        self.path, self.header, self.rows = path, header, []

    def add(self, row: dict) -> None:
        self.rows.append(row)
        peak, pred = row.get("peak_bytes"), row.get("predicted_peak_bytes")
        gib = lambda b: f"{b / 2**30:8.2f}" if b is not None else "       -"  # noqa: E731
        ratio = f"{peak / row['weights_bytes']:5.2f}x" if peak and row.get("weights_bytes") else "     -"
        secs = f"{row['seconds']:8.1f}" if row.get("seconds") is not None else "       -"
        tps = f"{row['tokens_per_s']:10.0f}" if row.get("tokens_per_s") else "         -"
        print(
            f"{row['size']:>8} {row['phase']:>9} {secs} s  peak {gib(peak)} GiB ({ratio} weights)  predicted "
            f"{gib(pred)} GiB  {tps} tok/s" + (f"  ERROR {row['error']}" if row.get("error") else ""),
            flush=True,
        )
        self.write()

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**self.header, "rows": self.rows}, f, indent=1, default=str)
        os.replace(tmp, self.path)


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:600]


def run_size(size: str, phases: list[str], args, report: Report, meter: Meter, deadline: float, workdir: Path):
    from engine import memory

    config = model_config(size)
    shapes = memory.shapes(config, args.dtype)
    settings = Settings.from_args(args)
    peaks = memory.job_peaks(shapes, settings.windows(), device=args.device)
    base = {"size": size, "weights_bytes": shapes.weights_bytes, "predicted_weights_bytes": shapes.weights_bytes}

    def row(phase, **kw):
        out = {
            **base,
            "phase": phase,
            "seconds": None,
            "peak_bytes": None,
            "tokens_per_s": None,
            "predicted_peak_bytes": peaks[phase],
            **kw,
        }
        report.add(out)

    def refuse(reason):
        for phase in ["load", *phases]:
            row(phase, error=reason)

    if time.monotonic() > deadline:
        return refuse(f"skipped: the time budget (--max-seconds {args.max_seconds:g}) was spent")
    meter.set_baseline()
    capacity = meter.capacity()
    if peaks["load"] > capacity and not args.force:
        return refuse(
            f"does not fit: the weights alone need {memory.fmt(peaks['load'])}, the device has {memory.fmt(capacity)}"
        )
    tokenizer = RandomIds(config.vocab_size)
    settings.corpus = corpus_file(
        workdir,
        config.vocab_size,
        max(settings.tokens, settings.calib_tokens),
        max(settings.eval_tokens, settings.matrix_tokens, settings.check_tokens),
    )
    handle = None
    meter.start()
    t0 = time.perf_counter()
    try:
        handle = build(config, size, args.device, args.dtype, tokenizer)
        seconds = time.perf_counter() - t0
        measured = parameter_bytes(handle.model)
        row(
            "load",
            seconds=seconds,
            peak_bytes=meter.peak(),
            weights_bytes=measured,
            details={"parameters": sum(p.numel() for p in handle.model.parameters())},
        )
    except Exception as e:  # noqa: BLE001 - recorded; the size's phases cannot run without a model
        row("load", seconds=time.perf_counter() - t0, error=_error(e))
        handle = None
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()
        for phase in phases:
            row(phase, error="skipped: the model could not be built")
        return
    try:
        for phase in phases:
            if time.monotonic() > deadline:
                row(phase, error=f"skipped: the time budget (--max-seconds {args.max_seconds:g}) was spent")
                continue
            capacity = meter.capacity()
            if peaks[phase] > capacity and not args.force:
                row(
                    phase,
                    error=f"not run: predicted peak {memory.fmt(peaks[phase])} exceeds the "
                    f"{memory.fmt(capacity)} the device can give (--force runs it anyway)",
                )
                continue
            row(phase, **run_phase(handle, settings, phase, meter))
    finally:
        handle.model = None
        del handle
        gc.collect()
        if args.device != "cpu":
            torch.cuda.empty_cache()


def run_phase(handle, settings, phase: str, meter: Meter) -> dict:
    """Run one phase's job on the handle's model, measured: seconds, peak_bytes, tokens, tokens_per_s, details and
    error (only when it failed; the exception is not raised)."""
    meter.start(held=parameter_bytes(handle.model))
    start = meter.current()  # the weights, and whatever an earlier phase left behind
    t0 = time.perf_counter()
    error, tokens, details = None, 0, {}
    try:
        tokens, details = RUNNERS[phase](handle, settings)
    except Exception as e:  # noqa: BLE001 - out of memory or any failure: recorded, the next phase runs
        error = _error(e)
    seconds = time.perf_counter() - t0
    peak = meter.peak()
    if phase == "capture" and error is None:
        details["plain_forward_seconds"] = plain_forward_seconds(handle, settings)
    gc.collect()
    if handle.device != "cpu":
        torch.cuda.empty_cache()
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "start_bytes": start,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds if tokens and seconds > 0 else None,
        "details": details,
        **({"error": error} if error else {}),
    }


def markdown_table(paths: list[str]) -> str:
    """The rows of one or more JSON files of this benchmark as a markdown table (docs/BENCHMARKS.md), each file's
    device named above its rows."""
    out = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        out += [
            f"{data['device']}, {data['dtype']}, torch {data['torch']}, transformers {data['transformers']}; "
            f"peak: {data['peak_method']}",
            "",
            "| size | phase | seconds | peak GiB | x weights | predicted GiB | tokens/s | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in data["rows"]:
            num = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            ratio = r["peak_bytes"] / r["weights_bytes"] if r.get("peak_bytes") else None
            out.append(
                f"| {r['size']} | {r['phase']} | {num(r['seconds'], '.1f')} | "
                f"{num(r['peak_bytes'] and r['peak_bytes'] / 2**30, '.2f')} | {num(ratio, '.2f')} | "
                f"{r['predicted_peak_bytes'] / 2**30:.2f} | {num(r.get('tokens_per_s'), '.0f')} | "
                f"{(r.get('error') or '').replace('|', '/')[:160]} |"
            )
        out.append("")
    return "\n".join(out)


def preload() -> None:
    """Import what the phases import lazily, before any baseline: on a CPU the resident set would otherwise count
    pandas or compressed-tensors as a phase's memory."""
    import importlib

    names = (
        "engine.observe.capture",
        "engine.observe.compare",
        "engine.evaluate",
        "engine.matrix",
        "engine.export",
        "engine.quant.gptq",
        "compressed_tensors.compressors",
        "compressed_tensors.transform",
    )
    for name in names:
        with contextlib.suppress(ImportError):  # compressed-tensors may be missing: only export needs it
            importlib.import_module(name)


def parse_list(text: str, known: tuple, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise SystemExit(f"unknown {what} {bad or text!r}; choose among {', '.join(known)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="135m,1.5b,8b,30b-a3b", help=f"comma-separated: {', '.join(SIZES)}")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        help="weights' dtype (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated: {', '.join(PHASES)}")
    p.add_argument("--tokens", type=int, help="capture tokens (default 2048; 512 on a CPU)")
    p.add_argument("--eval-tokens", type=int, help="evaluation tokens per run (default 16384; 512 on a CPU)")
    p.add_argument("--matrix-tokens", type=int, help="the matrix cell's evaluation tokens (default 4096; 256 on a CPU)")
    p.add_argument("--calib-tokens", type=int, help="calibration tokens (default 8192; 512 on a CPU)")
    p.add_argument("--max-seconds", type=float, default=math.inf, help="total budget: later phases are skipped")
    p.add_argument("--force", action="store_true", help="run phases the memory model predicts will not fit")
    p.add_argument(
        "--threads",
        type=int,
        help="torch's CPU threads (default: torch's own; 1 is much faster for the "
        "small operations of a CPU run on a busy machine, whose spinning threads wait for each other)",
    )
    p.add_argument("--json", metavar="FILE", help="write the rows here (rewritten after every row)")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print these runs' rows as a markdown table; run nothing")
    args = p.parse_args(argv)
    if args.table:
        print(markdown_table(args.table))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu)")
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    sizes = parse_list(args.sizes, SIZES, "sizes")
    phases = parse_list(args.phases, PHASES, "phases")
    deadline = time.monotonic() + args.max_seconds
    threads, cache = torch.get_num_threads(), os.environ.get("SPINSCOPE_CACHE")
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="gpu-scale-"))
    os.environ["SPINSCOPE_CACHE"] = str(workdir / "cache")  # evaluation rows are saved: never in the user's cache
    meter = Meter(args.device)
    import transformers

    header = {
        "device": device_name(args.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peak_method": meter.method,
        "notes": [
            SHAPES_NOTE,
            "predicted_peak_bytes: engine.memory.job_peaks from the config",
            "tokens: tokens run through the model in the phase (export: 0, its build needs no calibration)",
            "start_bytes: what was held when the phase started (peak_bytes is measured the same way)",
        ],
        "settings": {**Settings.from_args(args).to_dict(), "phases": phases, "sizes": sizes},
    }
    try:
        report = Report(args.json, header)
        report.write()
        print(f"device: {header['device']}, {args.dtype}; {SHAPES_NOTE}", flush=True)
        preload()
        for size in sizes:
            run_size(size, phases, args, report, meter, deadline, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        torch.set_num_threads(threads)
        if cache is None:
            os.environ.pop("SPINSCOPE_CACHE", None)
        else:
            os.environ["SPINSCOPE_CACHE"] = cache
    return 0


if __name__ == "__main__":
    sys.exit(main())
