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
from engine.model.early_stop import StopForward
from engine.quant.calibrate import (
    CalibrationInputs,
    ClipPlan,
    capture_inputs,
    search_activation,
    search_kv,
    search_weight,
)
from engine.quant.clip_check import check_plan
from engine.quant.formats import Encoded
from engine.quant.gptq import HessianAccumulator
from engine.quant.methods import ACTIVATION_METHODS, WEIGHT_METHODS, weight_format
from engine.quant.recipes import Bits, Recipe


def _set_weight(lin: nn.Linear, w: torch.Tensor | Encoded) -> None:
    """Write a quantized weight; an Encoded one (codes and scales) is also kept on the linear as
    `spinscope_codes`, which export writes as it is."""
    if isinstance(w, Encoded):
        lin.spinscope_codes = w
        w = w.dequantize()
    dispatch.write_tensor(lin, "weight", w)  # also where an offloaded weight lives (engine.model.dispatch)


def _weight(lin: nn.Linear) -> torch.Tensor:
    return dispatch.read_tensor(lin, "weight").float()


def quantize_weights_direct(
    model: nn.Module,
    arch: ArchInfo,
    bits: Bits,
    recipe: Recipe,
    inputs: CalibrationInputs | None = None,
    plan: ClipPlan | None = None,
    unclipped: dict | None = None,
):
    """Generator: each weight on its own (RTN, QRazor: no error feedback), a Progress per decoder layer. With
    calibration `inputs`, RTN picks each row's clip on its output error (engine.quant.calibrate), noted in `plan`;
    where that changed the rounding, `unclipped` gets (layer, role) -> (linear, the weight rounded unclipped, CPU)
    for the end-to-end check."""
    if not bits.quantizes("w"):
        return
    method = WEIGHT_METHODS[recipe.weights]
    calibrated = inputs is not None and recipe.weights == "rtn"
    t0 = time.perf_counter()
    for i in range(arch.n_layers):
        for role in arch.linears:
            lin = arch.module(model, role, i)
            if calibrated:
                fmt, w_fp = weight_format(bits.w, recipe), _weight(lin)
                _, plan.weights[(i, role)] = search_weight(w_fp, inputs.x.get((i, role)), fmt)
                w = fmt.encode(w_fp, clip_ratio=plan.weights[(i, role)][:, None])  # the codes of the chosen clips
                w_none = method.quantize(w_fp, bits.w, recipe)  # calibrated RTN has no range search: `none`'s
                if unclipped is not None and not torch.equal(w_none.dequantize(), w.dequantize()):
                    unclipped[(i, role)] = (lin, w_none)
            else:
                w = method.quantize(_weight(lin), bits.w, recipe)
            _set_weight(lin, w)
        yield Progress(
            "weights",
            i + 1,
            arch.n_layers,
            time.perf_counter() - t0,
            f"{recipe.weights.upper()} weights{' (clip calibrated per row)' * calibrated}, "
            f"layer {i + 1}/{arch.n_layers}",
        )


def calibrate_activation_clips(
    model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe, inputs: CalibrationInputs, plan: ClipPlan
):
    """Generator: the activation clip of every linear input and the K, V clips of every layer, chosen on the
    calibration inputs with the weights as quantized; a Progress per decoder layer."""
    method = ACTIVATION_METHODS[recipe.activations]
    act, kv = method.activation_quant(bits.a), method.kv_quant(bits.kv, arch.head_dim)
    t0 = time.perf_counter()
    for i in range(arch.n_layers):
        if act is not None:
            for role in arch.linears:
                plan.activations[(i, role)] = search_activation(
                    inputs.x.get((i, role)), _weight(arch.module(model, role, i)), act
                )
        if kv is not None and i in inputs.qkv:
            plan.k[i], plan.v[i] = search_kv(inputs.qkv[i], kv)
        yield Progress(
            "clips",
            i + 1,
            arch.n_layers,
            time.perf_counter() - t0,
            f"activation and KV clip ratios, layer {i + 1}/{arch.n_layers}",
        )


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


def quantize_weights_gptq(
    model: nn.Module,
    arch: ArchInfo,
    bits: Bits,
    recipe: Recipe,
    windows: torch.Tensor,
    damp: float = 0.01,
    block: int = 128,
):
    """Sequential GPTQ: layer by layer, Hessians from the inputs each linear sees given the already-quantized
    earlier layers (and any online rotation, since forward hooks see the arguments after pre-hooks)."""
    if not bits.quantizes("w"):
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
            handles.append(
                lin.register_forward_hook(lambda m, args, out, acc=accs[role]: acc.add_batch(args[0].detach().float()))
            )
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
            _set_weight(
                lin,
                method.quantize_with_hessian(_weight(lin), accs[role].hessian, bits.w, recipe, damp=damp, block=block),
            )
        with torch.no_grad():  # outputs of the quantized layer feed the next one
            outs = []
            for args, kwargs in inputs:
                out = layer(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                outs.append(((out,) + tuple(args[1:]), kwargs))
            inputs = outs
        yield Progress("gptq", i + 1, arch.n_layers, time.perf_counter() - t0, f"GPTQ layer {i + 1}/{arch.n_layers}")


def install_activation_quant(
    model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe, plan: ClipPlan | None = None
) -> None:
    """Per-token quantization of the input of every decoder linear (registered after any online rotation), with
    the plan's calibrated ratio of that linear when there is one, read at each call (the end-to-end check
    switches ratios in the plan)."""
    method = ACTIVATION_METHODS[recipe.activations]
    if method.activation_fn(bits.a, recipe) is None:
        return
    ratios = plan.activations if plan is not None else {}
    for i in range(arch.n_layers):
        for role in arch.linears:

            def quant(m, args, key=(i, role)):
                return (method.activation_fn(bits.a, recipe, ratios.get(key))(args[0]), *args[1:])

            arch.module(model, role, i).register_forward_pre_hook(quant)


def install_kv_quant(model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe, plan: ClipPlan | None = None):
    """K (after R3, if any) and V per head; k, v are [B, kv_heads, T, head_dim] so a group is one head. The plan's
    K and V ratios of a layer, when there are, are read at each call (as for activations)."""
    method = ACTIVATION_METHODS[recipe.activations]
    if method.kv_fn(bits.kv, recipe, arch.head_dim) is None:
        return
    attention.install(model)
    plan = plan if plan is not None else ClipPlan()
    for i in range(arch.n_layers):

        def quant(module, q, k, v, i=i):
            qk = method.kv_fn(bits.kv, recipe, arch.head_dim, plan.k.get(i))
            qv = method.kv_fn(bits.kv, recipe, arch.head_dim, plan.v.get(i))
            return q, qk(k), qv(v)

        attention.add_hook(arch.module(model, "attn", i), quant)


def needs_calibration(recipe: Recipe, bits: Bits) -> bool:
    """Whether building this row reads calibration windows: GPTQ, or clip ratios calibrated per layer."""
    if not recipe.quantize:
        return False
    return (WEIGHT_METHODS[recipe.weights].needs_calibration and bits.quantizes("w")) or _calibrates_clips(recipe, bits)


def _calibrates_clips(recipe: Recipe, bits: Bits) -> bool:
    acts = ACTIVATION_METHODS[recipe.activations]
    return (
        recipe.clip.calibrated
        and acts.calibrates
        and ((recipe.weights == "rtn" and bits.quantizes("w")) or bits.quantizes("a") or bits.quantizes("kv"))
    )


def quantize_model(
    model: nn.Module, arch: ArchInfo, bits: Bits, recipe: Recipe, calib_windows: torch.Tensor | None = None
):
    """Generator: quantize `model` in place, yielding Progress in every phase; returns the ClipPlan (empty unless
    clipping is calibrated). Calibration inputs are captured from the floating-point model first (as GPTQ
    calibrates in QuaRot), then weights are quantized, then activation and KV clips chosen and installed, and
    finally the end-to-end check keeps each layer's choices only where they lower the calibration loss
    (engine.quant.clip_check)."""
    plan = ClipPlan()
    if not recipe.quantize:
        return plan
    arch.check_known_roles("be quantized")  # which linears read what, and where the KV cache is, are unknown
    weights, acts = WEIGHT_METHODS[recipe.weights], ACTIVATION_METHODS[recipe.activations]
    weights.check(bits.w)  # refuse an impossible setting before any weight is touched
    acts.activation_fn(bits.a, recipe), acts.kv_fn(bits.kv, recipe, arch.head_dim)
    if needs_calibration(recipe, bits) and calib_windows is None:
        raise ValueError(
            "GPTQ needs calibration windows"
            if weights.needs_calibration and bits.quantizes("w")
            else "calibrated clipping needs calibration windows (or fixed or no clipping)"
        )
    inputs, unclipped = None, {}
    if _calibrates_clips(recipe, bits):
        inputs = yield from capture_inputs(model, arch, calib_windows, kv=bits.quantizes("kv"))
    if weights.needs_calibration and bits.quantizes("w"):
        yield from quantize_weights_gptq(model, arch, bits, recipe, calib_windows)
    else:
        yield from quantize_weights_direct(model, arch, bits, recipe, inputs, plan, unclipped)
    if inputs is not None and (bits.quantizes("a") or bits.quantizes("kv")):
        yield from calibrate_activation_clips(model, arch, bits, recipe, inputs, plan)
    install_activation_quant(model, arch, bits, recipe, plan)
    install_kv_quant(model, arch, bits, recipe, plan)
    if inputs is not None:
        yield from check_plan(model, arch, plan, unclipped, calib_windows)
    return plan
