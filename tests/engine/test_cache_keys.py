"""Cache keys that cannot serve stale numbers: a rotation file enters every key by its content (not its path),
capture keys carry the statistics' code version, and an edited evaluation entry (meta.json) is detected and
recomputed rather than shown."""

import json
import shutil

import torch

from engine import store
from engine.evaluate import EvalConfig, eval_job, run_key
from engine.events import Done
from engine.model.loading import load_model
from engine.observe import capture, stats
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig


def write_rotation_file(path, arch, seed):
    g = torch.Generator().manual_seed(seed)
    orth = lambda n: torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]  # noqa: E731
    data = {"R1": orth(arch.hidden)}
    data |= {f"model.layers.{i}.self_attn.R2": orth(arch.head_dim) for i in range(arch.n_layers)}
    torch.save(data, path)
    return path


def test_a_rotation_file_keys_by_content_not_path(tiny_model_dir, tmp_path):
    handle = load_model(str(tiny_model_dir))
    cfg = EvalConfig(tokens=64, window=32)
    a = write_rotation_file(tmp_path / "a.bin", handle.arch, seed=1)
    b = tmp_path / "elsewhere.bin"
    shutil.copy(a, b)
    key = lambda path: run_key(handle, get_recipe("rotated", rotation_file=str(path)), Bits(4, 4, 4), cfg)  # noqa: E731
    key_a = key(a)
    assert key(b) == key_a  # same rotations under another name: same entry
    write_rotation_file(a, handle.arch, seed=2)  # new rotations under the old name: a new entry
    assert key(a) != key_a
    tag_a = RotationConfig(r1="file", r2="file", file=str(a)).tag()
    assert tag_a != RotationConfig(r1="file", r2="file", file=str(b)).tag()  # capture keys use the tag
    assert "a.bin@" in tag_a


def test_capture_keys_carry_the_statistics_code_version(monkeypatch):
    cfg = capture.CaptureConfig(tokens=64, window=32)
    before = capture.cache_key("model", "corpus", cfg)
    monkeypatch.setattr(stats, "CODE_VERSION", stats.CODE_VERSION + "-changed")
    assert capture.cache_key("model", "corpus", cfg) != before


def test_an_edited_evaluation_entry_is_recomputed_not_shown(tiny_model_dir):
    handle = load_model(str(tiny_model_dir))
    cfg = EvalConfig(tokens=64, window=32)

    def ppl(use_cache=True):
        done = [e for e in eval_job(handle, "rtn", "4-16-16", cfg, use_cache=use_cache) if isinstance(e, Done)][-1]
        return done.result["ppl"], done.cached

    computed, cached = ppl()
    assert not cached
    assert ppl() == (computed, True)
    meta = store.entry_dir("eval", run_key(handle, get_recipe("rtn"), Bits(4, 16, 16), cfg)) / "meta.json"
    record = json.loads(meta.read_text())
    record["meta"]["ppl"] = 1.5  # someone "improves" a cached figure
    meta.write_text(json.dumps(record))
    again, cached = ppl()
    assert not cached and again == computed  # recomputed, never the edited 1.5
