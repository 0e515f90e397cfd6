"""Rotation files in SpinQuant's layout: import, export, validation.

SpinQuant's optimize_rotation.py saves one torch file (R.bin): a dict of float32 tensors taken from the trained
model's state dict with ".weight" stripped, i.e. "R1" [hidden, hidden] and "model.layers.{i}.self_attn.R2"
[head_dim, head_dim] for every layer; its ptq.py reads exactly those two keys. The fusion conventions are the
ones of engine.rotation.fusion (readers W <- W R1, writers W <- R1^T W; v rows per head R2^T W_v,h, o columns W_o,h R2),
so a file moves between the two code bases unchanged.

FLRot adds per-layer online rotations that SpinQuant's code ignores: "model.layers.{i}.self_attn.R3"
[head_dim, head_dim] and "model.layers.{i}.mlp.R4", either dense [intermediate, intermediate] or as its diagonal
blocks [n_blocks, block, block] (12x smaller for 128-wide blocks); engine.rotation.fusion reads both forms. A
block R4 learned after a channel permutation adds "model.layers.{i}.mlp.R4_perm" (int64 [intermediate], new
position -> old channel), fused exactly into gate/up rows and down_proj columns before R4.

Layer-wise training (engine.learn.layerwise) also learns clip ratios: "model.layers.{i}.clip.{site}" holds one
scalar in (0, 1] per quantizer site of the layer (attn_in, o_in, mlp_in, down_in: the linears' inputs; k_cache,
v_cache: the KV cache). Files without them (every file before) load as before; SpinQuant's code ignores the extra
keys.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from engine.model.arch import ArchInfo
from engine.rotation.orthogonal import orthogonality_error

if TYPE_CHECKING:
    from engine.rotation.fusion import RotationConfig

R1_KEY = "R1"
ORTHO_TOL = 1e-3  # what engine.rotation.fusion accepts
LOW_PRECISION_TOL = 5e-2  # a bf16/fp16 file is this far off at most; import re-orthonormalises it


def r2_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.R2"


def r4_perm_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.R4_perm"


def clip_key(layer: int, site: str) -> str:
    return f"model.layers.{layer}.clip.{site}"


def r3_key(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.R3"


def r4_key(layer: int) -> str:
    return f"model.layers.{layer}.mlp.R4"


def dense(r: torch.Tensor) -> torch.Tensor:
    """[n, n] as is; [n_blocks, b, b] -> the block-diagonal [n_blocks * b, n_blocks * b]."""
    return torch.block_diag(*r.unbind(0)) if r.dim() == 3 else r


def nearest_orthogonal(r: torch.Tensor) -> torch.Tensor:
    """The polar factor U V^T of R = U S V^T (the closest orthogonal matrix in Frobenius norm), float64; works on
    [n, n] and on blocks [n_blocks, b, b]."""
    u, _, vh = torch.linalg.svd(r.double())
    return u @ vh


ROTATION_FILE_LAYOUT = "a torch.save'd dict of tensors in SpinQuant's layout ('R1', 'model.layers.{i}.self_attn.R2')"


def load_rotation_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a rotation file; any other file is refused in one sentence (never torch's own advice, which
    suggests the unsafe weights_only=False)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"rotation file {path} not found: expected {ROTATION_FILE_LAYOUT}")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        with open(p, "rb") as f:
            head = f.read(4)
        found = (
            "a torch file holding objects other than tensors"
            if "weights_only" in str(e) and head[:2] == b"PK"
            else f"a file of {p.stat().st_size} bytes that torch cannot read"
        )
        raise ValueError(f"{path} is not a rotation file: expected {ROTATION_FILE_LAYOUT}, found {found}") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        found = type(data).__name__ if not isinstance(data, dict) else "a dict with non-tensor values"
        raise ValueError(f"{path} is not a rotation file: expected {ROTATION_FILE_LAYOUT}, found {found}")
    return data


@dataclass
class RotationSet:
    """R1 [hidden, hidden], one R2 [head_dim, head_dim] per layer, optional per-layer R3 and R4 (FLRot)."""

    r1: torch.Tensor
    r2: list[torch.Tensor]
    r3: list[torch.Tensor] | None = None
    r4: list[torch.Tensor] | None = None  # each [inter, inter] or blocks [n_blocks, block, block]
    r4_perm: list[torch.Tensor] | None = None  # each int64 [inter]: the channel order R4's blocks act on
    clips: list[dict[str, float]] | None = None  # per layer {site: learned clip ratio in (0, 1]}

    def __post_init__(self):
        n = len(self.r2)
        for name, rs in (("R3", self.r3), ("R4", self.r4), ("R4_perm", self.r4_perm), ("clip ratios", self.clips)):
            if rs is not None and len(rs) != n:
                raise ValueError(f"{name} has {len(rs)} layers but R2 has {n}; give one per decoder layer")

    @property
    def n_layers(self) -> int:
        return len(self.r2)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """SpinQuant's keys (float32, contiguous), plus the FLRot keys when present."""
        out = {R1_KEY: self.r1}
        out.update({r2_key(i): r for i, r in enumerate(self.r2)})
        for rs, key in ((self.r3, r3_key), (self.r4, r4_key)):
            if rs is not None:
                out.update({key(i): r for i, r in enumerate(rs)})
        out = {k: v.detach().float().contiguous().cpu() for k, v in out.items()}
        out.update({r4_perm_key(i): p.detach().long().contiguous().cpu() for i, p in enumerate(self.r4_perm or [])})
        out.update(
            {
                clip_key(i, site): torch.tensor(float(r))
                for i, layer in enumerate(self.clips or [])
                for site, r in layer.items()
            }
        )
        return out

    def rotation_config(self, path: str | os.PathLike) -> RotationConfig:
        """What engine.rotation.fusion.rotate needs for this file: learned online rotations come from the file too,
        otherwise R3/R4 are random Hadamard (SpinQuant's fixed online rotations)."""
        from engine.rotation.fusion import RotationConfig  # fusion reads files with this module: import it late

        return RotationConfig(
            r1="file",
            r2="file",
            r3="file" if self.r3 is not None else "hadamard",
            r4="file" if self.r4 is not None else "hadamard",
            file=str(path),
        )


def check_against(rs: RotationSet, arch: ArchInfo, tol: float = ORTHO_TOL) -> None:
    """ValueError unless every matrix has the model's shape and is orthogonal within `tol`."""
    if rs.n_layers != arch.n_layers:
        raise ValueError(f"the rotation file has R2 for {rs.n_layers} layers; the model has {arch.n_layers}")
    hd, inter = arch.head_dim, arch.intermediate
    checks = [("R1", rs.r1, (arch.hidden, arch.hidden))]
    checks += [(f"R2 of layer {i}", r, (hd, hd)) for i, r in enumerate(rs.r2)]
    checks += [(f"R3 of layer {i}", r, (hd, hd)) for i, r in enumerate(rs.r3 or [])]
    for name, r, shape in checks:
        if tuple(r.shape) != shape:
            raise ValueError(f"{name} is {tuple(r.shape)}; this model needs {shape}")
    for i, r in enumerate(rs.r4 or []):
        if r.dim() == 3 and (r.shape[1] != r.shape[2] or r.shape[0] * r.shape[1] != inter):
            raise ValueError(f"R4 blocks of layer {i} are {tuple(r.shape)}; they must tile {inter} channels")
        if r.dim() == 2 and tuple(r.shape) != (inter, inter):
            raise ValueError(f"R4 of layer {i} is {tuple(r.shape)}; this model needs ({inter}, {inter})")
        checks.append((f"R4 of layer {i}", r, None))
    for i, perm in enumerate(rs.r4_perm or []):
        if not torch.equal(torch.sort(perm.long()).values, torch.arange(inter)):
            raise ValueError(f"R4_perm of layer {i} is not a permutation of this model's {inter} channels")
    for i, layer in enumerate(rs.clips or []):
        for site, r in layer.items():
            if not 0 < r <= 1:
                raise ValueError(f"the clip ratio of {site} in layer {i} is {r}; clip ratios must be in (0, 1]")
    for name, r, _ in checks:
        err = float(orthogonality_error(r).max())
        if not err <= tol:
            raise ValueError(f"{name} is not orthogonal (max |R^T R - I| = {err:.2e} > {tol:g})")


def from_state_dict(data: dict[str, torch.Tensor]) -> RotationSet:
    """Parse SpinQuant's keys (and FLRot's); per-layer keys are counted from layer 0 up."""
    if R1_KEY not in data:
        raise ValueError(f"not a SpinQuant rotation file: no 'R1' key (keys: {sorted(data)[:6]}...)")
    n = 0
    while r2_key(n) in data:
        n += 1
    if n == 0:
        raise ValueError("the rotation file has R1 but no 'model.layers.0.self_attn.R2'")

    def per_layer(key) -> list | None:
        present = [key(i) in data for i in range(n)]
        if not any(present):
            return None
        if not all(present):
            raise ValueError(
                f"the rotation file has {key(0).rsplit('.', 1)[-1]} for only some layers "
                f"(missing layer {present.index(False)})"
            )
        return [data[key(i)] for i in range(n)]

    prefixes = [clip_key(i, "") for i in range(n)]
    clips = [{k[len(p) :]: float(v) for k, v in data.items() if k.startswith(p)} for p in prefixes]
    return RotationSet(
        data[R1_KEY],
        [data[r2_key(i)] for i in range(n)],
        per_layer(r3_key),
        per_layer(r4_key),
        per_layer(r4_perm_key),
        clips if any(clips) else None,
    )


def save_rotations(rs: RotationSet, path: str | os.PathLike, spinquant_only: bool = False) -> Path:
    """torch.save the SpinQuant-layout dict atomically (temporary file, then rename). spinquant_only drops R3/R4."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = rs.state_dict()
    if spinquant_only:
        data = {k: v for k, v in data.items() if k == R1_KEY or k.endswith(".R2")}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_rotations(path: str | os.PathLike, arch: ArchInfo | None = None) -> RotationSet:
    """Read and parse a rotation file; with `arch`, also check shapes and orthogonality for that model."""
    rs = from_state_dict(load_rotation_file(str(path)))
    if arch is not None:
        check_against(rs, arch)
    return rs


def import_spinquant(src: str | os.PathLike, dst: str | os.PathLike, arch: ArchInfo) -> Path:
    """Bring a file written by SpinQuant's code (possibly bf16/fp16) here: check it against the model, replace
    every matrix by its nearest orthogonal matrix (undoing low-precision rounding) and save it as float32."""
    rs = from_state_dict(load_rotation_file(str(src)))
    check_against(rs, arch, tol=LOW_PRECISION_TOL)
    fix = nearest_orthogonal
    fixed = RotationSet(
        fix(rs.r1),
        [fix(r) for r in rs.r2],
        None if rs.r3 is None else [fix(r) for r in rs.r3],
        None if rs.r4 is None else [fix(r) for r in rs.r4],
        rs.r4_perm,
        rs.clips,
    )
    return save_rotations(fixed, dst)


def export_spinquant(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """A copy of a rotation file with only SpinQuant's keys (R1 and each R2), for its ptq.py."""
    return save_rotations(from_state_dict(load_rotation_file(str(src))), dst, spinquant_only=True)
