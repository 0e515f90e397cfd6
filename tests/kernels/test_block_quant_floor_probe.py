"""benchmarks/block_quant_floor_probe.py: its probe kernels move the bytes the MX kernel moves (interpreter).

The floors in docs/BENCHMARKS.md mean something only if the probes read all of x and write as many code and scale
bytes, in the same layout, as kernels/block_quant.py: checked here against torch on every value.
"""

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="runs the probe kernels in Triton's CPU interpreter (TRITON_INTERPRET=1)",
)


def expected(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    nibble = (x.view(torch.int16).to(torch.int32) >> 11) & 0xF
    codes = (nibble[:, 0::2] | (nibble[:, 1::2] << 4)).to(torch.uint8)
    amax = x.float().reshape(x.shape[0], -1, 32).abs().amax(-1)
    return codes, ((amax.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def test_stream_and_tile_probes_write_every_code_and_scale():
    from benchmarks.block_quant_floor_probe import _stream_kernel, _tiles_kernel

    torch.manual_seed(0)
    x = torch.randn(48, 512).half() * 30
    want = expected(x)
    codes, scales = torch.zeros(48, 256, dtype=torch.uint8), torch.zeros(48, 16, dtype=torch.uint8)
    _stream_kernel[(5,)](x, codes, scales, x.numel(), CHUNK=4096, GROUP=32)  # 6 chunks over 5 programs
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])
    codes.zero_()
    scales.zero_()
    # 48 rows in row tiles of 16, two per program (the last program has one); 2 column stripes of 256
    _tiles_kernel[(4,)](x, codes, scales, 48, 512, 512, 256, 16, GROUP=32, BLOCK_M=16, BLOCK_N=256, ROW_TILES=2)
    assert torch.equal(codes, want[0]) and torch.equal(scales, want[1])
