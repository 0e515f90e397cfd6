"""Fake quantization of a whole model on tiny random Llamas: identity at 16-16-16, weight grids per row, lm_head left
alone, per-token activation grids on every linear input, K quantized after R3, sequential GPTQ beating RTN on a
layer's output, and a rotated, quantized copy that leaves the original untouched."""

import copy

import pytest
import torch

from engine.evaluate import EvalConfig, build_model
from engine.events import Done, Progress
from engine.model import attention
from engine.model.arch import resolve
from engine.model.loading import ModelHandle, tiny_llama
from engine.quant.apply import quantize_model
from engine.quant.quantizers import quantize_kv
from engine.quant.recipes import Bits, get_recipe
from engine.rotation.fusion import RotationConfig, rotate

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # every decoder linear of a Llama layer


def tokens(n: int, t: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def quantized(model, bits: str, recipe: str = "rtn", weights: str | None = None, calib=None):
    """A quantized copy of `model` and the events quantize_model yielded."""
    q = copy.deepcopy(model)
    events = list(
        quantize_model(q, resolve(q), Bits.parse(bits), get_recipe(recipe, weights=weights, clip="fixed"), calib)
    )
    return q, events


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


def levels_per_row(x: torch.Tensor) -> torch.Tensor:
    """Number of distinct values in each row of x [..., d] -> [...]."""
    rows = x.reshape(-1, x.shape[-1])
    return torch.tensor([row.unique().numel() for row in rows]).reshape(x.shape[:-1])


@pytest.mark.parametrize("recipe, weights", [("rtn", None), ("rtn", "gptq")])
def test_16_16_16_leaves_logits_bit_identical(recipe, weights):
    m = tiny_llama()
    ids = tokens(2, 24)
    q, events = quantized(m, "16-16-16", recipe, weights)  # GPTQ at 16 bits needs no calibration either
    assert events == []
    assert torch.equal(logits(q, ids), logits(m, ids))


@pytest.mark.parametrize("bits", [3, 4])
def test_weights_per_row_on_at_most_2b_minus_1_levels_and_lm_head_untouched(bits):
    m = tiny_llama()
    q, _ = quantized(m, f"{bits}-16-16")
    arch = resolve(m)
    for i in range(arch.n_layers):
        for role in LINEARS:
            w0 = arch.module(m, role, i).weight
            w = arch.module(q, role, i).weight
            assert levels_per_row(w0).min() > 2**bits  # the test could fail: the original rows are not on a grid
            assert levels_per_row(w).max() <= 2**bits - 1  # symmetric grid [-maxq, maxq]
            assert w.dtype == w0.dtype and w.shape == w0.shape
    for role in ("lm_head", "embed", "final_norm"):
        assert torch.equal(arch.module(q, role).weight, arch.module(m, role).weight)


@pytest.mark.parametrize("rotation", [None, RotationConfig(r1="hadamard", r2="hadamard", r3="hadamard", r4="hadamard")])
def test_activation_hooks_put_every_linear_input_on_a_per_token_grid(rotation):
    """16-4-16: each decoder linear sees x_hat = s (q - z) per token, s = clip * (max(x, 0) - min(x, 0)) / 15;
    lm_head sees its input unquantized. On a QuaRot-rotated copy the down_proj input is quantized after the online
    R4 (quantizing before it would leave the input off the grid)."""
    bits, m = 4, tiny_llama()
    recipe = get_recipe("rtn", clip="fixed")
    arch = resolve(m)
    q = copy.deepcopy(m) if rotation is None else rotate(m, arch, rotation)
    seen = {}

    def watch(name, lin):
        # registered before quantize_model: this pre-hook sees the raw input, the forward hook the quantized one
        lin.register_forward_pre_hook(lambda mod, args: seen.setdefault(name, {}).update(raw=args[0].clone()))
        lin.register_forward_hook(lambda mod, args, out: seen[name].update(used=args[0].clone()))

    for i in range(arch.n_layers):
        for role in LINEARS:
            watch((i, role), arch.module(q, role, i))
    watch("lm_head", arch.module(q, "lm_head"))
    list(quantize_model(q, arch, Bits(16, bits, 16), recipe))
    logits(q, tokens(2, 16))

    assert len(seen) == arch.n_layers * len(LINEARS) + 1
    for name, x in seen.items():
        raw, used = x["raw"], x["used"]  # [B, T, in]
        if name == "lm_head":
            assert torch.equal(raw, used)
            continue
        zero = torch.zeros(())
        step = (
            recipe.clip.activation
            * (torch.maximum(raw.amax(-1, keepdim=True), zero) - torch.minimum(raw.amin(-1, keepdim=True), zero))
            / (2**bits - 1)
        )
        units = used / step  # integer q - z on the grid of each token
        assert (units - units.round()).abs().max() < 1e-3, name
        assert levels_per_row(used).max() <= 2**bits, name
        assert levels_per_row(raw).min() > 2**bits, name  # the check has teeth: raw inputs are off the grid


def test_k_is_quantized_after_r3():
    """With R3 installed first, the KV quantizer's hook runs second: the K a later hook sees is R3-rotated K on a
    per-head grid. Quantizing before R3 would leave K off any grid (checked as a control)."""
    m = tiny_llama(hidden=128, heads=2, kv_heads=1, intermediate=128)  # head_dim 64
    arch = resolve(m)
    kv_bits, ids = 3, tokens(1, 32)
    recipe = get_recipe("rtn", clip="fixed")
    rotated = rotate(m, arch, RotationConfig(r3="hadamard"))
    rotated_q = copy.deepcopy(rotated)
    list(quantize_model(rotated_q, arch, Bits(16, 16, kv_bits), recipe))

    def capture(model):
        got = {}
        for i in range(arch.n_layers):
            attention.add_hook(
                arch.module(model, "attn", i), lambda mod, q, k, v, i=i: (got.setdefault(i, (q, k, v)), (q, k, v))[1]
            )
        logits(model, ids)
        return got

    plain, quant = capture(rotated), capture(rotated_q)
    for i in range(arch.n_layers):
        q, k, v = quant[i]  # [1, heads, T, 64], [1, kv_heads, T, 64]
        assert levels_per_row(k).max() <= 2**kv_bits and levels_per_row(v).max() <= 2**kv_bits
        assert levels_per_row(q).min() > 2**kv_bits  # queries are not quantized
    # layer 0 sees the same input in both models: its K is exactly quantize(K @ R3)
    _, k_rot, _ = plain[0]
    assert torch.equal(quant[0][1], quantize_kv(k_rot, kv_bits, arch.head_dim, clip_ratio=recipe.clip.kv))
    r3 = arch.module(rotated, "attn", 0).spinscope_r3.dense().float()
    k_before = k_rot @ r3.T
    wrong_order = quantize_kv(k_before, kv_bits, arch.head_dim, clip_ratio=recipe.clip.kv) @ r3
    assert levels_per_row(wrong_order).min() > 2**kv_bits


def _layer0_output_error(model, reference, ids) -> float:
    """Mean squared difference of decoder layer 0's output between `model` and `reference` on ids."""
    outs = []
    for mod in (model, reference):
        arch = resolve(mod)
        h = arch.layer(mod, 0).register_forward_hook(
            lambda m, a, out: outs.append(out[0] if isinstance(out, tuple) else out)
        )
        logits(mod, ids)
        h.remove()
    return float((outs[0] - outs[1]).pow(2).mean())


@pytest.mark.slow
def test_gptq_lowers_layer_output_error_versus_rtn():
    m = tiny_llama()
    calib = tokens(8, 64, seed=1)  # 512 calibration tokens for 64-wide inputs
    rtn, _ = quantized(m, "3-16-16")
    gptq, events = quantized(m, "3-16-16", weights="gptq", calib=calib)
    n_layers = resolve(m).n_layers
    assert [(e.stage, e.done, e.total) for e in events] == [("gptq", i + 1, n_layers) for i in range(n_layers)]
    assert all(isinstance(e, Progress) for e in events)
    arch = resolve(gptq)
    for i in range(n_layers):
        for role in LINEARS:
            w_gptq, w_rtn = arch.module(gptq, role, i).weight, arch.module(rtn, role, i).weight
            assert levels_per_row(w_gptq).max() <= 2**3 - 1
            assert not torch.equal(w_gptq, w_rtn)
    assert torch.equal(gptq.lm_head.weight, m.lm_head.weight)
    err_rtn, err_gptq = _layer0_output_error(rtn, m, calib), _layer0_output_error(gptq, m, calib)
    assert err_gptq < 0.9 * err_rtn


def test_gptq_without_calibration_windows_is_refused():
    with pytest.raises(ValueError, match="GPTQ needs calibration windows"):
        quantized(tiny_llama(), "4-16-16", weights="gptq")


@pytest.mark.parametrize("tied", [False, True])
def test_build_model_quantizes_a_rotated_copy_and_never_touches_the_original(tied):
    m = tiny_llama()
    if tied:  # like the default model: rotation unties the copy's lm_head, never the original's
        m.lm_head.weight = m.model.embed_tokens.weight
        m.config.tie_word_embeddings = True
    handle = ModelHandle(
        name="tiny",
        model=m,
        tokenizer=None,
        arch=resolve(m),
        fingerprint="tiny",
        note="",
        dtype="float32",
        device="cpu",
    )
    ids = tokens(2, 24)
    before_state = {k: v.clone() for k, v in m.state_dict().items()}
    before_logits = logits(m, ids)
    impl = m.config._attn_implementation
    with handle.working_model() as work:  # one device: a deep copy
        events = list(
            build_model(handle, work, get_recipe("quarot", clip="fixed"), Bits.parse("4-4-4"), EvalConfig(), seed=0)
        )
    built, plan = events[-1].result
    assert plan.summary(handle.arch.n_layers) == {"weights": {}, "activations": {}}  # fixed: nothing calibrated
    assert isinstance(events[-1], Done) and built is not m

    assert m.state_dict().keys() == before_state.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before_state.items())
    assert m.config._attn_implementation == impl
    for mod in m.modules():
        assert not mod._forward_pre_hooks and not mod._forward_hooks
        assert not getattr(mod, attention.HOOKS_ATTR, None)
    assert torch.equal(logits(m, ids), before_logits)
    assert (m.lm_head.weight is m.model.embed_tokens.weight) == tied and m.config.tie_word_embeddings == tied

    shared = {p.data_ptr() for p in m.parameters()} & {p.data_ptr() for p in built.parameters()}
    assert not shared
    assert not torch.allclose(logits(built, ids), before_logits)  # the copy really is rotated and quantized
    assert built.config._attn_implementation == attention.NAME


def test_rtn_weights_report_progress_per_layer():
    model = tiny_llama(layers=3)
    events = list(quantize_model(model, resolve(model), Bits(4, 16, 16), get_recipe("rtn", clip="fixed")))
    assert [(e.stage, e.done, e.total) for e in events] == [("weights", i, 3) for i in (1, 2, 3)]
    assert events[-1].message == "RTN weights, layer 3/3"
