"""The what-if matrix (engine.matrix) on a tiny random Llama whose widths hold whole 32-blocks: a 1x2 matrix (format
4; rotations none and block32) streams its cells as they finish, its unrotated cell has the perplexity of a model
quantized by hand here, and a rerun, or another matrix that shares a cell, reads the cells from the cache; one
cell's SQNR per layer is the SQNR of a per-token quantizer written out here.

The hand-built model is QuaRot's integers as ../shared/BRIEF.md states them, with no clipping (clip="none"):
weights per output row, symmetric, 4 bits (q in [-7, 7]), lm_head kept; every other linear's input per token,
asymmetric, 4 bits (16 levels over [min(x, 0), max(x, 0)]); the KV cache in 16 bits."""

import copy
import math

import pytest
import torch

from engine.data.corpus import load_corpus, windows
from engine.evaluate import EvalConfig
from engine.events import Done, Progress, run_to_end
from engine.matrix import MatrixConfig, cell_sqnr_job, matrix_job
from engine.model.loading import load_model
from tests.helpers import save_tiny_llama

TOKENS, WINDOW = 64, 32


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    """Widths 64 and 128: whole blocks of 32 for the block32 column."""
    return load_model(str(save_tiny_llama(tmp_path_factory.mktemp("wide_llama"), hidden=64, intermediate=128)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(
        "\n\n".join(f"Paragraph {i}. " + "The quick brown fox jumps over the lazy dog. " * 20 for i in range(40))
    )
    return str(path)


def int4_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(-1, keepdim=True) / 7
    return (w / scale).round().clamp(-7, 7) * scale


def int4_token(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zero = (-lo / scale).round()
    return ((x / scale).round() + zero).clamp(0, 15).sub(zero) * scale


def hand_perplexity(model, wins: torch.Tensor, quantize: bool) -> float:
    """exp(mean next-token NLL) over the windows, of `model` or of its W4A4 integer version built here."""
    model = copy.deepcopy(model)
    hooks = []
    if quantize:
        for name, linear in model.named_modules():
            if isinstance(linear, torch.nn.Linear) and name != "lm_head":
                with torch.no_grad():
                    linear.weight.copy_(int4_weight(linear.weight))
                hooks.append(linear.register_forward_pre_hook(lambda m, args: (int4_token(args[0]),)))
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in wins:
            logits = model(w.unsqueeze(0), use_cache=False).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
            n += w.numel() - 1
    for h in hooks:
        h.remove()
    return math.exp(nll / n)


def test_a_1x2_matrix_gives_its_cells_the_perplexity_of_their_models_and_a_rerun_comes_from_the_cache(handle, corpus):
    cfg = EvalConfig(tokens=TOKENS, window=WINDOW, corpus=corpus)
    mcfg = MatrixConfig(formats=("4",), rotations=("none", "block32"), clip="none")
    events = list(matrix_job(handle, mcfg, cfg))
    partials = [len(e.partial) for e in events if isinstance(e, Progress) and e.partial is not None]
    assert partials == [1, 2], "each cell is streamed as it finishes"
    assert isinstance(events[-1], Done)
    cells = events[-1].result
    assert [(c["format"], c["rotation"], c["bits"]) for c in cells] == [
        ("4", "none", "4-4-16"),
        ("4", "block32", "4-4-16"),
    ]
    assert {c["tokens"] for c in cells} == {TOKENS} and not any(c["cached"] for c in cells)
    ppl = {c["rotation"]: c["ppl"] for c in cells}

    wins = windows(load_corpus(corpus), handle.tokenizer, TOKENS, WINDOW, "eval")
    fp, w4a4 = hand_perplexity(handle.model, wins, False), hand_perplexity(handle.model, wins, True)
    assert ppl["none"] == pytest.approx(w4a4, rel=1e-4)
    assert abs(w4a4 - fp) > 1e-3 * fp, "4 bits must move the perplexity, or the check above shows nothing"
    assert not math.isclose(ppl["block32"], ppl["none"], rel_tol=1e-4), "the block32 column rotates"

    again = run_to_end(matrix_job(handle, mcfg, cfg))
    assert all(c["cached"] for c in again) and [c["ppl"] for c in again] == [c["ppl"] for c in cells]
    # a matrix that shares one cell with this one reads that cell from the cache
    (shared,) = run_to_end(matrix_job(handle, MatrixConfig(formats=("4",), rotations=("block32",), clip="none"), cfg))
    assert shared["cached"] and shared["ppl"] == ppl["block32"]


def test_a_cells_sqnr_per_layer_is_that_of_the_per_token_quantizer(handle):
    got = run_to_end(cell_sqnr_job(handle, "4", "none", tokens=TOKENS, window=WINDOW))
    wins = windows(load_corpus("wiki"), handle.tokenizer, TOKENS, WINDOW, "eval")
    sums = {site: [[0.0, 0.0] for _ in range(2)] for site in ("down_in", "attn_in")}
    hooks = []
    for i, layer in enumerate(handle.model.model.layers):
        for site, linear in (("down_in", layer.mlp.down_proj), ("attn_in", layer.self_attn.q_proj)):

            def keep(m, args, s=sums[site][i]):
                x = args[0].double()
                s[0] += float(x.pow(2).sum())
                s[1] += float((x - int4_token(args[0]).double()).pow(2).sum())

            hooks.append(linear.register_forward_pre_hook(keep))
    with torch.no_grad():
        for w in wins:
            handle.model(w.unsqueeze(0), use_cache=False)
    for h in hooks:
        h.remove()
    want = {site: [10 * math.log10(s / e) for s, e in layers] for site, layers in sums.items()}
    assert got.keys() == want.keys()
    for site in want:
        assert got[site] == pytest.approx(want[site], abs=1e-3), site
        assert all(5 < v < 40 for v in got[site]), (site, got[site])
