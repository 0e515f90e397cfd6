"""Fake-quantize a (rotated) model in place: weights (RTN, GPTQ or QRazor), activations on the inputs of every
linear except lm_head (per token), and the KV cache (per head, K after R3). Apply it to a copy: see evaluate.py.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from engine.events import Progress
from engine.model import attention, dispatch
from engine.model.arch import ArchInfo
from engine.quant.gptq import HessianAccumulator, gptq_quantize
from engine.quant.qrazor import qrazor_fake_quant
from engine.quant.quantizers import quantize_activation, quantize_kv, quantize_weight
from engine.quant.recipes import Bits, Recipe

QRAZOR_BASE = {"w": 8, "a": 16, "kv": 8}  # QRazor's base precision per role


def _qrazor_target(role: str, bits: int) -> int | None:
    """SDR target bits of a role's setting: below the base precision it is razored to `bits`; at the base (or 16
    for activations, whose base is 16) only the base integers are kept. Anything between base and 16 cannot be
    honoured (weights and KV have an 8-bit base) and is refused rather than silently run at 8 bits."""
    base = QRAZOR_BASE[role]
    if bits < base:
        return bits
    if bits == base:
        return None
    name = {"w": "weight", "a": "activation", "kv": "KV-cache"}[role]
    raise ValueError(f"qrazor {name} bits must be below its {base}-bit base precision (razored), {base} (base "
                     f"integers only) or 16 (floating point), got {bits}")


def _qrazor(x: torch.Tensor, role: str, bits: int, group: int = 16, per_channel: bool = False) -> torch.Tensor:
    """Base-precision absmax integers; razored to `bits` when below the base (QRazor's W4A4KV4)."""
    base = QRAZOR_BASE[role]
    target = _qrazor_target(role, bits)
    if target is None:
        from engine.quant.qrazor import dequantize, quantize_absmax

        q, scale = quantize_absmax(x.float(), base, per_channel=per_channel)
        return dequantize(q, scale).to(x.dtype)
    return qrazor_fake_quant(x, base, target_bits=target, group_size=group, per_channel=per_channel)


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    dispatch.write_tensor(lin, "weight", w)  # also where an offloaded weight lives (engine.model.dispatch)


def _weight(lin: nn.Linear) -> torch.Tensor:
    return dispatch.read_tensor(lin, "weight").float()


def quantize_weights_rtn(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe) -> None:
    if bits.w >= 16:
        return
    for i in range(arch.n_layers):
        for role in arch.roles.linears:
            lin = arch.module(model, role, i)
            w = _weight(lin)
            if recipe.weights == "qrazor":
                q = _qrazor(w, "w", bits.w, per_channel=True)
            else:
                q = quantize_weight(w, bits.w, group_size=recipe.w_group, clip_search=recipe.w_clip_search)
            _set_weight(lin, q)


class _StopForward(Exception):
    pass


def _layer_inputs(model: nn.Module, arch: ArchInfo, windows: torch.Tensor) -> list:
    """(args, kwargs) reaching decoder layer 0 for each calibration window (the forward stops there)."""
    first = arch.layer(model, 0)
    caught = []

    def catch(module, args, kwargs):
        caught.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _StopForward

    h = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = dispatch.input_device(model)
    try:
        for w in windows:
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        h.remove()
    return caught


def quantize_weights_gptq(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe, windows: torch.Tensor,
                          damp: float = 0.01, block: int = 128):
    """Sequential GPTQ: layer by layer, Hessians from the inputs each linear sees given the already-quantized
    earlier layers (and any online rotation, since forward hooks see the arguments after pre-hooks)."""
    if bits.w >= 16:
        return
    t0 = time.perf_counter()
    inputs = _layer_inputs(model, arch, windows)
    for i in range(arch.n_layers):
        layer = arch.layer(model, i)
        accs, handles = {}, []
        for role in arch.roles.linears:
            lin = arch.module(model, role, i)
            accs[role] = HessianAccumulator(lin.in_features, device=dispatch.execution_device(lin))
            handles.append(lin.register_forward_hook(
                lambda m, args, out, acc=accs[role]: acc.add_batch(args[0].detach().float())))
        with torch.no_grad():
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        for h in handles:
            h.remove()
        for role in arch.roles.linears:
            lin = arch.module(model, role, i)
            q = gptq_quantize(_weight(lin), accs[role].hessian, bits.w, group_size=recipe.w_group,
                              damp=damp, block=block, clip_search=recipe.w_clip_search)
            _set_weight(lin, q)
        with torch.no_grad():  # outputs of the quantized layer feed the next one
            outs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(((out,) + tuple(args[1:]), kwargs))
            inputs = outs
        yield Progress("gptq", i + 1, arch.n_layers, time.perf_counter() - t0, f"GPTQ layer {i + 1}/{arch.n_layers}")


def install_activation_quant(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe) -> None:
    """Per-token quantization of the input of every decoder linear (registered after any online rotation)."""
    if bits.a >= 16 and recipe.activations != "qrazor":
        return
    if recipe.activations == "qrazor":
        _qrazor_target("a", bits.a)  # refuse an impossible setting before any forward pass

        def hook(m, args):
            return (_qrazor(args[0], "a", bits.a), *args[1:])
    else:
        def hook(m, args):
            return (quantize_activation(args[0], bits.a, clip_ratio=recipe.a_clip), *args[1:])
    for i in range(arch.n_layers):
        for role in arch.roles.linears:
            arch.module(model, role, i).register_forward_pre_hook(hook)


def install_kv_quant(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe) -> None:
    """K (after R3, if any) and V per head; k, v are [B, kv_heads, T, head_dim] so a group is one head."""
    if bits.kv >= 16:
        return
    hd = arch.head_dim
    if recipe.activations == "qrazor":
        _qrazor_target("kv", bits.kv)

        def hook(module, q, k, v):
            return q, _qrazor(k, "kv", bits.kv), _qrazor(v, "kv", bits.kv)
    else:
        def hook(module, q, k, v):
            return (q, quantize_kv(k, bits.kv, hd, clip_ratio=recipe.kv_clip),
                    quantize_kv(v, bits.kv, hd, clip_ratio=recipe.kv_clip))
    attention.install(model)
    for i in range(arch.n_layers):
        attention.add_hook(arch.module(model, "attn", i), hook)


def quantize_model(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe,
                   calib_windows: torch.Tensor | None = None):
    """Generator: quantize `model` in place, yielding Progress during GPTQ. Weights first (GPTQ calibrates on
    floating-point activations, as in QuaRot), then the activation and KV quantizers are installed."""
    if not recipe.quantize:
        return
    if recipe.weights == "gptq" and bits.w < 16:
        if calib_windows is None:
            raise ValueError("GPTQ needs calibration windows")
        yield from quantize_weights_gptq(model, arch, bits, recipe, calib_windows)
    else:
        quantize_weights_rtn(model, arch, bits, recipe)
    install_activation_quant(model, arch, bits, recipe)
    install_kv_quant(model, arch, bits, recipe)
