"""kernels.hadamard against the engine's dense Hadamard matrices (the matrices the offline fusion uses)."""

import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch

from engine.rotation.hadamard import decompose, hadamard_matrix, sylvester
from kernels import hadamard


def test_backend_names_what_is_installed():
    installed = importlib.util.find_spec("fast_hadamard_transform") is not None
    usable = installed and hadamard.package_status().endswith("passed its check against the engine")
    assert hadamard.backend() == ("fast_hadamard_transform" if usable else "torch")


# ---- the fast_hadamard_transform package is checked against the engine before it is used -----------------------


def _package_transform(x, scale=1.0, *, ignore_scale=False, sequency=False, pow2_only=False):
    """What the package's hadamard_transform computes (its own reference: pad to a power of two, x @ H * scale,
    truncate), in float32 on any device; the flags make it wrong in ways a broken build or version could be."""
    dim = x.shape[-1]
    p = 1 << (dim - 1).bit_length()
    if pow2_only and p != dim:
        raise RuntimeError("fast_hadamard_transform: dim must be a power of two")  # a build without the padding
    h = (sylvester(p) * math.sqrt(p)).round().float()  # the +-1 matrix the package multiplies by
    if sequency:  # Walsh (sequency) order: the same rows, another order, so another matrix
        h = h[torch.argsort((h[:, 1:] != h[:, :-1]).sum(1))]
    out = torch.nn.functional.pad(x.float(), (0, p - dim)) @ h.to(x.device)
    return (out if ignore_scale else out * scale)[..., :dim].to(x.dtype)


def _fake_package(**flaws) -> types.ModuleType:
    fake = types.ModuleType("fast_hadamard_transform")
    fake.calls = []

    def hadamard_transform(x, scale=1.0):
        fake.calls.append(tuple(x.shape))
        return _package_transform(x, scale, **flaws)

    fake.hadamard_transform = hadamard_transform
    return fake


@pytest.fixture
def installed_package(monkeypatch):
    """Install a fake package; its check runs on the CPU (the real one is CUDA-only) with a fresh verdict cache."""
    monkeypatch.setattr(hadamard, "CHECK_DEVICE", "cpu")
    monkeypatch.setattr(hadamard, "_PACKAGE_CHECKS", {})

    def install(fake):
        monkeypatch.setitem(sys.modules, "fast_hadamard_transform", fake)
        return fake

    return install


def test_package_that_agrees_with_the_engine_is_used(installed_package):
    fake = installed_package(_fake_package())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a correct package
        assert hadamard.backend() == "fast_hadamard_transform"
    assert "passed" in hadamard.package_status()
    # it was really run on the check's widths: the exact ones over their 2^m axis (768 = 12 * 64), the padded one whole
    assert {shape[-1] for shape in fake.calls} == {256, 64, 768}
    calls = len(fake.calls)
    hadamard.backend()
    assert len(fake.calls) == calls, "the verdict is kept: the check runs once per imported package"


@pytest.mark.parametrize(
    "flaw, where",
    [
        ("ignore_scale", "exact transform, n = 256"),  # unnormalised: sqrt(n) too large
        ("sequency", "exact transform, n = 256"),  # another Hadamard matrix (Walsh order)
        ("pow2_only", "raised"),  # cannot do the padded width it claims to support
    ],
)
def test_package_that_disagrees_falls_back_to_torch(installed_package, flaw, where):
    installed_package(_fake_package(**{flaw: True}))
    with pytest.warns(RuntimeWarning, match="failed its check against the engine's Hadamard.*the torch backend"):
        assert hadamard.backend() == "torch"
    assert where in hadamard.package_status()
    x = torch.randn(2, 768)
    assert torch.allclose(hadamard.hadamard_transform(x), hadamard.hadamard_transform_reference(x), atol=1e-5)
    with pytest.raises(RuntimeError, match="rejected"):  # asking for it by name says why it is not used
        hadamard.hadamard_transform(x, backend_name="fast_hadamard_transform")


def test_package_check_compares_with_the_engine_not_itself(installed_package):
    # only the padded path wrong (scale of the unpadded width): the exact widths pass, the padded one must not
    fake = _fake_package()
    fake.hadamard_transform = lambda x, scale=1.0: _package_transform(
        x, 1.0 / math.sqrt(x.shape[-1]) if x.shape[-1] & (x.shape[-1] - 1) else scale
    )
    installed_package(fake)
    with pytest.warns(RuntimeWarning):
        assert hadamard.backend() == "torch"
    assert "padded transform, width 768" in hadamard.package_status()


@pytest.mark.parametrize("n", [64, 96, 576, 688, 1536])  # 2^6, 12*8, 36*16, 344*2, 12*128
def test_exact_transform_equals_engine_matrix(n):
    k, p = decompose(n)
    assert (k == 1) == (n & (n - 1) == 0)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    y = hadamard.hadamard_transform(x, backend_name="torch")
    assert y.shape == x.shape
    assert torch.allclose(y, x @ hadamard_matrix(n), atol=1e-10)
    assert torch.allclose(hadamard.hadamard_transform_reference(x.float()), (x @ hadamard_matrix(n)).float(), atol=1e-4)


def test_pow2_splits_into_several_kronecker_factors(monkeypatch):
    # 2^9 with factors of at most 2^4: three matmuls (16, 16, 2) must still give Sylvester H_512
    monkeypatch.setattr(hadamard, "MAX_FACTOR_LOG2", 4)
    assert [f.shape[0] for f in hadamard._pow2_factors(512, torch.float64, torch.device("cpu"))] == [16, 16, 2]
    x = torch.randn(4, 512, dtype=torch.float64)
    assert torch.allclose(hadamard.hadamard_transform(x, backend_name="torch"), x @ hadamard_matrix(512), atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_close_to_float64(dtype, tol):
    x = torch.randn(8, 576, dtype=torch.float64)
    y = hadamard.hadamard_transform(x.to(dtype), backend_name="torch")
    ref = x @ hadamard_matrix(576)
    assert y.dtype == dtype
    assert float((y.double() - ref).norm() / ref.norm()) < tol


def test_padded_transform_pads_to_next_power_of_two():
    x = torch.randn(6, 96, dtype=torch.float64)  # pads to 128
    padded = torch.nn.functional.pad(x, (0, 32))
    expected = (padded @ hadamard_matrix(128))[:, :96]
    assert torch.allclose(hadamard.hadamard_transform_padded(x, backend_name="torch"), expected, atol=1e-10)
    assert torch.allclose(hadamard.hadamard_transform_padded_reference(x), expected.float(), atol=1e-5)
    # and it is not the exact 96-point transform: the padded one loses norm
    exact = hadamard.hadamard_transform(x, backend_name="torch")
    assert not torch.allclose(expected, exact, atol=1e-3)


def test_bad_width_and_backend_raise():
    with pytest.raises(ValueError, match="last dim"):
        hadamard.hadamard_transform(torch.randn(2, 64), 128)
    with pytest.raises(ValueError, match="no Hadamard matrix"):
        hadamard.hadamard_transform(torch.randn(2, 6))
    with pytest.raises(ValueError, match="backend"):
        hadamard.hadamard_transform(torch.randn(2, 64), backend_name="cuda")
    if hadamard.backend() == "torch":
        with pytest.raises(RuntimeError, match="requirements-gpu.txt"):
            hadamard.hadamard_transform(torch.randn(2, 64), backend_name="fast_hadamard_transform")
