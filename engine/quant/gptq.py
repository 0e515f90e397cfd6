"""GPTQ (Frantar et al., 2023): quantize a linear weight column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse Hessian of the layer loss.

For a linear y = x @ W.T with calibration inputs X [n, in], the layer loss ||X W.T - X Wq.T||^2 has
Hessian H = 2 X.T X / n [in, in] (HessianAccumulator). The grid is the symmetric per-row grid of
engine.quant.quantizers (same integer range, same optional clipping search), or a named format's grid, through
the format's column rounder (engine.quant.formats), so GPTQ and RTN outputs are directly comparable. GPTQ returns
codes and scales (gptq_encode), as every weight quantizer does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine.quant.formats import ColumnRounder, Encoded, IntFormat
from engine.quant.quantizers import MAX_BITS, check_bits, check_group_size, split_groups


class HessianAccumulator:
    """Running mean H = 2 X.T X / n over every calibration row x [..., in] seen so far."""

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32, device=None) -> None:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.num_samples = 0  # rows (tokens) seen
        self._hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)

    def add_batch(self, x: Tensor) -> None:
        """Add inputs x [..., in] (any leading shape: batch, sequence, ...); every row counts once."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must end in {self.in_features} features, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(self._hessian)  # [m, in]
        m = rows.shape[0]
        if m == 0:
            return
        total = self.num_samples + m
        # Rescale the old mean, then add the new rows: H = (n H_old + 2 X_new.T X_new) / (n + m).
        self._hessian.mul_(self.num_samples / total)
        self._hessian.addmm_(rows.T, rows, alpha=2.0 / total)
        self.num_samples = total

    @property
    def hessian(self) -> Tensor:
        if self.num_samples == 0:
            raise ValueError("no calibration inputs yet: call add_batch(x) before reading the Hessian")
        return self._hessian


def _inverse_hessian_factor(H: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) I)^-1, so that H^-1 = U.T U."""
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(
            f"the damped Hessian is not positive definite (damp={damp}); raise damp (e.g. 0.1) "
            "or collect more calibration inputs"
        )
    H_inv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(H_inv, upper=True)
    if info.item() != 0:
        raise ValueError(f"the inverse Hessian lost positive definiteness (damp={damp}); raise damp")
    return U


def _check_inputs(W: Tensor, H: Tensor, damp: float, block: int) -> None:
    if W.dim() != 2:
        raise ValueError(f"W must be a 2-D weight [out, in], got shape {tuple(W.shape)}")
    in_features = W.shape[1]
    if H.shape != (in_features, in_features):
        raise ValueError(
            f"H must be [in, in] = [{in_features}, {in_features}] to match W {tuple(W.shape)}, got {tuple(H.shape)}"
        )
    if not damp > 0:
        raise ValueError(f"damp must be positive (0.01 is the usual value), got {damp}")
    if block <= 0:
        raise ValueError(f"block must be a positive number of columns (128 is usual), got {block}")
    if not torch.isfinite(H).all():
        raise ValueError("H contains inf or NaN; check the calibration inputs")


@torch.no_grad()
def gptq_encode(
    W: Tensor, H: Tensor, rounder: ColumnRounder, damp: float = 0.01, block: int = 128, act_order: bool = False
) -> Encoded:
    """GPTQ of W [out, in] given H [in, in] on a format's grid: the codes and scales of the result.

    - rounder: the format's column rounder built on W (Format.column_rounder: integer grids with or without
      QuaRot's clipping search, or a floating-point format's grid); its group (a group, a block, or None for one
      grid per row) is fitted when the loop reaches the group's first column, on the weights as updated so far
      (as in the reference). With act_order the groups stay the contiguous groups of the original column order
      and their grids are fitted once on the original weights ("static groups"), so the result is a valid grouped
      format.
    - damp: H += damp * mean(diag H) * I before inverting.
    - Dead columns (diag H = 0: the input channel is always zero) are set to 0 and ignored.
    - act_order: quantize columns in order of decreasing diag H.
    - block: columns per lazy batch update (only speed, not the result, depends on it up to rounding).
    Math runs in float32.
    """
    _check_inputs(W, H, damp, block)
    group_size = rounder.group
    out_features, in_features = W.shape
    weight = W.detach().float().clone()  # [out, in], updated in place as errors are pushed forward
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()

    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    weight[:, dead] = 0.0

    static = act_order and group_size is not None
    if group_size is None:
        rounder.fit(weight)
    elif static:  # one grid per contiguous group, on the original weights
        groups = split_groups(weight, group_size)  # [out, G, g]
        for g in range(groups.shape[1]):
            rounder.fit(groups[:, g])

    order = torch.arange(in_features, device=W.device)  # position -> original column
    if act_order:
        order = torch.argsort(H.diagonal(), descending=True)
        weight = weight[:, order]
        H = H[order][:, order]

    U = _inverse_hessian_factor(H, damp)  # [in, in], upper triangular
    original_column = order.tolist()  # on the host: no device sync per column
    elements = torch.zeros_like(weight)  # [out, in]: each column's integers or element values

    for start in range(0, in_features, block):
        stop = min(start + block, in_features)
        w_block = weight[:, start:stop].clone()  # [out, b]
        errors = torch.zeros_like(w_block)  # [out, b], scaled errors (w - q) / U[j, j]
        U_block = U[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if group_size is not None:
                if static:
                    rounder.select(original_column[col] // group_size)
                elif col % group_size == 0:
                    rounder.fit(_current_group(weight, w_block, errors, U, start, i, group_size))
            w = w_block[:, i]
            elements[:, col], q = rounder.round(w)
            err = (w - q) / U_block[i, i]
            w_block[:, i:] -= err.unsqueeze(1) * U_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        weight[:, stop:] -= errors @ U[start:stop, stop:]

    if act_order:
        elements = elements[:, torch.argsort(order)]
    return rounder.encoded(elements)


def gptq_quantize(
    W: Tensor,
    H: Tensor,
    bits: int,
    group_size: int | None = None,
    damp: float = 0.01,
    block: int = 128,
    clip_search: bool = False,
    act_order: bool = False,
) -> Tensor:
    """GPTQ fake quantization of W [out, in] on the symmetric integer grid of `bits` per row (or per group of
    `group_size` input columns), optionally with QuaRot's clipping search: gptq_encode's result dequantized, in
    W's dtype. bits = 16 returns W unchanged."""
    _check_inputs(W, H, damp, block)
    if check_bits(bits) >= MAX_BITS:
        return W.clone()
    rounder = IntFormat(bits, group=check_group_size(group_size)).column_rounder(W, search=clip_search)
    return gptq_encode(W, H, rounder, damp, block, act_order).dequantize().to(W.dtype)


def _current_group(
    weight: Tensor, w_block: Tensor, errors: Tensor, U: Tensor, start: int, i: int, group_size: int
) -> Tensor:
    """Columns [col, col + group_size) of the weight with every error pushed so far, col = start + i.

    Inside the block they are w_block[:, i:]; past it, `weight` still lacks the lazy update of this
    block's first i columns, so add it here. (The reference fits on the stale `weight` instead; the
    two agree when group_size divides block, and with this the result does not depend on block.)
    """
    stop = start + w_block.shape[1]
    inside = w_block[:, i : i + group_size]
    beyond = group_size - inside.shape[1]
    if beyond <= 0:
        return inside
    later = weight[:, stop : stop + beyond] - errors[:, :i] @ U[start : start + i, stop : stop + beyond]
    return torch.cat([inside, later], dim=1)
