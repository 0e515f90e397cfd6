"""GPU timing free of host time: a CUDA graph of one call, replayed under triton.testing.do_bench.

On the H100 machine our Triton launchers cost 70 to 115 us of Python per call, about as long as do_bench's L2
flush (a 256 MB memset), so a plain do_bench of a small or multi-launch op measured Python as much as the GPU
(docs/BENCHMARKS.md). A graph replay costs a few microseconds of host time whatever the op, so the median is the
op's GPU time, gaps between its launches included.
"""

from __future__ import annotations

import torch


def capture(fn) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of one call of fn (called twice first, to compile and autotune); None without CUDA.

    fn's outputs come from the graph's private pool. An op that cannot be captured (a host sync inside, say)
    raises: a failed capture can leave torch's CUDA generator in capture mode, so falling back silently would
    break the next random draw on the device.
    """
    if not torch.cuda.is_available():
        return None
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # a warm-up on a side stream, as torch's CUDA graph notes advise
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:
        raise RuntimeError(
            f"this op cannot be captured in a CUDA graph ({err}); time it eagerly "
            "(graph=False, or --eager on the command line)"
        ) from err
    torch.cuda.synchronize()
    return graph


def median_us(fn, warmup_ms: int = 25, rep_ms: int = 100, graph: bool = True) -> tuple[float, str]:
    """(median microseconds, "cuda graph" or "eager") of fn by do_bench, the L2 flushed before each call."""
    import triton.testing

    captured = capture(fn) if graph else None
    run = captured.replay if captured is not None else fn
    us = 1e3 * triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return us, "cuda graph" if captured is not None else "eager"
