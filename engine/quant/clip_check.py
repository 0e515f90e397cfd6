"""The end-to-end check of a calibrated clip plan: a layer's clip choices are kept only where they lower the loss of
the whole quantized model on calibration windows.

engine.quant.calibrate picks each ratio on a local error (a linear's output, the attention scores), where no
clipping is always a candidate. Each choice is then no worse than none locally, but clipping trades a smaller
rounding error for a biased one, and the biases of 24 layers compound: on Qwen2.5-0.5B at W4A4KV4 the per-layer
plan gave QuaRot 388.7 against 198.7 with no clipping at all. So, after the plan is chosen:

1. the quantized model's next-token loss on the first CHECK_WINDOWS calibration windows with the whole plan, and
   with every choice reverted (ratio 1.0, weights rounded on their whole range: exactly the `none` setting);
2. a greedy walk over the layers from the first, starting from the better of the two: from no clipping, a layer's
   choices (weights, activations, K, V) are switched on and kept only if the loss falls strictly below the best so
   far; from the whole plan, a layer's choices are reverted to 1.0 where that lowers the loss strictly;
3. if the whole plan's loss (step 1) is below the walk's result, the whole plan is kept instead.

The final loss is at most the unclipped one by construction (equal only when every choice was reverted, which is the
`none` setting itself). Cost: two forwards, then one per layer that clips anything.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from engine.events import Progress
from engine.model import dispatch
from engine.model.arch import ArchInfo
from engine.quant.calibrate import ClipPlan

CHECK_WINDOWS = 4  # calibration windows of the check (the first ones, as capture_inputs samples)


def calibration_loss(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean next-token cross entropy of `model` over windows [N, T], one forward per window."""
    return _Replay(model, [], windows).loss(start=0)


class _Replay:
    """Forwards over the check's windows that compute only decoder layers `start`.. and the head: the layers before
    `start` are stood in for by stubs returning, per window, the cached output of layer start - 1 (the walk has
    decided them, so it does not change). The model's own forward still runs around the layers (embedding,
    masks, final norm, any logit soft-capping), so a loss here is the whole model's."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], windows: torch.Tensor):
        self.model, self.layers, self.windows = model, layers, windows
        self.prefix: list | None = None  # per window: what layer start - 1 returned

    def loss(self, start: int, capture: tuple = ()) -> float:
        """Loss with layers < start replayed; records each layer in `capture`'s output per window in
        self.captured[layer]."""
        device = dispatch.input_device(self.model)
        current = [0]
        self.captured = {j: [] for j in capture}
        saved = [layer.__dict__.get("forward") for layer in self.layers[:start]]
        for layer in self.layers[:start]:  # an instance attribute shadows the class's forward (as accelerate's does)
            layer.forward = lambda *args, **kwargs: self.prefix[current[0]]
        hooks = [
            self.layers[j].register_forward_hook(lambda m, args, out, j=j: self.captured[j].append(out))
            for j in capture
        ]
        nll, count = 0.0, 0
        try:
            with torch.no_grad():
                for w, ids in enumerate(self.windows):
                    current[0] = w
                    ids = ids.unsqueeze(0).to(device)
                    logits = self.model(ids, use_cache=False).logits[0, :-1].float()
                    nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
                    count += ids.shape[1] - 1
        finally:
            for h in hooks:
                h.remove()
            for layer, old in zip(self.layers[:start], saved, strict=False):
                if old is None:
                    del layer.forward
                else:
                    layer.forward = old
        return nll / count


class LayerSwitch:
    """Switches one decoder layer between its calibrated clip choices and no clipping, in place: weights by their
    differing rows (kept on the CPU), activation and K/V ratios in the plan the installed quantizers read."""

    def __init__(self, plan: ClipPlan, unclipped_weights: dict):
        self.plan = plan
        self.choices = {"activations": dict(plan.activations), "k": dict(plan.k), "v": dict(plan.v)}
        self.weights = {}  # (layer, role) -> (linear, row indices, calibrated rows, unclipped rows)
        self.codes = {}  # (layer, role) -> (calibrated codes, unclipped codes): what export writes follows the switch
        for key, (lin, enc_none) in unclipped_weights.items():
            w_cal = dispatch.read_tensor(lin, "weight")
            w_none = enc_none.dequantize().to(w_cal.device, w_cal.dtype)
            rows = (w_cal != w_none).any(1).nonzero().flatten()  # the rows whose shrink changed the rounding
            self.weights[key] = (lin, rows, w_cal[rows].cpu(), w_none[rows].cpu())
            self.codes[key] = (getattr(lin, "spinscope_codes", None), enc_none)
        self.shrinks = {key: plan.weights[key] for key in self.weights}

    def layers(self) -> list[int]:
        """The layers with any choice below 1.0 (the others have nothing to decide)."""
        out = {i for (i, _), (_, rows, _, _) in self.weights.items() if len(rows)}
        out |= {i for (i, _), r in self.choices["activations"].items() if r < 1}
        out |= {i for kind in ("k", "v") for i, r in self.choices[kind].items() if r < 1}
        return sorted(out)

    def set(self, layer: int, on: bool) -> None:
        for (i, role), (lin, rows, cal, none) in self.weights.items():
            if i == layer and len(rows):
                w = dispatch.read_tensor(lin, "weight").clone()
                w[rows.to(w.device)] = (cal if on else none).to(w.device, w.dtype)
                dispatch.write_tensor(lin, "weight", w)
                lin.spinscope_codes = self.codes[(i, role)][0 if on else 1]
                shrink = self.shrinks[(i, role)]
                self.plan.weights[(i, role)] = shrink if on else torch.ones_like(shrink)
        for key, ratio in self.choices["activations"].items():
            if key[0] == layer:
                self.plan.activations[key] = ratio if on else 1.0
        for kind in ("k", "v"):
            table = getattr(self.plan, kind)
            if layer in self.choices[kind]:
                table[layer] = self.choices[kind][layer] if on else 1.0


def check_plan(model: nn.Module, arch: ArchInfo, plan: ClipPlan, unclipped_weights: dict, windows: torch.Tensor):
    """Generator: the end-to-end check above on `model`, quantized with `plan` and its quantizers installed reading
    the plan; `unclipped_weights` maps (layer, role) -> (linear, its weight rounded without clipping) for calibrated
    weights. Mutates the model and plan to the final choice; Progress per decision; returns (and sets plan.check)
    {"windows", "tokens", "loss_none", "loss_calibrated", "loss_final", "kept", "reverted", "seconds"}."""
    t0 = time.perf_counter()
    windows = windows[:CHECK_WINDOWS]
    switch = LayerSwitch(plan, unclipped_weights)
    layers = switch.layers()
    check = {"windows": int(windows.shape[0]), "tokens": int(windows.numel()), "kept": [], "reverted": []}
    if not layers:  # nothing clips: the plan is `none` already
        loss = calibration_loss(model, windows)
        plan.check = {
            **check,
            "loss_none": loss,
            "loss_calibrated": loss,
            "loss_final": loss,
            "seconds": time.perf_counter() - t0,
        }
        return plan.check
    n = len(layers) + 2

    def tick(k: int, message: str) -> Progress:
        return Progress("clip check", k, n, time.perf_counter() - t0, message)

    replay = _Replay(model, [arch.layer(model, i) for i in range(arch.n_layers)], windows)
    loss_calibrated = replay.loss(start=0)
    yield tick(1, f"loss with the whole per-layer plan {loss_calibrated:.4f}")
    for i in layers:
        switch.set(i, False)
    loss_none = replay.loss(start=0)
    yield tick(2, f"loss with no clipping {loss_none:.4f}")
    # walk from the better end: adding layers' choices to no clipping, or taking them out of the whole plan
    adding = loss_none <= loss_calibrated
    best = loss_none if adding else loss_calibrated
    if not adding:
        for i in layers:
            switch.set(i, True)
    on, start = set() if adding else set(layers), 0  # layers < start are decided; replay.prefix: layer start - 1's
    for k, i in enumerate(layers):
        switch.set(i, adding)  # the trial: flip layer i
        loss = replay.loss(start, capture=(i - 1, i) if i > start else (i,))
        if loss < best:
            best, replay.prefix, start = loss, replay.captured[i], i + 1
            on ^= {i}
        else:
            switch.set(i, not adding)
            if i > start:  # layer i - 1's output does not depend on layer i's choice
                replay.prefix, start = replay.captured[i - 1], i
        yield tick(
            k + 3,
            f"layer {i}: {'with' if adding else 'without'} its clips loss {loss:.4f} "
            f"({'kept' if i in on else 'reverted'}; best {best:.4f})",
        )
    kept = sorted(on)
    if loss_calibrated < best:  # the whole plan beats the walk from no clipping: keep all of it
        for i in layers:
            switch.set(i, True)
        best, kept = loss_calibrated, list(layers)
    plan.check = {
        **check,
        "loss_none": loss_none,
        "loss_calibrated": loss_calibrated,
        "loss_final": best,
        "kept": kept,
        "reverted": [i for i in layers if i not in kept],
        "seconds": time.perf_counter() - t0,
    }
    return plan.check
