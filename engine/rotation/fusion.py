"""Rotations R1-R4 of a LLaMA-style model (SpinQuant / QuaRot conventions).

`rotate(model, arch, cfg)` returns a rotated copy; the original is left untouched so before/after comparisons need
no reload. R1 and R2 are fused into the weights (in float64, cast back); R3 (queries and keys after RoPE) and R4
(down_proj input) run online as modules. HF linears compute y = x @ W.T with W [out, in].
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine import store
from engine.events import Done, Progress, run_to_end
from engine.model import attention, dispatch
from engine.model.arch import ArchInfo
from engine.rotation.algebra import rotated_bias, rotated_embedding, rotated_weight
from engine.rotation.files import ORTHO_TOL, load_rotation_file
from engine.rotation.hadamard import apply_hadamard, random_block_hadamard, random_hadamard, random_orthogonal
from engine.rotation.orthogonal import orthogonality_error

BLOCK_SIZES = (16, 32, 64, 128, 256)
# block<b>: block-diagonal random Hadamard (the block size of MXFP4 / NVFP4 groups, BRQ); block<b>p (R4 only): the
# same after a channel permutation that deals the outlier channels out over the blocks (fused into gate/up/down)
BLOCK_KINDS = tuple(f"block{b}" for b in BLOCK_SIZES)
PERMUTED_KINDS = tuple(f"{k}p" for k in BLOCK_KINDS)
KINDS = ("none", "hadamard", "orthogonal", "file") + BLOCK_KINDS + PERMUTED_KINDS
ROTATIONS = ("r1", "r2", "r3", "r4")
DENSE_ONLINE_MAX = 4096  # up to this width a dense matmul beats the transform on a CPU (BLAS vs Python-level FWHT)


@dataclass(frozen=True)
class RotationConfig:
    """Which rotation each of R1..R4 is: none (identity), random Hadamard, Haar-random orthogonal, or from `file`."""

    r1: str = "none"
    r2: str = "none"
    r3: str = "none"
    r4: str = "none"
    seed: int = 0
    file: str | None = None  # torch file: "R1", per-layer "model.layers.{i}.self_attn.R2", optional R3/R4
    fold_norms: bool = True  # required for R1; harmless (exact) otherwise

    def __post_init__(self):
        for r in ROTATIONS:
            if getattr(self, r) not in KINDS:
                raise ValueError(f"{r.upper()} kind must be one of {', '.join(KINDS)}, got {getattr(self, r)!r}")
            if getattr(self, r) in PERMUTED_KINDS and r != "r4":
                raise ValueError(
                    f"a channel permutation before the blocks ({getattr(self, r)}) is fused exactly only "
                    f"for R4 (the rows of gate/up and the columns of down_proj), not for {r.upper()}"
                )
        if self.file is None and any(getattr(self, r) == "file" for r in ROTATIONS):
            raise ValueError("a rotation of kind 'file' needs a rotation file")
        if self.r1 != "none" and not self.fold_norms:
            raise ValueError("R1 needs the RMSNorm scales folded into the linears (fold_norms=True)")

    @property
    def active(self) -> bool:
        return any(getattr(self, r) != "none" for r in ROTATIONS)

    @property
    def permutes(self) -> bool:
        """R4 deals the down_proj input channels out over its blocks first (needs calibration windows)."""
        return self.r4 in PERMUTED_KINDS

    def tag(self) -> str:
        """Short stable description for cache keys and labels; a rotation file by its name and content hash."""
        if not self.active:
            return "none"
        parts = [f"{r.upper()}={getattr(self, r)}" for r in ROTATIONS if getattr(self, r) != "none"]
        extra = f",seed={self.seed}" + (f",file={Path(self.file).name}@{self._file_digest()[:12]}" if self.file else "")
        return ",".join(parts) + extra

    def to_dict(self) -> dict:
        return asdict(self)

    def key(self) -> dict:
        """What a cache key holds: the settings, with a rotation file named by its content, not its path."""
        return self.to_dict() if not self.file else {**self.to_dict(), "file": f"sha256:{self._file_digest()}"}

    def _file_digest(self) -> str:
        try:
            return store.file_digest(self.file)
        except OSError as e:
            raise ValueError(f"cannot read rotation file {self.file}: {e.strerror or e}") from e

    @staticmethod
    def from_names(names: list[str], kind: str, seed: int = 0, file: str | None = None) -> RotationConfig:
        """RotationConfig.from_names(["R1", "R4"], "hadamard") -> those rotations of that kind, others none."""
        chosen = {n.strip().lower() for n in names if n.strip()}
        bad = chosen - set(ROTATIONS)
        if bad:
            raise ValueError(f"unknown rotations {sorted(bad)}; choose among R1, R2, R3, R4")
        return RotationConfig(**{r: (kind if r in chosen else "none") for r in ROTATIONS}, seed=seed, file=file)


class OnlineRotation(nn.Module):
    """x -> x @ R on the last dim. Three forms: a dense matrix (float32 matmul), a random Hadamard H diag(s) as a
    fast transform (O(n log n)), or block-diagonal blocks [nb, b, b] (FLRot), which run through the Triton kernel
    on a GPU in fp16/bf16 and a batched matmul elsewhere.

    A dense matrix of +-1 / sqrt(n) entries (a Hadamard) is kept as its +-1 matrix M and applied as
    (x @ M) / sqrt(n), in float32, as compressed-tensors' Hadamard transforms compute it: an exported checkpoint
    (engine.export) then computes bit for bit what the engine evaluated (a 4-bit row turns any one-ulp difference
    into a different network, tests/engine/test_export.py)."""

    def __init__(
        self,
        matrix: torch.Tensor | None = None,
        hadamard_signs: torch.Tensor | None = None,
        blocks: torch.Tensor | None = None,
    ):
        super().__init__()
        if sum(t is not None for t in (matrix, hadamard_signs, blocks)) != 1:
            raise ValueError("give exactly one of matrix, hadamard_signs or blocks")
        pm1 = None if matrix is None else pm1_form(matrix)
        self.register_buffer("matrix", None if matrix is None or pm1 is not None else matrix.float())
        self.register_buffer("pm1", pm1)
        self.register_buffer("signs", None if hadamard_signs is None else hadamard_signs.float())
        self.register_buffer("blocks", None if blocks is None else blocks.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            from kernels.blockdiag import blockdiag_rotate

            return blockdiag_rotate(x, self.blocks)
        dtype = x.dtype
        xf = x.float()
        if self.pm1 is not None:
            y = (xf @ self.pm1) / math.sqrt(self.pm1.shape[0])
        else:
            y = xf @ self.matrix if self.matrix is not None else apply_hadamard(xf) * self.signs
        return y.to(dtype)

    def dense(self) -> torch.Tensor:
        """The matrix R (float64; a dense one as the float32 values it was given)."""
        if self.pm1 is not None:
            return (self.pm1.double() / math.sqrt(self.pm1.shape[0])).float().double()
        if self.matrix is not None:
            return self.matrix.double()
        if self.blocks is not None:
            return torch.block_diag(*self.blocks.double())
        from engine.rotation.hadamard import hadamard_matrix

        return hadamard_matrix(self.signs.numel()).to(self.signs.device) * self.signs.double()


def pm1_form(r: torch.Tensor) -> torch.Tensor | None:
    """M (float32 +-1) with R = M / sqrt(n) to float32 rounding, or None when R is no such matrix. Such an R is
    applied as (x @ M) / sqrt(n) here and exported as a Hadamard transform (engine.export.transform_type)."""
    n = r.shape[0]
    m = (r.double() * math.sqrt(n)).round()
    if not bool((m.abs() == 1).all()) or not torch.equal((m / math.sqrt(n)).float(), r.float()):
        return None
    return m.float()


def as_blocks(r: torch.Tensor, sizes: tuple = BLOCK_SIZES) -> torch.Tensor | None:
    """[nb, b, b] if R is block-diagonal with one of these block sizes (the finest that fits), else None."""
    n = r.shape[0]
    for b in sizes:
        if n % b or n == b:
            continue
        blocks = r.reshape(n // b, b, n // b, b).permute(0, 2, 1, 3)  # [i, j, b, b]
        eye = torch.eye(n // b, dtype=torch.bool)
        if blocks[~eye].abs().max() == 0:
            return blocks[eye]
    return None


def _matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    if kind.startswith("block"):
        return random_block_hadamard(n, int(kind[5:].rstrip("p")), seed=seed)
    if kind == "hadamard":
        return random_hadamard(n, seed=seed)
    if kind == "orthogonal":
        return random_orthogonal(n, seed=seed)
    raise ValueError(f"no matrix for kind {kind!r}")


def _online(kind: str, n: int, seed: int, loaded: torch.Tensor | None) -> OnlineRotation:
    if kind == "file" or kind.startswith("block"):
        r = loaded if kind == "file" else _matrix(kind, n, seed)
        blocks = as_blocks(r)
        return OnlineRotation(blocks=blocks) if blocks is not None else OnlineRotation(matrix=r)
    if kind == "hadamard" and n > DENSE_ONLINE_MAX:
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
        return OnlineRotation(hadamard_signs=signs)
    return OnlineRotation(matrix=_matrix(kind, n, seed))


# ---- exact weight surgery (float64, cast back) --------------------------------------------------------------
# Weights are read and written through engine.model.dispatch, so the surgery also works on a model dispatched over
# several devices with offloaded weights; each rotation is moved to the device of the weight it touches.
def _get(module: nn.Module) -> torch.Tensor:
    """module.weight in float64 on the module's execution device."""
    return dispatch.read_tensor(module, "weight").double()


def _set(module: nn.Module, weight: torch.Tensor) -> None:
    dispatch.write_tensor(module, "weight", weight)


def _bias(module: nn.Module) -> torch.Tensor | None:
    if getattr(module, "bias", None) is None:
        return None
    return dispatch.read_tensor(module, "bias").double()


def untie_embeddings(model: nn.Module, arch: ArchInfo) -> None:
    """lm_head gets its own copy of the embedding so the final norm can be folded into it alone."""
    emb, head = arch.module(model, "embed"), arch.module(model, "lm_head")
    if head.weight is emb.weight or (
        head.weight.device.type != "meta" and head.weight.data_ptr() == emb.weight.data_ptr()
    ):
        value = dispatch.read_tensor(emb, "weight").detach().clone()
        if dispatch.is_offloaded(head):
            dispatch.write_tensor(head, "weight", value)
        else:
            head.weight = nn.Parameter(value.to(dispatch.execution_device(head)), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None


def fold_norms(model: nn.Module, arch: ArchInfo) -> None:
    """W <- W * g on the input columns of every linear reading an RMSNorm's output; then g = 1 (exact)."""
    untie_embeddings(model, arch)
    for i in range(arch.n_layers):
        for norm_role, readers in arch.norm_feeds:
            norm = arch.module(model, norm_role, i)
            g = _get(norm)
            for r in readers:
                lin = arch.module(model, r, i)
                w = _get(lin)
                _set(lin, w * g.to(w.device))
            _set(norm, torch.ones_like(g))
    norm = arch.module(model, "final_norm")
    head = arch.module(model, "lm_head")
    g = _get(norm)
    w = _get(head)
    _set(head, w * g.to(w.device))
    _set(norm, torch.ones_like(g))


class _PerDevice:
    """One float64 matrix, copied once to each device that asks for it."""

    def __init__(self, matrix: torch.Tensor):
        self._copies = {matrix.device: matrix.double()}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = next(iter(self._copies.values())).to(device)
        return self._copies[device]


def _fuse(
    module: nn.Module,
    arch: ArchInfo,
    role: str,
    r1: _PerDevice | None = None,
    r2: _PerDevice | None = None,
    r4: _PerDevice | None = None,
) -> None:
    """Write the decoder linear's rotated weight (and bias) back, each rotation on that weight's device."""
    w = _get(module)
    on = lambda r, device: None if r is None else r.on(device)  # noqa: E731
    _set(module, rotated_weight(arch, role, w, on(r1, w.device), on(r2, w.device), on(r4, w.device)))
    b = _bias(module)
    if b is not None and (r1 is not None or r2 is not None):
        dispatch.write_tensor(module, "bias", rotated_bias(arch, role, b, on(r1, b.device), on(r2, b.device)))


def fuse_r1(model: nn.Module, arch: ArchInfo, r1: torch.Tensor, layers=None, embeddings: bool = True) -> None:
    """Residual stream x -> x @ R1 (engine.rotation.algebra): embeddings and lm_head, and every reader and writer
    of the given decoder layers (all by default)."""
    r1 = r1 if isinstance(r1, _PerDevice) else _PerDevice(r1)
    if embeddings:
        for role in ("embed", "lm_head"):
            m = arch.module(model, role)
            w = _get(m)
            _set(m, rotated_embedding(w, r1.on(w.device)))
    for i in range(arch.n_layers) if layers is None else layers:
        for role in arch.residual_readers + arch.residual_writers:
            _fuse(arch.module(model, role, i), arch, role, r1=r1)


def fuse_r2(model: nn.Module, arch: ArchInfo, layer: int, r2: torch.Tensor) -> None:
    """Values per KV head v -> v @ R2 (v_proj rows, and bias), undone on o_proj's columns (engine.rotation.algebra)."""
    r2 = _PerDevice(r2)
    for role in (arch.roles.value, "o"):
        _fuse(arch.module(model, role, layer), arch, role, r2=r2)


def install_r3(model: nn.Module, arch: ArchInfo, layer: int, rot: OnlineRotation) -> None:
    """q -> q R3 and k -> k R3 after RoPE, so q k^T is unchanged and the K cache is stored rotated."""
    attn = arch.module(model, "attn", layer)
    attn.spinscope_r3 = rot.to(dispatch.execution_device(attn))

    def hook(module, q, k, v):
        return module.spinscope_r3(q), module.spinscope_r3(k), v

    attention.install(model)
    attention.add_hook(attn, hook)


def install_r4(model: nn.Module, arch: ArchInfo, layer: int, rot: OnlineRotation, role: str = "down") -> None:
    """down_proj input x -> x R4 online, and W_down <- W_down R4 so the product is unchanged (role: each of
    arch.down_roles, e.g. every expert's down_proj)."""
    down = arch.module(model, role, layer)
    rot.to(dispatch.execution_device(down))
    _fuse(down, arch, role, r4=_PerDevice(rot.dense()))
    down.spinscope_r4 = rot
    down.register_forward_pre_hook(lambda m, args: (m.spinscope_r4(args[0]), *args[1:]))


def deal_channels(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """A permutation of the channels (new position -> old channel): ordered by decreasing calibration magnitude
    and dealt out round-robin over the blocks, so that every block gets its share of the outlier channels."""
    n = magnitude.numel()
    n_blocks = -(-n // block)
    order = torch.argsort(magnitude, descending=True, stable=True)
    position = torch.tensor([(r % n_blocks) * block + r // n_blocks for r in range(n)])
    if n % block:  # a short last block: deal over the full blocks' slots first
        position = torch.argsort(torch.argsort(position))
    perm = torch.empty(n, dtype=torch.long)
    perm[position] = order
    return perm


def down_input_magnitudes(model: nn.Module, arch: ArchInfo, calib: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, each down_proj input channel's max |x| over the calibration windows [N, T]."""
    found: list = [None] * arch.n_layers
    hooks = []
    for i in range(arch.n_layers):

        def keep(m, args, i=i):
            a = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float().cpu()
            found[i] = a if found[i] is None else torch.maximum(found[i], a)

        hooks.append(arch.module(model, "down", i).register_forward_pre_hook(keep))
    try:
        with torch.no_grad():
            for w in calib:
                model(w.unsqueeze(0).to(dispatch.input_device(model)), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return found


def permute_mlp_channels(model: nn.Module, arch: ArchInfo, layer: int, perm: torch.Tensor) -> None:
    """Reorder the MLP's intermediate channels: rows of gate and up (both halves of a fused gate_up) and the
    columns of down_proj. The MLP computes exactly the same function; its down_proj input is x[..., perm]."""

    def rows(role: str, index: torch.Tensor) -> None:
        m = arch.module(model, role, layer)
        dispatch.write_tensor(m, "weight", dispatch.read_tensor(m, "weight")[index])
        if getattr(m, "bias", None) is not None:
            dispatch.write_tensor(m, "bias", dispatch.read_tensor(m, "bias")[index])

    if arch.roles.gate_up is not None:
        n = perm.numel()
        rows("gate_up", torch.cat([perm, perm + n]))
    else:
        rows("gate", perm)
        rows("up", perm)
    down = arch.module(model, "down", layer)
    dispatch.write_tensor(down, "weight", dispatch.read_tensor(down, "weight")[:, perm])


def _from_file(data: dict, key: str, fallback: str | None, n: int, what: str) -> torch.Tensor:
    t = data.get(key, data.get(fallback) if fallback else None)
    if t is None:
        raise ValueError(f"rotation file has no {what} (key {key!r})")
    if t.dim() == 3:  # a block-diagonal rotation stored as its blocks [n_blocks, b, b] (FLRot's R4)
        t = torch.block_diag(*t.unbind(0))
    if tuple(t.shape) != (n, n):
        raise ValueError(f"{what} in the rotation file is {tuple(t.shape)}, expected ({n}, {n})")
    err = float(orthogonality_error(t))
    if err > ORTHO_TOL:
        raise ValueError(f"{what} in the rotation file is not orthogonal (max |R^T R - I| = {err:.2e})")
    return t.double()


def _permutation(t: torch.Tensor, n: int, layer: int) -> torch.Tensor:
    perm = t.long()
    if not torch.equal(torch.sort(perm).values, torch.arange(n)):
        raise ValueError(f"R4_perm of layer {layer} in the rotation file is not a permutation of {n} channels")
    return perm


def rotate(
    model: nn.Module, arch: ArchInfo, cfg: RotationConfig, inplace: bool = False, calib: torch.Tensor | None = None
) -> nn.Module:
    """A rotated copy of `model` (or the model itself with inplace=True) computing the same function. A model
    dispatched over several devices is rotated in place only (ModelHandle.working_model gives one to rotate)."""
    return run_to_end(rotate_job(model, arch, cfg, inplace, calib))


def rotate_job(
    model: nn.Module, arch: ArchInfo, cfg: RotationConfig, inplace: bool = False, calib: torch.Tensor | None = None
):
    """Generator: rotate() with a Progress("rotate") after each decoder layer; Done(the rotated model). A permuted
    block R4 (cfg.permutes) orders each layer's down_proj input channels by their magnitude on `calib` windows."""
    t0 = time.perf_counter()
    if not inplace and dispatch.is_dispatched(model):
        raise ValueError(
            "a model dispatched over several devices may not fit twice, so it is not copied: rotate "
            "it in place (inplace=True, e.g. inside ModelHandle.working_model())"
        )
    if cfg.active:
        arch.check_rotatable()
    if cfg.permutes:
        if arch.n_experts:
            raise ValueError(
                "a channel permutation before block R4 is supported on dense MLPs only: in a mixture of "
                "experts each expert would need its own, from the tokens routed to it"
            )
        if calib is None:
            raise ValueError(f"R4 {cfg.r4} orders channels by their calibration magnitude: give calibration windows")
    m = model if inplace else copy.deepcopy(model)
    if not cfg.active:
        yield Done(m, seconds=time.perf_counter() - t0)
        return
    data = load_rotation_file(cfg.file) if cfg.file else {}
    magnitudes = down_input_magnitudes(m, arch, calib) if cfg.permutes else None  # before any weight changes
    if cfg.fold_norms:
        fold_norms(m, arch)
    r1 = None
    if cfg.r1 != "none":
        r1 = _PerDevice(
            _from_file(data, "R1", None, arch.hidden, "R1")
            if cfg.r1 == "file"
            else _matrix(cfg.r1, arch.hidden, cfg.seed)
        )
        fuse_r1(m, arch, r1, layers=())  # embeddings and lm_head; each layer's linears below
    for i in range(arch.n_layers):
        if r1 is not None:
            fuse_r1(m, arch, r1, layers=(i,), embeddings=False)
        if cfg.r2 != "none":
            r2 = (
                _from_file(data, f"model.layers.{i}.self_attn.R2", "R2", arch.head_dim, f"R2 of layer {i}")
                if cfg.r2 == "file"
                else _matrix(cfg.r2, arch.head_dim, cfg.seed + 1000 + i)
            )
            fuse_r2(m, arch, i, r2)
        if cfg.r3 != "none":
            loaded = (
                _from_file(data, f"model.layers.{i}.self_attn.R3", "R3", arch.head_dim, f"R3 of layer {i}")
                if cfg.r3 == "file"
                else None
            )
            install_r3(m, arch, i, _online(cfg.r3, arch.head_dim, cfg.seed + 2000, loaded))
        if cfg.r4 != "none":
            if magnitudes is not None:
                permute_mlp_channels(m, arch, i, deal_channels(magnitudes[i], int(cfg.r4[5:-1])))
            elif cfg.r4 == "file" and f"model.layers.{i}.mlp.R4_perm" in data:  # a learned permuted block R4
                permute_mlp_channels(
                    m, arch, i, _permutation(data[f"model.layers.{i}.mlp.R4_perm"], arch.intermediate, i)
                )
            made: dict[int, OnlineRotation] = {}  # per width: every expert's down shares its layer's R4
            for role in arch.down_roles:  # one per expert in a mixture (a shared expert may be narrower)
                width = arch.module(m, role, i).in_features
                if width not in made:
                    loaded = (
                        _from_file(data, f"model.layers.{i}.mlp.R4", "R4", width, f"R4 of layer {i}")
                        if cfg.r4 == "file"
                        else None
                    )
                    made[width] = _online(cfg.r4, width, cfg.seed + 3000, loaded)
                install_r4(m, arch, i, made[width], role)
        yield Progress(
            "rotate",
            i + 1,
            arch.n_layers,
            time.perf_counter() - t0,
            f"rotation fused into layer {i + 1}/{arch.n_layers}",
        )
    yield Done(m, seconds=time.perf_counter() - t0)


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 logits on the CPU (a reference kept while a dispatched model is rotated in place)."""
    return model(input_ids.to(dispatch.input_device(model)), use_cache=False).logits.double().cpu()


@torch.no_grad()
def equivalence(
    original: nn.Module | None, rotated: nn.Module, input_ids: torch.Tensor, reference: torch.Tensor | None = None
) -> dict[str, float]:
    """Logits of both models on the same tokens: max |difference| and mean KL(original || rotated) in nats.
    reference: the original's logits (from `logits`) instead of running `original`."""
    a = reference if reference is not None else logits(original, input_ids)
    return {**logit_agreement(a, logits(rotated, input_ids).to(a.device)), "tokens": int(input_ids.numel())}


def logit_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Max |a - b|, mean KL(softmax a || softmax b) in nats over positions, and max |a| for scale."""
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none")
    return {
        "max_abs_logit_diff": float((a - b).abs().max()),
        "kl": float(kl.sum(-1).mean()),
        "max_abs_logit": float(a.abs().max()),
    }
