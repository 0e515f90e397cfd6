"""ClipPolicy: each mode's defaults, one clear error per bad input, a round trip through a dict, and the one parse
that recipes, the CLI and pages share."""

import pytest

from engine.__main__ import main
from engine.quant.clipping import CLIP_MODES, ClipPolicy
from engine.quant.recipes import get_recipe


def test_each_mode_takes_its_defaults():
    assert ClipPolicy.parse("fixed").to_dict() == {
        "mode": "fixed",
        "activation": 0.9,
        "kv": 0.95,
        "weight_range_search": True,
    }
    assert ClipPolicy.parse("calibrated").to_dict() == {
        "mode": "calibrated",
        "activation": 1.0,
        "kv": 1.0,
        "weight_range_search": True,
    }
    assert ClipPolicy.parse("none").to_dict() == {
        "mode": "none",
        "activation": 1.0,
        "kv": 1.0,
        "weight_range_search": False,
    }
    assert ClipPolicy() == ClipPolicy.parse("calibrated")  # the default


@pytest.mark.parametrize("mode", CLIP_MODES)
def test_a_policy_round_trips_through_its_dict(mode):
    policy = ClipPolicy.parse(mode)
    assert ClipPolicy.from_dict(policy.to_dict()) == policy
    assert ClipPolicy.parse(policy.to_dict()) == policy and ClipPolicy.parse(policy) is policy


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "clever"}, r"clipping must be one of calibrated, fixed, none, got 'clever'"),
        ({"mode": "fixed", "activation": 0.0}, r"activation clip ratio must be a number in \(0, 1\] .* got 0.0"),
        ({"mode": "fixed", "activation": 1.5}, r"activation clip ratio must be a number in \(0, 1\] .* got 1.5"),
        ({"mode": "fixed", "kv": -0.1}, r"kv clip ratio must be a number in \(0, 1\] .* got -0.1"),
        ({"mode": "fixed", "kv": "0.9"}, r"kv clip ratio must be a number in \(0, 1\] .* got '0.9'"),
        ({"mode": "fixed", "kv": True}, r"kv clip ratio must be a number in \(0, 1\]"),
        (
            {"mode": "calibrated", "activation": 0.8},
            r"fixed activation clip ratio \(0.8\) needs clipping mode fixed, "
            r"not calibrated \(calibration chooses the ratios\)",
        ),
        ({"mode": "none", "kv": 0.9}, r"fixed kv clip ratio \(0.9\) needs clipping mode fixed, not none"),
        ({"mode": "none", "weight_range_search": True}, r"none clips nothing: it cannot take the weight range search"),
        ({"mode": "fixed", "weight_range_search": "yes"}, r"weight_range_search must be true or false, got 'yes'"),
    ],
)
def test_bad_inputs_give_one_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipPolicy(**kwargs)


def test_from_dict_refuses_unknown_fields_and_parse_refuses_unknown_modes():
    with pytest.raises(ValueError, match="unknown clipping fields a_clip"):
        ClipPolicy.from_dict({"mode": "fixed", "a_clip": 0.9})
    with pytest.raises(ValueError, match="clipping must be one of calibrated, fixed, none, got 'smart'"):
        get_recipe("rtn", clip="smart")


def test_a_recipe_holds_a_policy_and_says_when_weights_take_the_range_search():
    assert get_recipe("rtn", clip="fixed").weight_range_search is True  # QuaRot's w_clip under fixed clips
    assert get_recipe("rtn", clip="calibrated").weight_range_search is False  # rows calibrated on output error
    assert get_recipe("rtn", weights="gptq", clip="calibrated").weight_range_search is True
    assert get_recipe("rtn", clip="none").weight_range_search is False
    assert get_recipe("rtn", clip=ClipPolicy("fixed", weight_range_search=False)).weight_range_search is False
    assert get_recipe("qrazor").clip == ClipPolicy("none")  # SDR has no clip ratio
    fixed = get_recipe("quarot", clip=ClipPolicy("fixed", activation=0.8, kv=1.0))
    assert fixed.clip.ratios == (0.8, 1.0)
    assert fixed.key()["clip"] == {"mode": "fixed", "activation": 0.8, "kv": 1.0, "weight_range_search": True}


def test_the_cli_refuses_an_unknown_clip_mode(capsys):  # argparse, before any model load
    with pytest.raises(SystemExit):
        main(["eval", "--recipe", "rtn", "--clip", "smart"])
    assert "invalid choice: 'smart'" in capsys.readouterr().err
