"""Launch machinery shared by the Triton kernels of kernels/blockdiag.py and kernels/rotate_quant.py.

Both kernel families walk the same tiling (a program owns BLOCK_N output columns of one block b and walks
ROW_TILES row tiles of BLOCK_M tokens), so they share everything around the kernel bodies, which lives here:
- `TileConfig`, the shared-memory estimate and budget, and the autotune candidate lists of both families
  (`tile_configs`, `rotate_quant_configs`), with `fit_config` for a fixed tile;
- `check_blocks` / `check_kernel_args` (shapes, dtypes, device, the interpreter) and `as_rows`;
- the CPU interpreter checks (`triton_interpret_requested`, `check_interpreter_active`) and `INTERPRETER_TILE`;
- the launchers: `launch` (triton.jit, with a direct call of the compiled kernel once a specialization is known,
  see `FAST_LAUNCH`) and `launch_tuned` (autotune once per shape key, then `launch` the winner), and the
  common launch options (`tile_grid`, `launch_options`).

Import direction (tests/kernels/test_imports.py checks it in fresh processes): kernels/launch.py, blockdiag.py,
rotate_quant.py and timing.py import no `engine` module; kernels/hadamard.py imports one, the leaf data module
engine.rotation.hadamard (its H_K tables). `engine` imports `kernels.blockdiag` only inside the functions that run
the kernel (engine/rotation/orthogonal.py BlockDiagonalRotation.forward and engine/rotation/fusion.py's online
rotation), never at module level, so importing either package never imports the other's kernels or models.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

SUPPORTED_BLOCKS = (32, 64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
SHARED_MEMORY_BUDGET = 200 * 1024  # bytes per program; an H100 SM has 227 KiB for one block


# ----------------------------------------------------------------------------------------------------------------
# Tile configurations and the autotune candidates


@dataclass(frozen=True)
class TileConfig:
    """One launch shape of the block-diagonal kernels (blockdiag and both steps of rotate_quant)."""

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

    def name(self) -> str:
        """Short name for tables: m64n128r4w4s3."""
        return f"m{self.block_m}n{self.block_n}r{self.row_tiles}w{self.num_warps}s{self.num_stages}"


INTERPRETER_TILE = TileConfig(block_m=16, block_n=64, row_tiles=2, num_warps=4, num_stages=1)

# Block-diagonal autotune candidates (block_m, row_tiles, num_warps, num_stages). The first H100 sweep
# (benchmarks/gpu_kernel_check.py, docs/BENCHMARKS.md) found (64, 4, 4, 3) fastest from L = 512 to 8192 at d = 11008,
# b = 128; the others cover small L (one program per block), grids near a multiple of the SM count at mid L
# (2 or 3 programs per column tile at L = 512), and the other block sizes.
BLOCKDIAG_TILE_CANDIDATES = (
    (16, 1, 4, 2),
    (32, 1, 4, 2),
    (64, 1, 4, 3),
    (64, 4, 4, 3),
    (64, 16, 4, 3),
    (128, 1, 8, 3),
    (128, 4, 8, 3),
    (128, 8, 8, 3),
    (64, 8, 8, 3),
    (128, 4, 4, 3),
    (64, 2, 4, 3),
    (64, 3, 4, 3),
    (32, 4, 4, 3),
    (32, 8, 4, 3),
)
# Rotate + quantize candidates of each step, the same fields; output tiles are min(b, 128) wide. From the H100
# sweep (docs/BENCHMARKS.md): long row walks win at large L, one tile per program at small L.
ROTATE_QUANT_TILE_CANDIDATES = (
    (64, 4, 4, 3),
    (64, 8, 4, 4),
    (64, 16, 4, 4),
    (128, 4, 4, 3),
    (128, 4, 8, 3),
    (64, 1, 4, 3),
    (32, 1, 4, 2),
    (16, 1, 4, 2),
)


def shared_memory_estimate(block: int, config: TileConfig, element_size: int = 2) -> int:
    """The B tile [K, block_n] once plus num_stages pipelined x tiles [block_m, K], K = max(b, block_n): the block
    itself in the block-diagonal kernels (block_n <= b), a tile of zero-padded blocks in kernels/block_quant.py."""
    k = max(block, config.block_n)
    return element_size * (k * config.block_n + config.num_stages * config.block_m * k)


def tile_configs(block: int) -> list[TileConfig]:
    """Block-diagonal autotune candidates for block size b: output tiles of the whole block (b <= 128) or of half
    of it, with fewer pipeline stages (or none) where the tiles would overflow shared memory."""
    block_ns = [block] if block <= 128 else [block // 2, block]
    configs = []
    for block_m, row_tiles, warps, stages in BLOCKDIAG_TILE_CANDIDATES:
        for block_n in block_ns:
            config = TileConfig(block_m, block_n, row_tiles, warps, stages)
            while stages > 1 and shared_memory_estimate(block, config) > SHARED_MEMORY_BUDGET:
                stages -= 1
                config = TileConfig(block_m, block_n, row_tiles, warps, stages)
            if shared_memory_estimate(block, config) <= SHARED_MEMORY_BUDGET and config not in configs:
                configs.append(config)
    return configs


@functools.cache
def rotate_quant_candidates(block: int) -> tuple[TileConfig, ...]:
    """Rotate + quantize autotune candidates for block size b, as a tuple (a cache key of launch_tuned)."""
    block_n = min(block, 128)
    configs = (
        TileConfig(block_m, block_n, row_tiles, warps, stages)
        for block_m, row_tiles, warps, stages in ROTATE_QUANT_TILE_CANDIDATES
    )
    return tuple(c for c in configs if shared_memory_estimate(block, c) <= SHARED_MEMORY_BUDGET)


def rotate_quant_configs(block: int) -> list[TileConfig]:
    """Autotune candidates of each rotate + quantize step for block size b (output tiles min(b, 128) wide)."""
    return list(rotate_quant_candidates(block))


def blockdiag_autotune_configs(block: int) -> list[triton.Config]:
    """The triton.Config list the autotuner tries for the block-diagonal kernel at block size b."""
    return [config.to_triton() for config in tile_configs(block)]


def fit_config(config: TileConfig, block: int) -> TileConfig:
    """Clip a fixed tile to the block (a 256-wide tile for b = 32 becomes 32 wide); raise if it cannot fit."""
    if config.block_n > block:
        config = TileConfig(config.block_m, block, config.row_tiles, config.num_warps, config.num_stages)
    if shared_memory_estimate(block, config) > SHARED_MEMORY_BUDGET:
        raise ValueError(
            f"tile {config} needs about {shared_memory_estimate(block, config) // 1024} KiB of shared "
            f"memory for block {block}; use a smaller block_m, block_n or num_stages"
        )
    return config


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two (capped), so varying L re-tunes rarely."""
    return min(triton.next_power_of_2(max(m, 1)), 1 << 16)


def tile_grid(m: int, d: int, meta: dict) -> int:
    """Programs of a launch over x [m, d]: row groups of BLOCK_M * ROW_TILES tokens times d / BLOCK_N column tiles."""
    return triton.cdiv(m, meta["BLOCK_M"] * meta["ROW_TILES"]) * (d // meta["BLOCK_N"])


# ----------------------------------------------------------------------------------------------------------------
# Argument checks and the CPU interpreter


def triton_interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_interpreter_active() -> None:
    """Raise if TRITON_INTERPRET=1 came after `import triton` (the interpreter would fail inside tl.max)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(tl.standard.max, InterpretedFunction):
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported, so Triton's interpreter cannot run "
            "the kernels; set it before the first `import triton` (for pytest: at the top of "
            "tests/conftest.py, or run the kernel tests in their own process)"
        )


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
        raise ValueError(
            f"x's last dim ({x.shape[-1]}) must equal n_blocks * b = {n} * {b} = {n * b}; "
            f"for width d use d // b blocks of size b with d divisible by b"
        )
    if x.device != blocks.device:
        raise ValueError(f"x is on {x.device} but blocks are on {blocks.device}; move both to one device")
    return n, b


def check_kernel_args(x: torch.Tensor, blocks: torch.Tensor) -> tuple[int, int]:
    """The Triton kernels' constraints on top of check_blocks."""
    n, b = check_blocks(x, blocks)
    if b not in SUPPORTED_BLOCKS:
        raise ValueError(
            f"the Triton kernel supports block sizes {SUPPORTED_BLOCKS}, got b = {b}; "
            "use blockdiag_matmul_reference for other sizes"
        )
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(
            f"the Triton kernel takes float16 or bfloat16 inputs, got {x.dtype}; "
            "cast x (and blocks) with .half() or .bfloat16(), or use blockdiag_matmul_reference"
        )
    if blocks.dtype != x.dtype:
        raise ValueError(f"blocks dtype ({blocks.dtype}) must match x dtype ({x.dtype}); cast with blocks.to(x.dtype)")
    if not x.is_cuda:
        if not triton_interpret_requested():
            raise RuntimeError(
                f"the Triton kernel needs a CUDA tensor (x is on {x.device}); set TRITON_INTERPRET=1 "
                "to run it in Triton's CPU interpreter, or use blockdiag_matmul_reference"
            )
        check_interpreter_active()
    return n, b


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> [M, d] with a contiguous last dim (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def launch_options(x: torch.Tensor, block: int, config: TileConfig | None) -> tuple[dict, TileConfig | None]:
    """(constexprs every kernel here takes, the tile to launch or None to autotune) for x and block size b.

    Interpreted (x on the CPU), the interpreter's dot cannot read bf16, so DOT_FP32 upcasts the operands there
    (exact products), and a small fixed tile replaces autotuning. A fixed tile is clipped to the block."""
    interpret = not x.is_cuda
    if config is None and interpret:
        config = INTERPRETER_TILE
    meta = {"BLOCK": block, "DOT_FP32": interpret and x.dtype == torch.bfloat16}
    return meta, None if config is None else fit_config(config, block)


# ----------------------------------------------------------------------------------------------------------------
# Compilation, autotuning and launches


def autotune_do_bench(fn, quantiles=None):
    """do_bench (L2 flushed before each run) of a CUDA graph of one trial run, shorter than the default.

    Replaying a graph keeps the autotuner's Python (80 to 180 us per launch on the H100 machine, longer than
    the flush) out of the timings, which otherwise ranked the candidates by host noise at small L.
    """
    from kernels.timing import capture

    graph = capture(fn)  # our launches never sync, so they can always be captured
    return triton.testing.do_bench(graph.replay if graph is not None else fn, warmup=5, rep=25, quantiles=quantiles)


@functools.cache
def _jit(fn, interpret: bool):
    """triton.jit applied at first use: interpreted or compiled according to TRITON_INTERPRET then."""
    del interpret  # part of the cache key only; triton.jit reads the environment itself
    return triton.jit(fn)


def jit_kernel(fn):
    return _jit(fn, triton_interpret_requested())


@functools.cache
def _autotuned(fn, block: int, key: tuple[str, ...], configs: tuple[TileConfig, ...] | None):
    candidates = [c.to_triton() for c in configs] if configs else blockdiag_autotune_configs(block)
    return triton.autotune(configs=candidates, key=list(key), do_bench=autotune_do_bench)(_jit(fn, False))


def autotuned_kernel(
    fn, block: int, key: tuple[str, ...] = ("M_BUCKET", "D", "BLOCK"), configs: tuple[TileConfig, ...] | None = None
):
    """The autotuned kernel for block size b; configs: the candidates (None: tile_configs(block)). Trial runs
    repeat the launch, so a kernel tuned this way must be idempotent (ours are: plain stores, atomic max)."""
    return _autotuned(fn, block, key, configs)


_TUNED: dict[tuple, dict] = {}  # (kernel, shape key) -> the winning config's launch kwargs
_COMPILED: dict[tuple, object] = {}  # launch specialization -> Triton's CompiledKernel
FAST_LAUNCH = True  # False: every launch goes through triton.jit's full dispatch (benchmarks.gpu_kernel_check sets it)


def specialization(arg):
    """What Triton specializes a runtime argument on: dtype and 16-byte alignment, or == 1 and % 16 == 0."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool) or not isinstance(arg, int):
        return arg
    return arg == 1, arg % 16 == 0, -(1 << 31) <= arg < (1 << 31)  # the last: i32 or i64


@functools.cache
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
    key = (fn, tuple(specialization(a) for a in args), tuple(sorted(meta.items())))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = jit_kernel(fn)[(grid,)](*args, **meta)
    else:
        constexprs = [meta[name] for name in _constexpr_names(fn)]
        compiled[(grid, 1, 1)](*args, *constexprs)


def launch_tuned(
    fn,
    block: int,
    grid,
    args: tuple,
    meta: dict,
    tune_key: tuple,
    key: tuple[str, ...] = ("M_BUCKET", "D", "BLOCK"),
    configs: tuple[TileConfig, ...] | None = None,
) -> None:
    """Autotune on the first call for tune_key, then launch the winner through `launch` (no autotune wrapper).

    grid: meta -> (programs,). configs: the candidates (None: tile_configs(block)). Host time matters: on the
    H100 machine a Triton launch cost 70 to 180 us of Python, about as long as do_bench's L2 flush, so it leaks
    into small-L timings.
    """
    tune_key = (*tune_key, tuple(sorted(meta.items())), configs)
    best = _TUNED.get((fn, tune_key))
    if best is None:
        tuner = autotuned_kernel(fn, block, key, configs)
        tuner[grid](*args, **meta)
        _TUNED[(fn, tune_key)] = tuner.best_config.all_kwargs()
    else:
        launch(fn, grid(best)[0], args, {**meta, **best})


def launch_tiled(
    fn,
    block: int,
    m: int,
    d: int,
    args: tuple,
    meta: dict,
    config: TileConfig | None,
    tune_key: tuple,
    configs: tuple[TileConfig, ...] | None = None,
) -> None:
    """One launch of a tiled kernel over x [m, d]: the fixed `config`, or autotuned (launch_tuned) when None."""
    if config is None:
        launch_tuned(fn, block, lambda meta: (tile_grid(m, d, meta),), args, meta, tune_key, configs=configs)
    else:
        launch(fn, tile_grid(m, d, config.meta()), args, {**meta, **config.launch_kwargs()})
