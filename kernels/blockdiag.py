"""Block-diagonal rotation `y = x @ blockdiag(B_1..B_n)` as a Triton kernel (FLRot's online R3/R4).

x is [..., d] with d = n * b; the blocks are one tensor [n, b, b] (same dtype as x); output block j is
`x[..., j*b:(j+1)*b] @ B_j`. The op moves the same bytes as a copy of x, and a b x b matmul per block is cheap
on tensor cores, so a kernel that streams x once can approach the copy time (docs/BENCHMARKS.md).

Kernel shape: a program owns one output column tile of one block (BLOCK_N columns of B_j, loaded once and kept
on chip) and walks ROW_TILES consecutive row tiles of BLOCK_M tokens, so B is read about once per program and
x exactly once overall; fp16/bf16 operands, fp32 accumulation (tensor-core `tl.dot`).

CPU runs: with TRITON_INTERPRET=1 set before `triton` is first imported (Triton's own tl.max / tl.cdiv are
decorated at import), the kernels run in Triton's CPU interpreter; the CPU tests run the same kernel bodies
that way. Our kernels are jitted at first launch, so importing this module early does no harm.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_BLOCKS = (32, 64, 128, 256)
X_EVICTION_POLICY = "evict_first"  # L2 hint for the x tiles, read once; the B tiles are marked evict_last
DEFAULT_BLOCK = 128
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Tile configurations (also used by kernels/rotate_quant.py)

@dataclass(frozen=True)
class TileConfig:
    """One launch shape of the block-diagonal kernels."""
    block_m: int  # tokens per row tile
    block_n: int  # output columns per program; divides the block size b
    row_tiles: int  # consecutive row tiles one program walks with its B tile on chip
    num_warps: int = 4
    num_stages: int = 3  # software-pipelining depth of the row-tile loop

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {value}")
        if self.row_tiles < 1:
            raise ValueError(f"row_tiles must be >= 1, got {self.row_tiles}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be one of 1, 2, 4, 8, 16, got {self.num_warps}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")

    def meta(self) -> dict[str, int]:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "ROW_TILES": self.row_tiles}

    def launch_kwargs(self) -> dict[str, int]:
        """The tile's constexprs plus num_warps and num_stages, as a kernel launch takes them."""
        return {**self.meta(), "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_triton(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# Autotune candidates (block_m, row_tiles, num_warps, num_stages). The first H100 sweep (kernels/gpu_check.py,
# docs/BENCHMARKS.md) found (64, 4, 4, 3) fastest from L = 512 to 8192 at d = 11008, b = 128; the others
# cover small L (one program per block), grids near a multiple of the SM count at mid L (2 or 3 programs per
# column tile at L = 512), and the other block sizes.
_TILE_CANDIDATES = (
    (16, 1, 4, 2), (32, 1, 4, 2), (64, 1, 4, 3), (64, 4, 4, 3), (64, 16, 4, 3),
    (128, 1, 8, 3), (128, 4, 8, 3), (128, 8, 8, 3), (64, 8, 8, 3), (128, 4, 4, 3),
    (64, 2, 4, 3), (64, 3, 4, 3), (32, 4, 4, 3), (32, 8, 4, 3),
)
INTERPRETER_TILE = TileConfig(block_m=16, block_n=64, row_tiles=2, num_warps=4, num_stages=1)


SHARED_MEMORY_BUDGET = 200 * 1024  # bytes per program; an H100 SM has 227 KiB for one block


def shared_memory_estimate(block: int, config: TileConfig, element_size: int = 2) -> int:
    """The B tile [b, block_n] once plus num_stages pipelined x tiles [block_m, b]."""
    return element_size * (block * config.block_n + config.num_stages * config.block_m * block)


def tile_configs(block: int) -> list[TileConfig]:
    """Autotune candidates for block size b: output tiles of the whole block (b <= 128) or of half of it,
    with fewer pipeline stages (or none) where the tiles would overflow shared memory."""
    block_ns = [block] if block <= 128 else [block // 2, block]
    configs = []
    for block_m, row_tiles, warps, stages in _TILE_CANDIDATES:
        for block_n in block_ns:
            config = TileConfig(block_m, block_n, row_tiles, warps, stages)
            while stages > 1 and shared_memory_estimate(block, config) > SHARED_MEMORY_BUDGET:
                stages -= 1
                config = TileConfig(block_m, block_n, row_tiles, warps, stages)
            if shared_memory_estimate(block, config) <= SHARED_MEMORY_BUDGET and config not in configs:
                configs.append(config)
    return configs


def blockdiag_autotune_configs(block: int) -> list[triton.Config]:
    """The triton.Config list the autotuner tries for block size b."""
    return [config.to_triton() for config in tile_configs(block)]


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two (capped), so varying L re-tunes rarely."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_interpreter_active() -> None:
    """Raise if TRITON_INTERPRET=1 came after `import triton` (the interpreter would fail inside tl.max)."""
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(tl.standard.max, InterpretedFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported, so Triton's interpreter cannot run "
                           "the kernels; set it before the first `import triton` (for pytest: at the top of "
                           "tests/conftest.py, or run the kernel tests in their own process)")


def autotune_do_bench(fn, quantiles=None):
    """do_bench (L2 flushed before each run) of a CUDA graph of one trial run, shorter than the default.

    Replaying a graph keeps the autotuner's Python (80 to 180 us per launch on the H100 machine, longer than
    the flush) out of the timings, which otherwise ranked the candidates by host noise at small L.
    """
    from kernels.timing import capture
    graph = capture(fn)  # our launches never sync, so they can always be captured
    return triton.testing.do_bench(graph.replay if graph is not None else fn, warmup=5, rep=25,
                                   quantiles=quantiles)


@functools.lru_cache(maxsize=None)
def _jit(fn, interpret: bool):
    """triton.jit applied at first use: interpreted or compiled according to TRITON_INTERPRET then."""
    del interpret  # part of the cache key only; triton.jit reads the environment itself
    return triton.jit(fn)


def jit_kernel(fn):
    return _jit(fn, triton_interpret_requested())


@functools.lru_cache(maxsize=None)
def _autotuned(fn, block: int, key: tuple[str, ...], configs: tuple[TileConfig, ...] | None):
    candidates = [c.to_triton() for c in configs] if configs else blockdiag_autotune_configs(block)
    return triton.autotune(configs=candidates, key=list(key), do_bench=autotune_do_bench)(_jit(fn, False))


def autotuned_kernel(fn, block: int, key: tuple[str, ...] = ("M_BUCKET", "D", "BLOCK"),
                     configs: tuple[TileConfig, ...] | None = None):
    """The autotuned kernel for block size b; configs: the candidates (None: tile_configs(block)). Trial runs
    repeat the launch, so a kernel tuned this way must be idempotent (ours are: plain stores, atomic max)."""
    return _autotuned(fn, block, key, configs)


_TUNED: dict[tuple, dict] = {}  # (kernel, shape key) -> the winning config's launch kwargs
_COMPILED: dict[tuple, object] = {}  # launch specialization -> Triton's CompiledKernel
FAST_LAUNCH = True  # False: every launch goes through triton.jit's full dispatch


def _specialization(arg):
    """What Triton specializes a runtime argument on: dtype and 16-byte alignment, or == 1 and % 16 == 0."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return arg
    return arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31)  # the last: i32 or i64


@functools.lru_cache(maxsize=None)
def _constexpr_names(fn) -> tuple[str, ...]:
    """The kernel's tl.constexpr parameters, in order (our kernels list them after every runtime argument)."""
    jitted = jit_kernel(fn)
    return tuple(p.name for p in jitted.params if p.is_constexpr)


def launch(fn, grid: int, args: tuple, meta: dict) -> None:
    """jit launch of `fn` over `grid` programs; args: the runtime arguments in order, meta: constexprs and options.

    On CUDA, the first launch of a specialization goes through triton.jit; later ones call the compiled kernel
    directly, skipping Triton's argument binding and cache lookup (most of the 80 to 180 us of Python a launch
    cost on the H100 machine, more than do_bench's L2 flush, so it leaked into the timings). The key holds
    everything Triton specializes on, so the compiled kernel is the one triton.jit would pick.
    """
    if not FAST_LAUNCH or triton_interpret_requested():
        jit_kernel(fn)[(grid,)](*args, **meta)
        return
    key = (fn, tuple(_specialization(a) for a in args), tuple(sorted(meta.items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = jit_kernel(fn)[(grid,)](*args, **meta)
    else:
        constexprs = [meta[name] for name in _constexpr_names(fn)]
        compiled[(grid, 1, 1)](*args, *constexprs)


def launch_tuned(fn, block: int, grid, args: tuple, meta: dict, tune_key: tuple,
                 key: tuple[str, ...] = ("M_BUCKET", "D", "BLOCK"),
                 configs: tuple[TileConfig, ...] | None = None) -> None:
    """Autotune on the first call for tune_key, then launch the winner through `launch` (no autotune wrapper).

    configs: the candidates (None: tile_configs(block)). Host time matters: on the H100 machine a Triton launch
    cost 70 to 180 us of Python, about as long as do_bench's L2 flush, so it leaks into small-L timings.
    """
    tune_key = (*tune_key, tuple(sorted(meta.items())), configs)
    best = _TUNED.get((fn, tune_key))
    if best is None:
        tuner = autotuned_kernel(fn, block, key, configs)
        tuner[grid](*args, **meta)
        _TUNED[(fn, tune_key)] = tuner.best_config.all_kwargs()
    else:
        launch(fn, grid(best)[0], args, {**meta, **best})


# ----------------------------------------------------------------------------------------------------------------
# The kernel (plain function; compiled by jit_kernel / autotuned_kernel)

def _blockdiag_kernel(
    x_ptr, w_ptr, y_ptr,  # x [M, D], w [n, BLOCK, BLOCK], y [M, D]; last dims contiguous
    M, D, stride_xm, stride_ym,
    M_BUCKET,  # autotune key only
    BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_TILES: tl.constexpr,
    DOT_FP32: tl.constexpr,  # the interpreter's dot cannot read bf16: upcast there (exact products)
    X_EVICTION: tl.constexpr,  # L2 hint for x, streamed once (X_EVICTION_POLICY); "" for the default policy
):
    pid = tl.program_id(0)
    n_col_tiles = D // BLOCK_N
    col_tile = pid % n_col_tiles  # column tiles vary fastest: neighbours share the x rows in L2
    row_group = pid // n_col_tiles
    col0 = col_tile * BLOCK_N  # first output column
    k0 = (col0 // BLOCK) * BLOCK  # first input column of this block
    offs_k = tl.arange(0, BLOCK)
    offs_n = tl.arange(0, BLOCK_N)

    # B_j[:, col0-k0 : col0-k0+BLOCK_N]  [BLOCK, BLOCK_N], read once, reused for every row tile
    w = tl.load(w_ptr + (k0 // BLOCK) * BLOCK * BLOCK + offs_k[:, None] * BLOCK + (col0 - k0) + offs_n[None, :],
                eviction_policy="evict_last")  # every row group reads it
    if DOT_FP32:
        w = w.to(tl.float32)

    first = row_group * ROW_TILES
    last = tl.minimum(first + ROW_TILES, (M + BLOCK_M - 1) // BLOCK_M)  # no tl.cdiv: see module doc
    for tile in range(first, last):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        rows64 = rows.to(tl.int64)  # M * D can pass 2^31
        x = tl.load(x_ptr + rows64[:, None] * stride_xm + k0 + offs_k[None, :], mask=row_mask[:, None], other=0.0,
                    eviction_policy=X_EVICTION)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc = tl.dot(x, w)  # [BLOCK_M, BLOCK_N] fp32
        tl.store(y_ptr + rows64[:, None] * stride_ym + col0 + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_mask[:, None])


# ----------------------------------------------------------------------------------------------------------------
# Checks, launcher, reference

def check_blocks(x: torch.Tensor, blocks: torch.Tensor) -> tuple[int, int]:
    """Validate x [..., d] against blocks [n, b, b] (any b); returns (n, b)."""
    if not isinstance(x, torch.Tensor) or not isinstance(blocks, torch.Tensor):
        raise TypeError("x and blocks must be torch tensors")
    if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
        raise ValueError(f"blocks must have shape [n_blocks, b, b], got {list(blocks.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dim (the rotated width d)")
    n, b = blocks.shape[0], blocks.shape[1]
    if n == 0 or x.shape[-1] != n * b:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal n_blocks * b = {n} * {b} = {n * b}; "
                         f"for width d use d // b blocks of size b with d divisible by b")
    if x.device != blocks.device:
        raise ValueError(f"x is on {x.device} but blocks are on {blocks.device}; move both to one device")
    return n, b


def check_kernel_args(x: torch.Tensor, blocks: torch.Tensor) -> tuple[int, int]:
    """The Triton kernels' constraints on top of check_blocks."""
    n, b = check_blocks(x, blocks)
    if b not in SUPPORTED_BLOCKS:
        raise ValueError(f"the Triton kernel supports block sizes {SUPPORTED_BLOCKS}, got b = {b}; "
                         "use blockdiag_matmul_reference for other sizes")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Triton kernel takes float16 or bfloat16 inputs, got {x.dtype}; "
                         "cast x (and blocks) with .half() or .bfloat16(), or use blockdiag_matmul_reference")
    if blocks.dtype != x.dtype:
        raise ValueError(f"blocks dtype ({blocks.dtype}) must match x dtype ({x.dtype}); cast with blocks.to(x.dtype)")
    if not x.is_cuda:
        if not triton_interpret_requested():
            raise RuntimeError(f"the Triton kernel needs a CUDA tensor (x is on {x.device}); set TRITON_INTERPRET=1 "
                               "to run it in Triton's CPU interpreter, or use blockdiag_matmul_reference")
        check_interpreter_active()
    return n, b


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> [M, d] with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def blockdiag_matmul_triton(x: torch.Tensor, blocks: torch.Tensor, *, config: TileConfig | None = None) -> torch.Tensor:
    """Triton y = x @ blockdiag(blocks); autotuned unless `config` fixes the tile shape."""
    _, b = check_kernel_args(x, blocks)
    x2, w = as_rows(x), blocks.contiguous()
    m, d = x2.shape
    y = torch.empty((m, d), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(x.shape)
    interpret = not x.is_cuda
    if interpret and config is None:
        config = INTERPRETER_TILE
    args = (x2, w, y, m, d, x2.stride(0), y.stride(0), m_bucket(m))

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]) * (d // meta["BLOCK_N"])

    meta = dict(BLOCK=b, DOT_FP32=interpret and x.dtype == torch.bfloat16, X_EVICTION=X_EVICTION_POLICY)
    if config is None:
        launch_tuned(_blockdiag_kernel, b, lambda meta: (grid(meta),), args, meta,
                     (m_bucket(m), d, b, x.dtype, x.device))
    else:
        config = _fit_config(config, b)
        launch(_blockdiag_kernel, grid(config.meta()), args, {**meta, **config.launch_kwargs()})
    return y.reshape(x.shape)


def _fit_config(config: TileConfig, block: int) -> TileConfig:
    """Clip a fixed tile to the block (a 256-wide tile for b = 32 becomes 32 wide)."""
    if config.block_n > block:
        config = TileConfig(config.block_m, block, config.row_tiles, config.num_warps, config.num_stages)
    if shared_memory_estimate(block, config) > SHARED_MEMORY_BUDGET:
        raise ValueError(f"tile {config} needs about {shared_memory_estimate(block, config) // 1024} KiB of shared "
                         f"memory for block {block}; use a smaller block_m, block_n or num_stages")
    return config


def blockdiag_matmul_reference(x: torch.Tensor, blocks: torch.Tensor, *,
                               compute_dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """Torch y = x @ blockdiag(blocks), computed in compute_dtype (None: x's dtype, one batched matmul)."""
    n, b = check_blocks(x, blocks)
    dtype = compute_dtype or x.dtype
    # [..., n, b] x [n, b, b] -> [..., n, b]; einsum lowers to one bmm over the n blocks
    y = torch.einsum("...nk,nkj->...nj", x.reshape(*x.shape[:-1], n, b).to(dtype), blocks.to(dtype))
    return y.reshape(x.shape).to(x.dtype)


def blockdiag_matmul(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """y = x @ blockdiag(blocks): Triton on CUDA (or under TRITON_INTERPRET=1), the torch reference elsewhere."""
    if x.is_cuda or triton_interpret_requested():
        return blockdiag_matmul_triton(x, blocks)
    return blockdiag_matmul_reference(x, blocks)


# ----------------------------------------------------------------------------------------------------------------
# Engine hook (online R3/R4): differentiable, any device and dtype

def kernel_applies(x: torch.Tensor, blocks: torch.Tensor) -> bool:
    """True when the Triton kernel can run this rotation: CUDA, fp16/bf16 activations, a supported block."""
    return (x.is_cuda and x.dtype in KERNEL_DTYPES and blocks.dim() == 3
            and blocks.shape[-1] in SUPPORTED_BLOCKS and blocks.shape[-1] == blocks.shape[-2])


class _BlockdiagRotation(torch.autograd.Function):
    """Triton forward; backward dx = dy @ blockdiag(B)^T (the same kernel), dB_j = x_j^T dy_j in fp32."""

    @staticmethod
    def forward(ctx, x, blocks):
        ctx.save_for_backward(x, blocks)
        return blockdiag_matmul_triton(x, blocks)

    @staticmethod
    def backward(ctx, grad_y):
        x, blocks = ctx.saved_tensors
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = blockdiag_matmul_triton(grad_y.contiguous(), blocks.transpose(1, 2).contiguous())
        if ctx.needs_input_grad[1]:
            n, b = blocks.shape[0], blocks.shape[1]
            xs = x.reshape(-1, n, b).float()  # [M, n, b]
            gs = grad_y.reshape(-1, n, b).float()
            grad_blocks = torch.einsum("mnk,mnj->nkj", xs, gs).to(blocks.dtype)
        return grad_x, grad_blocks


def blockdiag_rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Engine entry for online R3/R4: `x @ blockdiag(blocks)` with autograd.

    Uses the Triton kernel when `kernel_applies` (blocks are cast to x's dtype; gradients flow back to the
    original blocks), otherwise the torch reference in float32, returned in x's dtype.
    """
    check_blocks(x, blocks)
    if kernel_applies(x, blocks):
        return _BlockdiagRotation.apply(x, blocks.to(x.dtype))
    return blockdiag_matmul_reference(x, blocks)
