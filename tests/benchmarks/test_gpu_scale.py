"""benchmarks.gpu_scale on the CPU at tiny sizes, and the memory model it prints (engine.memory): weights
counted exactly, and a phase's measured peak within the predicted one."""

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from benchmarks import gpu_scale
from engine import memory

# one torch thread: a CPU run's many small operations are much faster so on a busy machine (see --threads)
SMALL = [
    "--device",
    "cpu",
    "--threads",
    "1",
    "--tokens",
    "64",
    "--eval-tokens",
    "64",
    "--matrix-tokens",
    "64",
    "--calib-tokens",
    "128",
]


def run(tmp_path, *args) -> dict:
    out = tmp_path / "gs.json"
    assert gpu_scale.main([*SMALL, *args, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_cpu_run_writes_a_row_with_every_key_for_every_phase(tmp_path):
    result = run(tmp_path, "--sizes", "tiny")
    assert result["device"].startswith("cpu")
    assert "shapes only" in " ".join(result["notes"])
    rows = result["rows"]
    assert [r["phase"] for r in rows] == ["load", *gpu_scale.PHASES]
    for r in rows:
        assert set(gpu_scale.ROW_KEYS) <= set(r), r
        assert "error" not in r, r
        assert r["size"] == "tiny" and r["seconds"] > 0 and r["peak_bytes"] is not None
        assert r["weights_bytes"] == r["predicted_weights_bytes"]
    by = {r["phase"]: r for r in rows}
    assert by["capture"]["tokens"] == 64 and by["capture"]["tokens_per_s"] > 0
    assert by["eval"]["tokens"] == 3 * 64  # fp, rtn and quarot, 64 evaluation tokens each
    assert by["rotate"]["details"]["kl"] < 1e-9  # float32: the rotated random model computes the same logits


def test_a_failing_phase_is_recorded_and_the_others_keep_their_rows(tmp_path):
    rows = run(tmp_path, "--sizes", "tiny-moe", "--phases", "capture,export,rotate")["rows"]
    by = {r["phase"]: r for r in rows}
    assert list(by) == ["load", "capture", "export", "rotate"]
    assert "mixture of experts" in by["export"]["error"]  # export refuses a mixture, in its own words
    assert "error" not in by["capture"] and "error" not in by["rotate"]
    assert by["rotate"]["seconds"] > 0


def test_table_renders_each_row_of_a_run(tmp_path):
    result = run(tmp_path, "--sizes", "tiny", "--max-seconds", "0", "--phases", "gptq")
    table = gpu_scale.markdown_table([str(tmp_path / "gs.json")])
    assert result["device"] in table
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| tiny")] == ["load", "gptq"]


def test_home_plan_rows_read_a_model_directory_before_any_weight(tmp_path):
    """memory.plan_rows (the Home page's memory plan) from a model directory's config.json alone."""
    config = gpu_scale.model_config("8b")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # a weight file must be there; it is never read
    rows = memory.plan_rows(str(tmp_path), "bfloat16")
    assert [r["job"] for r in rows] == list(memory.PHASES)
    by = {r["job"]: r for r in rows}
    assert by["load"]["x weights"] == 1.0 and by["load"]["predicted peak"] == "14.96 GiB"  # 8.03e9 x 2 bytes
    assert by["rotate"]["x weights"] > 2  # the working copy beside the original


def test_spent_time_budget_skips_every_phase_with_the_reason(tmp_path):
    rows = run(tmp_path, "--sizes", "tiny", "--max-seconds", "0", "--phases", "capture,gptq")["rows"]
    assert [r["phase"] for r in rows] == ["load", "capture", "gptq"]
    assert all("time budget" in r["error"] and r["seconds"] is None for r in rows)


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(tmp_path):
    rows = run(tmp_path, "--sizes", "30b-a3b", "--phases", "capture")["rows"]  # 122 GB of float32 weights
    assert [r["phase"] for r in rows] == ["load", "capture"]
    assert all(r["error"].startswith("does not fit: the weights alone need") for r in rows)
    assert rows[0]["weights_bytes"] == 30_532_122_624 * 4


def by_hand(c, experts: int = 0, moe_width: int = 0, qk_norm: bool = False, qkv_bias: bool = False) -> int:
    """Parameters of a LLaMA-style decoder counted from its config by hand (independent of transformers)."""
    h, hd = c.hidden_size, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    attn = h * q + 2 * h * kv + q * h + (q + 2 * kv if qkv_bias else 0) + (2 * hd if qk_norm else 0)
    mlp = experts * (3 * h * moe_width) + experts * h if experts else 3 * h * c.intermediate_size
    layer = attn + mlp + 2 * h  # two RMSNorm gains
    embed = c.vocab_size * h
    return embed * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + h


@pytest.mark.parametrize("size", ["135m", "1.5b", "8b", "30b-a3b"])
def test_memory_model_counts_the_published_configs_by_hand(size):
    c = gpu_scale.model_config(size)
    moe = size == "30b-a3b"
    n = by_hand(
        c,
        experts=c.num_experts if moe else 0,
        moe_width=c.moe_intermediate_size if moe else 0,
        qk_norm=moe,
        qkv_bias=size == "1.5b",
    )
    s = memory.shapes(c, "bfloat16")
    assert s.weights_bytes == 2 * n
    published = {"135m": 134_515_008, "1.5b": 1_543_714_304, "8b": 8_030_261_248, "30b-a3b": 30_532_122_624}
    assert n == published[size]  # the published checkpoints' parameter counts (their safetensors totals)


TINY_QWEN2 = Qwen2Config(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=300,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "qwen2-tied", "135m"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_memory_model_weights_equal_the_built_models_parameter_bytes(name, dtype):
    config = TINY_QWEN2 if name == "qwen2-tied" else gpu_scale.model_config(name)
    handle = gpu_scale.build(config, name, "cpu", dtype, gpu_scale.RandomIds(config.vocab_size))
    assert memory.shapes(config, dtype).weights_bytes == gpu_scale.parameter_bytes(handle.model)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_cpu_peak_of_rotation_stays_within_the_memory_model(tmp_path, one_thread):
    """The rotate phase (compare_job: a working copy, float64 fusion, the logits check) on a model whose weights
    dwarf the process's own allocations, measured by the resident-set high-water mark: within the prediction, and
    above the two copies of the weights it must hold (so the measurement sees what it claims to)."""
    config = LlamaConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    settings = gpu_scale.Settings("cpu", tokens=64, eval_tokens=64, matrix_tokens=64, calib_tokens=128)
    meter = gpu_scale.Meter("cpu")
    warm = gpu_scale.Settings("cpu", tokens=64, eval_tokens=64, calib_tokens=128)  # imports and first calls first
    tiny = gpu_scale.model_config("tiny")
    warm.corpus = gpu_scale.corpus_file(tmp_path, tiny.vocab_size, 256, 256)
    gpu_scale.run_phase(
        gpu_scale.build(tiny, "tiny", "cpu", "float32", gpu_scale.RandomIds(512)), warm, "rotate", meter
    )

    meter.set_baseline()
    settings.corpus = gpu_scale.corpus_file(tmp_path, config.vocab_size, 256, 256)
    handle = gpu_scale.build(config, "mid", "cpu", "float32", gpu_scale.RandomIds(config.vocab_size))
    weights = gpu_scale.parameter_bytes(handle.model)
    assert weights > 150 * 2**20
    row = gpu_scale.run_phase(handle, settings, "rotate", meter)
    assert "error" not in row, row
    predicted = memory.job_peaks(memory.shapes(config, "float32"), settings.windows(), device="cpu")["rotate"]
    assert 2 * weights <= row["peak_bytes"] <= predicted, (row["peak_bytes"] / weights, predicted / weights)


def test_settings_follow_the_engine_defaults_on_a_gpu():
    s = gpu_scale.Settings("cuda")
    cfg = s.eval_config()
    assert (s.tokens, cfg.tokens, cfg.window, cfg.calib_tokens, cfg.calib_window) == (2048, 16384, 2048, 8192, 512)
    assert (s.capture_window, s.check_tokens) == (512, 256)
