"""AppTest of Rotate on the real default model, with small budgets: a random orthogonal R1 computes the same function
and flattens the residual stream's per-token kurtosis in the before/after charts; a missing rotation file is refused
with a clear message."""

import pytest

from tests.app.apptest import decode, figure, open_page, titles


def rotate(r1: str, others: str = "hadamard", tokens: int | None = None, window: int | None = None):
    at = open_page("rotate")
    for r in ("r2", "r3", "r4"):
        at.selectbox(key=f"rot_{r}").set_value(others)
    at.selectbox(key="rot_r1").set_value(r1)
    if tokens is not None:
        at.number_input(key="rot_tokens").set_value(tokens)
        at.number_input(key="rot_window").set_value(window)
    at.button(key="rot_go").click().run()
    assert not at.exception, at.exception
    return at


@pytest.mark.slow
def test_rotate_page_r1_equivalence_and_before_after():
    at = rotate("orthogonal", others="none", tokens=256, window=128)
    assert not at.error, [e.value for e in at.error]
    assert any(s.value.startswith("Same function") for s in at.success), [s.value for s in at.success]
    before = decode(figure(at, "resid_attn, before rotation")["data"][0]["y"])
    after = decode(figure(at, "resid_attn, after rotation")["data"][0]["y"])
    # R1 flattens the residual stream's per-token kurtosis (sink excluded) in every layer but the first
    assert max(after) < 4 and max(before) > 20
    shown = titles(at)
    assert any(t.startswith("Activation quantization SQNR") for t in shown)
    for start in ("Per-channel max |x|, before", "|x| tokens x channels, after", "Values vs a Gaussian, before"):
        assert any(t.startswith(start) for t in shown), (start, shown)


def test_rotate_page_bad_file_message():
    at = rotate("file")
    assert any("rotation file" in e.value for e in at.error)
