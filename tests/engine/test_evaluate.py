"""Perplexity and the cached evaluation job: perplexity equals exp(mean NLL) computed independently; on the default
model fp and 16-16-16 agree, a fixed seed reproduces a randomly rotated run, and the same run again is a cache hit
(in a private cache: see tmp_cache)."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine import store
from engine.evaluate import EvalConfig, beside_baselines, eval_job, eval_table_job, perplexity, run_key, table_row
from engine.events import Done, Progress
from engine.model.loading import tiny_llama
from engine.quant.clipping import ClipPolicy
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig

REPO_CACHE = Path(__file__).resolve().parents[2] / "cache"


@torch.no_grad()
def test_perplexity_is_exp_of_mean_next_token_nll():
    model = tiny_llama()
    wins = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    events = list(perplexity(model, wins, batch=2))  # 3 windows in batches of 2: the last batch is short
    assert [(e.stage, e.done, e.total) for e in events[:-1]] == [("perplexity", 2, 3), ("perplexity", 3, 3)]
    assert isinstance(events[-1], Done)

    nll = []  # per predicted token, one window at a time
    for w in wins:
        logp = model(w[None]).logits[0].double().log_softmax(-1)  # [T, vocab]
        nll += [-logp[t, w[t + 1]].item() for t in range(len(w) - 1)]
    assert len(nll) == 3 * 19
    assert events[-1].result == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"tokens": 0}, "token budget must be positive"),
        ({"tokens": 1}, "at least 2 tokens"),  # one token predicts nothing: perplexity would divide by zero
        ({"window": 1}, "at least 2 tokens"),
        ({"calib_tokens": 0}, "calibration tokens and window must be positive"),
        ({"limit": 0}, "document limit must be positive"),
        ({"tasks": ("piqa", "nosuch")}, "unknown zero-shot task(s) 'nosuch'"),  # before any perplexity is computed
    ],
)
def test_eval_config_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError) as e:
        EvalConfig(**kwargs)
    assert message in str(e.value)


# ---- the evaluation job on the real default model ----------------------------------------------------------------

CFG = EvalConfig(tokens=512, window=512)
# Seeded random Hadamard R2 and R3 (QuaRot's online ones) are enough to make a run depend on the seed; leaving out
# R1/R4 (dense float64 fusion over 30 layers) and clipping (the calibration and its end-to-end check) keeps the test
# quick.
QUAROT = replace(
    get_recipe("quarot"),
    name="quarot_r2_r3",
    rotation=RotationConfig(r2="hadamard", r3="hadamard"),
    clip=ClipPolicy("none"),
)


def run(handle, recipe, bits, cfg=CFG, use_cache=True) -> Done:
    events = list(eval_job(handle, recipe, bits, cfg, use_cache=use_cache))
    assert all(isinstance(e, Progress) for e in events[:-1])
    return events[-1]


def test_fp_and_16_16_16_give_the_same_perplexity_saved_in_the_private_cache(default_handle, tmp_cache):
    keys = [run_key(default_handle, get_recipe(name), Bits(), CFG) for name in ("fp", "rtn")]
    real = [REPO_CACHE / "eval" / key / "meta.json" for key in keys]
    real_before = [p.stat().st_mtime_ns if p.exists() else None for p in real]

    fp = run(default_handle, "fp", "16-16-16").result
    rtn = run(default_handle, "rtn", "16-16-16").result
    assert math.isfinite(fp["ppl"]) and fp["ppl"] > 1
    assert rtn["ppl"] == fp["ppl"]  # exactly: at 16-16-16 nothing is quantized, the same forward runs twice
    assert fp["tokens"] == rtn["tokens"] == 512 and fp["window"] == 512
    assert (fp["recipe"], rtn["recipe"], rtn["bits"]) == ("fp", "rtn", "16-16-16")

    # tmp_cache: both runs are saved in the test's own cache, none in the repository's
    assert store.cache_root() == tmp_cache
    assert store.entries("eval") == sorted(keys)
    assert [store.load("eval", key)[0] for key in keys] == [fp, rtn]
    assert [p.stat().st_mtime_ns if p.exists() else None for p in real] == real_before

    # the fp recipe ignores the bits, so asking for other bits is the same run, served from the cache
    again = run(default_handle, "fp", "4-4-4")
    assert again.cached and again.result["ppl"] == fp["ppl"] and again.result["bits"] == "16-16-16"
    assert again.result["bits_requested"] == "4-4-4"


def test_fixed_seed_reproduces_and_second_run_is_a_cache_hit(default_handle, tmp_cache):
    first = run(default_handle, QUAROT, "4-4-4", use_cache=False)
    again = run(default_handle, QUAROT, Bits(4, 4, 4), use_cache=False)
    assert not first.cached and not again.cached
    assert again.result["ppl"] == first.result["ppl"]  # exactly: same seed, same rotations, same grids

    hit = run(default_handle, QUAROT, "4-4-4")  # saved by the runs above
    assert hit.cached and hit.result == again.result

    other = run(default_handle, QUAROT, "4-4-4", cfg=replace(CFG, seed=1))  # the seed matters: new rotations
    assert not other.cached and other.result["ppl"] != first.result["ppl"]


# ---- the comparison table: the one loop behind the Evaluate and Optimize pages and `python -m engine eval` ---------


def test_table_row_adds_the_weight_search_cached_and_one_column_per_task_metric():
    tasks = {"piqa": {"acc": 0.5, "acc_norm": 0.625}, "arc_easy": {"acc": 0.25}}
    result = {"recipe": "rtn", "ppl": 12.5, "tasks": tasks}
    row = table_row(result, get_recipe("rtn"), cached=True)
    assert row == {
        **result,
        "w_search": False,
        "cached": True,
        "piqa acc": 0.5,  # calibrated RTN: no |err|^2.4
        "piqa acc_norm": 0.625,
        "arc_easy acc": 0.25,
    }
    assert table_row(result, get_recipe("rtn", clip="fixed"))["w_search"] is True
    assert table_row({**result, "tasks": {}}, get_recipe("fp"))["w_search"] is False  # fp quantizes nothing


def test_beside_baselines_gives_every_quantized_row_the_same_weight_quantizer():
    learned = get_recipe("rotated", rotation_file="R.bin")
    runs = beside_baselines(learned, "4-4-4", "gptq", weight_range_search=False)
    assert [(r.name, str(b)) for r, b in runs] == [
        ("fp", "16-16-16"),
        ("rtn", "4-4-4"),
        ("quarot", "4-4-4"),
        ("rotated", "4-4-4"),
    ]
    assert all(r.weights == "gptq" and r.clip == ClipPolicy("fixed", weight_range_search=False) for r, _ in runs[1:])
    assert runs[3][0].rotation == learned.rotation


def test_eval_table_job_streams_rows_and_reuses_each_run(tiny_model_dir):
    from engine.model.loading import load_model

    handle = load_model(str(tiny_model_dir))
    cfg = EvalConfig(tokens=64, window=32)
    runs = [("fp", "4-4-4"), (get_recipe("rtn", clip=ClipPolicy(weight_range_search=False)), Bits(4, 4, 4))]
    events = list(eval_table_job(handle, runs, cfg))
    done = events[-1]
    assert isinstance(done, Done) and all(isinstance(e, Progress) for e in events[:-1])
    rows = done.result
    assert [(r["recipe"], r["bits"], r["bits_requested"], r["clip"], r["cached"]) for r in rows] == [
        ("fp", "16-16-16", "4-4-4", "-", False),
        ("rtn", "4-4-4", "4-4-4", "calibrated", False),
    ]
    partials = [e.partial for e in events if e is not done and e.partial is not None]
    assert partials == [rows[:1], rows]  # the live table: one more row after each run
    inner = [e.message for e in events if e is not done and e.partial is None]
    assert inner and all(
        m.startswith(("run 1/2 fp (unquantized): ", "run 2/2 rtn 4-4-4 (rtn weights): ")) for m in inner
    )
    # each row is eval_job's own result: asked again, every run is a cache hit with exactly the same numbers
    again = list(eval_table_job(handle, runs, cfg))[-1]
    assert again.cached and [r["cached"] for r in again.result] == [True, True]
    assert [r["ppl"] for r in again.result] == [r["ppl"] for r in rows]
    recomputed = list(eval_job(handle, runs[1][0], runs[1][1], cfg, use_cache=False))[-1].result
    assert recomputed["ppl"] == rows[1]["ppl"]


def test_eval_table_job_error_ends_the_job_after_the_rows_already_done(tiny_model_dir, tmp_path):
    from engine.model.loading import load_model

    handle = load_model(str(tiny_model_dir))
    runs = [("fp", "16-16-16"), (get_recipe("rotated", rotation_file=str(tmp_path / "none.bin")), "4-4-4")]
    partials = []
    with pytest.raises(ValueError):
        for ev in eval_table_job(handle, runs, EvalConfig(tokens=64, window=32)):
            if isinstance(ev, Progress) and ev.partial is not None:
                partials.append(ev.partial)
    assert [[r["recipe"] for r in p] for p in partials] == [["fp"]]


def test_a_comparison_draws_one_bar_that_never_goes_back_with_phases_named_and_time_left(tiny_model_dir):
    from engine.model.loading import load_model

    handle = load_model(str(tiny_model_dir))
    cfg = EvalConfig(tokens=64, window=32)
    events = [
        e for e in eval_table_job(handle, [("quarot", "4-4-4"), ("rtn", "4-16-16")], cfg) if isinstance(e, Progress)
    ]
    overall = [e.overall for e in events]
    assert all(a <= b for a, b in zip(overall, overall[1:], strict=False)) and overall[-1] == 1.0  # never restarts
    stages = {e.stage for e in events}
    assert {"rotate", "weights", "perplexity", "runs"} <= stages  # every phase reports
    assert all(f": {e.stage}: " in e.message for e in events if e.stage != "runs")
    assert events[0].eta is None and any(e.eta is not None for e in events)  # time left once a phase is done
