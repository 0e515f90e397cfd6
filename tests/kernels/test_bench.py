"""kernels.bench: argument checks, the no-GPU error, and the reference check that precedes every timing."""

import os

import pytest
import torch

from kernels import bench

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)"
)


def test_no_gpu_raises_at_call_time(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(bench.NoGPUError, match="docs/BENCHMARKS.md"):
        bench.run_benchmark([4096], [1])


def test_cli_reports_missing_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--d", "256", "--L", "1,16"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ds=[1000], Ls=[1]), "multiples of the block"),
        (dict(ds=[4096], Ls=[0]), "positive"),
        (dict(ds=[4096], Ls=[1], dtype="fp8"), "dtype"),
        (dict(ds=[4096], Ls=[1], kernels=["fft"]), "unknown kernels"),
        (dict(ds=[], Ls=[1]), "at least one"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bench.run_benchmark(**kwargs)


def test_parse_ints_names_the_flag():
    assert bench.parse_ints("4096, 11008,", "d") == [4096, 11008]
    with pytest.raises(ValueError, match="--L"):
        bench.parse_ints("1,many", "L")


@interpreted
@pytest.mark.parametrize("kernel", bench.KERNELS)
def test_every_kernel_passes_its_reference_check(kernel):
    torch.manual_seed(0)
    case = bench.Case(d=256, tokens=5, dtype=torch.float16, block=128, device="cpu")
    run, nbytes, backend, error = bench.checked_kernel(case, kernel)
    assert error <= 2e-3 and nbytes >= 2 * 5 * 256 * 2 * (0.5 if kernel.startswith("rotate") else 1)
    assert backend in ("torch", "triton", "fast_hadamard_transform")


def test_wrong_kernel_output_is_not_timed(monkeypatch):
    case = bench.Case(d=256, tokens=5, dtype=torch.float16, block=128, device="cpu")
    monkeypatch.setattr(bench, "blockdiag_matmul_triton", lambda x, blocks: x.clone())  # forgets to rotate
    with pytest.raises(bench.KernelCheckError, match="triton_blockdiag"):
        bench.checked_kernel(case, "triton_blockdiag")


def test_markdown_table_has_one_line_per_row():
    rows = [
        {
            "kernel": k,
            "d": 4096,
            "L": 8,
            "dtype": "fp16",
            "median_us": 10.0 + i,
            "gbps": 100.0,
            "over_memcpy": 1.0 + i,
            "backend": "torch",
        }
        for i, k in enumerate(bench.KERNELS[:3])
    ]
    table = bench.markdown_table(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[3].startswith("| fht_padded | 4096 | 8 | fp16 | 11.0 |")


def test_timing_without_a_gpu_captures_nothing(monkeypatch):
    from kernels import timing

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = []
    assert timing.capture(lambda: calls.append(1)) is None and calls == []  # nothing run, nothing captured


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and TRITON_INTERPRET=0")
def test_graph_timing_replays_the_op():
    from kernels import timing

    x = torch.randn(1024, 4096, device="cuda", dtype=torch.float16)
    out = torch.empty_like(x)
    us, how = timing.median_us(lambda: out.copy_(x * 2), 5, 20)
    assert how == "cuda graph" and us > 0 and torch.equal(out, x * 2)
    assert timing.median_us(lambda: out.copy_(x), 5, 20, graph=False)[1] == "eager"
