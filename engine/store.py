"""The on-disk results cache (cache/): content-addressed entries, atomic writes, corruption detected on read.

An entry is a directory <kind>/<key>/ holding meta.json and tensors.safetensors. meta.json carries the SHA-256 of
the tensor file and of its own metadata (figures such as an evaluation's perplexity live there), so a truncated or
altered entry is found on load, removed and recomputed: never shown.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SCHEMA_VERSION = 2  # 2: the metadata is checksummed too
_REPO_CACHE = Path(__file__).resolve().parent.parent / "cache"


def cache_root() -> Path:
    root = Path(os.environ.get("SPINSCOPE_CACHE", _REPO_CACHE))
    root.mkdir(parents=True, exist_ok=True)
    return root


def make_key(**parts) -> str:
    """Stable key over everything that determines a result, the schema version included."""
    blob = json.dumps({"schema": SCHEMA_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes: how an input file (e.g. a rotation file) enters a cache key, by content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_json(meta: dict) -> dict:
    """The metadata as it reads back from meta.json (int keys become strings, tuples lists; order kept)."""
    return json.loads(json.dumps(meta, default=str))


def _meta_digest(meta: dict) -> str:
    """SHA-256 of JSON metadata (as read back), independent of key order."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def entry_dir(kind: str, key: str) -> Path:
    return cache_root() / kind / key


def save(kind: str, key: str, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write to a private temporary directory, then rename it into place (atomic on one filesystem)."""
    final = entry_dir(kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensor_path = tmp / "tensors.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensor_path))
        record = {
            "schema": SCHEMA_VERSION,
            "kind": kind,
            "key": key,
            "tensors_sha256": file_digest(tensor_path),
            "meta_sha256": _meta_digest(_as_json(meta)),
            "meta": _as_json(meta),
        }
        (tmp / "meta.json").write_text(json.dumps(record, indent=1, default=str))
        if final.exists():  # a rename cannot replace a non-empty directory: move the old one aside first
            trash = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load(kind: str, key: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The entry, or None when absent; a corrupt or partial entry is deleted and reported as absent."""
    d = entry_dir(kind, key)
    if not d.exists():
        return None
    try:
        record = json.loads((d / "meta.json").read_text())
        if record.get("schema") != SCHEMA_VERSION or record.get("key") != key:
            raise ValueError("schema or key mismatch")
        tensor_path = d / "tensors.safetensors"
        tensors_ok = file_digest(tensor_path) == record["tensors_sha256"]
        if not tensors_ok or _meta_digest(record["meta"]) != record["meta_sha256"]:
            raise ValueError("checksum mismatch")
        return record["meta"], load_file(str(tensor_path))
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        shutil.rmtree(d, ignore_errors=True)
        return None


def save_json(kind: str, key: str, meta: dict) -> Path:
    return save(kind, key, meta, {})


def entries(kind: str) -> list[str]:
    d = cache_root() / kind
    return sorted(p.name for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.exists() else []
