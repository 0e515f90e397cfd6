"""Cross-check the compressed-tensors export (engine.export) against llm-compressor's own SpinQuant (issue 19).

    python -m benchmarks.llmcompressor_crosscheck --llmc-python /tmp/llmc/bin/python [--out DIR] [--rotations R1,R2,R4]

1. Builds a tiny random Llama (hidden 64, 4 heads of 16, 2 layers, MLP 128, the default model's tokenizer, untied
   embeddings) with random RMSNorm gains, so folding them is exercised, and zero-mean embedding rows (see below).
2. In llm-compressor's own interpreter (--llmc-python; SpinScope is never imported there): oneshot (data-free
   pipeline) with SpinQuantModifier(rotations, transform_type="hadamard") then QuantizationModifier with int4
   symmetric per-channel weights (min-max observer, i.e. RTN), saved compressed (pack-quantized). Before saving,
   that process also keeps the float weights with the rotations fused, and their scales.
3. SpinScope exports the same model (engine.export.export_row) with a rotation file holding the same matrices,
   compressed-tensors' deterministic_hadamard_matrix(n) / sqrt(n) for R1 (64), R2 (16, per head) and R4 (128), R3
   off, at 4-16-16, RTN weights, --clip none. Each R is applied as x -> x R on its stream (engine.rotation.algebra).
4. Compares the two checkpoints: transform_config (types, targets, locations, inverse flags, head_dim), the weight
   QuantizationArgs, every stored tensor (fused float weights, dequantized weights, scales, integer codes, the
   stored R4 matrices, embeddings), and the logits of both, each loaded in a fresh interpreter with transformers +
   compressed-tensors only (the exported load_with_transforms.py, which applies the online R4).

Orientation: compressed-tensors' apply_transform_weight (transform/utils/matrix.py) makes a Linear's weight_output
transform U give W <- U^T W (its output y -> y U), weight_input with inverse=True W <- W U (its input x -> x U
undone), an Embedding's weight_output E <- E U, and an online input transform x -> x U: so its U is SpinScope's R,
not R^T (checked below on a non-symmetric orthogonal U; Sylvester Hadamard matrices are symmetric anyway).

Centering: SpinQuantModifier.on_calibration_start also calls center_embeddings (llmcompressor/modeling/fuse.py),
E <- E - mean(E, -1), which QuaRot does for LayerNorm models (where it is exact); under RMSNorm it changes the
function, and SpinScope does not do it. The tiny model's embedding rows are therefore made zero-mean before either
tool sees it (llm-compressor's centering is then a no-op); the report states how much centering alone moves this
model's floating-point logits.

Integer grid: compressed-tensors' calculate_qparams (quantization/utils/helpers.py) takes scale = amax / (range / 2)
with range = q_max - q_min = 7 - (-8) = 15 (_calculate_range), i.e. amax / 7.5, then _quantize
(quantization/lifecycle/forward_helpers.py) clamps x / scale to [-8, 7] and rounds (round_to_quantized_type_args):
+amax lands on the 7.5 tie and is clamped to 7 (dequantized 0.933 amax), -amax rounds to -8 or -7 by float32
rounding of the tie. SpinScope's grid (engine/quant/quantizers.py: integer_range, find_grid) is [-7, 7] with
scale = amax / 7, so +-amax are exact; engine.export writes the codes and scales the engine's RTN returned.
Scales therefore differ by 7 / 7.5 = 14/15 and some codes differ, but both checkpoints hold the same fused
weights quantized by round-to-nearest on their own grid, and each decompresses to q * scale (compressed-tensors'
_dequantize, for any q in [-8, 7]), so SpinScope's checkpoint means exactly the weights the engine evaluated.
Applying each tool's rule to the other's fused weights reproduces its codes.

Result (llm-compressor 0.14.0.1 with compressed-tensors 0.19.0; SpinScope with compressed-tensors 0.20.1; R1, R2, R4):
transform_config agrees in every scheme's type (hadamard), head_dim (R2: 16), targets, locations and inverse flags;
it differs only in `precision` (llm-compressor float64, get_high_precision; SpinScope float32, the precision its
engine runs the online R4 in; for the fused R1/R2 it is moot, since compressed-tensors fuses offline transforms in
float64 whatever it says). The weight QuantizationArgs agree (int, 4 bits, symmetric, channel, pack-quantized,
ignore lm_head) but for `observer` (memoryless_minmax vs unset: calibration metadata a runtime does not read). The
fused float weights agree to 7.5e-9 (down_proj only: the rotation file holds H / sqrt(128) in float32, where
compressed-tensors divides in float64), the embeddings to 1e-8, norms, lm_head and the stored R4 matrices (+-1; float64
vs float32) exactly. Scales differ by exactly 7.5 / 7 (the grids above); 16.5 % of the codes differ and the
dequantized weights differ by up to 0.012 (at most one step); each rule applied to the other's fused weights gives
its codes but for 0.04 % (down_proj, values within 5e-7 of a tie). Logits: SpinScope's checkpoint equals the
engine's row (max |diff| 0); SpinScope's checkpoint with llm-compressor's codes and scales swapped in equals
llm-compressor's (3e-7), so everything but the weight grid is the same computation; the two grids are each about
as far from the float model (0.134 vs 0.145 max |logit diff|).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.export_roundtrip import load_elsewhere, run_isolated

BITS = 4
ROTATIONS = ("R1", "R2", "R4")  # R3 would need the KV cache's online transform, outside this weight-only check

# Runs under llm-compressor's interpreter (no SpinScope there). argv: model dir, output dir, extras file, rotations.
LLMC_DRIVER = r"""
import sys

import compressed_tensors
import llmcompressor
import torch
import transformers
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from llmcompressor.modifiers.transform import SpinQuantModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, out_dir, extras_path, rotations = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel")  # W4A16, per channel
recipe = [SpinQuantModifier(rotations=rotations.split(","), transform_type="hadamard"),
          QuantizationModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                               ignore=["lm_head"])]
oneshot(model=model, recipe=recipe, pipeline="datafree")
# until save_pretrained compresses them the weights are floats: the rotations and norm gains fused, not yet rounded
kinds = (torch.nn.Linear, torch.nn.Embedding)
fused = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, kinds)}
scales = {n: m.weight_scale.detach().clone() for n, m in model.named_modules() if hasattr(m, "weight_scale")}
model.save_pretrained(out_dir, save_compressed=True)
AutoTokenizer.from_pretrained(model_dir).save_pretrained(out_dir)
torch.save({"fused": fused, "scales": scales,
            "engine": sorted(m for m in sys.modules if m == "engine" or m.startswith("engine.")),
            "versions": {name: str(module.__version__) for name, module in (
                ("llmcompressor", llmcompressor), ("compressed_tensors", compressed_tensors),
                ("transformers", transformers), ("torch", torch))}}, extras_path)
"""


# ---- the tiny model and the shared rotations ------------------------------------------------------------------------
def build_tiny(path: Path) -> dict:
    """Save the tiny Llama at `path`; returns how much centering its embeddings moved its float logits."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.model.loading import default_model_dir

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = token_ids()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # non-trivial gains, so that folding them into the linears matters
                p.copy_(1 + 0.3 * torch.randn_like(p))
        before = model(ids).logits
        emb = model.model.embed_tokens.weight
        emb.sub_(emb.mean(-1, keepdim=True))  # what llm-compressor's center_embeddings would do (see docstring)
        after = model(ids).logits
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {
        "centering_max_abs_logit_change": float((after - before).abs().max()),
        "max_abs_logit": float(before.abs().max()),
    }


def token_ids() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(1))


def hadamard(n: int) -> torch.Tensor:
    """compressed-tensors' "hadamard" transform of size n as a matrix: its Sylvester matrix over sqrt(n)."""
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    return (deterministic_hadamard_matrix(n, torch.float64) / math.sqrt(n)).float()


def orientation_check() -> dict:
    """compressed-tensors' weight transforms (the function llm-compressor fuses with) against SpinScope's algebra, on
    a non-symmetric orthogonal U: max |difference| per location (0 means CT's U is SpinScope's R, not R^T)."""
    from compressed_tensors.transform.utils.matrix import apply_transform_weight

    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    w, e = torch.randn(16, 16, generator=g, dtype=torch.float64), torch.randn(5, 16, generator=g, dtype=torch.float64)
    x = torch.randn(3, 16, generator=g, dtype=torch.float64)
    heads = torch.randn(32, 8, generator=g, dtype=torch.float64)  # 2 heads of 16 rows (v_proj) or columns (o_proj)
    u8 = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))[0]  # per head (head_dim 8 here)
    lin, emb = torch.nn.Linear, torch.nn.Embedding
    cases = {  # SpinScope's rule (engine/rotation/algebra.py) : compressed-tensors' application
        "Linear weight_output (writer W <- R^T W)": (u.T @ w, apply_transform_weight(u, w, "weight_output", lin)),
        "Linear weight_input inverse (reader W <- W R)": (w @ u, apply_transform_weight(u.T, w, "weight_input", lin)),
        "Embedding weight_output (E <- E R)": (e @ u, apply_transform_weight(u, e, "weight_output", emb)),
        "input, online (x <- x R)": (x @ u, apply_transform_weight(u, x, "input", lin)),
        "per head, Linear weight_output (v_proj rows W_h <- R2^T W_h)": (
            torch.block_diag(u8, u8, u8, u8).T @ heads,
            apply_transform_weight(u8, heads, "weight_output", lin),
        ),
        "per head, weight_input inverse (o_proj columns W_h <- W_h R2)": (
            heads.T @ torch.block_diag(u8, u8, u8, u8),
            apply_transform_weight(u8.T, heads.T, "weight_input", lin),
        ),
    }
    return {k: float((a - b).abs().max()) for k, (a, b) in cases.items()}


# ---- the two exports -----------------------------------------------------------------------------------------------
def run_llmcompressor(python: str, model_dir: Path, out: Path, work: Path, rotations: tuple[str, ...]) -> dict:
    """llm-compressor's checkpoint at `out`; returns its fused float weights, scales and versions."""
    script, extras = work / "llmc_driver.py", work / "llmc_extras.pt"
    script.write_text(LLMC_DRIVER)
    return run_isolated(
        python,
        script,
        [model_dir, out, extras, ",".join(rotations)],
        extras,
        "llm-compressor",
        1800,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"},
    )


def run_spinscope(model_dir: Path, out: Path, work: Path, rotations: tuple[str, ...]) -> dict:
    """SpinScope's checkpoint at `out` from a rotation file of the same Hadamard matrices; returns the export summary,
    the float weights of the rotated (not yet quantized) model and the engine's own logits of the row."""
    from engine.evaluate import EvalConfig, build_model
    from engine.events import run_to_end
    from engine.export import export_row
    from engine.model.loading import load_model
    from engine.quant.recipes import Bits, get_recipe
    from engine.rotation.files import RotationSet, save_rotations
    from engine.rotation.fusion import RotationConfig, rotate

    handle = load_model(str(model_dir), device="cpu")
    a = handle.arch
    r4 = [hadamard(a.intermediate)] * a.n_layers if "R4" in rotations else None
    file = str(
        save_rotations(
            RotationSet(hadamard(a.hidden), [hadamard(a.head_dim)] * a.n_layers, r4=r4), work / "hadamard_rotations.bin"
        )
    )
    on = lambda r: "file" if r in rotations else "none"  # noqa: E731
    rot = RotationConfig(r1=on("R1"), r2=on("R2"), r4=on("R4"), file=file)  # R3 off
    recipe = replace(get_recipe("rotated", rotation_file=file, clip="none"), rotation=rot)
    bits, cfg = Bits.parse(f"{BITS}-16-16"), EvalConfig()
    summary = export_row(handle, recipe, bits, out, cfg)
    with handle.working_model() as model, torch.no_grad():  # the row as `python -m engine eval` evaluates it
        model, _ = run_to_end(build_model(handle, model, recipe, bits, cfg, cfg.seed))
        logits = model(token_ids(), use_cache=False).logits
    rotated = rotate(handle.model, a, rot)  # a copy: the same fusion, before quantization
    kinds = (torch.nn.Linear, torch.nn.Embedding)
    fused = {n: m.weight.detach().clone() for n, m in rotated.named_modules() if isinstance(m, kinds)}
    return {"summary": summary, "fused": fused, "recipe": recipe.to_dict(), "logits": logits}


# ---- reading the checkpoints -----------------------------------------------------------------------------------------
def read_checkpoint(directory: Path) -> tuple[dict, dict]:
    """(quantization_config, {module: {"q": int codes, "scale": ...}} | {tensor name: tensor} for dense tensors),
    read from the safetensors with compressed-tensors' own unpacking."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    raw = {}
    for path in sorted(directory.glob("*.safetensors")):
        raw.update(load_file(path))
    tensors = {}
    for key, value in raw.items():
        if key.endswith(".weight_packed"):
            module = key[: -len(".weight_packed")]
            shape = torch.Size(raw[f"{module}.weight_shape"].tolist())
            tensors[module] = {"q": unpack_from_int32(value, BITS, shape), "scale": raw[f"{module}.weight_scale"]}
        elif not key.endswith((".weight_shape", ".weight_scale")):
            tensors[key] = value
    return config, tensors


def dequantized(entry: dict) -> torch.Tensor:
    return entry["q"].float() * entry["scale"].float()  # per channel: scale [out, 1]


def ct_codes(w: torch.Tensor, args: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) that compressed-tensors' min-max RTN gives w: calculate_qparams and quantize, its own code."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    qargs = QuantizationArgs(**{k: v for k, v in args.items() if k != "observer"})
    scale, zero = calculate_qparams(w.amin(-1, keepdim=True), w.amax(-1, keepdim=True), qargs)
    return quantize(w, scale, zero, qargs, dtype=torch.int8), scale


def spinscope_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) of SpinScope's RTN grid for w (engine.quant.quantizers.weight_grid, no clipping search)."""
    from engine.quant.quantizers import weight_grid

    grid = weight_grid(w, BITS)  # scale [out, 1 group, 1]
    return grid.to_int(w.float().unsqueeze(1)).squeeze(1).to(torch.int8), grid.scale.squeeze(-1)


# ---- comparisons -------------------------------------------------------------------------------------------------
def compare_transforms(ours: dict, theirs: dict) -> list[dict]:
    """One row per scheme and field (type, head_dim, ... and each application as location/inverse/targets)."""
    rows = []
    for name in sorted(set(ours) | set(theirs)):
        a, b = ours.get(name, {}), theirs.get(name, {})
        for field in ("type", "head_dim", "randomize", "requires_grad", "precision"):
            rows.append({"scheme": name, "field": field, "spinscope": a.get(field), "llmcompressor": b.get(field)})

        def apps(s):
            return {(x["location"], x["inverse"]): sorted(x["targets"]) for x in s.get("apply", [])}

        pa, pb = apps(a), apps(b)
        for loc in sorted(set(pa) | set(pb)):
            rows.append(
                {
                    "scheme": name,
                    "field": f"apply {loc[0]} inverse={loc[1]}",
                    "spinscope": pa.get(loc),
                    "llmcompressor": pb.get(loc),
                }
            )
    for r in rows:
        r["same"] = r["spinscope"] == r["llmcompressor"]
    return rows


def compare_quant_config(ours: dict, theirs: dict) -> list[dict]:
    rows = []
    wa, wb = (c["config_groups"]["group_0"]["weights"] for c in (ours, theirs))
    for k in sorted(set(wa) | set(wb)):
        rows.append({"field": f"weights.{k}", "spinscope": wa.get(k), "llmcompressor": wb.get(k)})
    ga, gb = ours["config_groups"]["group_0"], theirs["config_groups"]["group_0"]
    for k in ("targets", "format", "input_activations", "output_activations"):
        rows.append({"field": k, "spinscope": ga.get(k), "llmcompressor": gb.get(k)})
    for k in ("format", "ignore", "kv_cache_scheme", "quantization_status", "version"):
        rows.append({"field": k, "spinscope": ours.get(k), "llmcompressor": theirs.get(k)})
    for r in rows:
        r["same"] = r["spinscope"] == r["llmcompressor"]
    return rows


def compare_linear(name: str, ss: dict, lc: dict, ss_fused: torch.Tensor, lc_fused: torch.Tensor, args: dict) -> dict:
    """Everything about one quantized linear in the two checkpoints."""
    ds, dl = dequantized(ss), dequantized(lc)
    amax_s, amax_l = ss_fused.abs().amax(-1, keepdim=True), lc_fused.abs().amax(-1, keepdim=True)
    q_ct, s_ct = ct_codes(ss_fused, args)  # llm-compressor's rule on SpinScope's fused weights
    flips = q_ct != lc["q"]
    tie = ((ss_fused / s_ct)[flips].abs() % 1 - 0.5).abs()  # how far each flipped code's value is from a tie
    q_ss, _ = spinscope_codes(lc_fused)  # SpinScope's rule on llm-compressor's fused weights
    ratio = ss["scale"].double() / lc["scale"].double()
    return {
        "linear": name,
        "shape": list(ss["q"].shape),
        "fused_max_abs_diff": float((ss_fused - lc_fused).abs().max()),
        "max_abs_weight": float(ss_fused.abs().max()),
        "dequant_max_abs_diff": float((ds - dl).abs().max()),
        "scale_ratio_min": float(ratio.min()),
        "scale_ratio_max": float(ratio.max()),
        "scale_ratio_mean": float(ratio.mean()),
        # each scale against its rule on its own fused weights: SpinScope amax / 7, compressed-tensors amax / 7.5
        "spinscope_scale_vs_amax_over_7": float((ss["scale"] / (amax_s / 7) - 1).abs().max()),
        "llmc_scale_vs_amax_over_7.5": float((lc["scale"] / (amax_l / 7.5) - 1).abs().max()),
        "codes_differ": float((ss["q"] != lc["q"]).float().mean()),
        "spinscope_codes_range": [int(ss["q"].min()), int(ss["q"].max())],
        "llmc_codes_range": [int(lc["q"].min()), int(lc["q"].max())],
        "llmc_codes_at_-8": int((lc["q"] == -8).sum()),
        # each row's largest |weight|: on SpinScope's grid exactly (q = +-7), on compressed-tensors' a tie at 7.5
        # steps, dequantized half a step off (clamped to 7, or rounded to -8)
        "spinscope_rows_amax_exact": float(_at_amax(ds, ss_fused).isclose(amax_s, rtol=1e-6).float().mean()),
        "llmc_rows_amax_off_half_step": float(
            ((_at_amax(dl, lc_fused) - amax_l).abs() / lc["scale"]).sub(0.5).abs().lt(1e-4).float().mean()
        ),
        "llmc_rule_on_spinscope_fused_codes_differ": float((q_ct != lc["q"]).float().mean()),
        "spinscope_rule_on_llmc_fused_codes_differ": float((q_ss != ss["q"]).float().mean()),
        "flipped_codes_max_distance_from_tie": float(tie.max()) if tie.numel() else None,
        # quantization error relative to each one's own step: RTN keeps it within half a step (0.5)
        "spinscope_max_err_in_steps": float(((ds - ss_fused).abs() / ss["scale"]).max()),
        "llmc_max_err_in_steps": float(((dl - lc_fused).abs() / lc["scale"]).max()),
        "spinscope_rms_err": float((ds - ss_fused).pow(2).mean().sqrt()),
        "llmc_rms_err": float((dl - lc_fused).pow(2).mean().sqrt()),
    }


def _at_amax(dq: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """|dequantized value| [out, 1] at each row's largest |w|."""
    return dq.gather(-1, w.abs().argmax(-1, keepdim=True)).abs()


def compare_dense(ss: dict, lc: dict) -> list[dict]:
    """Tensors stored as they are (embeddings, lm_head, norms, online transform matrices), by name."""
    rows = []
    for key in sorted(k for k in set(ss) | set(lc) if not isinstance(ss.get(k, lc.get(k)), dict)):
        a, b = ss.get(key), lc.get(key)
        row = {
            "tensor": key,
            "spinscope": None if a is None else f"{list(a.shape)} {a.dtype}".replace("torch.", ""),
            "llmcompressor": None if b is None else f"{list(b.shape)} {b.dtype}".replace("torch.", ""),
        }
        if a is not None and b is not None:
            row["max_abs_diff"] = float((a.double() - b.double()).abs().max())
        rows.append(row)
    return rows


def swap_weights(ss_dir: Path, lc_dir: Path, dst: Path) -> Path:
    """A copy of SpinScope's checkpoint holding llm-compressor's packed codes and scales instead of its own: logits
    equal to llm-compressor's then mean everything else (config, embeddings, norms, R4) is the same."""
    from safetensors.torch import load_file, save_file

    theirs = {}
    for path in lc_dir.glob("*.safetensors"):
        theirs.update(load_file(path))
    shutil.copytree(ss_dir, dst, dirs_exist_ok=True)
    for path in dst.glob("*.safetensors"):
        tensors = load_file(path)
        tensors.update({k: theirs[k] for k in tensors if k.endswith((".weight_packed", ".weight_scale"))})
        save_file(tensors, path, metadata={"format": "pt"})
    return dst


def compare_logits(
    ss_dir: Path,
    lc_dir: Path,
    model_dir: Path,
    work: Path,
    ss_tensors: dict,
    lc_tensors: dict,
    engine_logits: torch.Tensor,
) -> dict:
    """Both checkpoints loaded in fresh interpreters (transformers + compressed-tensors, the exported loader), on the
    same token ids, against each other and the float model, and SpinScope's with llm-compressor's weights swapped in
    (swap_weights), and SpinScope's against the engine's own row; also the runtime's decompressed weights against
    the q * scale read here."""
    from transformers import AutoModelForCausalLM

    from engine.export import LOADER_FILE, LOADER_PATH

    ids, none = token_ids(), torch.zeros(0, 2, dtype=torch.long)
    if not (lc_dir / LOADER_FILE).exists():  # llm-compressor writes no loader; the same loader reads its config
        shutil.copyfile(LOADER_PATH, lc_dir / LOADER_FILE)
    swapped = swap_weights(ss_dir, lc_dir, work / "spinscope-with-llmc-weights")
    got = {}
    for label, directory in (("spinscope", ss_dir), ("llmcompressor", lc_dir), ("swapped", swapped)):
        (work / label).mkdir(exist_ok=True)
        got[label] = load_elsewhere(directory, ids, none, work / label, "loader")
    with torch.no_grad():
        fp = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids, use_cache=False).logits
    a, b = got["spinscope"]["logits"], got["llmcompressor"]["logits"]
    runtime = {}
    for label, tensors in (("spinscope", ss_tensors), ("llmcompressor", lc_tensors)):
        runtime[label] = max(
            float((w - dequantized(tensors[n[: -len(".weight")]])).abs().max())
            for n, w in got[label]["weights"].items()
        )
    return {
        "max_abs_logit": float(fp.abs().max()),
        "spinscope_checkpoint_vs_engine_max_abs_diff": float((a - engine_logits).abs().max()),
        "spinscope_vs_llmc_max_abs_diff": float((a - b).abs().max()),
        "spinscope_vs_llmc_top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        "spinscope_vs_float_max_abs_diff": float((a - fp).abs().max()),
        "llmc_vs_float_max_abs_diff": float((b - fp).abs().max()),
        "spinscope_with_llmc_weights_vs_llmc_max_abs_diff": float((got["swapped"]["logits"] - b).abs().max()),
        "runtime_weights_vs_q_times_scale_max_abs_diff": runtime,
    }


# ---- the report ---------------------------------------------------------------------------------------------------
def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 3 and all(isinstance(x, str) for x in v):
        return "[" + ", ".join(x.replace("re:.*", "").rstrip("$") for x in v) + "]"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def print_report(res: dict) -> None:
    v = res["versions"]
    print(
        f"llm-compressor {v['llmcompressor']} (compressed-tensors {v['compressed_tensors']}, transformers "
        f"{v['transformers']}) against SpinScope (compressed-tensors {res['spinscope_ct']}); rotations "
        f"{','.join(res['rotations'])} as deterministic Hadamard; W4A16 int4 symmetric per channel, RTN\n"
    )
    print(
        f"Centering the embeddings (llm-compressor's center_embeddings) moved the tiny model's float logits by up to "
        f"{res['centering']['centering_max_abs_logit_change']:.3g} (max |logit| "
        f"{res['centering']['max_abs_logit']:.3g}); the model is saved centered, so both tools start from it.\n"
    )
    print(
        "Orientation, compressed-tensors' apply_transform_weight vs SpinScope's algebra on a non-symmetric U "
        "(max |diff|):"
    )
    for k, d in res["orientation"].items():
        print(f"  {k}: {d:.2g}")
    print("\ntransform_config")
    print(table(res["transform_config"], ["scheme", "field", "spinscope", "llmcompressor", "same"]))
    print("\nquantization_config")
    print(table(res["quantization_config"], ["field", "spinscope", "llmcompressor", "same"]))
    print("\nQuantized linears (scale ratio = SpinScope / llm-compressor; codes_differ: fraction of int4 codes)")
    print(
        table(
            res["linears"],
            [
                "linear",
                "fused_max_abs_diff",
                "max_abs_weight",
                "dequant_max_abs_diff",
                "scale_ratio_min",
                "scale_ratio_max",
                "codes_differ",
                "llmc_codes_at_-8",
                "llmc_rule_on_spinscope_fused_codes_differ",
                "spinscope_rule_on_llmc_fused_codes_differ",
                "flipped_codes_max_distance_from_tie",
            ],
        )
    )
    print("\nEach scale against its own rule, and each quantization error")
    print(
        table(
            res["linears"],
            [
                "linear",
                "spinscope_scale_vs_amax_over_7",
                "llmc_scale_vs_amax_over_7.5",
                "spinscope_codes_range",
                "llmc_codes_range",
                "spinscope_rows_amax_exact",
                "llmc_rows_amax_off_half_step",
                "spinscope_max_err_in_steps",
                "llmc_max_err_in_steps",
                "spinscope_rms_err",
                "llmc_rms_err",
            ],
        )
    )
    print("\nTensors stored unquantized")
    print(table(res["dense"], ["tensor", "spinscope", "llmcompressor", "max_abs_diff"]))
    s, lg = res["summary"], res["logits"]
    print(
        f"\nSummary over {len(res['linears'])} linears: fused float weights max |diff| "
        f"{s['fused_max_abs_diff']:.3g}; "
        f"scale ratio {s['scale_ratio_min']:.6f}..{s['scale_ratio_max']:.6f} (7.5 / 7 = {7.5 / 7:.6f}); codes "
        f"differ {s['codes_differ']:.1%}; dequantized max |diff| {s['dequant_max_abs_diff']:.3g}; each tool's rule "
        f"applied to the other's fused weights reproduces its codes but for {s['cross_rule_codes_differ']:.2%}"
    )
    print(
        f"Logits ({lg['max_abs_logit']:.3g} at most): SpinScope's checkpoint vs the engine's row max |diff| "
        f"{lg['spinscope_checkpoint_vs_engine_max_abs_diff']:.3g}; SpinScope vs llm-compressor max |diff| "
        f"{lg['spinscope_vs_llmc_max_abs_diff']:.3g}, top-1 agreement {lg['spinscope_vs_llmc_top1_agreement']:.3f}; "
        f"vs the float model: SpinScope {lg['spinscope_vs_float_max_abs_diff']:.3g}, llm-compressor "
        f"{lg['llmc_vs_float_max_abs_diff']:.3g}; SpinScope's checkpoint with llm-compressor's codes and scales "
        f"swapped in vs llm-compressor's: {lg['spinscope_with_llmc_weights_vs_llmc_max_abs_diff']:.3g}; runtime "
        f"weights vs q * scale read here: {lg['runtime_weights_vs_q_times_scale_max_abs_diff']} (top-1 agreement "
        "means little here: a random model's logits are nearly flat)"
    )
    print(f"{res['seconds']:.0f} s")


def crosscheck(llmc_python: str, rotations: tuple[str, ...], work: Path) -> dict:
    from compressed_tensors import __version__ as ct_version

    t0 = time.perf_counter()
    model_dir, ss_dir, lc_dir = work / "tiny", work / "spinscope", work / "llmcompressor"
    centering = build_tiny(model_dir)
    llmc = run_llmcompressor(llmc_python, model_dir, lc_dir, work, rotations)
    ours = run_spinscope(model_dir, ss_dir, work, rotations)
    ss_config, ss_tensors = read_checkpoint(ss_dir)
    lc_config, lc_tensors = read_checkpoint(lc_dir)
    args = lc_config["config_groups"]["group_0"]["weights"]
    linears = [
        compare_linear(n, ss_tensors[n], lc_tensors[n], ours["fused"][n], llmc["fused"][n], args)
        for n in sorted(k for k, v in ss_tensors.items() if isinstance(v, dict))
    ]
    embed = [n for n in ours["fused"] if n.endswith(("embed_tokens", "lm_head"))]
    summary = {
        k: max(r[k] for r in linears)
        for k in ("fused_max_abs_diff", "dequant_max_abs_diff", "codes_differ", "scale_ratio_max")
    }
    summary["scale_ratio_min"] = min(r["scale_ratio_min"] for r in linears)
    summary["cross_rule_codes_differ"] = max(
        max(r["llmc_rule_on_spinscope_fused_codes_differ"], r["spinscope_rule_on_llmc_fused_codes_differ"])
        for r in linears
    )
    summary["fused_embeddings_max_abs_diff"] = {
        n: float((ours["fused"][n] - llmc["fused"][n]).abs().max()) for n in embed
    }
    return {
        "rotations": list(rotations),
        "versions": llmc["versions"],
        "spinscope_ct": ct_version,
        "centering": centering,
        "orientation": orientation_check(),
        "transform_config": compare_transforms(
            ss_config.get("transform_config", {}).get("config_groups", {}),
            lc_config.get("transform_config", {}).get("config_groups", {}),
        ),
        "quantization_config": compare_quant_config(ss_config, lc_config),
        "linears": linears,
        "dense": compare_dense(ss_tensors, lc_tensors),
        "summary": summary,
        "logits": compare_logits(ss_dir, lc_dir, model_dir, work, ss_tensors, lc_tensors, ours["logits"]),
        "spinscope_recipe": ours["recipe"],
        "seconds": time.perf_counter() - t0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llmc-python", required=True, help="python of an environment with llm-compressor")
    p.add_argument("--rotations", default=",".join(ROTATIONS), help="subset of R1,R2,R4")
    p.add_argument("--out", help="a directory: report.json and both checkpoints are kept there")
    args = p.parse_args(argv)
    rotations = tuple(r.strip().upper() for r in args.rotations.split(","))
    if not set(rotations) <= set(ROTATIONS):
        p.error(f"--rotations takes a subset of {','.join(ROTATIONS)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        res = crosscheck(args.llmc_python, rotations, work)
        print_report(res)
        if args.out:
            (work / "report.json").write_text(json.dumps(res, indent=1, default=str))
            print(f"wrote {work / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
