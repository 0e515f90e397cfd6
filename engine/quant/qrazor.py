"""QRazor (Lee, Choi, Chang 2025): static absmax base precision, then significant data razoring.

Two stages, both exact integer arithmetic once the floats are quantized:
1. Base precision: static absmax integers, `q = round(x * (2^(b-1)-1) / absmax)`; weights 8-bit per output
   channel, activations 16-bit per tensor, KV cache 8-bit (W8A16KV8). Wide enough to keep the outliers.
2. SDR: per group of g integers along the last dim, OR the magnitudes; the leading one of the OR is the
   razoring point. Keep `target_bits - 1` magnitude bits from there (plus the sign), round to nearest below
   the cut, floor when the kept bits are all ones (rounding would carry into a new MSB), and store the shift
   as a per-group flag. Decoded value = sign * (code << flag).
Products of two razored tensors need only the small codes and a shift by the sum of the two flags per group
pair (`razored_dot`), with no decompression.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

MIN_BITS = 2
MAX_BASE_BITS = 32  # magnitudes < 2^31, so shifts and products stay well inside int64
ROLE_BASE_BITS = {"weight": 8, "activation": 16, "kv": 8}  # the paper's W8A16KV8 base precision


def _check_bits(base_bits: int, target_bits: int | None = None) -> None:
    if not isinstance(base_bits, int) or not MIN_BITS <= base_bits <= MAX_BASE_BITS:
        raise ValueError(f"base_bits must be an int in [{MIN_BITS}, {MAX_BASE_BITS}], got {base_bits!r}")
    if target_bits is None:
        return
    if not isinstance(target_bits, int) or target_bits < MIN_BITS:
        raise ValueError(
            f"target_bits must be an int >= {MIN_BITS} (sign + at least one magnitude bit), got {target_bits!r}"
        )
    if target_bits >= base_bits:
        raise ValueError(
            f"target_bits ({target_bits}) must be smaller than base_bits ({base_bits}): "
            "razoring compresses the base-precision integers, e.g. base 8 or 16 to target 4"
        )


def _check_group_size(group_size: int, last_dim: int) -> None:
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if last_dim % group_size != 0:
        divisors = [g for g in (4, 8, 16, 32, 64, 128) if last_dim % g == 0]
        raise ValueError(
            f"the last dim ({last_dim}) must be divisible by group_size ({group_size}); "
            f"group sizes that divide it: {', '.join(map(str, divisors)) or 'none of 4-128'}"
        )


@dataclass(frozen=True)
class QRazorConfig:
    """Base precisions per role and the SDR target; defaults are the paper's W8A16KV8 -> 4 bits."""

    weight_bits: int = 8  # per output channel absmax
    activation_bits: int = 16  # per tensor static absmax
    kv_bits: int = 8  # per tensor static absmax
    target_bits: int = 4  # sign + 3 magnitude bits after razoring
    group_size: int = 16  # integers sharing one razoring flag
    version: int = 1

    def __post_init__(self) -> None:
        for bits in (self.weight_bits, self.activation_bits, self.kv_bits):
            _check_bits(bits, self.target_bits)
        _check_group_size(self.group_size, self.group_size)

    def effective_bits(self, role: str) -> float:
        if role not in ROLE_BASE_BITS:
            raise ValueError(f"role must be one of {sorted(ROLE_BASE_BITS)}, got {role!r}")
        base = {"weight": self.weight_bits, "activation": self.activation_bits, "kv": self.kv_bits}[role]
        return effective_bits(base, self.target_bits, self.group_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> QRazorConfig:
        return cls(**data)


# ---------------------------------------------------------------------------------------------- base stage


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric `bits`-bit integer: 2^(bits-1) - 1 (127 for 8 bits)."""
    _check_bits(bits)
    return (1 << (bits - 1)) - 1


def quantize_absmax(
    x: torch.Tensor, bits: int, per_channel: bool = False, absmax: float | torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static symmetric absmax quantization -> (int64 q of x's shape, float32 scale); x ~= q * scale.

    per_channel: x is a weight [out, in], one scale per output row (scale [out, 1]); otherwise one scale
    for the whole tensor (scale []). absmax: a calibrated static range (scalar, or [out] / [out, 1] when
    per_channel); values beyond it clamp to +-qmax. None computes it from x.
    """
    top = qmax(bits)
    xf = x.detach().to(torch.float32)
    if per_channel and xf.dim() != 2:
        raise ValueError(f"per_channel expects a weight of shape [out, in], got shape {tuple(x.shape)}")
    if absmax is None:
        amax = xf.abs().amax(dim=1, keepdim=True) if per_channel else xf.abs().amax()
    else:
        amax = torch.as_tensor(absmax, dtype=torch.float32, device=xf.device)
        if per_channel and amax.dim() > 0:
            amax = amax.reshape(-1, 1)
        if (amax < 0).any() or not torch.isfinite(amax).all():
            raise ValueError("absmax must be finite and >= 0")
    # An all-zero tensor/row quantizes to zeros under any scale; use 1 to avoid dividing by zero.
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    q = torch.round(xf / scale).clamp(-top, top).to(torch.int64)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integers back to floats: q * scale (scale broadcasts: [] per tensor, [out, 1] per channel)."""
    return (q.to(torch.float32) * scale).to(dtype)


# ----------------------------------------------------------------------------------------------- SDR stage


def flag_bits(base_bits: int, target_bits: int = 4) -> int:
    """Bits to store one group's shift.

    A b-bit base integer has b-1 magnitude bits and razoring keeps k = target_bits-1 of them, so the shift
    takes the values 0 .. b-1-k = base_bits - target_bits; that needs bit_length(base - target) bits:
    3 for 8 -> 4 (shifts 0..4), 4 for 16 -> 4 (shifts 0..12).
    """
    _check_bits(base_bits, target_bits)
    return (base_bits - target_bits).bit_length()


def effective_bits(base_bits: int, target_bits: int = 4, group_size: int = 16) -> float:
    """Storage per value: target_bits + flag_bits / g (4 + 3/16 = 4.1875 for an 8-bit base, g = 16)."""
    _check_group_size(group_size, group_size)
    return target_bits + flag_bits(base_bits, target_bits) / group_size


@dataclass(frozen=True)
class RazoredTensor:
    """SDR output. codes: int64 [..., d], signed, |code| < 2^(target_bits-1). flags: int64 [..., d // g],
    the per-group right shift; decoded value = sign(code) * (|code| << flag)."""

    codes: torch.Tensor
    flags: torch.Tensor
    base_bits: int
    target_bits: int
    group_size: int

    @property
    def effective_bits(self) -> float:
        return effective_bits(self.base_bits, self.target_bits, self.group_size)

    def decode(self) -> torch.Tensor:
        return sdr_decode(self.codes, self.flags, self.group_size)


def _bit_length(m: torch.Tensor, max_bits: int) -> torch.Tensor:
    """Exact int.bit_length() of non-negative int64 m (< 2^max_bits) by counting powers of two <= m."""
    powers = torch.ones(max_bits, dtype=torch.int64, device=m.device) << torch.arange(max_bits, device=m.device)
    return (m.unsqueeze(-1) >= powers).sum(dim=-1)


def _group_or(mags: torch.Tensor) -> torch.Tensor:
    """Bitwise OR over the last dim of [..., G, g] by pairwise halving -> [..., G].
    (Its leading one is also that of the group max; the OR is what the hardware computes.)"""
    while mags.shape[-1] > 1:
        if mags.shape[-1] % 2:
            mags = torch.cat([mags, torch.zeros_like(mags[..., :1])], dim=-1)
        mags = mags[..., 0::2] | mags[..., 1::2]
    return mags[..., 0]


def _check_int_tensor(q: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor) or q.dtype.is_floating_point or q.dtype.is_complex or q.dtype == torch.bool:
        raise ValueError(
            f"{name} must be an integer tensor (e.g. from quantize_absmax), got {getattr(q, 'dtype', type(q))}"
        )
    if q.dim() == 0:
        raise ValueError(f"{name} must have at least one dim (groups run along the last dim)")


def sdr_encode(q: torch.Tensor, base_bits: int, target_bits: int = 4, group_size: int = 16) -> RazoredTensor:
    """Razor base-precision integers q [..., d] (|q| <= 2^(base_bits-1)-1) to target_bits per value
    plus one shift flag per group of group_size along the last dim."""
    _check_bits(base_bits, target_bits)
    _check_int_tensor(q, "q")
    _check_group_size(group_size, q.shape[-1])
    top = qmax(base_bits)
    q = q.to(torch.int64)
    if q.numel() and q.abs().max().item() > top:
        raise ValueError(
            f"q holds magnitudes above {top}, outside a symmetric {base_bits}-bit base; "
            "quantize with quantize_absmax(x, base_bits) first"
        )
    kept = target_bits - 1  # magnitude bits kept; the sign is the remaining bit
    grouped = q.reshape(*q.shape[:-1], q.shape[-1] // group_size, group_size)  # [..., G, g]
    sign, mag = torch.sign(grouped), grouped.abs()

    msb_len = _bit_length(_group_or(mag), base_bits - 1)  # [..., G], 0 for an all-zero group
    shift = (msb_len - kept).clamp(min=0)  # groups whose OR fits in `kept` bits stay exact
    s = shift.unsqueeze(-1)  # [..., G, 1]
    floored = mag >> s
    half = (torch.ones_like(s) << s) >> 1  # 2^(s-1), or 0 when s = 0
    rounded = (mag + half) >> s
    all_ones = floored == (1 << kept) - 1  # rounding up would need a (kept+1)-th bit: floor instead
    code = torch.where(all_ones, floored, rounded) * sign
    return RazoredTensor(code.reshape(q.shape), shift, base_bits, target_bits, group_size)


def sdr_decode(codes: torch.Tensor, flags: torch.Tensor, group_size: int) -> torch.Tensor:
    """Razored codes [..., d] and flags [..., d // g] back to base-precision int64 integers [..., d]."""
    _check_int_tensor(codes, "codes")
    _check_group_size(group_size, codes.shape[-1])
    groups = codes.shape[-1] // group_size
    if tuple(flags.shape) != (*codes.shape[:-1], groups):
        raise ValueError(
            f"flags must have shape {(*codes.shape[:-1], groups)} for codes {tuple(codes.shape)} "
            f"and group_size {group_size}, got {tuple(flags.shape)}"
        )
    grouped = codes.to(torch.int64).reshape(*codes.shape[:-1], groups, group_size)
    s = flags.to(torch.int64).unsqueeze(-1)
    # Shift the magnitude, not the signed value, so the sign handling matches the encoder exactly.
    return (torch.sign(grouped) * (grouped.abs() << s)).reshape(codes.shape)


def razored_dot(
    a_codes: torch.Tensor, a_flags: torch.Tensor, w_codes: torch.Tensor, w_flags: torch.Tensor, g: int
) -> torch.Tensor:
    """Decompression-free product of razored tensors, exact in int64.

    a: codes [T, d] (or [d]) with flags [T, d // g]; w: codes [out, d] (or [d]) with flags [out, d // g].
    Returns decode(a) @ decode(w).T as int64 [T, out] (dims dropped for 1-D inputs; a scalar for two
    vectors). Each group pair multiplies only the small codes and shifts the partial sum by a_flag + w_flag.
    Multiply by the two base scales to get the float result.
    """
    for name, codes in (("a_codes", a_codes), ("w_codes", w_codes)):
        _check_int_tensor(codes, name)
        if codes.dim() > 2:
            raise ValueError(f"{name} must be [d] or [rows, d], got shape {tuple(codes.shape)}")
    a_vec, w_vec = a_codes.dim() == 1, w_codes.dim() == 1
    a_c, w_c = a_codes.reshape(-1, a_codes.shape[-1]), w_codes.reshape(-1, w_codes.shape[-1])
    if a_c.shape[-1] != w_c.shape[-1]:
        raise ValueError(f"inner dims differ: a has {a_c.shape[-1]}, w has {w_c.shape[-1]}")
    _check_group_size(g, a_c.shape[-1])
    groups = a_c.shape[-1] // g
    for name, flags, codes in (("a_flags", a_flags, a_codes), ("w_flags", w_flags, w_codes)):
        if tuple(flags.shape) != (*codes.shape[:-1], groups):
            raise ValueError(
                f"{name} must have shape {(*codes.shape[:-1], groups)} (one shift per group of "
                f"{g}), got {tuple(flags.shape)}"
            )
    a_s, w_s = a_flags.reshape(a_c.shape[0], groups), w_flags.reshape(w_c.shape[0], groups)
    a_c, w_c = a_c.to(torch.int64), w_c.to(torch.int64)
    a_s, w_s = a_s.to(torch.int64), w_s.to(torch.int64)
    if a_c.numel() and w_c.numel():
        # Worst-case |result| in Python ints: refuse rather than wrap around silently.
        bound = a_c.shape[-1] * a_c.abs().max().item() * w_c.abs().max().item() << (a_s.max().item() + w_s.max().item())
        if bound >= 1 << 63:
            raise ValueError(f"the product could reach {bound}, beyond int64; use smaller bases or d")

    a_g = a_c.reshape(a_c.shape[0], groups, g)  # [T, G, g]
    w_g = w_c.reshape(w_c.shape[0], groups, g)  # [O, G, g]
    # Partial sums of code products per group pair, accumulated lane by lane: [T, O, G] in memory,
    # not [T, O, G, g]. Integer matmul is CPU-only in torch; this runs on any device.
    partial = torch.zeros(a_g.shape[0], w_g.shape[0], groups, dtype=torch.int64, device=a_c.device)
    for lane in range(g):
        partial += a_g[:, None, :, lane] * w_g[None, :, :, lane]
    shifts = a_s[:, None, :] + w_s[None, :, :]  # [T, O, G]
    out = (partial << shifts).sum(dim=-1)  # [T, O]; shifting a negative int64 left is exact multiplication
    if w_vec:
        out = out[:, 0]
    if a_vec:
        out = out[0]
    return out


# ------------------------------------------------------------------------------------------ fake quant


def qrazor_fake_quant(
    x: torch.Tensor,
    base_bits: int,
    target_bits: int = 4,
    group_size: int = 16,
    per_channel: bool = False,
    absmax: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize to the base precision, razor, decode, dequantize -> a float tensor of x's shape and dtype.

    Weights: x [out, in], per_channel=True (one scale per output row), groups along in.
    Activations / KV: x [..., d], per tensor; pass the calibrated static absmax, or None to use x's own.
    No gradient flows (round has zero gradient); QRazor needs no training.
    """
    _check_bits(base_bits, target_bits)
    if x.dim() == 0:
        raise ValueError("x must have at least one dim: groups of group_size run along the last dim")
    _check_group_size(group_size, x.shape[-1])
    q, scale = quantize_absmax(x, base_bits, per_channel=per_channel, absmax=absmax)
    razored = sdr_encode(q, base_bits, target_bits, group_size)
    return dequantize(razored.decode(), scale, dtype=x.dtype)
