"""Export one evaluation row (a recipe at a bit setting) as a compressed-tensors checkpoint, and read one back.

The row is built exactly as engine.evaluate builds it (build_model: rotations fused, weights quantized, online R3/R4
and the activation/KV quantizers installed); what it computes is then written in compressed-tensors' terms
(compressed-tensors 0.20.1 schema, as llm-compressor writes it):

- weights: the engine's symmetric grid q in [-(2^(b-1)-1), 2^(b-1)-1] per output row (or per group) and its scale,
  read back from the fake-quantized weight (integer_grid) -> `weights` int, symmetric, strategy channel (group),
  format pack-quantized. The scale is stored, so whatever clipping chose it (search, calibrated per row, GPTQ) is
  kept exactly.
- activations: per token, asymmetric, dynamic -> `input_activations` int, asymmetric, strategy token, dynamic: the
  engine's grid [-2^(b-1), 2^(b-1)-1] and float32 operations (engine.quant.quantizers); its range is each token's
  min and max with 0 included, i.e. clip ratio 1.0.
- KV cache: K (after RoPE and R3) and V, one asymmetric grid per token and head -> `kv_cache_scheme` int,
  asymmetric, strategy group, group_size head_dim, dynamic. (Strategy attn_head is one static scale per head.)
- R1, R2 (and the folded RMSNorm gains) are fused into the weights; transform_config lists them as offline
  weight_input/weight_output entries, as llm-compressor's SpinQuantModifier does. R3 -> q_attn + k_cache online
  transforms of each self_attn, R4 -> an `input` transform of down_proj, with their matrices stored: a Hadamard
  one as "hadamard" (compressed-tensors' own Sylvester matrix) or "random-hadamard" (+-1 entries, divided by sqrt(n)
  when applied), any other as "random-matrix" (transform_type).
- named floating-point weight formats, read back on their grid (float_grid) with their scales stored: mxfp4 /
  mxfp6 (E2M3) / mxfp8 (E4M3) -> `weights` float, strategy group 32, E8M0 scales (scale_dtype uint8), formats
  mxfp4-pack-quantized / mxfp6-pack-quantized / mxfp8-quantized; nvfp4 -> float 4, strategy tensor_group 16, E4M3
  block scales and weight_global_scale = 1 / g (compressed-tensors divides by 448 * 6 / amax where the engine
  multiplies by amax / (6 * 448)), nvfp4-pack-quantized; fp8 -> float 8 per channel, float-quantized. fp8
  activations -> per-token dynamic E4M3 (FP8_DYNAMIC's), fp8 KV cache -> the same per token and head.
  compressed-tensors 0.20.1 decompresses MX and NVFP4 weights to bfloat16: LOADER casts them back (MX and FP8
  weights round-trip bit for bit; NVFP4's stored codes and scales mean the engine's weights to float32 rounding,
  but the decompressed ones carry bfloat16's rounding, up to 2^-8 relative).

Refused, each with its reason (check_exportable): QRazor's SDR; asymmetric integer weights; MX and NVFP4
activations or KV cache (REFUSED_DYNAMIC: compressed-tensors' dynamic MX scale rounds a block's max to the nearest
power of two before taking its exponent where the engine floors log2 max; its NVFP4 activations take a stored,
calibrated global scale where the engine recomputes amax / (6 * 448) per tensor); weights above 8 bits; clip ratios
below 1.0 on activations or the KV cache (calibrated or fixed: dynamic quantizers cannot clip); mixtures of experts;
nothing quantized.

Fidelity (SmolLM2-135M, tests/engine/test_export.py and benchmarks/export_roundtrip.py): integer W4A16 and
W4A4KV4 rows, rotated or not, give the engine's logits bit for bit. That needs the same float32 operations in the
same order on both sides, because a 4-bit row is chaotic (one ulp on a third of the embedding values moves its
perplexity by 0.3-1 %): the engine's asymmetric quantizer is compressed-tensors' round(x / s + z) on its signed
grid, and its dense Hadamards are applied as (x @ M) / sqrt(n) with the +-1 matrix M, as compressed-tensors'
Hadamard transforms apply them (engine.rotation.fusion.OnlineRotation).

Runtimes (checked here with transformers 5.23 and compressed-tensors 0.20.1): transformers applies the quantization
(packed weights, dynamic activation and KV quantizers) but ignores transform_config, so a rotated export needs its
online transforms applied through compressed-tensors: LOADER (written next to the checkpoint as
load_with_transforms.py) does that. Once R3 hooks an attention, compressed-tensors also quantizes the queries with
the KV cache's arguments (QuantizedAttentionImpl reads the scheme that kv_cache_scheme puts on the attention);
SpinScope quantizes only K and V, so LOADER keeps queries in floating point unless asked.

Import (engine.model.loading): a compressed-tensors directory loads with its weights dequantized (import_kwargs) and
its online linear transforms folded back into the weights (fold_online_transforms), i.e. as the floating-point
model its weights mean; Explore and Evaluate then apply SpinScope's own rotations and quantizers to it.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from engine.events import Done, Progress

MARKER = "SPINSCOPE_EXPORT.json"  # provenance; also what lets --force replace a directory (only an earlier export)
LOADER_FILE = "load_with_transforms.py"
# checked to dequantize correctly with transformers 5.23 (nvfp4: to bfloat16's rounding, as compressed-tensors 0.20.1
# decompresses it; the rest exactly)
IMPORT_FORMATS = ("pack-quantized", "dense", "float-quantized", "mxfp4-pack-quantized", "mxfp6-pack-quantized",
                  "mxfp8-quantized", "nvfp4-pack-quantized")
GRID_TOL = 0.02  # |w / scale - q| allowed when reading a weight back on its grid (float32 STE rounding is ~1e-6)


class ExportError(ValueError):
    """A row that cannot be exported, or a destination that cannot be written, with a one-sentence reason."""

# Why a named activation / KV format has no exact compressed-tensors counterpart (by the engine's format class)
REFUSED_DYNAMIC = {
    "MXFormat": "compressed-tensors' dynamic MX scale rounds each block's max to the nearest power of two before "
                "taking its exponent (round_to_power_2: up once the mantissa reaches 1.75, or 1.9375 for E2M3), where "
                "the engine takes floor(log2 max) as OCP MX v1.0 does, so such blocks get twice the engine's scale",
    "NVFP4Format": "compressed-tensors' NVFP4 activations divide by a stored, calibrated input_global_scale (only the "
                   "block scales are dynamic), where the engine recomputes the per-tensor scale amax / (6 * 448) from "
                   "every tensor it quantizes",
}
MX_ELEMENTS = {"e2m1": (4, "mxfp4-pack-quantized"), "e2m3": (6, "mxfp6-pack-quantized"), "e4m3": (8, "mxfp8-quantized")}


def _float_weights(fmt) -> tuple[dict, str] | None:
    """(QuantizationArgs keywords, compression format) of a floating-point weight format that compressed-tensors
    holds exactly (its presets MXFP4/6/8, NVFP4, FP8_DYNAMIC's weights), or None."""
    from engine.quant.formats import FP8Format, MXFormat, NVFP4Format

    if isinstance(fmt, MXFormat) and fmt.block == 32 and fmt.element in MX_ELEMENTS:
        bits, name = MX_ELEMENTS[fmt.element]
        return dict(num_bits=bits, type="float", strategy="group", group_size=32, symmetric=True,
                    scale_dtype=torch.uint8, zp_dtype=torch.uint8), name
    if isinstance(fmt, NVFP4Format) and fmt.block == 16:
        return dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True,
                    scale_dtype=torch.float8_e4m3fn, zp_dtype=torch.float8_e4m3fn), "nvfp4-pack-quantized"
    if isinstance(fmt, FP8Format) and fmt.axis_per_row:
        return dict(num_bits=8, type="float", strategy="channel", symmetric=True), "float-quantized"
    return None


# ---- what can be expressed ----------------------------------------------------------------------------------------
def check_exportable(recipe, bits, handle=None) -> None:
    """Refuse (ExportError) what compressed-tensors cannot express, before any model is built; with the model's
    `handle`, also what depends on the model."""
    from engine.quant.formats import IntFormat
    from engine.quant.methods import weight_format

    if not recipe.quantize or not any(bits.quantizes(p) for p in ("w", "a", "kv")):
        raise ExportError(f"nothing to export: {recipe.name} at {bits} quantizes nothing, and a floating-point model "
                          "needs no compressed-tensors checkpoint")
    if "qrazor" in (recipe.weights, recipe.activations):
        raise ExportError("QRazor cannot be exported: its significant-data razoring keeps each value's 4 bits from "
                          "its group's leading one, with a per-group shift flag, and compressed-tensors' integer "
                          "formats hold only a scale and a zero point per group")
    fmt = weight_format(bits.w, recipe) if bits.quantizes("w") else None
    if fmt is not None and (not isinstance(fmt, IntFormat) or not fmt.symmetric) and _float_weights(fmt) is None:
        raise ExportError(f"weight format {bits.w} is not exported: only symmetric integer weights (per row or per "
                          "group), mxfp4/mxfp6/mxfp8 (blocks of 32), nvfp4 (blocks of 16) and per-row fp8 map to "
                          "compressed-tensors' formats")
    if isinstance(fmt, IntFormat) and fmt.bits > 8:
        raise ExportError(f"{fmt.bits}-bit weights cannot be exported: pack-quantized holds 1- to 8-bit integers")
    for part, name in (("a", "activation"), ("kv", "KV-cache")):
        value = getattr(bits, part)
        if bits.quantizes(part) and not isinstance(value, int) and value != "fp8":
            raise ExportError(f"{name} format {value} cannot be exported: " + REFUSED_DYNAMIC.get(
                type(bits.format(part)).__name__, "only integer bit widths (per-token / per-head asymmetric) and fp8 "
                "map to compressed-tensors' dynamic quantizers"))
    if (bits.quantizes("a") or bits.quantizes("kv")) and recipe.clip.calibrated:
        raise ExportError("calibrated activation and KV clip ratios cannot be exported: compressed-tensors' dynamic "
                          "quantizers take each token's whole min-max range (clip 1.0); use --clip none, or keep "
                          "activations and KV cache at 16 bits (weight clipping is kept: weight scales are stored)")
    low = [f"{name} {ratio:g}" for name, part, ratio in (("activation", "a", recipe.clip.activation),
                                                         ("KV-cache", "kv", recipe.clip.kv))
           if bits.quantizes(part) and ratio < 1.0]
    if low:
        raise ExportError(f"fixed clip ratios below 1.0 ({', '.join(low)}) cannot be exported: compressed-tensors' "
                          "dynamic quantizers take each token's whole min-max range; use --clip none")
    if handle is None:
        return
    arch = handle.arch
    if handle.dispatched:
        raise ExportError("a model dispatched over several devices cannot be exported yet: load it on one device")
    if arch.n_experts:
        raise ExportError(f"{arch.name} is a mixture of experts: transformers stores its experts as stacked 3-D "
                          "parameters, which compressed-tensors' Linear schemes do not cover")
    group = getattr(fmt, "group", None) or getattr(fmt, "block", None)
    for role in arch.linears if group else ():
        width = arch.module(handle.model, role, 0).in_features
        if width % group:
            raise ExportError(f"weight group size {group} does not divide {role}'s {width} input channels, and "
                              "compressed-tensors' group strategy needs whole groups")


def check_destination(out: str | os.PathLike, force: bool = False) -> Path:
    """The output directory as a Path; refuses an existing one unless `force`, and even then anything but an
    earlier export (or an empty directory), so --force never deletes a directory SpinScope did not write."""
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise ExportError(f"{out} is not an earlier SpinScope export (it has no {MARKER}); --force replaces only "
                              "those or an empty directory")
    return out


# ---- the engine's weights on their integer grid ------------------------------------------------------------------
def _off_grid(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    r = x / scale
    return ((r - r.round()).abs() > GRID_TOL).any(-1)


def integer_grid(w: torch.Tensor, bits: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale float32 [out, groups]) with scale * q = w: a fake-quantized weight read back on its
    symmetric grid. Each row (group)'s step is its largest |value| over the largest |q| <= 2^(b-1)-1 that puts all
    its values on the grid: round to nearest always reaches that maximum, GPTQ's error feedback may not."""
    maxq = 2 ** (bits - 1) - 1
    out, d = w.shape
    x = w.detach().double().reshape(-1, group or d)  # one row per group
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / maxq, torch.ones_like(amax))  # an all-zero group: any scale
    bad = _off_grid(x, scale)
    for k in range(maxq - 1, 0, -1):
        if not bad.any():
            break
        rows = bad.nonzero().squeeze(1)
        trial = amax[rows] / k
        ok = ~_off_grid(x[rows], trial)
        scale[rows[ok]] = trial[ok]
        bad[rows[ok]] = False
    if bad.any():
        raise ExportError(f"{int(bad.sum())} weight rows (or groups) are not on a {bits}-bit integer grid, so the "
                          "weights were not quantized as the recipe says")
    q = torch.round(x / scale).reshape(out, d).to(torch.int8)
    return q, scale.reshape(out, -1).float()


def _fit(x: torch.Tensor, element, candidates) -> torch.Tensor:
    """Per row of x [n, k], the first candidate scale [n, 1] that puts the whole row on the element's grid (to
    float rounding); NaN where none does."""
    scale = torch.full_like(x[:, :1], math.nan)
    for c in candidates:
        r = x / c
        fits = ((element.round(r) - r).abs() <= 1e-5 * r.abs()).all(-1, keepdim=True) & torch.isfinite(r).all(-1, True)
        scale = torch.where(scale.isnan() & fits, c, scale)
    return scale


def float_grid(w: torch.Tensor, fmt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(weight, scale float32 [out, groups], global scale g or None) of a weight fake-quantized in a floating-point
    format, read back on its grid: weight = element values * scale (* g) as the format dequantizes. Scales follow
    the format's own rule first (RTN reaches it; GPTQ's error feedback may leave a block's maximum lower, hence the
    other candidates): MX 2^(floor(log2 amax) - emax), else twice that; FP8 amax / t for t in E4M3's top binade;
    NVFP4 g = amax / (6 * 448) (or amax / (v s) for other top codes) and block scales e4m3(amax_b / (v g))."""
    from engine.quant.formats import E2M1, E4M3, E8M0_MAX, E8M0_MIN, ELEMENTS, MXFormat, NVFP4Format, floor_log2

    out, d = w.shape
    group = getattr(fmt, "block", None) or d
    x = w.detach().float().reshape(-1, group)
    amax = x.abs().amax(-1, keepdim=True)
    zero = amax == 0
    g = None
    if isinstance(fmt, MXFormat):
        element = ELEMENTS[fmt.element]
        shared = torch.where(zero, E8M0_MIN, floor_log2(amax) - element.emax)
        scale = _fit(x, element, [torch.exp2((shared + k).clamp(E8M0_MIN, E8M0_MAX).float()) for k in (0, 1)])
        scale = torch.where(zero, 2.0 ** E8M0_MIN, scale)
    elif isinstance(fmt, NVFP4Format):
        element, top = E2M1, amax.max()
        tops = [E2M1.max_normal * E4M3.max_normal] + [v * s for v in (6.0, 4.0, 3.0) for s in range(256, 449, 32)]
        for t in tops if top > 0 else [1.0]:
            g = top / t if top > 0 else torch.tensor(1.0)
            blocks = [E4M3.round(amax / (v * g)) for v in (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5)]
            s = _fit(x, element, [b * g for b in blocks]) / g
            s = torch.where(zero, 2.0 ** -9, s)  # an all-zero block: any scale (the smallest E4M3 one)
            if not s.isnan().any():
                break
        scale = s
    else:  # FP8 per row
        element = E4M3
        scale = _fit(x, element, [amax / t for t in (448.0, 416.0, 384.0, 352.0, 320.0, 288.0, 256.0, 240.0)])
        scale = torch.where(zero, 1.0, scale)
    bad = scale.isnan()
    if bad.any():
        raise ExportError(f"{int(bad.sum())} weight rows (or blocks) are not on the {fmt.name} grid, so the weights "
                          "were not quantized as the recipe says")
    q = element.round(x / (scale if g is None else scale * g)) * scale
    q = (q if g is None else q * g).reshape(out, d)
    return q.to(w.dtype), scale.reshape(out, -1), g


# ---- the checkpoint -------------------------------------------------------------------------------------------------
def _plain_model(model: nn.Module) -> nn.Module:
    """A transformers model of the same class holding the built model's tensors (the same objects, never written
    to) without SpinScope's hooks, online-rotation modules or attention entry point."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # an imported checkpoint's: this export writes its own
        del config.quantization_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory until the built model's tensors are assigned
        plain = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=next(model.parameters()).dtype)
    own, state = plain.state_dict(), model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ExportError(f"the built model lacks {len(missing)} tensors of a plain {type(model).__name__} (e.g. "
                          f"{missing[0]})")
    plain.load_state_dict({k: state[k] for k in own}, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval().requires_grad_(False)


def _quantization_config(recipe, bits, arch):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    from engine.quant.methods import weight_format

    weights = acts = kv = None
    fmt_name = "dense"
    if bits.quantizes("w"):
        fmt = weight_format(bits.w, recipe)
        floating = _float_weights(fmt)
        if floating:
            weights, fmt_name = QuantizationArgs(**floating[0]), floating[1]
        else:
            weights, fmt_name = QuantizationArgs(num_bits=fmt.bits, type="int", symmetric=True, group_size=fmt.group,
                                                 strategy="group" if fmt.group else "channel"), "pack-quantized"
    # fp8: FP8_DYNAMIC's per-token E4M3 (scale amax / 448), as the engine's FP8Format along the last dim
    if bits.quantizes("a"):
        acts = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True) \
            if bits.a == "fp8" else QuantizationArgs(num_bits=bits.a, type="int", symmetric=False, strategy="token",
                                                      dynamic=True)
    if bits.quantizes("kv"):  # one grid per token and head: groups of head_dim along the last dim of k and v
        kind = dict(num_bits=8, type="float", symmetric=True) if bits.kv == "fp8" else dict(
            num_bits=bits.kv, type="int", symmetric=False)
        kv = QuantizationArgs(**kind, strategy="group", group_size=arch.head_dim, dynamic=True)
    groups = {} if weights is None and acts is None else {"group_0": QuantizationScheme(
        targets=["Linear"], weights=weights, input_activations=acts, format=fmt_name if weights else None)}
    return QuantizationConfig(config_groups=groups, ignore=[arch.roles.lm_head], kv_cache_scheme=kv, format=fmt_name,
                              quantization_status="frozen")


def _regex(path: str) -> str:
    """A target matching the module of this path in every layer, by its last name (as llm-compressor writes them)."""
    return f"re:.*{re.escape(path.rsplit('.', 1)[-1])}$"


def _offline_schemes(recipe, arch) -> dict:
    """R1 and R2 as llm-compressor's SpinQuantModifier lists them: fused (offline) transforms; for the record only,
    since the weights already hold them (a runtime applies only online locations)."""
    from compressed_tensors.transform import TransformArgs, TransformScheme

    from engine.rotation.fusion import load_rotation_file

    rot, roles, out = recipe.rotation, arch.roles, {}
    data = load_rotation_file(rot.file) if rot.file else {}
    first_r2 = data.get("model.layers.0.self_attn.R2", data.get("R2"))

    def kind(setting: str, loaded) -> str:
        return transform_type(loaded) if setting == "file" and loaded is not None else {
            "hadamard": "random-hadamard"}.get(setting, "random-matrix")

    if rot.r1 != "none":
        out["R1"] = TransformScheme(type=kind(rot.r1, data.get("R1")), apply=[
            TransformArgs(targets=[_regex(roles.embed)] + [_regex(getattr(roles, r)) for r in arch.residual_writers],
                          location="weight_output"),
            TransformArgs(targets=[_regex(getattr(roles, r)) for r in arch.residual_readers] + [roles.lm_head],
                          location="weight_input", inverse=True)])
    if rot.r2 != "none" and roles.value == "v":  # a fused qkv holds R2 on its value rows only: not a CT location
        out["R2"] = TransformScheme(type=kind(rot.r2, first_r2), head_dim=arch.head_dim, apply=[
            TransformArgs(targets=[_regex(roles.v)], location="weight_output"),
            TransformArgs(targets=[_regex(roles.o)], location="weight_input", inverse=True)])
    return out


def transform_type(r: torch.Tensor) -> str:
    """compressed-tensors' name for an orthogonal R [n, n]: "hadamard" for its own Sylvester matrix over sqrt(n)
    (vLLM runs it with its Hadamard kernel), "random-hadamard" for any other +-1/sqrt(n) matrix of an order it can
    build (a Hadamard transform divides the stored +-1 matrix by sqrt(n)), else "random-matrix" (stored as is).
    The +-1 test is the one that makes the engine apply R as (x @ M) / sqrt(n) (pm1_form), so both sides compute
    the same float32 values."""
    from compressed_tensors.transform.utils.hadamard import (
        _fetch_hadamard_divisor,
        deterministic_hadamard_matrix,
        is_pow2,
    )

    from engine.rotation.fusion import pm1_form

    n, signs = r.shape[0], pm1_form(r)
    if signs is None or _fetch_hadamard_divisor(n, torch.float32) is None:
        return "random-matrix"
    if is_pow2(n) and torch.equal(signs.double(), deterministic_hadamard_matrix(n, torch.float64)):
        return "hadamard"
    return "random-hadamard"


def stored_matrix(r: torch.Tensor, kind: str) -> torch.Tensor:
    """What a transform of that type stores for R: the +-1 matrix sqrt(n) R for Hadamard types, R otherwise."""
    from engine.rotation.fusion import pm1_form

    return pm1_form(r) if kind != "random-matrix" else r.float()


def _online_schemes(model: nn.Module, arch) -> tuple[dict, dict]:
    """({scheme name: TransformScheme}, {scheme name: stored matrix}) of the built model's online rotations: R3 on
    queries and keys of each attention, R4 on each down_proj input (and fused into its weight, as llm-compressor
    lists it); layers sharing one matrix share one scheme."""
    from compressed_tensors.transform import TransformArgs, TransformScheme

    names = {id(m): n for n, m in model.named_modules()}
    found = {"R3": [], "R4": []}  # the modules engine.rotation.fusion.install_r3 / install_r4 gave a rotation
    for i in range(arch.n_layers):
        attn = arch.module(model, "attn", i)
        if getattr(attn, "spinscope_r3", None) is not None:
            found["R3"].append((names[id(attn)], attn.spinscope_r3.dense()))
        for role in arch.down_roles:
            down = arch.module(model, role, i)
            if getattr(down, "spinscope_r4", None) is not None:
                found["R4"].append((names[id(down)], down.spinscope_r4.dense()))
    schemes, weights = {}, {}
    for kind, entries in found.items():
        distinct: list[tuple[torch.Tensor, list[str]]] = []
        for name, r in entries:
            same = next((ns for m, ns in distinct if m.shape == r.shape and torch.equal(m, r)), None)
            if same is None:
                distinct.append((r, [name]))
            else:
                same.append(name)
        generic = _regex(arch.roles.attn if kind == "R3" else arch.roles.down or "")
        for j, (r, members) in enumerate(distinct):
            key = kind if len(distinct) == 1 else f"{kind}_{j}"
            kind_name = transform_type(r)
            targets = [generic] if len(members) == arch.n_layers else [f"re:^{re.escape(m)}$" for m in members]
            if kind == "R3":
                apply = [TransformArgs(targets=targets, location=loc) for loc in ("q_attn", "k_cache")]
            else:  # R4: online on down_proj's input, and fused into its weight (W R4)
                apply = [TransformArgs(targets=targets, location="input"),
                         TransformArgs(targets=targets, location="weight_input", inverse=True)]
            schemes[key] = TransformScheme(type=kind_name, head_dim=r.shape[0] if kind == "R3" else None, apply=apply)
            weights[key] = stored_matrix(r, kind_name)
    return schemes, weights


def _pack(model: nn.Module, recipe, bits, arch):
    """The plain model with compressed-tensors' quantization and online transforms attached and its weights packed;
    returns (plain model, ModelCompressor to write the config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    from engine.quant.methods import weight_format

    online, matrices = _online_schemes(model, arch)
    plain = _plain_model(model)
    qconfig = _quantization_config(recipe, bits, arch)
    apply_quantization_config(plain, qconfig, show_progress=False)
    fmt = weight_format(bits.w, recipe) if bits.quantizes("w") else None
    for module in plain.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if fmt is None or not isinstance(module, nn.Linear) or scheme is None or scheme.weights is None:
            continue
        if _float_weights(fmt):  # compressed-tensors rounds exact / scale (/ g) back to exactly these codes
            exact, scale, g = float_grid(module.weight, fmt)
            if g is not None:  # NVFP4: compressed-tensors divides by the reciprocal, 448 * 6 / amax
                module.weight_global_scale.data = (1 / g).reshape(module.weight_global_scale.shape)
        else:
            q, scale = integer_grid(module.weight, fmt.bits, fmt.group)
            scale = scale.to(module.weight_scale.dtype)
            exact = (q.to(scale.dtype).unflatten(1, (scale.shape[1], -1)) * scale.unsqueeze(-1)).flatten(1)
        # new tensors (the built model is left as it was) that compressed-tensors packs back to exactly q
        module.weight = nn.Parameter(exact.to(module.weight.dtype), requires_grad=False)
        module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
    if online:  # attached only to be saved under compressed-tensors' names; the fused parts are already fused
        attach = copy.deepcopy(online)
        for scheme in attach.values():
            scheme.apply = [a for a in scheme.apply if a.is_online()]
        apply_transform_config(plain, TransformConfig(config_groups=attach))
        with torch.no_grad():
            for name, module in plain.named_modules():
                leaf = name.rsplit(".", 1)[-1]  # "{scheme}_{location}", as compressed-tensors names it
                if isinstance(module, TransformBase):
                    key = next(leaf[:-len(x)] for x in ("_q_attn", "_k_cache", "_input") if leaf.endswith(x))
                    module.weight.copy_(matrices[key].to(module.weight))
    tconfig = {**_offline_schemes(recipe, arch), **online}
    compressor = ModelCompressor(quantization_config=qconfig,
                                 transform_config=TransformConfig(config_groups=tconfig) if tconfig else None)
    compressor.compress_model(plain)
    return plain, compressor


def _save_model(plain: nn.Module, compressor, directory: Path) -> None:
    plain.save_pretrained(directory)
    compressor.update_config(str(directory))


def _save_extras(directory: Path, handle, record: dict) -> None:
    """The tokenizer, the provenance record and the transformers loader, next to the weights."""
    handle.tokenizer.save_pretrained(directory)
    (directory / LOADER_FILE).write_text(LOADER)
    (directory / MARKER).write_text(json.dumps(record, indent=1, default=str))


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temporary directory to `out` (an earlier export moves aside first, and back on failure)."""
    check_destination(out, force)
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def runtime_notes(recipe, bits) -> list[str]:
    """What a consumer of the checkpoint must know (see the module docstring)."""
    rot, notes = recipe.rotation, []
    if rot.r3 != "none" or rot.r4 != "none":
        notes.append(f"transformers ignores transform_config: load with {LOADER_FILE} (transformers + "
                     "compressed-tensors only), which applies the online R3/R4 transforms and their stored matrices")
    if rot.r3 != "none" and bits.quantizes("kv"):
        notes.append("compressed-tensors also quantizes the queries with the KV-cache arguments once R3 hooks the "
                     f"attention; SpinScope quantizes only K and V, so {LOADER_FILE} keeps queries unquantized "
                     "(quantize_queries=True gives compressed-tensors' own behaviour)")
    if isinstance(bits.w, str) and bits.w.startswith(("mx", "nvfp")):
        notes.append(f"compressed-tensors decompresses {bits.w} weights to bfloat16: load in bfloat16, or with "
                     f"{LOADER_FILE}, which casts them to the model's dtype")
    if bits.quantizes("kv") and bits.kv != "fp8":
        notes.append("the KV cache is quantized dynamically and asymmetrically per token and head: compressed-tensors "
                     "runs it in transformers, and itself warns that vLLM does not support asymmetric KV-cache "
                     "quantization")
    return notes


def write_checkpoint(handle, model: nn.Module, recipe, bits, out: str | os.PathLike, force: bool = False,
                     seed: int = 0) -> dict:
    """Write the built `model` (engine.evaluate.build_model's) as a compressed-tensors directory at `out`, through a
    temporary directory beside it renamed at the end: an error or an interruption leaves nothing behind. Returns a
    summary (also written as SPINSCOPE_EXPORT.json)."""
    from compressed_tensors import __version__ as ct_version
    from transformers import __version__ as tf_version

    from engine.evaluate import CODE_VERSION

    out = check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record = {"model": handle.name, "source": handle.source, "recipe": recipe.name, "weights": recipe.weights,
              "bits": str(bits), "clip": recipe.clip.mode, "rotation": recipe.rotation.tag(), "seed": seed,
              "dtype": handle.dtype, "engine_code": CODE_VERSION, "compressed_tensors": ct_version,
              "transformers": tf_version, "notes": runtime_notes(recipe, bits)}
    try:
        plain, compressor = _pack(model, recipe, bits, handle.arch)
        tmp.mkdir()
        _save_model(plain, compressor, tmp)
        _save_extras(tmp, handle, record)
        _publish(tmp, out, force)
    except OSError as e:  # a full disk, a permission: the same one-sentence error as any refusal
        raise ExportError(f"writing {out} failed ({e.strerror or e}); nothing was left behind") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.name for p in out.iterdir())
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    return {**record, "out": str(out), "files": files, "bytes": sum((out / f).stat().st_size for f in files),
            "quantization_config": config}


def export_job(handle, recipe, bits, out_dir: str | os.PathLike, cfg, force: bool = False):
    """Generator: build the row as engine.evaluate does (Progress of rotate, calibrate, weights...), then write it
    (Progress 'export'); Done(summary of write_checkpoint). Refusals come before any work."""
    from engine.evaluate import build_model
    from engine.quant.recipes import Bits, get_recipe

    recipe = get_recipe(recipe) if isinstance(recipe, str) else recipe
    bits = Bits.parse(bits) if isinstance(bits, str) else bits
    check_exportable(recipe, bits, handle)
    check_destination(out_dir, force)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    with handle.working_model() as model:
        for ev in build_model(handle, model, recipe, bits, cfg, cfg.seed):
            if isinstance(ev, Done):
                model = ev.result[0]
            else:
                yield ev
        yield Progress("export", 0, 1, time.perf_counter() - t0, f"packing and writing {out_dir}")
        summary = write_checkpoint(handle, model, recipe, bits, out_dir, force, cfg.seed)
        del model
    yield Progress("export", 1, 1, time.perf_counter() - t0, f"wrote {summary['out']}")
    yield Done({**summary, "seconds": time.perf_counter() - t0}, seconds=time.perf_counter() - t0)


def export_row(handle, recipe, bits, out_dir, cfg, force: bool = False) -> dict:
    """export_job to the end (the Evaluate page's button, scripts): the summary."""
    from engine.events import run_to_end

    return run_to_end(export_job(handle, recipe, bits, out_dir, cfg, force))


# ---- reading a checkpoint back --------------------------------------------------------------------------------------
LOADER = '''"""Load this compressed-tensors checkpoint with transformers and compressed-tensors only (no SpinScope).

transformers applies its quantization_config (packed integer weights, dynamic activation and KV-cache quantizers)
but ignores its transform_config; load() applies the online transforms (R3 on queries and keys, R4 on down_proj's
input) through compressed-tensors and loads their stored matrices. R1 and R2 are already in the weights.

compressed-tensors also quantizes the queries with the KV cache's arguments once a transform hooks the attention;
the model this was exported from quantizes only keys and values, so queries stay unquantized unless
quantize_queries=True.   Usage: from load_with_transforms import load; model = load(directory)
"""
import json
from pathlib import Path

import torch
from compressed_tensors.modeling.attention import QuantizedAttentionImpl
from compressed_tensors.transform import TransformConfig, apply_transform_config
from compressed_tensors.transform.factory.base import TransformBase
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def _attention_without_query_quantization(module, query, key, value, *args, **kwargs):
    return ALL_ATTENTION_FUNCTIONS[QuantizedAttentionImpl._original_impl](module, query, key, value, *args, **kwargs)


def load(directory, dtype=torch.float32, quantize_queries=False, **kwargs):
    directory = Path(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, **kwargs).eval()
    quant = json.loads((directory / "config.json").read_text()).get("quantization_config") or {}
    if quant.get("format", "").startswith(("mxfp", "nvfp")) and getattr(model, "hf_quantizer", None) is not None:
        # compressed-tensors decompresses these weights to bfloat16 on the first forward, which a float32 model
        # cannot multiply: decompress now and cast (MX stays exact; NVFP4 keeps bfloat16's rounding)
        model.hf_quantizer.compressor.decompress_model(model)
        for m in model.modules():
            if getattr(m, "quantization_scheme", None) is not None and m.weight.dtype != dtype:
                m.weight.data = m.weight.data.to(dtype)
    groups = (quant.get("transform_config") or {}).get("config_groups")
    if not groups:
        return model
    config = TransformConfig.model_validate({"config_groups": groups})
    for scheme in config.config_groups.values():
        scheme.apply = [a for a in scheme.apply if a.is_online()]  # offline ones are fused into the weights
    apply_transform_config(model, config)
    wanted = {n for n, m in model.named_modules() if isinstance(m, TransformBase)}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:  # shared matrices are stored once, under their first module
            stored = {k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 1)[0] in wanted}
        model.load_state_dict(stored, strict=False)
    if not quantize_queries:
        for m in model.modules():
            if isinstance(m, QuantizedAttentionImpl):  # its pre-hook (R3 on the queries) still runs
                m.forward = _attention_without_query_quantization
    return model
'''


def import_kwargs(config) -> dict:
    """from_pretrained keyword arguments for a compressed-tensors checkpoint (engine.model.loading): its weights
    dequantized at load, as SpinScope analyses floating-point models and applies its own quantizers; {} otherwise."""
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return {}
    if qc.get("format") not in IMPORT_FORMATS:
        raise ValueError(f"compressed-tensors format {qc.get('format')!r} cannot be imported: SpinScope reads "
                         f"{', '.join(IMPORT_FORMATS)} checkpoints (transformers' dequantizing load returns an "
                         "int-quantized checkpoint's integers without their scales)")
    config = copy.deepcopy(config)
    config.quantization_config = {**qc, "dequantize": True}
    return {"config": config}


def _stored_transforms(directory: Path, leaves: set[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys() if k.rsplit(".", 2)[-2] in leaves})
    return out


def _transform_matrix(scheme, args, key: str, leaf: str, stored: dict, size: int) -> torch.Tensor:
    """T of x -> x T as compressed-tensors applies it (float64): a Hadamard type's stored +-1 matrix over sqrt(n)
    (transposed when inverse), a random-matrix's stored matrix (already the inverse when inverse), block-diagonal
    copies when head_dim is set. Shared matrices are stored once: any module's copy serves."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    if scheme.randomize:
        raise ValueError(f"transform {leaf} is randomized per module, which import does not support")
    n = scheme.head_dim or size
    w = stored.get(key, next((v for k, v in stored.items() if k.endswith(f".{leaf}.weight") and v.shape[0] == n),
                             None))
    if w is None and scheme.type == "hadamard":
        w = deterministic_hadamard_matrix(n, torch.float64)
    if w is None:
        raise ValueError(f"the checkpoint does not store the matrix of transform {leaf}")
    t = w.double()
    if scheme.type in ("hadamard", "random-hadamard"):
        t = t / math.sqrt(n)
        t = t.T if args.inverse else t
    return torch.block_diag(*[t] * (size // n)) if n != size else t


def fold_online_transforms(model: nn.Module, directory: str | os.PathLike) -> str | None:
    """Fold the online transforms of a (dequantized) compressed-tensors checkpoint back into its weights so the
    model computes the floating-point function its weights mean: a linear's input transform x -> x T makes
    W <- W T^T (R4); a q_attn/k_cache pair (R3) cancels in q k^T. Returns a note for the UI, or None."""
    from compressed_tensors.transform import TransformScheme
    from compressed_tensors.utils import match_named_modules

    from engine.model import dispatch

    quant = json.loads((Path(directory) / "config.json").read_text()).get("quantization_config") or {}
    groups = (quant.get("transform_config") or {}).get("config_groups") or {}
    schemes = {name: TransformScheme.model_validate(raw) for name, raw in groups.items()}
    online = {name: s for name, s in schemes.items() if any(a.is_online() for a in s.apply)}
    if not online:
        return None
    stored = _stored_transforms(Path(directory), {f"{n}_input" for n in online})
    folded = []
    for name, scheme in online.items():
        locations = {a.location for a in scheme.apply if a.is_online()}
        if locations == {"q_attn", "k_cache"}:
            folded.append(f"{name} (queries and keys: cancels in q k^T)")
            continue
        if locations != {"input"}:
            raise ValueError(f"transform {name} acts online at {', '.join(sorted(locations))}, which SpinScope cannot "
                             "fold into the weights on import (it folds input transforms and q_attn/k_cache pairs)")
        for args in (a for a in scheme.apply if a.is_online()):
            for module_name, module in match_named_modules(model, args.targets, args.ignore):
                t = _transform_matrix(scheme, args, f"{module_name}.{name}_input.weight", f"{name}_input", stored,
                                      module.in_features)
                w = dispatch.read_tensor(module, "weight")
                dispatch.write_tensor(module, "weight", (w.double() @ t.T.to(w.device)).to(w.dtype))
        folded.append(f"{name} (linear inputs: folded into the weights)")
    return "online transforms " + "; ".join(folded)


def import_note(config, folded: str | None) -> str:
    """What the UI says of a compressed-tensors checkpoint loaded through import_kwargs."""
    quant = config.quantization_config
    scheme = next(iter((quant.get("config_groups") or {}).values()), {}) or {}
    w = (scheme.get("weights") or {}).get("num_bits")
    parts = [f"compressed-tensors checkpoint ({quant.get('format', '?')}"
             + (f", {w}-bit weights dequantized at load" if w else "")
             + (" to bfloat16's rounding" if quant.get("format", "").startswith("nvfp4") else "") + ")",
             "its activation and KV-cache quantizers are not applied: SpinScope's own recipes quantize it"]
    return "; ".join(parts + ([folded] if folded else []))
