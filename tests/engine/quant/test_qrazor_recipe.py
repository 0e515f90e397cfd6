"""The `qrazor` recipe end to end on tiny Llamas, checked against a hand-written QRazor reference.

Reference (written here as a plain loop over Python ints, from the paper's rule as engine/quant/qrazor.py states
it): absmax integers of `base` bits (per output row for weights, per tensor for activations and KV), then per group
of 16 along the last dim keep target-1 magnitude bits from the leading one of the group's largest magnitude,
rounding half up and saturating at 2^(target-1)-1, i.e. value = sign * min(floor(|q| / 2^s + 1/2), 2^(t-1)-1) * 2^s.
Checked against it: qrazor_fake_quant on hand-worked rows and random tensors; every decoder linear's weight after
quantize_model; every linear's input as the activation hooks pass it on; K and V as the KV hooks pass them to SDPA.
Also: eval_job at 4-4-4 gives a finite perplexity that differs from fp, bits between base and 16 are refused with
a clear ValueError, and --weights gptq does not change the recipe.

The model of tiny_model_dir has head_dim 8, below QRazor's group of 16, so its KV cannot be razored; the KV and
4-4-4 checks use a same-shaped tiny Llama with head_dim 16 (hidden 32, 2 heads).
"""

import copy
import math

import pytest
import torch

from engine import store
from engine.evaluate import EvalConfig, eval_job
from engine.events import Done
from engine.model import attention
from engine.model.loading import load_model
from engine.quant.apply import quantize_model
from engine.quant.qrazor import qrazor_fake_quant
from engine.quant.recipes import RECIPES, Bits, get_recipe

G = 16
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")  # every decoder linear of a Llama layer


def razor_by_hand(x: torch.Tensor, base: int, target: int, per_row: bool) -> torch.Tensor:
    top = 2 ** (base - 1) - 1
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True) if per_row else xf.abs().amax()
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp(-top, top).to(torch.int64)
    out = []
    for row in q.reshape(-1, q.shape[-1]).tolist():
        for start in range(0, len(row), G):
            group = row[start : start + G]
            shift = max(max(abs(v) for v in group).bit_length() - (target - 1), 0)
            for v in group:
                code = min(math.floor(abs(v) / 2**shift + 0.5), 2 ** (target - 1) - 1)
                out.append((1 if v > 0 else -1) * code * 2**shift)
    return (torch.tensor(out, dtype=torch.float32).reshape(q.shape) * scale).to(x.dtype)


def test_hand_worked_rows_and_random_tensors_match_qrazor_fake_quant():
    # Rows with absmax 127, so the 8-bit scale is exactly 1 and the integers are the values themselves.
    x = torch.tensor(
        [
            [
                127,
                100,
                -50,
                3,
                24,
                8,
                -8,
                0,
                1,
                -127,
                64,
                72,
                15,
                16,
                17,
                119,  # leading one at bit 7: shift 4
                5,
                -5,
                4,
                3,
                2,
                1,
                0,
                -1,
                -2,
                -3,
                -4,
                5,
                0,
                0,
                0,
                1,
            ],  # fits in 3 bits: exact
            [127] + [0] * 15 + [9, 7, 3, 1, -1, 14, 15, -15, 2, 6, 0, 0, 0, 0, 0, 0],  # leading one at bit 4: shift 1
        ],
        dtype=torch.float32,
    )
    expected = torch.tensor(
        [
            [
                112,
                96,
                -48,
                0,
                32,
                16,
                -16,
                0,
                0,
                -112,
                64,
                80,
                16,
                16,
                16,
                112,  # 127 saturates at 7 << 4
                5,
                -5,
                4,
                3,
                2,
                1,
                0,
                -1,
                -2,
                -3,
                -4,
                5,
                0,
                0,
                0,
                1,
            ],
            [112] + [0] * 15 + [10, 8, 4, 2, -2, 14, 14, -14, 2, 6, 0, 0, 0, 0, 0, 0],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(razor_by_hand(x, 8, 4, per_row=True), expected)
    assert torch.equal(qrazor_fake_quant(x, 8, target_bits=4, group_size=G, per_channel=True), expected)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 64, generator=g) * torch.rand(6, 1, generator=g) * 3
    a = torch.randn(2, 5, 32, generator=g) * torch.logspace(-3, 1, 32)  # very different magnitudes per channel
    for base, target in ((8, 4), (8, 3), (8, 6)):
        engine = qrazor_fake_quant(w, base, target, G, per_channel=True)
        assert torch.equal(engine, razor_by_hand(w, base, target, per_row=True))
    for base, target in ((16, 4), (8, 4)):
        assert torch.equal(qrazor_fake_quant(a, base, target, G), razor_by_hand(a, base, target, False))


@pytest.fixture(scope="module")
def handle(tiny_model_dir):
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def kv_handle(tiny_model_dir, tmp_path_factory):
    """A 2-layer random Llama with head_dim 16 (one QRazor group per head), with the default tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_llama_hd16")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return load_model(str(path))


def quantized(h, bits: str):
    model = copy.deepcopy(h.model)
    list(quantize_model(model, h.arch, Bits.parse(bits), get_recipe("qrazor")))
    return model


@torch.no_grad()
def logits(model, ids):
    return model(ids, use_cache=False).logits


IDS = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))


def test_weights_are_razored_per_row_and_group(handle):
    h = handle
    model = quantized(h, "4-16-16")
    for i in range(h.arch.n_layers):
        for role in LINEARS:
            w0 = h.arch.module(h.model, role, i).weight
            w = h.arch.module(model, role, i).weight
            assert not torch.equal(w, w0)
            assert torch.equal(w, razor_by_hand(w0, 8, 4, per_row=True)), (i, role)
            groups = w.reshape(-1, G)
            # at most 15 values per group (codes -7..7 times one shift and one row scale); the original had 16
            assert max(g.unique().numel() for g in groups) <= 15
            assert min(g.unique().numel() for g in w0.reshape(-1, G)) == 16
    assert torch.equal(model.lm_head.weight, h.model.lm_head.weight)


def test_activation_hooks_razor_every_linear_input_and_change_the_output(handle):
    h = handle
    model = copy.deepcopy(h.model)
    raw, seen = {}, {}
    for i in range(h.arch.n_layers):  # registered before quantize_model: the first pre-hook sees the raw input
        for role in LINEARS:
            lin = h.arch.module(model, role, i)
            lin.register_forward_pre_hook(lambda m, args, key=(i, role): raw.__setitem__(key, args[0].clone()))
            lin.register_forward_hook(lambda m, args, out, key=(i, role): seen.__setitem__(key, args[0].clone()))
    list(quantize_model(model, h.arch, Bits.parse("16-4-16"), get_recipe("qrazor")))
    for i in range(h.arch.n_layers):
        for role in LINEARS:  # weights at 16 bits stay floating point; one more pre-hook per linear
            lin = h.arch.module(model, role, i)
            assert torch.equal(lin.weight, h.arch.module(h.model, role, i).weight)
            assert len(lin._forward_pre_hooks) == 2
    out = logits(model, IDS)
    assert set(seen) == {(i, r) for i in range(h.arch.n_layers) for r in LINEARS}
    for key in seen:
        assert not torch.equal(seen[key], raw[key])
        assert torch.equal(seen[key], razor_by_hand(raw[key], 16, 4, per_row=False)), key
    assert not torch.allclose(out, logits(h.model, IDS))


def test_kv_hooks_razor_k_and_v_per_head_and_change_the_output(kv_handle):
    h = kv_handle
    assert h.arch.head_dim == G
    model = quantized(h, "16-16-4")
    caught = {}
    for i in range(h.arch.n_layers):
        attn = h.arch.module(model, "attn", i)
        hooks = getattr(attn, attention.HOOKS_ATTR)
        assert len(hooks) == 1  # the KV quantizer

        def before(m, q, k, v, i=i):
            caught[i, "raw"] = (k.clone(), v.clone())
            return q, k, v

        def after(m, q, k, v, i=i):
            caught[i, "quantized"] = (k.clone(), v.clone())
            return q, k, v

        hooks.insert(0, before)
        hooks.append(after)
    out = logits(model, IDS)
    for i in range(h.arch.n_layers):
        for raw, quant in zip(caught[i, "raw"], caught[i, "quantized"], strict=False):
            assert raw.shape[-1] == h.arch.head_dim and not torch.equal(raw, quant)
            assert torch.equal(quant, razor_by_hand(raw, 8, 4, per_row=False)), i
    assert not torch.allclose(out, logits(h.model, IDS))


@pytest.mark.slow  # 4-6 s alone, mostly the corpus read once per process
def test_eval_job_at_4_4_4_gives_a_finite_perplexity_unlike_fp(kv_handle, tmp_cache):
    cfg = EvalConfig(tokens=64, window=32)
    run = {
        r: [e for e in eval_job(kv_handle, r, "4-4-4", cfg) if isinstance(e, Done)][-1].result for r in ("fp", "qrazor")
    }
    q = run["qrazor"]
    assert (q["recipe"], q["weights"], q["bits"], q["tokens"]) == ("qrazor", "qrazor", "4-4-4", 64)
    assert math.isfinite(q["ppl"]) and q["ppl"] > 1 and math.isfinite(run["fp"]["ppl"])
    assert q["ppl"] != pytest.approx(run["fp"]["ppl"], rel=1e-6)
    assert len(store.entries("eval")) == 2 and store.cache_root() == tmp_cache


@pytest.mark.parametrize(
    "bits, message",
    [
        (
            "12-4-4",
            "qrazor weight bits must be below its 8-bit base precision (razored), 8 (base integers only) or 16 "
            "(floating point), got 12",
        ),
        (
            "4-4-12",
            "qrazor KV-cache bits must be below its 8-bit base precision (razored), 8 (base integers only) or "
            "16 (floating point), got 12",
        ),
        ("9-16-16", "qrazor weight bits must be below its 8-bit base precision"),
    ],
)
def test_bits_between_base_and_16_are_refused(handle, tmp_cache, bits, message):
    with pytest.raises(ValueError) as info:
        list(eval_job(handle, "qrazor", bits, EvalConfig(tokens=64, window=32)))
    assert message in str(info.value)
    assert store.entries("eval") == []  # nothing cached for a refused run
    for fine in ("8-16-8", "3-4-16"):  # base integers only, and razored: accepted
        quantized(handle, fine)


def test_weights_gptq_is_not_applied_to_qrazor():
    recipe = get_recipe("qrazor", weights="gptq")
    assert recipe.weights == "qrazor" and recipe.activations == "qrazor"
    assert recipe == RECIPES["qrazor"]
    assert get_recipe("rtn", weights="gptq").weights == "gptq"  # the flag itself works for other recipes


def test_kv_razoring_is_refused_up_front_when_head_dim_is_below_the_group(tiny_model_dir):
    """tiny_model_dir has head_dim 8 < QRazor's group of 16: a clear refusal before any weight changes."""
    h = load_model(str(tiny_model_dir))
    model = copy.deepcopy(h.model)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="head_dim is 8; keep the KV cache at 16 bits"):
        list(quantize_model(model, h.arch, Bits(4, 4, 4), get_recipe("qrazor")))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    list(quantize_model(model, h.arch, Bits(4, 4, 16), get_recipe("qrazor")))  # KV at 16 bits runs
