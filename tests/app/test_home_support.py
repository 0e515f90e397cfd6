"""Home's support table for the loaded model, as a user sees it after choosing a local model directory: every
capability 'yes' for a Llama; for a Gemma 3 capture and evaluation 'yes', rotation refused with the reason; for a
model outside the architecture table (GPT-NeoX) capture only."""

import pytest
import torch

from tests.app.apptest import open_page


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory):
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny_gemma3")
    Gemma3ForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def support_table(model_dir) -> dict:
    at = open_page("home", model_dir)
    assert any("What SpinScope can do with this model" in m.value for m in at.markdown)
    table = at.dataframe[-1].value
    return dict(zip(table["what"], table["supported"], strict=False))


def test_a_llama_directory_supports_everything(tiny_model_dir):
    assert set(support_table(tiny_model_dir).values()) == {"yes"}


def test_a_gemma3_directory_is_captured_and_evaluated_but_not_rotated(gemma3_dir):
    support = support_table(gemma3_dir)
    assert support["capture (Explore)"] == support["evaluate (fp, rtn, qrazor)"] == "yes"
    assert "normalize each sublayer's output before the residual add" in support["rotate (Rotate)"]
    assert support["learn rotations (Optimize)"] == support["rotate (Rotate)"]


def test_a_model_outside_the_table_is_captured_only(family_model_dirs):
    table = support_table(family_model_dirs["gpt_neox"])
    assert table["capture (Explore)"] == "yes"
    reason = "not in the architecture table: roles unknown, rotations cannot be fused"
    assert reason in table["rotate (Rotate)"] and reason in table["learn rotations (Optimize)"]
    assert table["evaluate (fp, rtn, qrazor)"].startswith("floating point only")
