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
from engine.observe.capture import StopForward
from engine.quant.gptq import HessianAccumulator
from engine.quant.methods import ACTIVATION_METHODS, WEIGHT_METHODS
from engine.quant.recipes import Bits, Recipe


def _set_weight(lin: nn.Linear, w: torch.Tensor) -> None:
    dispatch.write_tensor(lin, "weight", w)  # also where an offloaded weight lives (engine.model.dispatch)


def _weight(lin: nn.Linear) -> torch.Tensor:
    return dispatch.read_tensor(lin, "weight").float()


def quantize_weights_direct(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe):
    """Generator: each weight on its own (RTN, QRazor: no calibration data), a Progress per decoder layer."""
    if bits.w >= 16:
        return
    method = WEIGHT_METHODS[recipe.weights]
    t0 = time.perf_counter()
    for i in range(arch.n_layers):
        for role in arch.linears:
            lin = arch.module(model, role, i)
            _set_weight(lin, method.quantize(_weight(lin), bits.w, recipe))
        yield Progress("weights", i + 1, arch.n_layers, time.perf_counter() - t0,
                       f"{recipe.weights.upper()} weights, layer {i + 1}/{arch.n_layers}")


def _layer_inputs(model: nn.Module, arch: ArchInfo, windows: torch.Tensor) -> list:
    """(args, kwargs) reaching decoder layer 0 for each calibration window (the forward stops there)."""
    first = arch.layer(model, 0)
    caught = []

    def catch(module, args, kwargs):
        caught.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise StopForward

    h = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = dispatch.input_device(model)
    try:
        for w in windows:
            try:
                model(w.unsqueeze(0).to(device), use_cache=False)
            except StopForward:
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
    method = WEIGHT_METHODS[recipe.weights]
    t0 = time.perf_counter()
    inputs = _layer_inputs(model, arch, windows)
    for i in range(arch.n_layers):
        layer = arch.layer(model, i)
        accs, handles = {}, []
        for role in arch.linears:
            lin = arch.module(model, role, i)
            accs[role] = HessianAccumulator(lin.in_features, device=dispatch.execution_device(lin))
            handles.append(lin.register_forward_hook(
                lambda m, args, out, acc=accs[role]: acc.add_batch(args[0].detach().float())))
        with torch.no_grad():
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        for h in handles:
            h.remove()
        for role in arch.linears:
            lin = arch.module(model, role, i)
            if accs[role].num_samples == 0:  # an expert no calibration token was routed to: nothing to weigh by
                _set_weight(lin, method.quantize(_weight(lin), bits.w, recipe))
                continue
            _set_weight(lin, method.quantize_with_hessian(_weight(lin), accs[role].hessian, bits.w, recipe,
                                                          damp=damp, block=block))
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
    quant = ACTIVATION_METHODS[recipe.activations].activation_fn(bits.a, recipe)
    if quant is None:
        return

    def hook(m, args):
        return (quant(args[0]), *args[1:])

    for i in range(arch.n_layers):
        for role in arch.linears:
            arch.module(model, role, i).register_forward_pre_hook(hook)


def install_kv_quant(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe) -> None:
    """K (after R3, if any) and V per head; k, v are [B, kv_heads, T, head_dim] so a group is one head."""
    quant = ACTIVATION_METHODS[recipe.activations].kv_fn(bits.kv, recipe, arch.head_dim)
    if quant is None:
        return

    def hook(module, q, k, v):
        return q, quant(k), quant(v)

    attention.install(model)
    for i in range(arch.n_layers):
        attention.add_hook(arch.module(model, "attn", i), hook)


def quantize_model(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe,
                   calib_windows: torch.Tensor | None = None):
    """Generator: quantize `model` in place, yielding Progress during GPTQ. Weights first (GPTQ calibrates on
    floating-point activations, as in QuaRot), then the activation and KV quantizers are installed."""
    if not recipe.quantize:
        return
    weights, acts = WEIGHT_METHODS[recipe.weights], ACTIVATION_METHODS[recipe.activations]
    weights.check(bits.w)  # refuse an impossible setting before any weight is touched
    acts.activation_fn(bits.a, recipe), acts.kv_fn(bits.kv, recipe, arch.head_dim)
    if weights.needs_calibration and bits.w < 16:
        if calib_windows is None:
            raise ValueError("GPTQ needs calibration windows")
        yield from quantize_weights_gptq(model, arch, bits, recipe, calib_windows)
    else:
        yield from quantize_weights_direct(model, arch, bits, recipe)
    install_activation_quant(model, arch, bits, recipe)
    install_kv_quant(model, arch, bits, recipe)
