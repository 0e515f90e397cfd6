"""Recipes and bit settings: parsing, validation with clear messages, and the eval CLI refusing bad input before
it loads a model."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.__main__ import main
from engine.quant.recipes import PRESETS, RECIPES, Bits, Recipe, get_recipe

REPO = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4-4-4", (4, 4, 4)),
        ("4-8-16", (4, 8, 16)),
        ("W4A4KV4", (4, 4, 4)),
        ("W4A8KV16", (4, 8, 16)),
        ("w4a4kv16", (4, 4, 16)),
        (" 4-4-16 ", (4, 4, 16)),
        ("2-3-16", (2, 3, 16)),
    ],
)
def test_bits_parse_accepts_dashed_and_named_forms(text, expected):
    b = Bits.parse(text)
    assert (b.w, b.a, b.kv) == expected
    assert Bits.parse(str(b)) == b  # str gives the dashed form back


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_parses(preset):
    assert str(Bits.parse(preset)) == preset


@pytest.mark.parametrize(
    "text, role, value",
    [
        ("0-4-4", "weight", "0"),
        ("1-4-4", "weight", "1"),
        ("17-4-4", "weight", "17"),
        ("4-0-4", "activation", "0"),
        ("4-1-4", "activation", "1"),
        ("4-4-17", "KV-cache", "17"),
        ("W4A17KV4", "activation", "17"),
    ],
)
def test_bits_outside_2_to_16_rejected_with_role_and_range(text, role, value):
    with pytest.raises(ValueError) as e:
        Bits.parse(text)
    msg = str(e.value)
    assert role in msg and "2 to 16" in msg and value in msg


@pytest.mark.parametrize(
    "text", ["4-4", "4-4-4-4", "four", "", "4-x-4", "4.5-4-4", "4--4-4", "-4-4-4", "W4-4-4", "4A4KV4"]
)
def test_bits_malformed_text_names_the_expected_form(text):
    with pytest.raises(ValueError, match="W-A-KV"):
        Bits.parse(text)


def test_bits_constructor_rejects_non_integers():
    with pytest.raises(ValueError, match="integer"):
        Bits(4.0, 4, 4)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ValueError) as e:
        get_recipe("nosuch")
    msg = str(e.value)
    assert "unknown recipe 'nosuch'" in msg
    for name in RECIPES:
        assert name in msg


def test_rotated_needs_a_file():
    with pytest.raises(ValueError, match="rotation file"):
        get_recipe("rotated")
    r = get_recipe("rotated", rotation_file="rot.pt")
    assert r.rotation.file == "rot.pt" and r.rotation.r1 == "file" and r.rotation.r2 == "file"


def test_weights_choice_applies_to_quantized_recipes_only():
    assert get_recipe("rtn").weights == "rtn"
    assert get_recipe("rtn", weights="gptq").weights == "gptq"
    assert get_recipe("quarot", weights="gptq").weights == "gptq"
    assert get_recipe("quarot", weights="gptq").rotation == get_recipe("quarot").rotation
    assert not get_recipe("fp", weights="gptq").quantize  # fp stays floating point whatever is asked
    assert RECIPES["rtn"].weights == "rtn"  # get_recipe returns a changed copy, never edits the table


def test_quarot_rotates_all_four_with_hadamard_and_rtn_rotates_nothing():
    q = get_recipe("quarot").rotation
    assert (q.r1, q.r2, q.r3, q.r4) == ("hadamard",) * 4
    assert not get_recipe("rtn").rotation.active and not get_recipe("fp").rotation.active


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "awq"}, "weight quantizer must be one of rtn, gptq, qrazor"),
        ({"activations": "gptq"}, "activation quantizer must be one of rtn, qrazor"),
    ],
)
def test_recipe_rejects_unknown_quantizers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Recipe("x", "test", **kwargs)
    with pytest.raises(ValueError, match="weight quantizer"):
        get_recipe("rtn", weights="awq")


# ---- the eval CLI validates everything before the (slow) model load -------------------------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI reaches the model loader."""
    import engine.model.loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(engine.model.loading, "load_model", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks", "nosuch"], "unknown zero-shot task(s) 'nosuch'"),
        (["--tasks", "piqa,nosuch"], "unknown zero-shot task(s) 'nosuch'"),
        (["--recipe", "nosuch"], "unknown recipe 'nosuch'"),
        (["--recipe", "rotated"], "needs a rotation file"),
        (["--bits", "17-4-4"], "weight bits must be an integer from 2 to 16"),
        (["--bits", "4-4-0"], "KV-cache bits must be an integer from 2 to 16"),
        (["--bits", "4-4"], "W-A-KV"),
        (["--tokens", "0"], "token budget must be positive"),
        (["--tasks", "piqa", "--limit", "0"], "limit must be a positive number"),
    ],
)
def test_eval_cli_refuses_bad_input_before_loading_the_model(capsys, no_model_load, tmp_cache, argv, message):
    rc = main(["eval", *argv])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error: ") and message in err


@pytest.mark.slow
def test_python_m_engine_eval_unknown_task_fails_before_the_model(tmp_cache):
    """The real command line. The model named does not exist, so had it been loaded first the error would be about
    the model; the task error shows the task list is checked first."""
    env = {**os.environ, "SPINSCOPE_CACHE": str(tmp_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "eval", "--tasks", "nosuch", "--model", "/no/such/model"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown zero-shot task(s) 'nosuch'; known tasks: piqa")
    assert proc.stdout == ""
