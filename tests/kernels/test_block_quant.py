"""kernels.block_quant: one-pass rotation + MXFP4 / NVFP4 / MXFP8, bit for bit against engine/quant/formats.py.

The interpreter tests compare codes and scales EXACTLY with the engine's encoders (MXFormat / NVFP4Format.encode +
pack_nibbles) of the fp32 rotation, on inputs whose fp32 rotation is exact whatever the summation order
(exact_rotation_inputs: small integers times powers of two, +-1 blocks times powers of two), so the kernel's y is
the reference's y. On random inputs with random orthogonal blocks the fp32 sums of tl.dot and torch differ in
order; there a group may differ only where y sits within 1e-6 * (|x| @ |B|) of a rounding boundary (boundary_groups
with rotation_tolerance: relative to the summands rather than to y, since a sum with cancellation has errors far
above 1e-6 |y|; on the H200, 1e-7 * (|x| @ |B|) already explained every difference).
"""

import os

import pytest
import torch

from engine.quant.formats import pack_nibbles
from kernels.block_quant import (
    FORMATS,
    block_quantize,
    block_quantize_reference,
    boundary_groups,
    exact_rotation_inputs,
    group_mismatch,
    nvfp4_global_scale,
    rotate_quantize_mx,
    rotate_quantize_mx_bytes,
    rotate_quantize_mx_reference,
    rotate_reference,
    rotate_then_quantize,
    rotation_tolerance,
    unpack_fp4,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(
    not INTERPRETED, reason="runs the kernel in Triton's CPU interpreter (TRITON_INTERPRET=1)"
)
needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or INTERPRETED, reason="needs a CUDA GPU and TRITON_INTERPRET=0"
)


def engine_encode(y: torch.Tensor, fmt: str, g=None) -> tuple[torch.Tensor, torch.Tensor]:
    from engine.quant.formats import FORMATS

    return FORMATS[fmt].kernel_encode(y, g)


def assert_same(got, want, what=""):
    (c, s), (c_ref, s_ref) = got, want
    assert c.dtype == s.dtype == torch.uint8 and c.shape == c_ref.shape and s.shape == s_ref.shape, what
    assert torch.equal(c, c_ref), f"{what}: {(c != c_ref).sum().item()} code bytes differ"
    assert torch.equal(s, s_ref), f"{what}: {(s != s_ref).sum().item()} scales differ"


def small_g(x, blocks):
    """An NVFP4 g calibrated on the rows without outliers: row 2's outliers then saturate scales and values."""
    rows = torch.cat([x[:2], x[3:]])
    return nvfp4_global_scale(rows, blocks)


# ----------------------------------------------------------------------------------------------------------------
# The kernels-side torch reference equals the engine's encoders (kernels/ may not import engine.quant)


def test_every_kernel_format_is_named_by_exactly_one_engine_format():
    from engine.quant.formats import REGISTRY

    named = [f.kernel for f in REGISTRY if f.kernel is not None]
    assert sorted(named) == sorted(FORMATS)  # and engine_encode finds each by the kernel's name
    assert all(f.name == f.kernel for f in REGISTRY if f.kernel is not None)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_torch_reference_equals_the_engine_encoders(fmt):
    torch.manual_seed(1)
    y = torch.randn(64, 256) * torch.logspace(-30, 30, 64)[:, None]
    y[3] = 0.0
    y[5, :16] = -1e-30  # negatives rounding to zero keep their sign
    y[6] = torch.randint(-64, 65, (256,)).float() / 16  # exact ties
    y[7] = 1e-40  # fp32 subnormals
    g = torch.tensor(3e-4) if fmt == "nvfp4" else None
    assert_same(block_quantize_reference(y, fmt, g), engine_encode(y, fmt, g), fmt)


def test_unpack_fp4_inverts_pack_nibbles():
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_nibbles(codes)), codes)
    assert pack_nibbles(torch.tensor([1, 15], dtype=torch.uint8)).tolist() == [0xF1]  # element 0 low nibble


# ----------------------------------------------------------------------------------------------------------------
# Bad arguments: clear ValueErrors before any launch (no interpreter needed)


def _x(d=256, dtype=torch.float16):
    return torch.zeros(4, d, dtype=dtype)


def _w(b=32, n=None, dtype=torch.float16):
    return torch.eye(b, dtype=dtype) if n is None else torch.eye(b, dtype=dtype).expand(n, b, b).contiguous()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: rotate_quantize_mx(_x(96), _w(128), "mxfp4"), "multiple of the rotation block"),
        (lambda: rotate_quantize_mx(_x(48), _w(16), "mxfp4"), "multiple of mxfp4's group of 32"),
        (lambda: rotate_quantize_mx(_x(), _w(), "mxfp5"), "unknown microscaling format"),
        (lambda: rotate_quantize_mx(_x(dtype=torch.float64), _w(dtype=torch.float64)), "float16, bfloat16 or float32"),
        (lambda: rotate_quantize_mx(_x(dtype=torch.int8), _w()), "float16, bfloat16 or float32"),
        (lambda: rotate_quantize_mx(_x(), _w(dtype=torch.float32)), "must match x dtype"),
        (lambda: rotate_quantize_mx(_x(), _w(8)), "rotation block b must be one of"),
        (lambda: rotate_quantize_mx(_x(512), _w(512)), "rotation block b must be one of"),
        (lambda: rotate_quantize_mx(_x(), _w(32, n=3)), "1 \\(shared\\) or d / b = 8"),
        (lambda: rotate_quantize_mx(_x(), torch.zeros(2, 32, 16, dtype=torch.float16)), "\\[b, b\\]"),
        (lambda: rotate_quantize_mx(_x(), _w(), "nvfp4"), "nvfp4 needs global_scale"),
        (lambda: rotate_quantize_mx(_x(), _w(), "nvfp4", -1.0), "finite positive"),
        (lambda: rotate_quantize_mx(_x(), _w(), "nvfp4", float("nan")), "finite positive"),
        (lambda: rotate_quantize_mx(_x(), _w(), "nvfp4", torch.ones(2)), "one floating-point number"),
        (lambda: rotate_quantize_mx(_x(), _w(), "mxfp4", 1.0), "no global scale"),
        (lambda: block_quantize(_x(40), "mxfp8"), "multiple of mxfp8's group of 32"),
        (lambda: block_quantize(_x(dtype=torch.int32), "mxfp4"), "float16, bfloat16 or float32"),
        (lambda: rotate_quantize_mx_bytes(256, 1, 32, "fp4"), "unknown microscaling format"),
    ],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(INTERPRETED, reason="checks the error raised when the interpreter is off")
def test_cpu_tensor_without_the_interpreter_says_how_to_run():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rotate_quantize_mx(_x(), _w())


def test_bytes_count_reads_and_writes_once():
    # 2 tokens x 256 fp16 in, 128 E2M1 bytes + 8 E8M0 scales out each, one shared 32 x 32 fp16 block
    assert rotate_quantize_mx_bytes(256, 2, 32, "mxfp4", shared=True) == 2 * (512 + 128 + 8) + 32 * 32 * 2
    assert rotate_quantize_mx_bytes(256, 1, 128, "mxfp8") == 512 + 256 + 8 + 2 * 128 * 128 * 2


# ----------------------------------------------------------------------------------------------------------------
# The kernel in the interpreter: bit-exact against the engine

# (b, d): rotation blocks smaller than, equal to and larger than the groups; d = 96 is 3 groups of 32 / 6 of 16
SHAPES = [(16, 96), (32, 64), (32, 96), (128, 256), (16, 256)]


@interpreted
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("block, d", SHAPES)
@pytest.mark.parametrize("shared, dtype", [(True, torch.float16), (False, torch.float32)])
def test_kernel_is_bit_exact_against_the_engine(fmt, block, d, shared, dtype):
    x, blocks = exact_rotation_inputs(21, d, block, dtype, shared, seed=block + d)  # 21 rows: a ragged row tile
    y = rotate_reference(x, blocks)
    g = small_g(x, blocks) if fmt == "nvfp4" else None
    got = rotate_quantize_mx(x, blocks, fmt, g)
    n_codes = d // 2 if FORMATS[fmt].packed else d
    assert got[0].shape == (21, n_codes) and got[1].shape == (21, d // FORMATS[fmt].group)
    assert_same(got, engine_encode(y, fmt, g), f"{fmt} b={block} d={d} shared={shared} {dtype}")
    assert_same(got, rotate_quantize_mx_reference(x, blocks, fmt, g), "kernels reference")
    # the zero row: E8M0 scale 2^-127 (code 0) or E4M3 scale 0, every code +0
    assert not got[0][1].any() and not got[1][1].any()


@interpreted
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_outliers_saturate_like_the_engine(fmt):
    x, blocks = exact_rotation_inputs(8, 256, 128, torch.float16, shared=False, seed=7)
    y = rotate_reference(x, blocks)
    g = small_g(x, blocks) if fmt == "nvfp4" else None
    got = rotate_quantize_mx(x, blocks, fmt, g)
    assert_same(got, engine_encode(y, fmt, g), fmt)
    spec = FORMATS[fmt]
    groups = y.reshape(8, -1, spec.group)
    amax = groups.abs().amax(-1)
    if fmt == "nvfp4":  # row 2's scales saturate at E4M3's 448 (0x7E) and its values at E2M1's 6
        assert (amax[2] / (6 * g) > 464).any() and (got[1][2] == 0x7E).any()
    else:  # some group's amax has a mantissa that saturates the element (e2m1: >= 7 * 2^(e-2); e4m3: > 464 * ...)
        ratio = amax / torch.exp2(torch.frexp(amax).exponent - 1 - spec.emax)
        assert (ratio >= (7.0 if fmt == "mxfp4" else 464.0)).any()


@interpreted
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_batched_bf16_input_and_fixed_tile(fmt):
    from kernels.launch import TileConfig

    x, blocks = exact_rotation_inputs(2 * 9, 128, 32, torch.bfloat16, shared=False, seed=3)
    x = x.reshape(2, 9, 128)
    g = 0.01 if fmt == "nvfp4" else None
    codes, scales = rotate_quantize_mx(x, blocks, fmt, g, config=TileConfig(16, 64, 1))  # a tile over 2 blocks
    assert codes.shape[:2] == scales.shape[:2] == (2, 9)
    assert_same((codes, scales), engine_encode(rotate_reference(x, blocks), fmt, g), fmt)
    bad_width = 16 if FORMATS[fmt].group == 32 else 256  # not a multiple of the group, or wider than d
    with pytest.raises(ValueError, match="must be a multiple of the group"):
        rotate_quantize_mx(x, blocks, fmt, g, config=TileConfig(16, bad_width, 1))


@interpreted
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("block", [32, 128])
def test_random_rotation_differs_only_at_rounding_boundaries(fmt, block):
    torch.manual_seed(block)
    x = torch.randn(24, 256, dtype=torch.float16)
    x[4, 9] = 300.0  # an outlier
    blocks = torch.linalg.qr(torch.randn(256 // block, block, block))[0].half()
    y = rotate_reference(x, blocks)
    g = nvfp4_global_scale(x, blocks) if fmt == "nvfp4" else None
    got = rotate_quantize_mx(x, blocks, fmt, g)
    differ = group_mismatch(got, engine_encode(y, fmt, g), fmt)
    assert not (differ & ~boundary_groups(y, fmt, g, rotation_tolerance(x, blocks))).any()
    assert differ.float().mean() <= 0.01


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's amax / (6 g) -> inf: saturates
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantize_only_is_exact_on_any_values(fmt):
    # no rotation, no summation: the kernel must equal the engine on arbitrary values, ties and extremes included
    torch.manual_seed(2)
    y = torch.randn(20, 128) * torch.logspace(-35, 35, 20)[:, None]
    y[1] = 0.0
    y[2] = torch.randint(-512, 513, (128,)).float() / 64  # exact ties of both element grids
    y[3, ::2] = -1e-20  # negatives rounding to -0 under a large amax
    y[3, 1::2] = 1e3
    y[4] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 16) * torch.exp2(torch.arange(128.0) % 5)
    y[5] = 3e38 * torch.sign(torch.randn(128))
    y[6] = 1e-41  # fp32 subnormals (the interpreter keeps them)
    g = torch.tensor(2e-3) if fmt == "nvfp4" else None
    assert_same(block_quantize(y, fmt, g), engine_encode(y, fmt, g), f"{fmt} fp32")
    y16 = (torch.randn(33, 64) * 100).half()
    assert_same(block_quantize(y16, fmt, g), engine_encode(y16.float(), fmt, g), f"{fmt} fp16")


@interpreted
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_e2m1_rounding_next_to_every_boundary(fmt):
    # values at, and 1 or 2 fp32 ulps either side of, each E2M1 midpoint and grid point, both signs; every group
    # leads with a value that makes its scale 1 (MX: amax 4 -> 2^0; NVFP4 with g = 1: amax 6 -> s = 1)
    points = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 7.0])
    vals = [points]
    for k in (1, 2):
        up, down = points.clone(), points.clone()
        for _ in range(k):
            up, down = torch.nextafter(up, torch.tensor(9.0)), torch.nextafter(down, torch.tensor(0.0))
        vals += [up, down]
    vals = torch.cat(vals)
    vals = torch.cat([vals, -vals, torch.tensor([-0.0, 0.0, -1e-30])])
    group = FORMATS[fmt].group
    lead = 4.0 if fmt == "mxfp4" else 6.0
    n_groups = -(-len(vals) // (group - 1))
    rest = torch.zeros(n_groups * (group - 1))
    rest[: len(vals)] = vals
    y = torch.cat([torch.full((n_groups, 1), lead), rest.reshape(n_groups, group - 1)], dim=1).reshape(1, -1)
    y = torch.cat([y, torch.zeros(1, (-y.shape[1]) % 64)], dim=1) if y.shape[1] % 64 else y
    g = 1.0 if fmt == "nvfp4" else None
    assert_same(block_quantize(y, fmt, g), engine_encode(y, fmt, g), fmt)


@interpreted
@pytest.mark.parametrize("g", [2.0**-64, 2.0**64, 1e-25, 1e25, 3e-30])
def test_nvfp4_global_scale_at_and_beyond_the_reciprocal_range(g):
    # 2^-64 <= g <= 2^64 divides by a correctly rounded reciprocal per group (Markstein); beyond, by IEEE division
    torch.manual_seed(4)
    y = torch.randn(6, 128) * g * torch.logspace(-3, 3, 6)[:, None]
    y[1, :16] = -0.0
    y[2, :16] = -y[2, :16].abs() * 1e-6
    assert_same(block_quantize(y, "nvfp4", g), engine_encode(y, "nvfp4", g), f"nvfp4 g={g}")


@interpreted
@pytest.mark.parametrize("fmt, block", [("mxfp4", 32), ("nvfp4", 16)])  # Triton blockdiag; torch bmm for b = 16
def test_rotate_then_quantize_quantizes_the_rounded_rotation(fmt, block):
    x, blocks = exact_rotation_inputs(10, 64, block, torch.float16, shared=True, seed=5)
    x[2] = x[3]  # no outliers: their sums overflow fp16
    g = 0.05 if fmt == "nvfp4" else None
    y16 = rotate_reference(x, blocks).half()
    assert_same(rotate_then_quantize(x, blocks, fmt, g), engine_encode(y16.float(), fmt, g), fmt)


@interpreted
def test_nvfp4_block_scale_ties_round_to_even():
    # g = 0.25, so amax / (6 g) = amax / 1.5 = t exactly: E4M3 midpoints (normal, subnormal, above 448)
    ties = torch.tensor([1.0625, 1.1875, 3 * 2**-10, 2**-10, 5 * 2**-10, 464.0, 11.5 * 2**-9, 17.0])
    y = (torch.linspace(-1, 1, 16) * 1.5 * ties[:, None]).reshape(1, 128)  # each group's amax is 1.5 * t
    got = block_quantize(y, "nvfp4", 0.25)
    # 1, 1.25, 2^-8, 0, 2^-8, 448 (saturated), 12 * 2^-9, 16
    assert got[1].tolist() == [[0x38, 0x3A, 0x02, 0x00, 0x02, 0x7E, 0x0C, 0x58]]
    assert_same(got, engine_encode(y, "nvfp4", 0.25))


# ----------------------------------------------------------------------------------------------------------------
# GPU: the same checks at a real width, and the point of the fused kernel (it beats rotate, then quantize)


@needs_gpu
@pytest.mark.parametrize("fmt, block", [("mxfp4", 32), ("mxfp4", 128), ("nvfp4", 16), ("nvfp4", 128), ("mxfp8", 32)])
def test_gpu_kernel_matches_the_engine(fmt, block):
    x, blocks = exact_rotation_inputs(300, 11008, block, torch.float16, shared=False, seed=block)
    x, blocks = x.cuda(), blocks.cuda()
    g = small_g(x, blocks) if fmt == "nvfp4" else None
    y = rotate_reference(x, blocks)
    assert_same(rotate_quantize_mx(x, blocks, fmt, g), engine_encode(y, fmt, g), f"{fmt} b={block} exact")
    assert_same(block_quantize(y, fmt, g), engine_encode(y, fmt, g), f"{fmt} quantize only")
    x = torch.randn(1000, 11008, dtype=torch.float16, device="cuda")
    blocks = torch.linalg.qr(torch.randn(11008 // block, block, block, device="cuda"))[0].half().contiguous()
    y = rotate_reference(x, blocks)
    g = nvfp4_global_scale(x, blocks) if fmt == "nvfp4" else None
    differ = group_mismatch(rotate_quantize_mx(x, blocks, fmt, g), engine_encode(y, fmt, g), fmt)
    assert not (differ & ~boundary_groups(y, fmt, g, rotation_tolerance(x, blocks))).any()
    assert differ.float().mean() <= 1e-3


@needs_gpu
def test_gpu_nvfp4_divisions_match_the_engine_for_any_global_scale():
    # per-group reciprocal + two corrections for 2^-64 <= g <= 2^64, IEEE division beyond: exact either way
    torch.manual_seed(6)
    y = torch.randn(512, 11008, device="cuda") * torch.logspace(-6, 6, 512, device="cuda")[:, None]
    y[3] = -0.0
    for g in (1e-3, 0.37, 2.0**-64, 2.0**64, 1e-25, 1e25):
        yg = y * g
        assert_same(block_quantize(yg, "nvfp4", g), engine_encode(yg, "nvfp4", g), f"g={g}")


@needs_gpu
@pytest.mark.parametrize("fmt, block", [("mxfp4", 32), ("mxfp4", 128), ("nvfp4", 16)])
def test_gpu_one_pass_beats_rotate_then_quantize(fmt, block):
    from kernels.timing import median_us

    x = torch.randn(8192, 11008, dtype=torch.float16, device="cuda")
    blocks = torch.linalg.qr(torch.randn(11008 // block, block, block, device="cuda"))[0].half().contiguous()
    g = nvfp4_global_scale(x[:256], blocks).cuda() if fmt == "nvfp4" else None
    fused = median_us(lambda: rotate_quantize_mx(x, blocks, fmt, g), 10, 50)[0]
    separate = median_us(lambda: rotate_then_quantize(x, blocks, fmt, g), 10, 50)[0]
    memcpy = median_us(lambda: x.clone(), 10, 50)[0]
    # x read once and a quarter of its bytes written, against x read, y written and read back, codes written
    assert fused < separate, f"one pass {fused:.0f} us, separate {separate:.0f} us, memcpy {memcpy:.0f} us"


@needs_gpu
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gpu_tma_and_plain_loads_agree(fmt, monkeypatch):
    """x tiles by TMA (the default on sm_90+) and by masked loads give the same bits; rows past M read as zeros."""
    import kernels.block_quant as bq
    from kernels.launch import TileConfig

    x = torch.randn(300, 11008, dtype=torch.float16, device="cuda")
    blocks = torch.linalg.qr(torch.randn(11008 // 32, 32, 32, device="cuda"))[0].half().contiguous()
    g = nvfp4_global_scale(x, blocks) if fmt == "nvfp4" else None
    g_x = nvfp4_global_scale(x) if fmt == "nvfp4" else None
    tile = TileConfig(64, 64, 4, 4, 3)
    runs = []
    for tma in (True, False):
        monkeypatch.setattr(bq, "USE_TMA", tma)
        runs.append((rotate_quantize_mx(x, blocks, fmt, g, config=tile), block_quantize(x, fmt, g_x, config=tile)))
    assert_same(runs[0][0], runs[1][0], f"{fmt} rotated: TMA vs masked loads")
    assert_same(runs[0][1], runs[1][1], f"{fmt} quantize only: TMA vs masked loads")
    assert_same(runs[0][1], engine_encode(x.float(), fmt, g_x), f"{fmt} quantize only (TMA) vs the engine")
