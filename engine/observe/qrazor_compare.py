"""QRazor's SDR on real tensors: one layer's activations, KV cache or weights, and SDR against RTN-4 and
Hadamard+RTN-4 at matched effective bits (what the QRazor page compares; app/qrazor_bits.py spells one group out).

Tensors are laid out [rows, d]: rows are tokens for activations and the KV cache, output channels for weights;
SDR groups and RTN grids both run along d. The base precision follows QRazor: activations A16 and KV8 per tensor
(static absmax over the captured tokens), weights W8 per output channel.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import pandas as pd
import torch

from engine.data.corpus import load_corpus, windows
from engine.model import dispatch
from engine.observe.capture import layer_sites
from engine.quant.qrazor import ROLE_BASE_BITS, dequantize, flag_bits, quantize_absmax, sdr_decode, sdr_encode
from engine.quant.quantizers import QuantSpec, fake_quantize
from engine.rotation.hadamard import apply_hadamard, supported

# Sites the qrazor recipe quantizes, and the role that sets their base precision.
SITE_ROLES = {
    "attn_in": "activation",
    "o_in": "activation",
    "mlp_in": "activation",
    "down_in": "activation",
    "k": "kv",
    "v": "kv",
}
SITE_LABELS = {
    "attn_in": "input of q/k/v_proj",
    "o_in": "input of o_proj",
    "mlp_in": "input of gate/up_proj",
    "down_in": "input of down_proj",
    "k": "K cache (after RoPE)",
    "v": "V cache",
}
GROUP_SIZES = (4, 8, 16, 32, 64, 128)  # the SDR group sizes swept (the QRazor page's slider offers the same)
SCALE_BITS = 16  # an RTN grid stores an fp16 scale; an asymmetric one adds a zero point of the code's width
_CACHE_ENTRIES = 16
_captured: OrderedDict = OrderedDict()  # (fingerprint, dtype, layer, tokens, corpus) -> {site: [T, d]}


# ------------------------------------------------------------------------------------------- real tensors


@dataclass(frozen=True)
class QRazorTensor:
    """One real tensor to razor. values: float32 [rows, d]."""

    label: str
    values: torch.Tensor
    role: str  # activation | kv | weight: sets the base precision (A16, KV8, W8)
    per_channel: bool  # weights: one base scale per output row; else one per tensor
    row_name: str  # what a row is: "token" or "output channel"
    hadamard_block: int  # width of the Hadamard used by the comparison (d, or a head for the KV cache)

    def __post_init__(self):
        if self.role not in ROLE_BASE_BITS:
            raise ValueError(f"role must be one of {sorted(ROLE_BASE_BITS)}, got {self.role!r}")
        if self.values.dim() != 2 or not self.values.is_floating_point():
            raise ValueError(
                f"values must be a float tensor [rows, d], got {self.values.dtype} {tuple(self.values.shape)}"
            )

    @property
    def base_bits(self) -> int:
        return ROLE_BASE_BITS[self.role]


def capture_layer(handle, layer: int, tokens: int = 256, corpus: str = "wiki") -> dict[str, torch.Tensor]:
    """{site: float32 [tokens, d]} for every site of SITE_ROLES in one decoder layer, from one forward pass over
    `tokens` calibration tokens (one window; position 0 is the attention sink): engine.observe.capture.layer_sites,
    which stops the forward after the layer. Memoised per (model, layer, tokens, corpus)."""
    key = (handle.fingerprint, handle.dtype, layer, int(tokens), corpus)
    if key in _captured:
        _captured.move_to_end(key)
        return _captured[key]
    ids = windows(load_corpus(corpus), handle.tokenizer, tokens, min(tokens, handle.max_length), "calib")[:1]
    got = {site: t[0] for site, t in layer_sites(handle.model, handle.arch, ids, layer, tuple(SITE_ROLES)).items()}
    _captured[key] = got
    while len(_captured) > _CACHE_ENTRIES:
        _captured.popitem(last=False)
    return got


def site_readers(arch) -> dict[str, tuple]:
    """The linears reading each site, from the architecture table (q, k, v or a fused qkv; gate, up or gate_up)."""
    readers = [x for x in arch.residual_readers if x in arch.linears]  # a router is not quantized
    attn = tuple(x for x in readers if arch.linears.index(x) < arch.linears.index("o"))
    mlp = tuple(x for x in readers if x not in attn)
    return {"attn_in": attn, "o_in": ("o",), "mlp_in": mlp, "down_in": arch.down_roles, "k": (), "v": ()}


def site_tensor(
    handle, layer: int, site: str, source: str = "activation", tokens: int = 256, corpus: str = "wiki"
) -> QRazorTensor:
    """The activation at `site` of `layer`, or (source = a role in site_readers(arch)[site]) the weight [out, in] of
    the linear that reads it."""
    if site not in SITE_ROLES:
        raise ValueError(f"site must be one of {', '.join(SITE_ROLES)}, got {site!r}")
    arch = handle.arch
    if source == "activation":
        values = capture_layer(handle, layer, tokens, corpus)[site]
        block = arch.head_dim if SITE_ROLES[site] == "kv" else values.shape[-1]
        return QRazorTensor(
            f"layer {layer}, {site} ({SITE_LABELS[site]}), {values.shape[0]} tokens",
            values,
            SITE_ROLES[site],
            False,
            "token",
            block,
        )
    if source not in site_readers(arch)[site]:
        readers = ", ".join(site_readers(arch)[site]) or "none"
        raise ValueError(f"source must be 'activation' or a linear reading {site} ({readers}), got {source!r}")
    if not 0 <= layer < arch.n_layers:
        raise ValueError(f"layer must be in [0, {arch.n_layers - 1}], got {layer}")
    weight = dispatch.read_tensor(arch.module(handle.model, source, layer), "weight").detach().float().cpu()
    return QRazorTensor(
        f"layer {layer}, {source}_proj weight [out, in] = {list(weight.shape)}",
        weight,
        "weight",
        True,
        "output channel",
        weight.shape[-1],
    )


def pad_to_groups(q: torch.Tensor, g: int) -> torch.Tensor:
    """Zero-pad the last dim to a multiple of g: zeros change neither a group's OR nor anyone's code."""
    pad = -q.shape[-1] % g
    return torch.nn.functional.pad(q, (0, pad)) if pad else q


# ------------------------------------------------------------------------------- matched-bits comparison


def sdr_effective_bits(d: int, base_bits: int, group_size: int, target_bits: int = 4) -> float:
    """target + flag_bits per group, per value: 4 + flag_bits / g when g divides d (a ragged last group is
    zero-padded and still stores one flag)."""
    return target_bits + flag_bits(base_bits, target_bits) * math.ceil(d / group_size) / d


def rtn_effective_bits(d: int, group_size: int, bits: int = 4, symmetric: bool = False) -> float:
    """bits + (fp16 scale [+ zero point of `bits` bits]) per grid of group_size values along d."""
    side = SCALE_BITS + (0 if symmetric else bits)
    return bits + side * math.ceil(d / group_size) / d


def matched_rtn_group(d: int, sdr_bits: float, bits: int = 4, symmetric: bool = False) -> int:
    """The smallest divisor of d whose RTN grids cost no more bits per value than SDR (`sdr_bits`): RTN gets
    the finest grids the same budget buys. If even one grid per row costs more, one grid per row (d)."""
    for g in sorted(k for k in range(1, d + 1) if d % k == 0):
        if rtn_effective_bits(d, g, bits, symmetric) <= sdr_bits + 1e-12:
            return g
    return d


def sdr_roundtrip(tensor: QRazorTensor, group_size: int, target_bits: int = 4) -> torch.Tensor:
    """Base precision, razor, decode, dequantize: float32 [rows, d]."""
    d = tensor.values.shape[-1]
    q, scale = quantize_absmax(tensor.values, tensor.base_bits, per_channel=tensor.per_channel)
    razored = sdr_encode(pad_to_groups(q, group_size), tensor.base_bits, target_bits, group_size)
    decoded = sdr_decode(razored.codes, razored.flags, group_size)[:, :d]
    return dequantize(decoded, scale)


def _rtn(values: torch.Tensor, group_size: int, bits: int, symmetric: bool) -> torch.Tensor:
    return fake_quantize(values, QuantSpec(bits=bits, symmetric=symmetric, group_size=group_size)).float()


def rtn_roundtrip(tensor: QRazorTensor, group_size: int, bits: int = 4) -> torch.Tensor:
    """RTN along each row in grids of group_size: asymmetric for activations/KV (per token, as QuaRot), symmetric
    for weights (per output channel); no clipping. float32 [rows, d]."""
    return _rtn(tensor.values, group_size, bits, symmetric=tensor.role == "weight")


def hadamard_block(tensor: QRazorTensor) -> int:
    """The rotation width: the tensor's own block if a Hadamard matrix of it exists, else the largest power of
    two dividing it (block-diagonal)."""
    n = tensor.hadamard_block
    return n if supported(n) else n & -n


def hadamard_rtn_roundtrip(tensor: QRazorTensor, group_size: int, bits: int = 4, seed: int = 0) -> torch.Tensor:
    """QuaRot-style: rotate each row by a random Hadamard (x diag(s) H; block-diagonal per head for the KV
    cache), RTN in the rotated basis, rotate back. float32 [rows, d] in the original basis."""
    x, n = tensor.values.float(), hadamard_block(tensor)
    signs = (torch.randint(0, 2, (x.shape[-1],), generator=torch.Generator().manual_seed(seed)) * 2 - 1).float()
    rotated = apply_hadamard(x * signs, n)  # [rows, d]
    quantized = _rtn(rotated, group_size, bits, symmetric=tensor.role == "weight")
    return apply_hadamard(quantized, n, transpose=True) * signs


def sqnr_db(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    noise = float((x_hat.double() - x.double()).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(x.double().pow(2).sum()) / noise)


@dataclass(frozen=True)
class Comparison:
    """One method on one tensor: errors float32 [rows, d] = x_hat - x."""

    method: str
    group_size: int
    effective_bits: float
    mse: float
    sqnr_db: float
    errors: torch.Tensor

    @property
    def name(self) -> str:
        """The method without its settings: 'SDR', 'RTN-4' or 'Hadamard + RTN-4'."""
        return self.method.split(" (")[0]

    @property
    def zero_share(self) -> float:
        """The share of values this method reproduces exactly (error 0)."""
        err = self.errors.abs().numpy().ravel()
        return 1 - err[err > 0].size / err.size


def compare_methods(tensor: QRazorTensor, group_size: int = 16, bits: int = 4) -> list[Comparison]:
    """SDR (g = group_size) vs RTN and Hadamard+RTN at the same effective bits: both RTNs get the finest grid
    that costs no more bits per value than SDR's flags (matched_rtn_group)."""
    x, d = tensor.values.float(), tensor.values.shape[-1]
    symmetric = tensor.role == "weight"
    sdr_bits = sdr_effective_bits(d, tensor.base_bits, group_size, bits)
    g_rtn = matched_rtn_group(d, sdr_bits, bits, symmetric)
    rtn_bits = rtn_effective_bits(d, g_rtn, bits, symmetric)
    out = []
    for method, g, eff, x_hat in (
        (f"SDR (QRazor, g={group_size})", group_size, sdr_bits, sdr_roundtrip(tensor, group_size, bits)),
        (f"RTN-{bits} (grids of {g_rtn})", g_rtn, rtn_bits, rtn_roundtrip(tensor, g_rtn, bits)),
        (f"Hadamard + RTN-{bits} (grids of {g_rtn})", g_rtn, rtn_bits, hadamard_rtn_roundtrip(tensor, g_rtn, bits)),
    ):
        err = (x_hat - x).float()
        out.append(Comparison(method, g, eff, float(err.pow(2).mean()), sqnr_db(x, x_hat), err))
    return out


def group_size_sweep(tensor: QRazorTensor, sizes: tuple = GROUP_SIZES, bits: int = 4) -> pd.DataFrame:
    """One row per (SDR group size, method): effective bits, MSE and SQNR (dB), each RTN matched to that SDR."""
    rows = []
    for g in sizes:
        for c in compare_methods(tensor, g, bits):
            rows.append(
                {
                    "sdr_group": g,
                    "method": c.name,
                    "grid": c.group_size,
                    "effective_bits": c.effective_bits,
                    "mse": c.mse,
                    "sqnr_db": c.sqnr_db,
                }
            )
    return pd.DataFrame(rows)
