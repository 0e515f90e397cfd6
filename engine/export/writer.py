"""Write one evaluation row (a recipe at a bit setting) as a compressed-tensors checkpoint.

The row is built exactly as engine.evaluate builds it (build_model: rotations fused, weights quantized, online R3/R4
and the activation/KV quantizers installed); what it computes is then written in compressed-tensors' terms
(compressed-tensors 0.20.1 schema, as llm-compressor writes it). Every format describes itself
(engine.quant.formats: ct_weights, ct_input_activations, ct_kv_cache, ct_weight_tensors), so this module has no
branch per format:

- weights: the codes and scales the weight quantizer returned (RTN with or without a clip search, calibrated per
  row, GPTQ), kept on each linear as `spinscope_codes`, are written as they are: no grid is searched for. Integer
  widths -> `weights` int, symmetric, strategy channel (group), pack-quantized; mxfp4 / mxfp6 / mxfp8 -> float,
  group 32, E8M0 scales; nvfp4 -> float 4, tensor_group 16, E4M3 block scales and weight_global_scale = 1 / g
  (compressed-tensors divides by 448 * 6 / amax where the engine multiplies by amax / (6 * 448)); fp8 -> float 8 per
  channel, float-quantized. compressed-tensors 0.20.1 decompresses MX and NVFP4 weights to bfloat16: the loader
  casts them back (MX and FP8 weights round-trip bit for bit; NVFP4's stored codes and scales mean the engine's
  weights to float32 rounding, but the decompressed ones carry bfloat16's rounding, up to 2^-8 relative).
- activations: per token, asymmetric, dynamic -> `input_activations` int, asymmetric, strategy token: the engine's
  grid [-2^(b-1), 2^(b-1)-1] and float32 operations (engine.quant.quantizers); its range is each token's min and max
  with 0 included, i.e. clip ratio 1.0. fp8 -> per-token dynamic E4M3 (FP8_DYNAMIC's).
- KV cache: K (after RoPE and R3) and V, one asymmetric grid per token and head -> `kv_cache_scheme` int,
  asymmetric, strategy group, group_size head_dim, dynamic (fp8: the same in E4M3).
- R1, R2 (and the folded RMSNorm gains) are fused into the weights; transform_config lists them as offline
  weight_input/weight_output entries, as llm-compressor's SpinQuantModifier does. R3 -> q_attn + k_cache online
  transforms of each self_attn, R4 -> an `input` transform of down_proj, with their matrices stored: a Hadamard
  one as "hadamard" (compressed-tensors' own Sylvester matrix) or "random-hadamard" (+-1 entries, divided by sqrt(n)
  when applied), any other as "random-matrix" (transform_type).

Refused, each with its reason (check_exportable; a format's own reason comes from its class): QRazor's SDR;
formats without a compressed-tensors scheme (asymmetric integer weights, MXINT8, ...); MX and NVFP4 activations or
KV cache (compressed-tensors' dynamic scales differ from the engine's); clip ratios below 1.0 on activations or the
KV cache (dynamic quantizers cannot clip); mixtures of experts; nothing quantized.

Fidelity (SmolLM2-135M, tests/engine/test_export.py and benchmarks/export_roundtrip.py): integer W4A16 and
W4A4KV4 rows, rotated or not, give the engine's logits bit for bit. That needs the same float32 operations in the
same order on both sides, because a 4-bit row is chaotic (one ulp on a third of the embedding values moves its
perplexity by 0.3-1 %): the engine's asymmetric quantizer is compressed-tensors' round(x / s + z) on its signed
grid, and its dense Hadamards are applied as (x @ M) / sqrt(n) with the +-1 matrix M, as compressed-tensors'
Hadamard transforms apply them (engine.rotation.fusion.OnlineRotation).

Runtimes (checked here with transformers 5.23 and compressed-tensors 0.20.1): transformers applies the quantization
(packed weights, dynamic activation and KV quantizers) but ignores transform_config, so a rotated export needs its
online transforms applied through compressed-tensors: load_with_transforms.py (this package's standalone loader,
copied next to the checkpoint) does that. Once R3 hooks an attention, compressed-tensors also quantizes the queries
with the KV cache's arguments (QuantizedAttentionImpl reads the scheme that kv_cache_scheme puts on the attention);
SpinScope quantizes only K and V, so the loader keeps queries in floating point unless asked.

Reading a checkpoint back is engine.model.compressed's job (load_model calls it).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path

import torch
from torch import nn

from engine.events import Done, Progress, result_of

MARKER = "SPINSCOPE_EXPORT.json"  # provenance; also what lets --force replace a directory (only an earlier export)
LOADER_FILE = "load_with_transforms.py"
LOADER_PATH = Path(__file__).with_name(LOADER_FILE)  # the standalone loader, copied into every export


class ExportError(ValueError):
    """A row that cannot be exported, or a destination that cannot be written, with a one-sentence reason."""


def _formats(recipe, bits, head_dim: int | None = None):
    """(weight, activation, KV-cache) formats of the row (engine.quant.methods), None where left at 16 bits."""
    from engine.quant.methods import activation_format, kv_format, weight_format

    return (
        weight_format(bits.w, recipe) if bits.quantizes("w") else None,
        activation_format(bits.a),
        kv_format(bits.kv, head_dim),
    )


# ---- what can be expressed ----------------------------------------------------------------------------------------
def check_exportable(recipe, bits, handle=None) -> None:
    """Refuse (ExportError) what compressed-tensors cannot express, before any model is built; with the model's
    `handle`, also what depends on the model."""
    from engine.quant.formats import NotExportable

    if not recipe.quantize or not any(bits.quantizes(p) for p in ("w", "a", "kv")):
        raise ExportError(
            f"nothing to export: {recipe.name} at {bits} quantizes nothing, and a floating-point model "
            "needs no compressed-tensors checkpoint"
        )
    if "qrazor" in (recipe.weights, recipe.activations):
        raise ExportError(
            "QRazor cannot be exported: its significant-data razoring keeps each value's 4 bits from "
            "its group's leading one, with a per-group shift flag, and compressed-tensors' integer "
            "formats hold only a scale and a zero point per group"
        )
    head_dim = handle.arch.head_dim if handle is not None else None
    w, a, kv = _formats(recipe, bits, head_dim)
    for part, name, fmt, describe in (
        ("w", "weight", w, lambda f: f.ct_weights()),
        ("a", "activation", a, lambda f: f.ct_input_activations()),
        ("kv", "KV-cache", kv, lambda f: f.ct_kv_cache(head_dim)),
    ):
        try:
            if fmt is not None:
                describe(fmt)
        except NotExportable as e:
            verb = "is not exported" if part == "w" else "cannot be exported"
            raise ExportError(f"{name} format {bits.label(part)} {verb}: {e}") from None
    if (bits.quantizes("a") or bits.quantizes("kv")) and recipe.clip.calibrated:
        raise ExportError(
            "calibrated activation and KV clip ratios cannot be exported: compressed-tensors' dynamic "
            "quantizers take each token's whole min-max range (clip 1.0); use --clip none, or keep "
            "activations and KV cache at 16 bits (weight clipping is kept: weight scales are stored)"
        )
    low = [
        f"{name} {ratio:g}"
        for name, part, ratio in (("activation", "a", recipe.clip.activation), ("KV-cache", "kv", recipe.clip.kv))
        if bits.quantizes(part) and ratio < 1.0
    ]
    if low:
        raise ExportError(
            f"fixed clip ratios below 1.0 ({', '.join(low)}) cannot be exported: compressed-tensors' "
            "dynamic quantizers take each token's whole min-max range; use --clip none"
        )
    if handle is None:
        return
    arch = handle.arch
    if handle.dispatched:
        raise ExportError("a model dispatched over several devices cannot be exported yet: load it on one device")
    if arch.n_experts:
        raise ExportError(
            f"{arch.name} is a mixture of experts: transformers stores its experts as stacked 3-D "
            "parameters, which compressed-tensors' Linear schemes do not cover"
        )
    group = w.group if w is not None else None
    for role in arch.linears if group else ():
        width = arch.module(handle.model, role, 0).in_features
        if width % group:
            raise ExportError(
                f"weight group size {group} does not divide {role}'s {width} input channels, and "
                "compressed-tensors' group strategy needs whole groups"
            )


def check_destination(out: str | os.PathLike, force: bool = False) -> Path:
    """The output directory as a Path; refuses an existing one unless `force`, and even then anything but an
    earlier export (or an empty directory), so --force never deletes a directory SpinScope did not write."""
    out = Path(out).expanduser()
    if out.exists() or out.is_symlink():
        if not force:
            raise ExportError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir() or out.is_symlink() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise ExportError(
                f"{out} is not an earlier SpinScope export (it has no {MARKER}); --force replaces only "
                "those or an empty directory"
            )
    return out


# ---- the checkpoint -------------------------------------------------------------------------------------------------
def _plain_model(model: nn.Module) -> nn.Module:
    """A transformers model of the same class holding the built model's tensors (the same objects, never written
    to) without SpinScope's hooks, online-rotation modules or attention entry point."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # an imported checkpoint's: this export writes its own
        del config.quantization_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # no memory until the built model's tensors are assigned
        plain = AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=next(model.parameters()).dtype
        )
    own, state = plain.state_dict(), model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise ExportError(
            f"the built model lacks {len(missing)} tensors of a plain {type(model).__name__} (e.g. {missing[0]})"
        )
    plain.load_state_dict({k: state[k] for k in own}, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain.eval().requires_grad_(False)


def _quantization_config(recipe, bits, arch):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    w, a, kv = _formats(recipe, bits, arch.head_dim)
    weights, fmt_name = (None, "dense") if w is None else w.ct_weights()
    weights = None if weights is None else QuantizationArgs(**weights)
    acts = None if a is None else QuantizationArgs(**a.ct_input_activations())
    kv = None if kv is None else QuantizationArgs(**kv.ct_kv_cache(arch.head_dim))
    groups = (
        {}
        if weights is None and acts is None
        else {
            "group_0": QuantizationScheme(
                targets=["Linear"], weights=weights, input_activations=acts, format=fmt_name if weights else None
            )
        }
    )
    return QuantizationConfig(
        config_groups=groups,
        ignore=[arch.roles.lm_head],
        kv_cache_scheme=kv,
        format=fmt_name,
        quantization_status="frozen",
    )


def _regex(path: str) -> str:
    """A target matching the module of this path in every layer, by its last name (as llm-compressor writes them)."""
    return f"re:.*{re.escape(path.rsplit('.', 1)[-1])}$"


def _offline_schemes(recipe, arch) -> dict:
    """R1 and R2 as llm-compressor's SpinQuantModifier lists them: fused (offline) transforms; for the record only,
    since the weights already hold them (a runtime applies only online locations)."""
    from compressed_tensors.transform import TransformArgs, TransformScheme

    from engine.rotation.files import load_rotation_file

    rot, roles, out = recipe.rotation, arch.roles, {}
    data = load_rotation_file(rot.file) if rot.file else {}
    first_r2 = data.get("model.layers.0.self_attn.R2", data.get("R2"))

    def kind(setting: str, loaded) -> str:
        return (
            transform_type(loaded)
            if setting == "file" and loaded is not None
            else {"hadamard": "random-hadamard"}.get(setting, "random-matrix")
        )

    if rot.r1 != "none":
        out["R1"] = TransformScheme(
            type=kind(rot.r1, data.get("R1")),
            apply=[
                TransformArgs(
                    targets=[_regex(roles.embed)] + [_regex(getattr(roles, r)) for r in arch.residual_writers],
                    location="weight_output",
                ),
                TransformArgs(
                    targets=[_regex(getattr(roles, r)) for r in arch.residual_readers] + [roles.lm_head],
                    location="weight_input",
                    inverse=True,
                ),
            ],
        )
    if rot.r2 != "none" and roles.value == "v":  # a fused qkv holds R2 on its value rows only: not a CT location
        out["R2"] = TransformScheme(
            type=kind(rot.r2, first_r2),
            head_dim=arch.head_dim,
            apply=[
                TransformArgs(targets=[_regex(roles.v)], location="weight_output"),
                TransformArgs(targets=[_regex(roles.o)], location="weight_input", inverse=True),
            ],
        )
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
                apply = [
                    TransformArgs(targets=targets, location="input"),
                    TransformArgs(targets=targets, location="weight_input", inverse=True),
                ]
            schemes[key] = TransformScheme(type=kind_name, head_dim=r.shape[0] if kind == "R3" else None, apply=apply)
            weights[key] = stored_matrix(r, kind_name)
    return schemes, weights


def _weight_tensors(linear: nn.Module, name: str, fmt, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """What compressed-tensors stores for one built linear: its format's tensors of the codes and scales its weight
    quantizer returned (engine.quant.apply keeps them as `spinscope_codes`)."""
    enc = getattr(linear, "spinscope_codes", None)
    if enc is None:
        raise ExportError(f"{name} has no codes and scales: its weight was not quantized by SpinScope's RTN or GPTQ")
    if enc.fmt != fmt:
        raise ExportError(f"{name} holds {enc.fmt.name} codes where the row's weights are {fmt.name}")
    w = linear.weight
    if not torch.equal(enc.dequantize().to(device=w.device, dtype=w.dtype), w):
        raise ExportError(
            f"{name}'s weight changed after it was quantized, so its codes and scales no longer say "
            "what the model computes"
        )
    return enc.fmt.ct_weight_tensors(enc, scale_dtype)


def _pack(model: nn.Module, recipe, bits, arch):
    """The plain model with compressed-tensors' quantization and online transforms attached and its weights packed;
    returns (plain model, ModelCompressor to write the config)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from compressed_tensors.transform.factory.base import TransformBase

    online, matrices = _online_schemes(model, arch)
    plain = _plain_model(model)
    qconfig = _quantization_config(recipe, bits, arch)
    apply_quantization_config(plain, qconfig, show_progress=False)
    built, fmt = dict(model.named_modules()), _formats(recipe, bits)[0]
    for name, module in plain.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, nn.Linear) or scheme is None or scheme.weights is None:
            continue
        for key, value in _weight_tensors(built[name], name, fmt, module.weight_scale.dtype).items():
            # new tensors (the built model is left as it was) that compressed-tensors packs back to exactly the codes
            param = getattr(module, key)
            if key == "weight":
                module.weight = nn.Parameter(value.to(param.dtype), requires_grad=False)
            else:
                param.data = value.to(param.dtype).reshape(param.shape)
    if online:  # attached only to be saved under compressed-tensors' names; the fused parts are already fused
        attach = copy.deepcopy(online)
        for scheme in attach.values():
            scheme.apply = [a for a in scheme.apply if a.is_online()]
        apply_transform_config(plain, TransformConfig(config_groups=attach))
        with torch.no_grad():
            for name, module in plain.named_modules():
                leaf = name.rsplit(".", 1)[-1]  # "{scheme}_{location}", as compressed-tensors names it
                if isinstance(module, TransformBase):
                    key = next(leaf[: -len(x)] for x in ("_q_attn", "_k_cache", "_input") if leaf.endswith(x))
                    module.weight.copy_(matrices[key].to(module.weight))
    tconfig = {**_offline_schemes(recipe, arch), **online}
    compressor = ModelCompressor(
        quantization_config=qconfig, transform_config=TransformConfig(config_groups=tconfig) if tconfig else None
    )
    compressor.compress_model(plain)
    return plain, compressor


def _save_model(plain: nn.Module, compressor, directory: Path) -> None:
    plain.save_pretrained(directory)
    compressor.update_config(str(directory))


def _save_extras(directory: Path, handle, record: dict) -> None:
    """The tokenizer, the provenance record and the transformers loader, next to the weights."""
    handle.tokenizer.save_pretrained(directory)
    shutil.copyfile(LOADER_PATH, directory / LOADER_FILE)
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
        notes.append(
            f"transformers ignores transform_config: load with {LOADER_FILE} (transformers + "
            "compressed-tensors only), which applies the online R3/R4 transforms and their stored matrices"
        )
    if rot.r3 != "none" and bits.quantizes("kv"):
        notes.append(
            "compressed-tensors also quantizes the queries with the KV-cache arguments once R3 hooks the "
            f"attention; SpinScope quantizes only K and V, so {LOADER_FILE} keeps queries unquantized "
            "(quantize_queries=True gives compressed-tensors' own behaviour)"
        )
    w, _, kv = _formats(recipe, bits)
    if w is not None and w.ct_weights()[1].startswith(("mxfp", "nvfp4")):
        notes.append(
            f"compressed-tensors decompresses {w.name} weights to bfloat16: load in bfloat16, or with "
            f"{LOADER_FILE}, which casts them to the model's dtype"
        )
    if kv is not None and not kv.ct_kv_cache(None)["symmetric"]:
        notes.append(
            "the KV cache is quantized dynamically and asymmetrically per token and head: compressed-tensors "
            "runs it in transformers, and itself warns that vLLM does not support asymmetric KV-cache "
            "quantization"
        )
    return notes


def write_checkpoint(
    handle, model: nn.Module, recipe, bits, out: str | os.PathLike, force: bool = False, seed: int = 0
) -> dict:
    """Write the built `model` (engine.evaluate.build_model's) as a compressed-tensors directory at `out`, through a
    temporary directory beside it renamed at the end: an error or an interruption leaves nothing behind. Returns a
    summary (also written as SPINSCOPE_EXPORT.json)."""
    from compressed_tensors import __version__ as ct_version
    from transformers import __version__ as tf_version

    from engine.evaluate import CODE_VERSION

    out = check_destination(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    record = {
        "model": handle.name,
        "source": handle.source,
        "recipe": recipe.name,
        "weights": recipe.weights,
        "bits": str(bits),
        "clip": recipe.clip.mode,
        "rotation": recipe.rotation.tag(),
        "seed": seed,
        "dtype": handle.dtype,
        "engine_code": CODE_VERSION,
        "compressed_tensors": ct_version,
        "transformers": tf_version,
        "notes": runtime_notes(recipe, bits),
    }
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
    return {
        **record,
        "out": str(out),
        "files": files,
        "bytes": sum((out / f).stat().st_size for f in files),
        "quantization_config": config,
    }


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
        model = (yield from result_of(build_model(handle, model, recipe, bits, cfg, cfg.seed)))[0]
        yield Progress("export", 0, 1, time.perf_counter() - t0, f"packing and writing {out_dir}")
        summary = write_checkpoint(handle, model, recipe, bits, out_dir, force, cfg.seed)
        del model
    yield Progress("export", 1, 1, time.perf_counter() - t0, f"wrote {summary['out']}")
    yield Done({**summary, "seconds": time.perf_counter() - t0}, seconds=time.perf_counter() - t0)


def export_row(handle, recipe, bits, out_dir, cfg, force: bool = False) -> dict:
    """export_job to the end (the Evaluate page's button, scripts): the summary."""
    from engine.events import run_to_end

    return run_to_end(export_job(handle, recipe, bits, out_dir, cfg, force))
