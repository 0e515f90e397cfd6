"""SDR against RTN on real tensors (engine.observe.qrazor_compare): effective bits, the matched-bits comparison, and
the one-layer capture on a tiny real model directory."""

import math

import pytest
import torch

from engine.model import attention
from engine.observe import qrazor_compare as qc
from engine.quant.qrazor import flag_bits, qrazor_fake_quant


def _activation(rows=8, d=64, seed=0, outlier_channel=5, outlier=40.0) -> qc.QRazorTensor:
    """Gaussian activations with one outlier channel, an all-zero group (row 2, group 1) and a value at the
    tensor's absmax (row 3)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    x[:, outlier_channel] *= outlier
    x[2, 16:32] = 0.0
    x[3, 32] = float(x.abs().max()) * 1.0
    return qc.QRazorTensor("test activation", x, "activation", False, "token", d)


def _weight(out=16, d=64, seed=1) -> qc.QRazorTensor:
    w = torch.randn(out, d, generator=torch.Generator().manual_seed(seed)) * 0.05
    return qc.QRazorTensor("test weight", w, "weight", True, "output channel", d)


# ------------------------------------------------------------------------------------------ effective bits


@pytest.mark.parametrize("base,flags", [(16, 4), (8, 3)])
def test_sdr_effective_bits_is_4_plus_flag_bits_over_g(base, flags):
    for g in qc.GROUP_SIZES:
        assert qc.sdr_effective_bits(512, base, g) == 4 + flags / g
    # a ragged last group is zero-padded and stores its own flag
    assert qc.sdr_effective_bits(576, base, 128) == 4 + flags * 5 / 576


def test_compare_methods_reports_sdr_effective_bits_and_errors():
    t = _activation()
    for g in (4, 16, 64):
        sdr, rtn, had = qc.compare_methods(t, g)
        assert sdr.effective_bits == 4 + flag_bits(16) / g
        expected = qrazor_fake_quant(t.values, 16, 4, g)
        assert torch.equal(sdr.errors, expected - t.values)
        assert sdr.mse == pytest.approx(float((expected - t.values).pow(2).mean()))
        assert sdr.sqnr_db == pytest.approx(
            10 * math.log10(float(t.values.pow(2).sum()) / float((expected - t.values).pow(2).sum()))
        )
        assert sdr.zero_share == pytest.approx(float((expected == t.values).double().mean()))
        assert (sdr.name, rtn.name, had.name) == ("SDR", "RTN-4", "Hadamard + RTN-4")


# ------------------------------------------------------------------------------------- matched comparison


@pytest.mark.parametrize("make", [_activation, _weight])
def test_rtn_is_matched_to_the_sdr_budget(make):
    t = make()
    d = t.values.shape[1]
    symmetric = t.role == "weight"
    divisors = [k for k in range(1, d + 1) if d % k == 0]
    for g in qc.GROUP_SIZES:
        sdr, rtn, had = qc.compare_methods(t, g)
        assert rtn.group_size == had.group_size and rtn.effective_bits == had.effective_bits
        assert rtn.effective_bits == qc.rtn_effective_bits(d, rtn.group_size, 4, symmetric)
        finer = [k for k in divisors if k < rtn.group_size]
        if rtn.effective_bits <= sdr.effective_bits:
            # the finest grid within the budget: the next finer one would cost more than SDR
            assert not finer or qc.rtn_effective_bits(d, max(finer), 4, symmetric) > sdr.effective_bits
        else:  # only when even one grid per row costs more than SDR's flags
            assert rtn.group_size == d


def test_matched_group_examples():
    # SDR from a 16-bit base at g = 16 costs 4.25 bits; RTN asymmetric (fp16 scale + 4-bit zero = 20 bits per grid)
    assert qc.matched_rtn_group(1536, 4.25) == 96  # 4 + 20/96 = 4.208 <= 4.25 < 4 + 20/64
    # symmetric weights pay 16 bits per grid: 8-bit base at g = 16 costs 4.1875 -> grids of 96 (4.167)
    assert qc.matched_rtn_group(576, 4.1875, symmetric=True) == 96
    assert qc.matched_rtn_group(64, 4.01) == 64  # nothing fits: one grid per row


def test_hadamard_roundtrip_is_exact_without_quantization_and_helps_an_outlier_channel():
    t = _activation(rows=32)
    assert torch.allclose(qc.hadamard_rtn_roundtrip(t, 64, bits=16), t.values, atol=1e-4)
    rtn = qc.rtn_roundtrip(t, 64)
    had = qc.hadamard_rtn_roundtrip(t, 64)
    assert (had - t.values).pow(2).mean() < 0.5 * (rtn - t.values).pow(2).mean()


def test_group_size_sweep_has_every_size_and_method():
    sweep = qc.group_size_sweep(_activation())
    assert sorted(set(sweep.sdr_group)) == list(qc.GROUP_SIZES)
    assert set(sweep.method) == {"SDR", "RTN-4", "Hadamard + RTN-4"}
    sdr = sweep[sweep.method == "SDR"].set_index("sdr_group")
    assert sdr.effective_bits.is_monotonic_decreasing


# ------------------------------------------------------------------------------------------------ capture


@pytest.fixture(scope="module")
def tiny_handle(tiny_model_dir):
    from engine.model.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def text_corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(
        "\n\n".join(f"Article {i}. " + "The quick brown fox jumps over the lazy dog. " * 40 for i in range(12))
    )
    return str(path)


def test_capture_layer_reads_the_linear_inputs_and_removes_its_hooks(tiny_handle, text_corpus):
    arch, model = tiny_handle.arch, tiny_handle.model
    got = qc.capture_layer(tiny_handle, 1, tokens=32, corpus=text_corpus)
    kv = arch.n_kv_heads * arch.head_dim
    assert {s: tuple(v.shape) for s, v in got.items()} == {
        "attn_in": (32, arch.hidden),
        "o_in": (32, arch.hidden),
        "mlp_in": (32, arch.hidden),
        "down_in": (32, arch.intermediate),
        "k": (32, kv),
        "v": (32, kv),
    }
    # independent check: the post-attention norm's output is what gate_proj reads
    seen = {}
    h = arch.module(model, "post_attn_norm", 1).register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    from engine.data.corpus import load_corpus, windows

    ids = windows(load_corpus(text_corpus), tiny_handle.tokenizer, 32, 32, "calib")[:1]
    with torch.no_grad():
        model(ids, use_cache=False)
    h.remove()
    assert torch.allclose(got["mlp_in"], seen["x"][0].float(), atol=1e-6)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not getattr(arch.module(model, "attn", 1), attention.HOOKS_ATTR, [])
    assert qc.capture_layer(tiny_handle, 1, tokens=32, corpus=text_corpus) is got  # memoised


def test_site_tensor_roles_and_bad_input(tiny_handle, text_corpus):
    act = qc.site_tensor(tiny_handle, 0, "k", tokens=32, corpus=text_corpus)
    assert act.role == "kv" and act.base_bits == 8 and act.hadamard_block == tiny_handle.arch.head_dim
    w = qc.site_tensor(tiny_handle, 0, "down_in", "down", tokens=32, corpus=text_corpus)
    assert w.role == "weight" and w.base_bits == 8 and w.per_channel
    assert torch.equal(w.values, tiny_handle.arch.module(tiny_handle.model, "down", 0).weight.float())
    with pytest.raises(ValueError, match="site must be one of"):
        qc.site_tensor(tiny_handle, 0, "resid_attn")
    with pytest.raises(ValueError, match="linear reading"):
        qc.site_tensor(tiny_handle, 0, "o_in", "down")
    with pytest.raises(ValueError, match="layer must be"):
        qc.capture_layer(tiny_handle, 7, tokens=32, corpus=text_corpus)


def test_layer_capture_uses_capture_s_hooks_and_stops_after_the_layer(tiny_handle, text_corpus):
    """capture_layer goes through engine.observe.capture.layer_sites: the tensors are what the linears really
    read, the values a full capture() accumulates at the same sites, and no later layer runs."""
    from engine.data.corpus import load_corpus, windows
    from engine.events import run_to_end
    from engine.observe.capture import CaptureConfig, capture, layer_sites

    arch, model = tiny_handle.arch, tiny_handle.model
    qc._captured.clear()
    read, later = {}, []

    def reader(role):
        def hook(module, args):  # returns None: the linear's input is left as it is
            read[role] = args[0][0].float().clone()

        return hook

    handles = [
        arch.module(model, role, 0).register_forward_pre_hook(reader(role)) for role in ("q", "o", "gate", "down")
    ]
    handles.append(arch.layer(model, 1).register_forward_pre_hook(lambda m, args: later.append(1)))
    try:
        got = qc.capture_layer(tiny_handle, 0, tokens=32, corpus=text_corpus)
    finally:
        for h in handles:
            h.remove()
    assert not later, "the forward went on past the captured layer"
    for site, role in (("attn_in", "q"), ("o_in", "o"), ("mlp_in", "gate"), ("down_in", "down")):
        assert torch.equal(got[site], read[role]), site
    ids = windows(load_corpus(text_corpus), tiny_handle.tokenizer, 32, 32, "calib")[:1]
    full = run_to_end(capture(model, arch, ids, CaptureConfig(tokens=32, window=32, sites=tuple(qc.SITE_ROLES))))
    for site in qc.SITE_ROLES:
        assert torch.equal(full.array(0, site, "absmax"), got[site].abs().amax(0)), site
    with pytest.raises(ValueError, match="unknown capture sites"):
        layer_sites(model, arch, ids, 0, ("nosuch",))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(getattr(arch.module(model, "attn", i), attention.HOOKS_ATTR, []) for i in range(arch.n_layers))
