"""Cayley training across two processes (torch DDP over gloo on the CPU) equals training in one process.

The two ranks are spawned once per module (imports cost seconds on 2 cores) and run every scenario in turn; each
rank rebuilds the same tiny random Llama and writes what it saw to a file that the tests read."""

import faulthandler
import os
import socket
from pathlib import Path

import pytest
import torch

from engine.events import Done, Metric
from engine.learn import distributed
from engine.learn.rotated_network import LearnedRotations
from engine.learn.spinquant import TrainConfig, train
from engine.model.arch import resolve
from engine.model.loading import tiny_llama
from engine.rotation.files import load_rotations

LAYERS, HIDDEN, HEADS, KV_HEADS, INTER, VOCAB = 2, 32, 4, 2, 64, 128
WORLD = 2
METHODS = ("spinquant", "flrot")

pytestmark = pytest.mark.slow  # every test trains in several processes


def tiny():
    model = tiny_llama(
        seed=0, layers=LAYERS, hidden=HIDDEN, heads=HEADS, kv_heads=KV_HEADS, intermediate=INTER, vocab=VOCAB
    )
    return model, resolve(model)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 24), generator=g), torch.randint(0, VOCAB, (2, 24), generator=g)


def config(method: str, **kw) -> TrainConfig:
    base = dict(method=method, steps=2, windows=4, window=24, batch=2, block=16, eval_every=1, checkpoint_every=1)
    return TrainConfig(**{**base, **kw})


def key_for(method: str) -> str | None:
    return "ddp-test" if method == "flrot" else None  # one run with checkpoints, one without cache writes


_KEY = object()  # train_recording's default: key_for(method)


def train_recording(
    method: str, monkeypatch_module, cfg: TrainConfig | None = None, key=_KEY, resume: bool = True
) -> dict:
    """Run train() on the tiny model; record the events and the final rotations that every rank checks (a spy on
    distributed.check_same_on_all_ranks, which train calls once with every learned parameter)."""
    cfg = cfg or config(method)
    key = key_for(method) if key is _KEY else key
    seen = {}
    real_check = distributed.check_same_on_all_ranks

    def spy(tensors, what="tensors", rtol=1e-6):
        seen["rotations"] = [t.detach().clone() for t in tensors]
        return real_check(tensors, what, rtol)

    monkeypatch_module.check_same_on_all_ranks = spy
    try:
        model, arch = tiny()
        calib, ev = data()
        events = list(train(model, arch, calib, ev, cfg, key=key, resume=resume))
    finally:
        monkeypatch_module.check_same_on_all_ranks = real_check
    metrics = lambda name: [(e.step, e.value) for e in events if isinstance(e, Metric) and e.name == name]  # noqa
    done = events[-1]
    assert isinstance(done, Done)
    return {
        "losses": metrics("loss"),
        "ppl": metrics("ppl"),
        "rotations": seen["rotations"],
        "path": done.result.path,
        "file_exists": Path(done.result.path).exists(),
    }


RESUME = dict(method="spinquant", steps=3)  # the stop-and-resume scenario: stopped after step 1 of 3


def stop_after_first_step(key: str) -> None:
    """Start a run and close it after its first step, as the Optimize page's Stop does (checkpointed on close)."""
    model, arch = tiny()
    calib, ev = data()
    run = train(model, arch, calib, ev, config(**RESUME), key=key, resume=False)
    for event in run:
        if isinstance(event, Metric) and event.name == "loss" and event.step == 1:
            break
    run.close()


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    """One spawned rank: join the group as torchrun would, run every scenario, save what it saw."""
    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock fails the test instead of hanging it
    torch.set_num_threads(1)
    cache = Path(out_dir) / f"cache{rank}"  # a private cache per rank: shows which rank writes files
    os.environ.update(
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        SPINSCOPE_CACHE=str(cache),
    )
    info = distributed.init_from_env()
    try:
        out = {"info": info, "current": distributed.current(), "is_main": distributed.current().is_main}
        for method in METHODS:
            out[method] = train_recording(method, distributed)
        out["checkpoints"] = (
            sorted(p.name for p in (cache / "optimize").glob("*")) if (cache / "optimize").exists() else []
        )
        stop_after_first_step("ddp-resume")  # every rank stops at the same step, as a Stop in a torchrun job would
        out["resume"] = train_recording("spinquant", distributed, cfg=config(**RESUME), key="ddp-resume")
        model, arch = tiny()
        calib, ev = data()
        try:  # 3 windows per step cannot be split over 2 ranks: every rank refuses, none waits for the other
            list(train(model, arch, calib, ev, config("spinquant", batch=3)))
            out["odd_batch_error"] = None
        except ValueError as e:
            out["odd_batch_error"] = str(e)
        try:  # ranks that disagree are caught
            distributed.check_same_on_all_ranks([torch.eye(3), torch.full((2, 2), float(rank))], "probe tensors")
            out["mismatch_error"] = None
        except RuntimeError as e:
            out["mismatch_error"] = str(e)
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    torch.multiprocessing.spawn(_rank_main, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out_dir


@pytest.fixture
def single(tmp_cache):
    return {method: train_recording(method, distributed) for method in METHODS}


def test_ranks_join_one_group_as_torchrun_describes_it(ranks):
    results, _ = ranks
    for r, res in enumerate(results):
        assert (res["info"].rank, res["info"].world_size, res["info"].local_rank) == (r, WORLD, r)
        assert res["info"].device == "cpu" and res["current"] == res["info"]
        assert res["is_main"] == (r == 0)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_train_the_same_rotations_as_one(method, ranks, single):
    results, _ = ranks
    rank0, rank1 = results[0][method], results[1][method]
    ref = single[method]
    assert len(rank0["rotations"]) == len(ref["rotations"]) == (1 + LAYERS if method == "spinquant" else 1 + 3 * LAYERS)
    for a, b, s in zip(rank0["rotations"], rank1["rotations"], ref["rotations"], strict=False):
        assert torch.equal(a, b), "the ranks' rotations differ"
        torch.testing.assert_close(a, s, atol=1e-5, rtol=0)
    start = LearnedRotations(tiny()[1], method, 16, 0).manifold_params()  # training moved R1 well beyond the
    assert (rank0["rotations"][0] - start[0].detach()).abs().max() > 3e-4  # tolerance: not two starts compared
    # the reported loss is the mean over ranks: the same on both, and the single-process mean over the batch
    assert [s for s, _ in rank0["losses"]] == [1, 2]
    assert rank0["losses"] == rank1["losses"]
    assert [v for _, v in rank0["losses"]] == pytest.approx([v for _, v in ref["losses"]], abs=1e-5)
    assert ref["losses"][0][1] != pytest.approx(ref["losses"][1][1], abs=1e-6), "the second step saw other windows"


@pytest.mark.parametrize("method", METHODS)
def test_only_rank_zero_evaluates_and_writes_files(method, ranks, single):
    results, out_dir = ranks
    rank0, rank1 = results[0][method], results[1][method]
    assert [s for s, _ in rank0["ppl"]] == [0, 1, 2] and rank1["ppl"] == []
    assert [v for _, v in rank0["ppl"]] == pytest.approx([v for _, v in single[method]["ppl"]], rel=1e-4)
    assert rank0["file_exists"] and not rank1["file_exists"]
    learned = load_rotations(rank0["path"])  # what rank 0 exported is what every rank trained
    exported = [learned.r1, *learned.r2] + ([*learned.r3, *learned.r4] if method == "flrot" else [])
    for a, b in zip(exported, rank0["rotations"], strict=False):
        assert torch.equal(a, b)
    if method == "flrot":  # the run with a key checkpointed, on rank 0 only
        assert results[0]["checkpoints"] == ["ddp-test"] and results[1]["checkpoints"] == []
        assert not (out_dir / "cache1" / "rotations").exists()


def test_a_stopped_two_process_run_resumes_to_the_uninterrupted_result(ranks, tmp_cache):
    results, out_dir = ranks
    full = train_recording("spinquant", distributed, cfg=config(**RESUME), key=None)  # one process, no stop
    rank0, rank1 = results[0]["resume"], results[1]["resume"]
    # rank 0 checkpointed step 1 when the run was closed; the resumed run went on from step 2 on both ranks
    assert [s for s, _ in rank0["losses"]] == [2, 3] and rank0["losses"] == rank1["losses"]
    assert [v for _, v in rank0["losses"]] == pytest.approx([v for s, v in full["losses"] if s >= 2], abs=1e-5)
    for a, b, s in zip(rank0["rotations"], rank1["rotations"], full["rotations"], strict=True):
        assert torch.equal(a, b), "the ranks' rotations differ after the resume"
        torch.testing.assert_close(a, s, atol=1e-5, rtol=0)
    assert (out_dir / "cache0" / "optimize" / "ddp-resume").exists()
    assert not (out_dir / "cache1" / "optimize").exists()


def test_batch_not_divisible_by_the_world_size_is_refused(ranks):
    results, _ = ranks
    for res in results:
        assert res["odd_batch_error"] is not None and "not divisible by the 2 processes" in res["odd_batch_error"]
    assert distributed.local_batch(6, 3, 2) == slice(4, 6)
    with pytest.raises(
        ValueError,
        match=r"batch \(3 windows per step\) is not divisible by the 2 processes; use "
        r"a multiple of 2 \(e.g. 4\)",
    ):
        distributed.local_batch(3, 2, 0)
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        distributed.local_batch(4, 2, 2)


def test_ranks_that_disagree_are_caught(ranks):
    results, _ = ranks
    for res in results:
        assert (
            res["mismatch_error"] is not None and "probe tensors differ across ranks (tensor 1" in res["mismatch_error"]
        )


def test_a_single_process_needs_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.init_from_env()
    assert (info.rank, info.world_size, info.distributed, info.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()
    assert distributed.local_batch(3, 1, 0) == slice(0, 3)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR is not set; start the processes with torchrun"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        distributed.init_from_env()


def test_optimize_command_prints_losses_and_the_file_in_one_process(tiny_model_dir, tmp_cache, capsys):
    from engine.__main__ import main

    argv = [
        "optimize",
        "--model",
        str(tiny_model_dir),
        "--steps",
        "2",
        "--windows",
        "2",
        "--window",
        "16",
        "--batch",
        "2",
        "--eval-every",
        "0",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out if line.startswith("step ")] == [["step", "1/2"], ["step", "2/2"]]
    assert out[-1].startswith("rotations: ") and Path(out[-1].split(": ", 1)[1]).exists()
    assert main(argv) == 0 and "nothing to train" in capsys.readouterr().out  # resumed from the finished run
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "steps must be a positive integer"),
        ("--method", "quarot", "method must be one of spinquant, flrot"),
        ("--bits", "16-16-16", "rotation invariant"),
    ],
)
def test_optimize_command_refuses_bad_values(flag, value, message, tmp_cache, capsys):
    from engine.__main__ import main

    assert main(["optimize", flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
