"""SpinQuant rotation files (R.bin layout) through engine.rotation.fusion.rotate, checked weight by weight against
SpinQuant's published fusion (facebookresearch/SpinQuant, rotation_utils.py) computed here from the formulas:

    fold RMSNorm gains g into the linears that read the norm: W <- W diag(g), then g = 1;
    embedding E <- E R1; readers (q, k, v, gate, up, lm_head) W <- W R1; writers (o, down) W <- R1^T W;
    R2 per head: v_proj rows of KV head h W_v,h <- R2^T W_v,h; o_proj columns of head h W_o[:, h] <- W_o[:, h] R2.

HF linears are [out, in] with y = x W^T. The tiny Llama, R1 and R2 (QR of Gaussians) are all made here; the
engine only reads the file. The model runs in float64, so weights are compared at atol 1e-9; logits at 1e-5, since
the float32 rotations in the file are orthogonal only to ~1e-7 (logits of magnitude ~5 move by ~1e-6).
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine.model.arch import resolve
from engine.rotation.fusion import RotationConfig, rotate

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 32, 2, 4, 2, 64, 100
HEAD_DIM = HIDDEN // HEADS
ATOL = 1e-9  # weights: the expected ones use the file's exact float32 values, so only float64 rounding remains
LOGIT_ATOL = 1e-5


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        intermediate_size=INTER,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():  # non-trivial norm gains, or folding them would test nothing
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand_like(p))
    return model


def random_orthogonal(n: int, g: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed; no engine helper


def make_rotations(seed: int = 1):
    """R1 and one R2 per layer, float32 like SpinQuant's R.bin (the expected weights use these exact values)."""
    g = torch.Generator().manual_seed(seed)
    r1 = random_orthogonal(HIDDEN, g).float()
    r2 = [random_orthogonal(HEAD_DIM, g).float() for _ in range(LAYERS)]
    return r1, r2


def save_spinquant_file(path, r1, r2s):
    torch.save({"R1": r1, **{f"model.layers.{i}.self_attn.R2": r for i, r in enumerate(r2s)}}, path)
    return str(path)


def expected_weights(model, r1, r2s) -> dict[str, torch.Tensor]:
    """SpinQuant's fused weights of `model` (not modified), from the formulas in the module docstring."""
    sd = {k: v.detach().double().clone() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    R1 = r1.double()
    out = {
        "model.embed_tokens.weight": sd["model.embed_tokens.weight"] @ R1,
        "lm_head.weight": sd["lm_head.weight"] * sd["model.norm.weight"] @ R1,
        "model.norm.weight": torch.ones(HIDDEN, dtype=torch.float64),
    }
    for i, r2 in enumerate(r2s):
        p, R2 = f"model.layers.{i}.", r2.double()
        g_in, g_post = sd[p + "input_layernorm.weight"], sd[p + "post_attention_layernorm.weight"]
        for name, g in (
            ("self_attn.q_proj", g_in),
            ("self_attn.k_proj", g_in),
            ("self_attn.v_proj", g_in),
            ("mlp.gate_proj", g_post),
            ("mlp.up_proj", g_post),
        ):
            out[p + name + ".weight"] = sd[p + name + ".weight"] * g[None, :] @ R1  # W diag(g) R1
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            out[p + name + ".weight"] = R1.T @ sd[p + name + ".weight"]
        wv = out[p + "self_attn.v_proj.weight"].clone()
        for h in range(KV_HEADS):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            wv[rows] = R2.T @ wv[rows]
        out[p + "self_attn.v_proj.weight"] = wv
        wo = out[p + "self_attn.o_proj.weight"].clone()
        for h in range(HEADS):
            cols = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            wo[:, cols] = wo[:, cols] @ R2
        out[p + "self_attn.o_proj.weight"] = wo
        out[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float64)
        out[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=torch.float64)
    return out


def weight_mismatches(model, expected: dict, atol: float = ATOL) -> dict[str, float]:
    """{parameter name: max |model - expected|} for every expected weight off by more than atol (or missing)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    bad = {}
    for name, want in expected.items():
        got = params.get(name)
        if got is None or got.shape != want.shape:
            bad[name] = float("inf")
            continue
        err = (got.detach().double() - want).abs().max().item()
        if not err <= atol:
            bad[name] = err
    return bad


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


def rotate_with_file(model, path):
    return rotate(model, resolve(model), RotationConfig(r1="file", r2="file", file=path))


def test_expected_weights_cover_every_parameter():
    model = tiny_llama()
    names = {n for n, _ in model.named_parameters()}
    assert names == set(expected_weights(model, *make_rotations()))


@pytest.mark.parametrize("tied", [False, True])
def test_spinquant_file_fuses_as_published(tmp_path, tied):
    model = tiny_llama(tied)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r1, r2s = make_rotations()
    rotated = rotate_with_file(model, save_spinquant_file(tmp_path / "R.bin", r1, r2s))

    assert weight_mismatches(rotated, expected_weights(model, r1, r2s)) == {}
    if tied:  # the engine unties: the final norm is folded into lm_head alone
        assert rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    # the original is untouched (rotate returns a copy), so the check above compared against the real source
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("tied", [False, True])
def test_spinquant_file_preserves_logits(tmp_path, tied):
    model = tiny_llama(tied)
    rotated = rotate_with_file(model, save_spinquant_file(tmp_path / "R.bin", *make_rotations()))
    want, got = logits(model, TOKENS), logits(rotated, TOKENS)
    assert want.abs().max() > 1.0  # logits large enough for the comparison to mean something
    torch.testing.assert_close(got, want, atol=LOGIT_ATOL, rtol=0)


def test_transposed_r2_is_caught_by_the_weight_check(tmp_path):
    """A file holding R2^T (an orientation bug in an exporter or in the fusion) must fail the weight check.

    R2^T is orthogonal too, so the rotated model still computes the same logits: only the weight-level comparison
    against SpinQuant's formulas can tell the two orientations apart, which is why it exists.
    """
    model = tiny_llama()
    r1, r2s = make_rotations()
    path = save_spinquant_file(tmp_path / "R_t.bin", r1, [r.T.contiguous() for r in r2s])
    rotated = rotate_with_file(model, path)

    torch.testing.assert_close(logits(rotated, TOKENS), logits(model, TOKENS), atol=LOGIT_ATOL, rtol=0)
    bad = weight_mismatches(rotated, expected_weights(model, r1, r2s))
    expected_bad = {f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(LAYERS) for m in "vo"}
    assert set(bad) == expected_bad  # exactly the R2-touched weights, each far beyond tolerance
    assert min(bad.values()) > 1e3 * ATOL
