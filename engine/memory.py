"""What a job needs in memory, predicted from the model's config before any weight is read.

Weights are counted exactly: a skeleton of the model is built on the meta device (no memory) and its parameters'
bytes summed (tied embeddings once). Each job's peak on its device is then the copies of the weights it holds plus
the largest transient it makes, each term named after the code that makes it:

- loading builds a tied lm_head's own weight before tying it, and unfuses a mixture's experts one layer at a time
  (engine.model.experts), each layer's beside the weights;
- every job that rotates or quantizes works on a copy of the model (ModelHandle.working_model deep-copies it on
  one device), so it holds the weights twice;
- rotation fuses each weight in float64 (engine.rotation.fusion: read as float64, the product, the cast back),
  the largest matrix (the embedding or lm_head) at once; a rotated copy unties tied embeddings and carries its
  online R3/R4 matrices;
- calibrated RTN weights search clip ratios on one linear at a time in float32 (engine.quant.calibrate);
- GPTQ keeps one decoder layer's Hessians (float32, one per linear) and every calibration window's input of that
  layer (engine.quant.apply.quantize_weights_gptq);
- a forward pass holds one window's activations and its logits (float32 logits and their log-softmax in
  perplexity);
- export packs a new copy of the decoder linears beside the built model (engine.export).

Activations are a bound from the shapes (the residual stream, q/k/v, the MLP's widest input, float32 copies
where a fake quantizer reads them); they are small beside the weights at the windows the jobs use. On the CPU the
host-side state is added (capture's per-site accumulators, the calibration inputs, the rotation check's float64
logits), since it shares the device; a process's resident set also holds the allocator's and the interpreter's
own memory, which no tensor count sees.
benchmarks.gpu_scale prints these predictions beside what each job measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PHASES = ("load", "capture", "rotate", "calibrate", "gptq", "eval", "matrix", "export")


@dataclass(frozen=True)
class Windows:
    """The token windows the jobs run, with the engine's defaults (engine.evaluate.EvalConfig, CaptureConfig,
    the CLI's matrix and export settings)."""

    capture: int = 512
    eval: int = 2048
    matrix: int = 1024
    calib: int = 512
    calib_tokens: int = 8192
    check: int = 256  # the rotation's logits check (engine.observe.compare)


@dataclass(frozen=True)
class Shapes:
    """What the memory model reads from a config: widths and the exact weight bytes."""

    hidden: int
    mlp_width: int  # the widest MLP activation (a dense MLP's intermediate, an expert's in a mixture)
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_experts: int
    elem: int  # bytes per weight element
    weights_bytes: int  # every parameter, tied ones once
    linear_bytes: int  # the decoder linears (what quantization and export rewrite)
    largest_linear: int  # elements of the largest decoder linear
    largest_matrix: int  # elements of the largest weight (the embedding or lm_head, usually)
    layer_hessians: int  # sum over one layer's linears of in_features^2 (GPTQ's Hessians)
    layer_inputs: int  # sum over one layer's linears of in_features (calibration's sampled inputs)
    layer_expert_bytes: int  # one layer's experts (unfused at load one layer at a time)
    untie_bytes: int  # tied embeddings: a separate lm_head weight (built, then tied; untied by a rotation)


def _layer_linears(layer: nn.Module) -> list[tuple[int, int]]:
    """(out, in) of every linear of a decoder layer, an expert of a stacked-parameter mixture counted as its
    gate_up [2I, H] and down [H, I] (engine.model.experts makes them linears at load)."""
    from engine.model.experts import is_fused_experts

    shapes = []
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            shapes.append((m.out_features, m.in_features))
        elif is_fused_experts(m):
            e, two_i, h = m.gate_up_proj.shape
            shapes += [(two_i, h), (h, m.down_proj.shape[2])] * e
    return shapes


def shapes(config, dtype: str = "bfloat16") -> Shapes:
    """The Shapes of a model of this config in `dtype`, from a skeleton on the meta device (no memory used)."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPE_BYTES)}")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "tie_word_embeddings", False):  # as from_pretrained ties them
        skeleton.tie_weights()
    weights = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    layers = [m for m in skeleton.modules() if isinstance(m, nn.ModuleList) and len(m) == text.num_hidden_layers]
    first = layers[0][0]
    linears = _layer_linears(first)
    elem = DTYPE_BYTES[dtype]
    n_experts = int(getattr(text, "num_local_experts", None) or getattr(text, "num_experts", 0) or 0)
    mlp = int(getattr(text, "moe_intermediate_size", None) or 0) if n_experts else 0
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    embed = skeleton.get_input_embeddings().weight.numel()
    return Shapes(
        hidden=text.hidden_size,
        mlp_width=mlp or int(text.intermediate_size),
        n_layers=text.num_hidden_layers,
        n_heads=text.num_attention_heads,
        n_kv_heads=int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads),
        head_dim=head_dim,
        vocab=text.vocab_size,
        n_experts=n_experts,
        elem=elem,
        weights_bytes=int(weights),
        linear_bytes=text.num_hidden_layers * sum(o * i for o, i in linears) * elem,
        largest_linear=max(o * i for o, i in linears),
        largest_matrix=max(embed, max(o * i for o, i in linears)),
        layer_hessians=sum(i * i for _, i in linears),
        layer_inputs=sum(i for _, i in linears),
        layer_expert_bytes=sum(o * i for o, i in linears[-2 * n_experts :]) * elem if n_experts else 0,
        untie_bytes=embed * elem if getattr(text, "tie_word_embeddings", False) else 0,
    )


def forward_bytes(s: Shapes, tokens: int, quantized: bool = False, perplexity: bool = False) -> int:
    """A bound on one forward pass of `tokens` tokens (batch 1, no gradients): the residual stream and its normed
    copies, q/k/v and the attention output, the MLP's gate/up/product, float32 copies a fake quantizer makes of a
    linear's input (quantized), and the logits (plus their float32 copy and log-softmax in perplexity)."""
    width = 4 * s.hidden + 2 * (s.n_heads + 2 * s.n_kv_heads) * s.head_dim + 3 * s.mlp_width
    acts = tokens * width * s.elem
    if quantized:
        acts += 3 * 4 * tokens * max(s.hidden, s.mlp_width)
    logits = tokens * s.vocab * (s.elem + (8 if perplexity else 0))
    return acts + logits


def surgery_bytes(s: Shapes) -> int:
    """Rotation fusion's transient: a weight as float64, its rotated float64 product and the cast back, while the
    previous weight's float64 copy is still referenced (fusion's loop over embed and lm_head rebinds it only once the
    next is read), for the largest weight; or down_proj with R4 as a dense float64 matrix (OnlineRotation.dense),
    whichever is more; and R1 (float64, hidden x hidden) with its copy on the device."""
    per_weight = max(
        s.largest_matrix * (8 + 8 + 8 + s.elem),
        8 * s.mlp_width * s.mlp_width + s.hidden * s.mlp_width * (8 + 8 + s.elem),
    )
    return per_weight + 2 * 8 * s.hidden * s.hidden


def online_bytes(s: Shapes) -> int:
    """The online rotations a rotated model carries (engine.rotation.fusion.OnlineRotation), one R3 and one R4 per
    layer: a Hadamard up to DENSE_ONLINE_MAX wide as its float32 +-1 matrix, a wider one as its signs."""
    from engine.rotation.fusion import DENSE_ONLINE_MAX

    r4 = s.mlp_width * s.mlp_width if s.mlp_width <= DENSE_ONLINE_MAX else s.mlp_width
    return s.n_layers * 4 * (r4 + s.head_dim * s.head_dim)


def weight_search_bytes(s: Shapes) -> int:
    """Calibrated RTN's transient on the largest decoder linear: float32 weight, candidate, best, error and the
    quantizer's own temporaries (about six float32 copies)."""
    return 6 * 4 * s.largest_linear


def gptq_bytes(s: Shapes, w: Windows) -> int:
    """GPTQ's transient: one layer's Hessians (float32), every calibration window's input and output of that layer,
    and the largest linear's float32 working copies and inverse-Hessian factors."""
    inputs = 2 * (w.calib_tokens // w.calib) * w.calib * s.hidden * s.elem
    widest = max(s.hidden, s.mlp_width)
    return 4 * s.layer_hessians + inputs + 4 * 4 * s.largest_linear + 3 * 4 * widest * widest


def host_bytes(s: Shapes, phase: str, w: Windows) -> int:
    """What a job keeps in host memory beside the device's: capture's accumulators (every site of every layer, at
    most stats.state_bytes_bound each) and calibration's sampled linear inputs and q, k, v (float32)."""
    from engine.observe.stats import state_bytes_bound
    from engine.quant.calibrate import KV_TOKENS, SAMPLE_TOKENS

    # engine.observe.capture.SITES: the residual stream and the normed inputs, q, k, v, o_proj's input, and
    # down_proj's input (one site per expert in a mixture)
    widths = (
        [s.hidden] * 4
        + [s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_heads * s.head_dim]
        + [s.mlp_width] * max(1, s.n_experts)
    )
    # the accumulators, and at the end the result's arrays made from them while they are still held
    capture = 2 * s.n_layers * sum(state_bytes_bound(c) for c in widths)
    if phase == "capture":
        return capture
    if phase == "rotate":  # engine.observe.compare: captures before and after, the check's float64 logits twice
        return 2 * capture + 2 * 8 * w.check * s.vocab
    if phase in ("calibrate", "eval", "matrix"):  # each linear's sampled inputs, as parts then joined, and q, k, v
        qkv = KV_TOKENS * (s.n_heads + 2 * s.n_kv_heads) * s.head_dim
        return s.n_layers * 4 * (2 * SAMPLE_TOKENS * s.layer_inputs + qkv)
    return 0


def job_peaks(s: Shapes, w: Windows = Windows(), device: str = "cuda") -> dict[str, int]:
    """Predicted peak bytes of each phase on its device (on the CPU, host-side state included)."""
    W = s.weights_bytes
    # the original beside its working copy, whose lm_head a rotation unties and which carries online rotations
    rotated = 2 * W + s.untie_bytes + online_bytes(s)
    fwd_q = forward_bytes(s, w.eval, quantized=True, perplexity=True)
    build = max(surgery_bytes(s), weight_search_bytes(s), forward_bytes(s, w.calib))
    peaks = {
        "load": W + s.untie_bytes + s.layer_expert_bytes,  # lm_head's own weight is made before it is tied
        "capture": W + forward_bytes(s, w.capture),
        "rotate": rotated + max(surgery_bytes(s), forward_bytes(s, w.capture)),
        "calibrate": 2 * W + max(weight_search_bytes(s), forward_bytes(s, w.calib)),
        "gptq": 2 * W + gptq_bytes(s, w),
        "eval": rotated + max(build, fwd_q),
        "matrix": rotated + max(build, forward_bytes(s, w.matrix, quantized=True, perplexity=True)),
        "export": rotated + s.linear_bytes + s.linear_bytes // 4 + build,
    }
    if device == "cpu":
        peaks = {p: b + host_bytes(s, p, w) for p, b in peaks.items()}
    return peaks


def fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / (1 << 20):.1f} MiB"


def job_rows(config, dtype: str, free_bytes: int | None = None) -> list[dict]:
    """One row per job: predicted peak on one GPU, as a multiple of the weights, and whether it fits `free_bytes`
    when given."""
    s = shapes(config, dtype)
    rows = []
    for phase, peak in job_peaks(s).items():
        row = {"job": phase, "predicted peak": fmt(peak), "x weights": round(peak / s.weights_bytes, 2)}
        if free_bytes is not None:
            row["fits"] = "yes" if peak <= free_bytes else f"no: needs {fmt(peak)}, {fmt(free_bytes)} free"
        rows.append(row)
    return rows


def plan_rows(name: str, dtype: str) -> list[dict]:
    """job_rows for the user's model name (read from its config, no weight loaded), against this machine's first
    GPU's free memory when it has one: the Home page's memory plan."""
    from engine.model.loading import read_config

    free = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    return job_rows(read_config(name), dtype, free)
