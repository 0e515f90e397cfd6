"""The one rotation algebra: the weight of a linear after R1, R2 and R4, given its role.

Fusion (engine.rotation.fusion, in float64 on real weights) and Cayley training (engine.learn.spinquant, on the fly
with gradients) both call `rotated_weight`; nothing else writes these products. HF linears compute y = x @ W.T with
W [out, in]; the residual stream x becomes x R1, per-head values v_h become v_h R2, the down_proj input x R4:
    readers (q, k, v, gate, up):  W <- W R1          writers (o, down):  W <- R1^T W
    v_proj rows of KV head h:     W_h <- R2^T W_h    o_proj columns of head h:  W[:, h] <- W[:, h] R2
    down_proj:                    W <- W R4          embeddings and lm_head:  E <- E R1
The factors commute per role (R1 acts on one side, R2/R4 on the other), so one call applies any subset.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from engine.model.arch import ArchInfo

RightFactor = Tensor | Callable[[Tensor], Tensor]  # R, or a function x -> x R (e.g. a block-diagonal module)


def _right(x: Tensor, r: RightFactor) -> Tensor:
    return r(x) if callable(r) else x @ r.to(x.dtype)


def rotated_weight(
    arch: ArchInfo,
    role: str,
    w: Tensor,
    r1: Tensor | None = None,
    r2: Tensor | None = None,
    r4: RightFactor | None = None,
) -> Tensor:
    """W [out, in] of the decoder linear `role` with the given rotations fused (None: that rotation is absent)."""
    roles = arch.roles
    if r1 is not None:
        r1 = r1.to(w.dtype)
        if role in arch.residual_readers:
            w = w @ r1
        elif role in arch.residual_writers:
            w = r1.T @ w
    if r2 is not None:
        r2, hd = r2.to(w.dtype), arch.head_dim
        if role == roles.value:  # rows of each KV head: [kv_heads * hd, in], after q and k rows in a fused qkv
            start = arch.value_row_offset
            values = torch.einsum("dc,kdi->kci", r2, w[start:].reshape(arch.n_kv_heads, hd, -1))
            w = torch.cat([w[:start], values.reshape(-1, w.shape[1])])
        elif role == "o":  # [out, heads * hd]: columns of each head
            w = (w.reshape(w.shape[0], arch.n_heads, hd) @ r2).reshape(w.shape)
    if r4 is not None and role in arch.down_roles:
        w = _right(w, r4)
    return w


def rotated_bias(arch: ArchInfo, role: str, b: Tensor, r1: Tensor | None = None, r2: Tensor | None = None) -> Tensor:
    """The bias [out] of `role` after the rotations: a writer's output lives in the residual stream (b R1), v's
    output per KV head is rotated by R2 (b_h R2); readers' biases (Qwen2's q, k, v) are outputs R1 never touches."""
    if r1 is not None and role in arch.residual_writers:
        b = b @ r1.to(b.dtype)
    if r2 is not None and role == arch.roles.value:
        start = arch.value_row_offset
        b = torch.cat([b[:start], (b[start:].reshape(arch.n_kv_heads, arch.head_dim) @ r2.to(b.dtype)).reshape(-1)])
    return b


def rotated_embedding(w: Tensor, r1: Tensor) -> Tensor:
    """Embedding table or lm_head weight [vocab, hidden]: its hidden side meets the residual stream, E R1."""
    return w @ r1.to(w.dtype)
