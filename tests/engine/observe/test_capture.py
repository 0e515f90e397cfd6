"""Capture hooks on tiny random Llama, Mistral and Qwen2 models, checked against an independent manual forward pass;
hook removal, early stop, the cache round trip; and the real outliers of the default model."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from engine import store
from engine.events import Done, Progress, run_to_end
from engine.model import attention
from engine.model.arch import UnsupportedArchitectureError, resolve
from engine.model.loading import tiny_llama
from engine.observe.capture import SITES, CaptureConfig, capture, capture_job, load_cached
from engine.observe.stats import SAMPLE_ROWS


def reference_sites(model, arch, ids: torch.Tensor) -> tuple[dict, torch.Tensor, dict]:
    """Our own forward pass, module by module, with plain-math attention.

    Returns ({(layer, site): [B, T, C]}, logits [B, T, vocab], {layer: q before RoPE [B, T, heads*hd]})."""
    b, t = ids.shape
    hd, nh, nkv = arch.head_dim, arch.n_heads, arch.n_kv_heads
    pos = torch.arange(t).unsqueeze(0)
    h = arch.module(model, "embed")(ids)
    cos, sin = model.model.rotary_emb(h, pos)
    causal = torch.full((t, t), float("-inf")).triu(1)
    out, pre_rope = {}, {}
    for i in range(arch.n_layers):
        m = lambda role, i=i: arch.module(model, role, i)  # noqa: E731
        x = m("input_norm")(h)
        q = m("q")(x).view(b, t, nh, hd).transpose(1, 2)  # [B, heads, T, hd]
        k = m("k")(x).view(b, t, nkv, hd).transpose(1, 2)  # [B, kv_heads, T, hd]
        v = m("v")(x).view(b, t, nkv, hd).transpose(1, 2)
        pre_rope[i] = q.transpose(1, 2).reshape(b, t, nh * hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        kr, vr = (z.repeat_interleave(nh // nkv, dim=1) for z in (k, v))
        att = torch.softmax(q @ kr.transpose(-1, -2) * hd**-0.5 + causal, dim=-1) @ vr
        o_in = att.transpose(1, 2).reshape(b, t, nh * hd)
        h_mid = h + m("o")(o_in)
        y = m("post_attn_norm")(h_mid)
        down_in = F.silu(m("gate")(y)) * m("up")(y)
        flat = lambda z: z.transpose(1, 2).reshape(b, t, -1)  # noqa: E731
        out.update(
            {
                (i, "resid_attn"): h,
                (i, "attn_in"): x,
                (i, "q"): flat(q),
                (i, "k"): flat(k),
                (i, "v"): flat(v),
                (i, "o_in"): o_in,
                (i, "resid_mlp"): h_mid,
                (i, "mlp_in"): y,
                (i, "down_in"): down_in,
            }
        )
        h = h_mid + m("down")(down_in)
    logits = arch.module(model, "lm_head")(arch.module(model, "final_norm")(h))
    return out, logits, pre_rope


def hook_count(model) -> int:
    n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return n + sum(len(getattr(m, attention.HOOKS_ATTR, [])) for m in model.modules())


def expected_channels(arch, site: str) -> int:
    if site in ("q", "o_in"):
        return arch.n_heads * arch.head_dim
    if site in ("k", "v"):
        return arch.n_kv_heads * arch.head_dim
    return arch.intermediate if site == "down_in" else arch.hidden


def tiny_windows(vocab: int, n: int = 3, t: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def check_against_reference(model, wins: torch.Tensor, result) -> None:
    """Every site of every layer: right width, and its statistics equal those of the reference activations."""
    arch = resolve(model)
    with torch.no_grad():
        ref, _, _ = reference_sites(model, arch, wins)
    table = result.table.set_index(["layer", "site"])
    assert len(table) == arch.n_layers * len(SITES)
    for (layer, site), x in ref.items():
        c = expected_channels(arch, site)
        assert table.loc[(layer, site), "channels"] == c == x.shape[-1], (layer, site)
        flat = x.reshape(-1, c)
        tol = dict(rtol=1e-4, atol=1e-5 * float(flat.abs().max()))
        torch.testing.assert_close(result.array(layer, site, "absmax"), flat.abs().amax(0), **tol)
        torch.testing.assert_close(result.array(layer, site, "mean"), flat.mean(0), **tol)
        torch.testing.assert_close(
            result.array(layer, site, "var"),
            flat.var(0, unbiased=False),
            rtol=1e-3,
            atol=1e-5 * float(flat.var(0).max()),
        )
        # Every sampled row is a reference row of its kind: the last column flags position 0 of a window.
        samples = result.array(layer, site, "samples")
        assert samples.shape == (min(SAMPLE_ROWS, flat.shape[0]), c + 1)
        is_sink = (torch.arange(flat.shape[0]) % wins.shape[1]) == 0
        for flag, rows in ((1.0, flat[is_sink]), (0.0, flat[~is_sink])):
            kept = samples[samples[:, c] == flag, :c]
            gap = (kept[:, None, :] - rows[None]).abs().amax(-1).min(1).values  # distance to the nearest row
            assert torch.all(gap <= 2 * tol["atol"]), (layer, site, flag)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(seed=0, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=256)


def test_reference_forward_reproduces_the_model(llama):
    wins = tiny_windows(256)
    with torch.no_grad():
        _, logits, _ = reference_sites(llama, resolve(llama), wins)
        torch.testing.assert_close(logits, llama(wins, use_cache=False).logits, rtol=1e-4, atol=1e-5)


def test_every_site_of_every_layer_matches_an_independent_forward(llama):
    wins = tiny_windows(256)
    result = run_to_end(capture(llama, resolve(llama), wins, CaptureConfig(tokens=48, window=16, batch=2)))
    check_against_reference(llama, wins, result)
    assert result.meta["n_windows"] == 3 and result.meta["tokens"] == 48


def test_q_and_k_are_captured_after_rope(llama):
    wins = tiny_windows(256)
    arch = resolve(llama)
    with torch.no_grad():
        ref, _, pre_rope = reference_sites(llama, arch, wins)
    result = run_to_end(capture(llama, arch, wins, CaptureConfig(tokens=48, window=16, sites=("q", "k"))))
    assert set(result.table.site) == {"q", "k"}
    for layer in range(arch.n_layers):
        got = result.array(layer, "q", "absmax")
        torch.testing.assert_close(got, ref[(layer, "q")].reshape(-1, got.numel()).abs().amax(0))
        before = pre_rope[layer].reshape(-1, got.numel()).abs().amax(0)
        assert not torch.allclose(got, before, rtol=1e-2), "q looks captured before RoPE"


def test_logits_unchanged_by_capture_and_hooks_removed(llama):
    wins = tiny_windows(256)
    with torch.no_grad():
        before = llama(wins, use_cache=False).logits
    seen = []
    handle = llama.lm_head.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        base = hook_count(llama)
        events = capture(llama, resolve(llama), wins, CaptureConfig(tokens=48, window=16, batch=3))
        first = next(events)
        assert isinstance(first, Progress) and hook_count(llama) > base  # hooks are really in place
        list(events)
    finally:
        handle.remove()
    torch.testing.assert_close(seen[0], before, rtol=1e-5, atol=1e-6)  # logits while capturing
    assert hook_count(llama) == 0
    with torch.no_grad():
        torch.testing.assert_close(llama(wins, use_cache=False).logits, before, rtol=1e-5, atol=1e-6)


def test_stopped_capture_removes_hooks_and_caches_nothing(llama, tmp_cache):
    wins = tiny_windows(256, n=4)
    cfg = CaptureConfig(tokens=64, window=16, batch=1)
    key = "stopped-capture"
    events = capture(llama, resolve(llama), wins, cfg, key=key)
    assert isinstance(next(events), Progress)
    assert hook_count(llama) > 0
    events.close()  # the user pressed Stop after one window
    assert hook_count(llama) == 0
    assert store.load("capture", key) is None and store.entries("capture") == []


def test_failed_forward_removes_hooks_and_caches_nothing(llama, tmp_cache):
    def boom(module, args):
        raise RuntimeError("simulated failure in layer 1")

    handle = resolve(llama).layer(llama, 1).register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            run_to_end(
                capture(llama, resolve(llama), tiny_windows(256), CaptureConfig(tokens=48, window=16), key="failed")
            )
    finally:
        handle.remove()
    assert hook_count(llama) == 0
    assert store.entries("capture") == []


def test_cache_hit_returns_identical_results(llama, tmp_cache):
    wins = tiny_windows(256)
    cfg = CaptureConfig(tokens=48, window=16, batch=2)
    key = "tiny-hit"
    fresh = [ev for ev in capture(llama, resolve(llama), wins, cfg, key=key) if isinstance(ev, Done)][0]
    assert not fresh.cached and store.entries("capture") == [key]
    hit = [ev for ev in capture(llama, resolve(llama), wins, cfg, key=key) if isinstance(ev, Done)][0]
    assert hit.cached
    pd.testing.assert_frame_equal(hit.result.table, fresh.result.table)
    assert hit.result.meta == fresh.result.meta
    assert hit.result.arrays.keys() == fresh.result.arrays.keys()
    for name, t in fresh.result.arrays.items():
        assert torch.equal(hit.result.arrays[name], t), name


@pytest.mark.parametrize("damage", ["flip", "truncate", "meta"])
def test_corrupt_cached_capture_is_recomputed_never_shown(llama, tmp_cache, damage):
    wins = tiny_windows(256)
    cfg = CaptureConfig(tokens=48, window=16)
    key = f"tiny-{damage}"
    first = run_to_end(capture(llama, resolve(llama), wins, cfg, key=key))
    entry = store.entry_dir("capture", key)
    tensors, meta = entry / "tensors.safetensors", entry / "meta.json"
    if damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0xFF
        tensors.write_bytes(bytes(data))
    elif damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    else:
        meta.write_text(meta.read_text()[:-40])
    assert load_cached(key) is None and not entry.exists()  # detected and removed
    run_to_end(capture(llama, resolve(llama), wins, cfg, key=key))  # nothing to find: recomputed and saved
    again = [ev for ev in capture(llama, resolve(llama), wins, cfg, key=key) if isinstance(ev, Done)][0]
    assert again.cached
    pd.testing.assert_frame_equal(again.result.table, first.table)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_mistral_and_qwen2_resolve_and_capture(family):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        family
    ]
    torch.manual_seed(0)
    # head_dim 12 != hidden / heads, so q and o_in widths come from the heads, not from the hidden size.
    cfg = config_cls(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=64,
    )
    model = model_cls(cfg).eval().requires_grad_(False)
    arch = resolve(model)
    assert arch.name == model_cls.__name__ and arch.head_dim == 12
    assert arch.roles.qkv_bias == (family == "qwen2")
    assert (arch.module(model, "q", 0).bias is not None) == arch.roles.qkv_bias
    if family == "qwen2":  # make the biases matter, so a capture that missed them would differ
        for i in range(arch.n_layers):
            for role in ("q", "k", "v"):
                arch.module(model, role, i).bias.normal_(0, 1)
    wins = tiny_windows(128)
    result = run_to_end(capture(model, arch, wins, CaptureConfig(tokens=48, window=16)))
    check_against_reference(model, wins, result)
    assert hook_count(model) == 0


def test_unsupported_architecture_is_refused_clearly():
    from transformers import BertConfig, BertForMaskedLM

    bert = BertForMaskedLM(
        BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    )  # no causal LM (those outside the table: capture only)
    with pytest.raises(UnsupportedArchitectureError, match="BertForMaskedLM.*LlamaForCausalLM"):
        resolve(bert)


@pytest.mark.slow
def test_default_model_shows_real_outliers(default_handle):
    """SmolLM2 on 512 wiki tokens: heavy-tailed tokens everywhere, and a few massive tokens in some layers."""
    cfg = CaptureConfig(tokens=512, window=512)
    result = run_to_end(capture_job(default_handle, "wiki", cfg, use_cache=False))
    resid = result.site_table("resid_attn")
    assert len(resid) == default_handle.arch.n_layers
    assert resid.kurt_token_mean_nosink.max() > 20
    # Layers where one massive token (not the sink) dominates: whole-tensor kurtosis far above per-token kurtosis.
    massive = resid[(resid.kurt_tensor_nosink > 10 * resid.kurt_token_mean_nosink) & (resid.massive_ratio > 5)]
    assert len(massive) > 0, resid[["kurt_token_mean_nosink", "kurt_tensor_nosink", "massive_ratio"]]
    layer = int(massive.index[0])
    top = result.array(layer, "resid_attn", "top_tokens")  # rows: norm, absmax, window, position, token id
    body_top = top[top[:, 3] > 0][0]
    assert float(body_top[0]) > 5 * float(resid.loc[layer, "median_token_norm"])
