"""Capture memory stays bounded per site on a mixture with hundreds of expert sites (Qwen3-MoE, 2 layers x 128
experts): what each site keeps does not grow with the number of tokens once its reservoirs are full, never exceeds
stats.state_bytes_bound, and the whole capture holds about sites x that bound."""

import pytest
import torch
import transformers

from engine.events import Done
from engine.model.arch import resolve
from engine.model.experts import unfuse_experts
from engine.observe import capture as capture_mod
from engine.observe.capture import CaptureConfig, capture
from engine.observe.stats import NORM_SAMPLE, SAMPLE_ROWS, state_bytes_bound

N, WINDOW = 16384, 128


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every tensor reachable from obj's attributes, dicts and lists (what an accumulator holds)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__") and not isinstance(obj, torch.Generator):
        return tensor_bytes(vars(obj), seen)
    return 0


@pytest.fixture(scope="module")
def moe():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=16,
        moe_intermediate_size=8,
        num_experts=128,
        num_experts_per_tok=32,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval().requires_grad_(False)
    unfuse_experts(model)
    return model, resolve(model)


def kept(model, arch, tokens: int, monkeypatch) -> dict:
    """{(layer, site): (tokens seen, bytes its accumulator holds, bytes of its result arrays, channels)}."""
    hooks = []

    class Recording(capture_mod._Hooks):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            hooks.append(self)

    monkeypatch.setattr(capture_mod, "_Hooks", Recording)
    # the 4N run's first N tokens are the N run's, so the first window (the surface) is the same in both
    ids = torch.randint(0, 64, (4 * N // WINDOW, WINDOW), generator=torch.Generator().manual_seed(1))
    wins = ids[: tokens // WINDOW]
    done = [
        e
        for e in capture(model, arch, wins, CaptureConfig(tokens=tokens, window=WINDOW, batch=WINDOW))
        if isinstance(e, Done)
    ][-1].result
    out = {}
    for (layer, site), acc in hooks[0].acc.items():
        arrays = sum(tensor_bytes(t) for k, t in done.arrays.items() if k.startswith(f"L{layer}.{site}."))
        out[(layer, site)] = (acc.tk_n["body"] + acc.tk_n["sink"], tensor_bytes(acc), arrays, acc.c)
    return out


def test_capture_memory_per_site_does_not_grow_with_tokens(moe, monkeypatch):
    model, arch = moe
    small, large = kept(model, arch, N, monkeypatch), kept(model, arch, 4 * N, monkeypatch)
    experts = [k for k in large if k[1].startswith("down_in[expert")]
    assert len(large) >= 2 * 128 and len(experts) >= 200  # hundreds of sites
    full = [k for k in small if small[k][0] >= NORM_SAMPLE + WINDOW]  # reservoirs full already at N
    assert len(full) >= 100
    for key in full:
        tokens_n, state_n, arrays_n, _ = small[key]
        tokens_4n, state_4n, arrays_4n, _ = large[key]
        assert tokens_4n > 3 * tokens_n  # the site really saw about four times the tokens
        assert (state_4n, arrays_4n) == (state_n, arrays_n), key
    for key, (tokens, state, arrays, channels) in large.items():
        assert state <= state_bytes_bound(channels), key
        assert arrays <= state_bytes_bound(channels), key
        if tokens >= SAMPLE_ROWS:  # the row reservoir is full: the largest part at wide sites
            assert state >= 4 * SAMPLE_ROWS * (channels + 1)
    total, bound = sum(v[1] for v in large.values()), sum(state_bytes_bound(v[3]) for v in large.values())
    assert 0.5 * bound <= total <= bound  # about sites x the per-site bound (sparse experts fill less)
