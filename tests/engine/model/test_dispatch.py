"""Models dispatched over CPU and disk (accelerate): the same logits, statistics, rotated logits, fake-quantized
perplexity and zero-shot scores as the model on one device; placement plans and refusals."""

import hashlib
from pathlib import Path

import pytest
import torch

from engine.evaluate import EvalConfig, eval_job
from engine.events import Done
from engine.model import dispatch
from engine.model.dispatch import PlacementError
from engine.model.loading import ModelLoadError, load_model, plan_model
from engine.observe.capture import CaptureConfig, capture
from engine.rotation.fusion import RotationConfig, logits, rotate

# Layers 1-2 and the final norm on disk, the rest on the CPU; lm_head asks for disk but is tied to the embedding.
SPLIT = {
    "model.embed_tokens": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "disk",
    "model.layers.3": "cpu",
    "model.norm": "disk",
    "model.rotary_emb": "cpu",
    "lm_head": "disk",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 4-layer random Llama with tied embeddings and the default model's tokenizer, saved to disk."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a few outlier channels, so statistics and quantization have something to show
        model.model.embed_tokens.weight[:, :3] *= 20
    path = tmp_path_factory.mktemp("tiny_dispatch")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def handles(model_dir, tmp_cache):
    single = load_model(str(model_dir), "float32", device="cpu")
    split = load_model(str(model_dir), "float32", device_map=SPLIT, offload_disk=True)
    return single, split


def ids(n=2, t=32, seed=0):
    return torch.randint(0, 2000, (n, t), generator=torch.Generator().manual_seed(seed))


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_split_model_really_is_offloaded_and_computes_the_same_logits(handles):
    single, split = handles
    assert split.dispatched and not single.dispatched
    assert split.placement.devices == ["cpu", "disk"]
    q_disk = split.arch.module(split.model, "q", 1)
    assert dispatch.is_offloaded(q_disk) and q_disk.weight.device.type == "meta"
    assert not dispatch.is_offloaded(split.arch.module(split.model, "q", 0))
    assert "dispatched" in split.note and "disk" in split.note
    # lm_head is tied to the embedding in the files: the plan keeps it with its twin on the CPU, and says so
    assert split.placement.device_map["lm_head"] == "cpu" and any("tied" in n for n in split.placement.notes)
    assert torch.equal(logits(single.model, ids()), logits(split.model, ids()))


def test_capture_gives_the_same_statistics(handles):
    single, split = handles
    cfg = CaptureConfig(tokens=64, window=32)
    results = []
    for h in handles:
        *_, done = capture(h.model, h.arch, ids(), cfg)
        results.append(done.result.table.set_index(["layer", "site"]).sort_index())
    a, b = results
    assert list(a.columns) == list(b.columns) and len(a) == 4 * len(cfg.sites)
    numeric = a.select_dtypes("number").columns
    assert torch.allclose(
        torch.tensor(a[numeric].to_numpy(float)),
        torch.tensor(b[numeric].to_numpy(float)),
        rtol=1e-9,
        atol=0,
        equal_nan=True,
    )


def test_rotating_in_place_gives_the_rotated_logits_and_never_writes_the_model_files(handles, model_dir):
    single, split = handles
    files = {p: digest(p) for p in model_dir.glob("*.safetensors")}
    cfg = RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard", seed=3)
    want = logits(rotate(single.model, single.arch, cfg), ids())
    with pytest.raises(ValueError, match="in place"):
        rotate(split.model, split.arch, cfg)  # a copy of a dispatched model is refused
    with split.working_model() as model:
        got = logits(rotate(model, split.arch, cfg, inplace=True), ids())
        q_disk = split.arch.module(model, "q", 1)
        folder = Path(q_disk._hf_hook.weights_map.dataset.save_folder)  # this load's own offload folder
        assert any(p.suffix == ".dat" for p in folder.iterdir())  # edits of disk weights were written there
        assert not torch.allclose(
            dispatch.read_tensor(q_disk), single.arch.module(single.model, "q", 1).weight, atol=1e-3
        )  # and the forward reads them
    assert torch.allclose(got, want, atol=1e-5, rtol=0)
    # the job's end reloaded the original, and the model's own files were never written
    assert torch.equal(logits(split.model, ids()), logits(single.model, ids()))
    assert {p: digest(p) for p in model_dir.glob("*.safetensors")} == files


@pytest.mark.slow
@pytest.mark.parametrize("recipe,weights", [("quarot", "rtn"), ("quarot", "gptq")])
def test_fake_quantized_evaluation_matches(handles, recipe, weights):
    from engine.quant.recipes import get_recipe

    cfg = EvalConfig(tokens=128, window=64, calib_tokens=128, calib_window=64)
    results = []
    for h in handles:
        *_, done = eval_job(h, get_recipe(recipe, weights=weights), "4-4-4", cfg, use_cache=False)
        assert isinstance(done, Done)
        results.append(done.result["ppl"])
    # exactly: both placements run the same float32 operations on the CPU (the disk only stores weights)
    assert results[0] == results[1], results
    fp = [list(eval_job(h, "fp", "16-16-16", cfg, use_cache=False))[-1].result["ppl"] for h in handles]
    assert fp[0] == fp[1], fp
    assert results[0] != pytest.approx(fp[0], rel=1e-3)


@pytest.mark.slow
def test_zero_shot_runs_on_the_dispatched_model(handles):
    cfg = EvalConfig(tokens=64, window=64, tasks=("piqa",), limit=4)
    scores = [list(eval_job(h, "fp", "16-16-16", cfg, use_cache=False))[-1].result["tasks"]["piqa"] for h in handles]
    assert scores[0]["n"] == scores[1]["n"] == 4
    assert scores[0]["acc"] == scores[1]["acc"]


def test_plan_refuses_what_cannot_fit_without_disk(model_dir, tmp_cache):
    with pytest.raises(PlacementError, match="does not fit.*allow disk offload"):
        plan_model(str(model_dir), "float32", "cpu=1MiB")
    with pytest.raises(PlacementError, match="does not fit"):
        load_model(str(model_dir), "float32", max_memory="cpu=1MiB")
    plan = plan_model(str(model_dir), "float32", "cpu=1MiB", offload_disk=True)
    assert plan.devices == ["disk"] and plan.total_bytes > 12 * 2**20
    fits = plan_model(str(model_dir), "float16", "cpu=1GiB")
    assert fits.devices == ["cpu"] and fits.total_bytes == pytest.approx(plan.total_bytes / 2, rel=0.01)
    assert "float16" in fits.summary() and fits.rows()[0]["device"] == "cpu"


def test_bad_budgets_and_maps_are_refused(model_dir, tmp_cache):
    for text, match in [
        ("cpu:20GiB", "device=size"),
        ("cpu=lots", "memory size"),
        ("tpu=1GiB", "unknown device"),
        ("cuda:7=1GiB", "not present"),
    ]:
        with pytest.raises(PlacementError, match=match):
            dispatch.parse_max_memory(text)
    with pytest.raises(PlacementError, match="unplaced"):
        plan_model(str(model_dir), "float32", device_map={"model.embed_tokens": "cpu"})
    with pytest.raises(PlacementError, match="does not have"):
        plan_model(str(model_dir), "float32", device_map={**SPLIT, "model.layers.9": "cpu"})
    with pytest.raises(ModelLoadError, match="dtype"):
        plan_model(str(model_dir), "int8")


def test_cli_plan_prints_the_placement_or_refuses(model_dir, tmp_cache, capsys):
    from engine.__main__ import main

    assert main(["plan", "--model", str(model_dir), "--dtype", "float32", "--max-memory", "cpu=1MiB"]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert (
        main(["plan", "--model", str(model_dir), "--dtype", "float32", "--max-memory", "cpu=1MiB", "--offload-disk"])
        == 0
    )
    out = capsys.readouterr().out
    assert "disk" in out and "MiB of float32 weights" in out
