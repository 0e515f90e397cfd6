"""The results cache: keys, round trip, atomic writes, and corrupt entries detected, removed and reported absent."""

import json
import os
import shutil

import pytest
import torch

from engine import store


def tensors(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(5, 7, generator=g), "b": torch.arange(4), "c": torch.rand(3, generator=g).bfloat16()}


def test_cache_root_follows_the_environment(tmp_cache):
    assert store.cache_root() == tmp_cache
    path = store.save("capture", "k1", {"x": 1}, tensors())
    assert path == tmp_cache / "capture" / "k1" and path.is_dir()


def test_round_trip_returns_what_was_saved():
    meta = {"model": "tiny", "table": {"kurt": [3.0, float("nan")]}, "n": 3}
    store.save("capture", "k1", meta, tensors())
    got_meta, got = store.load("capture", "k1")
    assert got_meta["model"] == "tiny" and got_meta["n"] == 3 and got_meta["table"]["kurt"][0] == 3.0
    assert got.keys() == tensors().keys()
    for name, t in tensors().items():
        assert torch.equal(got[name], t) and got[name].dtype == t.dtype
    assert store.entries("capture") == ["k1"]
    assert store.load("capture", "absent") is None


def test_save_replaces_an_existing_entry_and_leaves_nothing_aside():
    store.save("capture", "k1", {"v": 1}, tensors(0))
    store.save("capture", "k1", {"v": 2}, tensors(1))
    meta, got = store.load("capture", "k1")
    assert meta["v"] == 2 and torch.equal(got["a"], tensors(1)["a"])
    assert sorted(p.name for p in (store.cache_root() / "capture").iterdir()) == ["k1"]


def test_key_covers_every_part_and_the_schema(monkeypatch):
    parts = dict(kind="capture", model="m", corpus="c", tokens=2048, window=512, rotation="none")
    key = store.make_key(**parts)
    assert key == store.make_key(**dict(reversed(list(parts.items()))))  # order of arguments does not matter
    for name, other in (("model", "m2"), ("corpus", "c2"), ("tokens", 1024), ("window", 256), ("rotation", "R1")):
        assert store.make_key(**{**parts, name: other}) != key, name
    monkeypatch.setattr(store, "SCHEMA_VERSION", store.SCHEMA_VERSION + 1)
    assert store.make_key(**parts) != key


def test_crash_between_write_and_rename_leaves_no_entry(monkeypatch):
    """The process dies after writing the temporary directory and before renaming it: nothing appears, the
    leftover temporary directory is never read, and a later save of the same key works."""
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def crash(src, dst):
        if os.path.basename(src).startswith(".tmp-"):
            raise OSError("simulated crash before rename")
        real_replace(src, dst)

    def keep_tmp(path, *args, **kwargs):  # a killed process runs no cleanup
        if not os.path.basename(path).startswith(".tmp-"):
            real_rmtree(path, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(OSError, match="simulated crash"):
        patch.setattr(os, "replace", crash)
        patch.setattr(shutil, "rmtree", keep_tmp)
        store.save("capture", "k1", {"v": 1}, tensors())

    leftovers = [p for p in (store.cache_root() / "capture").iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-k1")
    assert (leftovers[0] / "meta.json").is_file() and (leftovers[0] / "tensors.safetensors").is_file()
    assert store.load("capture", "k1") is None
    assert store.entries("capture") == []
    store.save("capture", "k1", {"v": 2}, tensors())
    assert store.load("capture", "k1")[0]["v"] == 2


def test_failed_write_cleans_up_and_leaves_no_entry(monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        store.save("capture", "k1", {"v": 1}, tensors())
    assert list((store.cache_root() / "capture").iterdir()) == []


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:50])


DAMAGE = {
    "flipped byte": lambda d: _flip(d / "tensors.safetensors"),
    "truncated tensors": lambda d: _truncate(d / "tensors.safetensors"),
    "empty tensors": lambda d: (d / "tensors.safetensors").write_bytes(b""),
    "missing tensors": lambda d: (d / "tensors.safetensors").unlink(),
    "broken meta.json": lambda d: (d / "meta.json").write_text('{"schema": 1, "key": '),
    "missing meta.json": lambda d: (d / "meta.json").unlink(),
    "meta without checksum": lambda d: (d / "meta.json").write_text(json.dumps({"schema": 1, "key": "k1"})),
    "other schema": lambda d: (d / "meta.json").write_text(
        (d / "meta.json").read_text().replace(f'"schema": {store.SCHEMA_VERSION}', '"schema": 999')
    ),
    "edited figure": lambda d: (d / "meta.json").write_text((d / "meta.json").read_text().replace('"v": 1', '"v": 7')),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_corrupt_entry_is_detected_removed_and_reported_absent(damage):
    store.save("capture", "k1", {"v": 1}, tensors(0))
    store.save("capture", "k2", {"v": 2}, tensors(1))
    entry = store.entry_dir("capture", "k1")
    DAMAGE[damage](entry)
    assert store.load("capture", "k1") is None
    assert not entry.exists()
    meta, got = store.load("capture", "k2")  # the neighbour is untouched
    assert meta["v"] == 2 and torch.equal(got["a"], tensors(1)["a"])
