"""The network SpinQuant and FLRot train: the rotations being learned, and a norm-folded copy of the model that
computes the rotated, fake-quantized network from them on every forward; all weights stay frozen.

Weights come from the one rotation algebra (engine.rotation.algebra.rotated_weight), as torch parametrizations of
their frozen, norm-folded values (engine.rotation.fusion.fold_norms), fake-quantized (RTN, straight-through):
    q, k, gate, up: W R1        v: rows of each KV head R2^T (W R1)_h       o: columns of each head (R1^T W)_h R2
    down: R1^T W R4             embedding output e R1                       lm_head input x R1^T (= W_head R1)
    online: q, k <- q R3, k R3 after RoPE (then K is quantized);  down_proj input x <- x R4
The activation and KV quantizers of engine.quant.apply act on the linears' inputs and on K, V, so the loss sees the
same network that `engine.rotation.fusion.rotate` + `engine.quant.apply` build from the exported file.
SpinQuant keeps R3/R4 fixed: the random Hadamards that `rotate` draws for seed 0, i.e. what the 'rotated' recipe
uses at EvalConfig(seed=0).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from engine.model import attention
from engine.model.arch import ArchInfo
from engine.observe.stats import token_moments
from engine.quant.apply import install_activation_quant, install_kv_quant
from engine.quant.quantizers import quantize_weight
from engine.quant.recipes import Bits, Recipe
from engine.rotation.algebra import rotated_embedding, rotated_weight
from engine.rotation.files import RotationSet
from engine.rotation.fusion import fold_norms, permute_mlp_channels
from engine.rotation.hadamard import random_hadamard
from engine.rotation.orthogonal import BlockDiagonalRotation, FullRotation, check_block_divides

ONLINE_SEED = 0  # SpinQuant's fixed R3/R4: rotate(..., seed=0) draws them from seeds 2000 / 3000
KURTOSIS_SITES = ("attn_in", "down_in")


# ---- the rotations being learned -----------------------------------------------------------------------------
class LearnedRotations(nn.Module):
    """R1 [hidden, hidden], per-layer R2 [hd, hd]; FLRot adds per-layer R3 [hd, hd] and R4 blocks [nb, b, b].
    All start as random Hadamards with the seeds `rotate` uses (R1: seed, R2: seed + 1000 + i), so SpinQuant
    step 0 is QuaRot with the same seed. SpinQuant's R3/R4 are fixed buffers."""

    def __init__(self, arch: ArchInfo, method: str, block: int = 128, seed: int = 0):
        super().__init__()
        hd, inter, n = arch.head_dim, arch.intermediate, arch.n_layers
        self.method = method
        had = lambda size, s: random_hadamard(size, seed=s).float()  # noqa: E731
        self.r1 = FullRotation(arch.hidden, matrix=had(arch.hidden, seed))
        self.r2 = nn.ModuleList(FullRotation(hd, matrix=had(hd, seed + 1000 + i)) for i in range(n))
        if method == "flrot":
            nb = check_block_divides(inter, block)
            self.r3 = nn.ModuleList(FullRotation(hd, matrix=had(hd, seed + 2000 + i)) for i in range(n))
            self.r4 = nn.ModuleList(
                BlockDiagonalRotation(
                    inter, block, blocks=torch.stack([had(block, seed + 3000 + nb * i + j) for j in range(nb)])
                )
                for i in range(n)
            )
        else:
            self.r3, self.r4 = None, None
            self.register_buffer("r3_fixed", had(hd, ONLINE_SEED + 2000))
            self.register_buffer("r4_fixed", had(inter, ONLINE_SEED + 3000))
        self.r4_perm: list[torch.Tensor] | None = None  # FLRot's channel order per layer (TrainConfig.permute)

    def manifold_params(self) -> list[nn.Parameter]:
        return list(self.parameters())  # every parameter is an orthogonal matrix or a batch of blocks

    def r3_matrix(self, i: int) -> torch.Tensor:
        return self.r3[i].weight if self.r3 is not None else self.r3_fixed

    def rotate_down_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x [..., inter] -> x R4 (float32 at least, as engine.rotation.fusion.OnlineRotation)."""
        xf = x.float()
        y = self.r4[i](xf) if self.r4 is not None else xf @ self.r4_fixed
        return y.to(x.dtype)

    def weight_factors(self, i: int):
        """(R1, R2, R4) that layer i's weights carry (engine.rotation.algebra.rotated_weight); a fixed R4 was folded
        into W once, so it is None here."""
        return self.r1.weight, self.r2[i].weight, None if self.r4 is None else self.r4[i]

    def rotation_set(self) -> RotationSet:
        """A detached copy in the file layout (R4 as its blocks)."""
        grab = lambda t: t.detach().float().clone()  # noqa: E731
        return RotationSet(
            grab(self.r1.weight),
            [grab(r.weight) for r in self.r2],
            None if self.r3 is None else [grab(r.weight) for r in self.r3],
            None if self.r4 is None else [grab(r.blocks) for r in self.r4],
            self.r4_perm,
        )


class RotatedWeight(nn.Module):
    """Parametrization of one frozen decoder weight W [out, in] -> fake_quant(rotated W); gradients reach the
    rotations through the straight-through quantizer. `rots.weight_factors(layer)` gives (R1, R2, R4), each None
    when absent (LearnedRotations here; one block's transforms in engine.learn.layerwise, R1 already fused)."""

    def __init__(
        self, rots: LearnedRotations, arch: ArchInfo, role: str, layer: int, w_bits: int, weight_range_search: bool
    ):
        super().__init__()
        self._rots = (rots,)  # a tuple, so the rotations are not registered as a submodule of every weight
        self.arch, self.role, self.layer, self.w_bits = arch, role, layer, w_bits
        self.weight_range_search = weight_range_search

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        r1, r2, r4 = self._rots[0].weight_factors(self.layer)
        w = rotated_weight(self.arch, self.role, w, r1=r1, r2=r2, r4=r4)
        return quantize_weight(w, self.w_bits, clip_search=self.weight_range_search) if self.w_bits < 16 else w


class RotatedTrainingModel:
    """A norm-folded copy of `model` computing the rotated, fake-quantized network from `rots` on every forward."""

    def __init__(
        self,
        model: nn.Module,
        arch: ArchInfo,
        rots: LearnedRotations,
        bits: Bits,
        recipe: Recipe,
        weight_range_search: bool = False,
    ):
        self.arch, self.rots, self.bits = arch, rots, bits
        m = copy.deepcopy(model).eval().requires_grad_(False)
        if next(m.parameters()).dtype in (torch.float16, torch.bfloat16):
            m.float()  # the loss and its gradients in float32 at least
        for i, perm in enumerate(rots.r4_perm or []):  # exact: R4's blocks then see the dealt channel order
            permute_mlp_channels(m, arch, i, perm)
        fold_norms(m, arch)
        if rots.r4 is None:  # a fixed R4 folds once, as engine.rotation.fusion.install_r4 does (float64, cast back)
            for i in range(arch.n_layers):
                for role in arch.down_roles:
                    down = arch.module(m, role, i)
                    down.weight.data = rotated_weight(arch, role, down.weight.double(), r4=rots.r4_fixed.double()).to(
                        down.weight.dtype
                    )
        unquantized = tuple(r for r in arch.residual_readers if r not in arch.linears)  # a router, a shared gate
        for i in range(arch.n_layers):
            for role in arch.linears + unquantized:
                w_bits = bits.w if role in arch.linears else 16
                parametrize.register_parametrization(
                    arch.module(m, role, i),
                    "weight",
                    RotatedWeight(rots, arch, role, i, w_bits, weight_range_search),
                    unsafe=True,
                )
        arch.module(m, "embed").register_forward_hook(lambda mod, args, out: rotated_embedding(out, rots.r1.weight))
        arch.module(m, "lm_head").register_forward_pre_hook(
            lambda mod, args: (args[0] @ rots.r1.weight.to(args[0].dtype).T, *args[1:])
        )
        self.kurtosis: dict | None = None  # {(site, layer): [sum, count]} while probing
        attention.install(m)
        for i in range(arch.n_layers):  # online rotations first: the quantizers must see their outputs

            def r3(mod, q, k, v, i=i):
                return q @ rots.r3_matrix(i).to(q.dtype), k @ rots.r3_matrix(i).to(k.dtype), v

            attention.add_hook(arch.module(m, "attn", i), r3)
            for role in arch.down_roles:  # every expert's down_proj in a mixture
                down = arch.module(m, role, i)
                down.register_forward_pre_hook(lambda mod, args, i=i: (rots.rotate_down_input(i, args[0]), *args[1:]))
                down.register_forward_pre_hook(lambda mod, args, i=i: self._probe("down_in", i, args[0]))
            arch.module(m, "input_norm", i).register_forward_hook(
                lambda mod, args, out, i=i: self._probe("attn_in", i, out)
            )
        install_activation_quant(m, arch, bits, recipe)
        install_kv_quant(m, arch, bits, recipe)
        self.model = m

    def _probe(self, site: str, layer: int, x: torch.Tensor) -> None:
        """Per-token kurtosis across channels, mean over tokens without position 0 (the sink), when probing."""
        if self.kurtosis is None or x.shape[1] < 2:
            return
        kurt, _ = token_moments(x[:, 1:].detach().reshape(-1, x.shape[-1]).float())
        acc = self.kurtosis.setdefault((site, layer), [0.0, 0])
        acc[0] += float(kurt.sum())
        acc[1] += kurt.numel()

    def _mean_kurtosis(self, site: str, layer: int) -> float:
        total, count = self.kurtosis.get((site, layer), (0.0, 0))
        return total / count if count else math.nan

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over ids [B, T]."""
        device = next(iter(self.rots.parameters())).device
        ids = ids.to(device)
        logits = self.model(ids, use_cache=False).logits[:, :-1].float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

    @torch.no_grad()
    def evaluate(self, wins: torch.Tensor) -> tuple[float, dict[str, list[float]]]:
        """(perplexity of the fake-quantized network on wins [N, T], per-layer kurtosis per site)."""
        self.kurtosis = {}
        nll, count = 0.0, 0
        try:
            with parametrize.cached():  # the rotated weights once for all windows
                for w in wins:
                    nll += float(self.loss(w.unsqueeze(0))) * (w.numel() - 1)
                    count += w.numel() - 1
            kurt = {s: [self._mean_kurtosis(s, i) for i in range(self.arch.n_layers)] for s in KURTOSIS_SITES}
        finally:
            self.kurtosis = None
        return math.exp(nll / count), kurt
