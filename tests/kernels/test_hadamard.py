"""kernels.hadamard against the engine's dense Hadamard matrices (the matrices the offline fusion uses)."""

import importlib.util

import pytest
import torch

from engine.rotation.hadamard import decompose, hadamard_matrix
from kernels import hadamard


def test_backend_names_what_is_installed():
    installed = importlib.util.find_spec("fast_hadamard_transform") is not None
    assert hadamard.backend() == ("fast_hadamard_transform" if installed else "torch")


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
