"""Load this compressed-tensors checkpoint with transformers and compressed-tensors only (no SpinScope).

transformers applies its quantization_config (packed integer weights, dynamic activation and KV-cache quantizers)
but ignores its transform_config; load() applies the online transforms (R3 on queries and keys, R4 on down_proj's
input) through compressed-tensors and loads their stored matrices. R1 and R2 are already in the weights.

compressed-tensors also quantizes the queries with the KV cache's arguments once a transform hooks the attention;
the model this was exported from quantizes only keys and values, so queries stay unquantized unless
quantize_queries=True.   Usage: from load_with_transforms import load; model = load(directory)

(SpinScope copies this file, engine/export/load_with_transforms.py, into every export; it imports nothing of
SpinScope.)
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
