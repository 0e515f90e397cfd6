"""Reading compressed-tensors checkpoints back (engine/export writes them): load_model loads such a directory with
its weights dequantized (import_kwargs) and its online linear transforms folded back into the weights
(fold_online_transforms), i.e. as the floating-point model its weights mean; Explore and Evaluate then apply
SpinScope's own rotations and quantizers to it.

It lives with the loading code, not in engine/export: loading is this floor's job, the writer sits on the top floor
(it builds rows with engine.evaluate), and model/ must not import a floor above it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from engine.model import dispatch

# checked to dequantize correctly with transformers 5.23 (nvfp4: to bfloat16's rounding, as compressed-tensors 0.20.1
# decompresses it; the rest exactly)
IMPORT_FORMATS = (
    "pack-quantized",
    "dense",
    "float-quantized",
    "mxfp4-pack-quantized",
    "mxfp6-pack-quantized",
    "mxfp8-quantized",
    "nvfp4-pack-quantized",
)


def import_kwargs(config) -> dict:
    """from_pretrained keyword arguments for a compressed-tensors checkpoint (engine.model.loading): its weights
    dequantized at load, as SpinScope analyses floating-point models and applies its own quantizers; {} otherwise."""
    qc = getattr(config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
        return {}
    if qc.get("format") not in IMPORT_FORMATS:
        raise ValueError(
            f"compressed-tensors format {qc.get('format')!r} cannot be imported: SpinScope reads "
            f"{', '.join(IMPORT_FORMATS)} checkpoints (transformers' dequantizing load returns an "
            "int-quantized checkpoint's integers without their scales)"
        )
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
    w = stored.get(key, next((v for k, v in stored.items() if k.endswith(f".{leaf}.weight") and v.shape[0] == n), None))
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
            raise ValueError(
                f"transform {name} acts online at {', '.join(sorted(locations))}, which SpinScope cannot "
                "fold into the weights on import (it folds input transforms and q_attn/k_cache pairs)"
            )
        for args in (a for a in scheme.apply if a.is_online()):
            for module_name, module in match_named_modules(model, args.targets, args.ignore):
                t = _transform_matrix(
                    scheme, args, f"{module_name}.{name}_input.weight", f"{name}_input", stored, module.in_features
                )
                w = dispatch.read_tensor(module, "weight")
                dispatch.write_tensor(module, "weight", (w.double() @ t.T.to(w.device)).to(w.dtype))
        folded.append(f"{name} (linear inputs: folded into the weights)")
    return "online transforms " + "; ".join(folded)


def import_note(config, folded: str | None) -> str:
    """What the UI says of a compressed-tensors checkpoint loaded through import_kwargs."""
    quant = config.quantization_config
    scheme = next(iter((quant.get("config_groups") or {}).values()), {}) or {}
    w = (scheme.get("weights") or {}).get("num_bits")
    parts = [
        f"compressed-tensors checkpoint ({quant.get('format', '?')}"
        + (f", {w}-bit weights dequantized at load" if w else "")
        + (" to bfloat16's rounding" if quant.get("format", "").startswith("nvfp4") else "")
        + ")",
        "its activation and KV-cache quantizers are not applied: SpinScope's own recipes quantize it",
    ]
    return "; ".join(parts + ([folded] if folded else []))
