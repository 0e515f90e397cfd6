"""Helpers that several test modules share: plain functions, imported as `from tests.helpers import ...`.

Fixtures live in the conftest.py files; a test module imports nothing from another test module or a conftest.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL_CACHE = ROOT / "cache"  # engine.store's default root


def cache_snapshot(root: Path = REAL_CACHE) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under the real cache except the shared models/."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if rel.parts[0] != "models" and path.is_file():
            st = path.stat()
            out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


def private_cache(root: Path) -> Path:
    """An empty results cache at `root` whose models/ links to the real converted models."""
    real_models = REAL_CACHE / "models"
    real_models.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    (root / "models").symlink_to(real_models, target_is_directory=True)
    return root


def save_tiny_llama(path, hidden: int = 16, intermediate: int = 32):
    """A 2-layer random Llama (seed 0, tied embeddings) saved at `path` with the default model's tokenizer: a real
    local model directory that loads in about a second."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def drain(gen):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def latest_recorded_csv() -> Path:
    """The CSV that docs/BENCHMARKS.md's '## Latest run' section names."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    section = re.search(r"^## Latest run.*?(?=^## )", text, flags=re.S | re.M)
    assert section, "docs/BENCHMARKS.md has no '## Latest run' section"
    names = re.findall(r"`docs/(bench_[^`]+\.csv)`", section.group(0))
    assert len(names) == 1, f"the latest run should name one CSV, found {names}"
    return ROOT / "docs" / names[0]


def tiny_llama_gguf(
    path: Path,
    hidden: int = 32,
    intermediate: int = 64,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    vocab: int = 1024,
    seed: int = 0,
) -> tuple[Path, dict]:
    """A 2-layer random Llama written as a GGUF file the way llama.cpp writes one: the default model's GGUF keys and
    the first `vocab` tokens of its tokenizer with this model's sizes, Q4_1 linears, a Q8_0 embedding (tied),
    float32 norms, and q/k rows in llama.cpp's rotary order (convert_hf_to_gguf's `permute`). Returns (path, the
    Hugging Face state dict it holds: the weights as the gguf package dequantizes them), so that a test can build
    the same model with transformers alone. Loads and converts in seconds, where the default model's GGUF takes
    tens of seconds."""
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize, quantize

    from engine.model.loading import default_gguf_path

    src = GGUFReader(default_gguf_path())
    # The first `vocab` tokens of the default tokenizer and the merges among them: every reader of the file (our
    # checks, transformers' config, tokenizer and weights) parses the vocabulary again, 15 s a time at 49152 tokens.
    tokens = src.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    known = set(tokens)
    merges = [
        m
        for m in src.fields["tokenizer.ggml.merges"].contents()
        if m.replace(" ", "", 1) in known and all(part in known for part in m.split(" ", 1))
    ]
    sizes = {
        "llama.vocab_size": vocab,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": src.fields["tokenizer.ggml.token_type"].contents()[:vocab],
        "llama.block_count": layers,
        "llama.embedding_length": hidden,
        "llama.feed_forward_length": intermediate,
        "llama.attention.head_count": heads,
        "llama.attention.head_count_kv": kv_heads,
        "llama.rope.dimension_count": hidden // heads,
        "llama.context_length": 256,
    }
    writer = GGUFWriter(path, "llama")
    for field in src.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        value = sizes.get(field.name, field.contents())
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, vtype, sub_type=sub_type)
    rng = np.random.default_rng(seed)
    state = {}

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # llama.cpp's rotary order of q/k rows
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    def add(gguf_name: str, hf_name: str, w: np.ndarray, qtype=None, rows_per_head: int | None = None) -> None:
        if qtype is None:
            writer.add_tensor(gguf_name, w)
            state[hf_name] = w
            return
        state[hf_name] = dequantize(quantize(w, qtype), qtype)  # a row permutation commutes with row-wise blocks
        stored = permute(w, rows_per_head) if rows_per_head else w
        writer.add_tensor(gguf_name, quantize(stored, qtype), raw_dtype=qtype)

    def normal(*shape) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    head_dim = hidden // heads
    add("token_embd.weight", "model.embed_tokens.weight", normal(vocab, hidden), GGMLQuantizationType.Q8_0)
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        add(b + "attn_norm.weight", p + "input_layernorm.weight", 1 + normal(hidden))
        add(b + "ffn_norm.weight", p + "post_attention_layernorm.weight", 1 + normal(hidden))
        q4 = GGMLQuantizationType.Q4_1
        add(b + "attn_q.weight", p + "self_attn.q_proj.weight", normal(hidden, hidden), q4, heads)
        add(b + "attn_k.weight", p + "self_attn.k_proj.weight", normal(kv_heads * head_dim, hidden), q4, kv_heads)
        add(b + "attn_v.weight", p + "self_attn.v_proj.weight", normal(kv_heads * head_dim, hidden), q4)
        add(b + "attn_output.weight", p + "self_attn.o_proj.weight", normal(hidden, hidden), q4)
        add(b + "ffn_gate.weight", p + "mlp.gate_proj.weight", normal(intermediate, hidden), q4)
        add(b + "ffn_up.weight", p + "mlp.up_proj.weight", normal(intermediate, hidden), q4)
        add(b + "ffn_down.weight", p + "mlp.down_proj.weight", normal(hidden, intermediate), q4)
    add("output_norm.weight", "model.norm.weight", 1 + normal(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, state


def llama_from_state(state: dict, gguf_path: Path):
    """The Llama that a tiny_llama_gguf file describes, built by transformers from its config and the state dict."""
    import torch
    from gguf import GGUFReader
    from transformers import LlamaConfig, LlamaForCausalLM

    f = {k: v.contents() for k, v in GGUFReader(gguf_path).fields.items() if k.startswith("llama.")}
    cfg = LlamaConfig(
        vocab_size=int(f["llama.vocab_size"]),
        hidden_size=int(f["llama.embedding_length"]),
        intermediate_size=int(f["llama.feed_forward_length"]),
        num_hidden_layers=int(f["llama.block_count"]),
        num_attention_heads=int(f["llama.attention.head_count"]),
        num_key_value_heads=int(f["llama.attention.head_count_kv"]),
        max_position_embeddings=int(f["llama.context_length"]),
        rope_theta=float(f["llama.rope.freq_base"]),
        rms_norm_eps=float(f["llama.attention.layer_norm_rms_epsilon"]),
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()}, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)  # lm_head: tied
    return model.eval()
