"""Every width of today's popular models has an exact Hadamard transform: hidden, intermediate, MoE-intermediate
and head widths read from the models' published config.json files. A width with none gets an error naming the
nearest supported widths and the block-diagonal alternative."""

import pytest
import torch

from engine.rotation.hadamard import UnsupportedWidthError, apply_hadamard, decompose, hadamard_matrix

# model: (hidden_size, intermediate_size, moe_intermediate_size or None, head_dim), from the published configs
PUBLISHED = {
    "Llama-3.2-1B": (2048, 8192, None, 64),
    "Llama-3.2-3B": (3072, 8192, None, 128),
    "Llama-3.1-8B": (4096, 14336, None, 128),
    "Llama-3.1-70B": (8192, 28672, None, 128),
    "Qwen2.5-0.5B": (896, 4864, None, 64),
    "Qwen2.5-1.5B": (1536, 8960, None, 128),
    "Qwen2.5-3B": (2048, 11008, None, 128),
    "Qwen2.5-7B": (3584, 18944, None, 128),
    "Qwen2.5-14B": (5120, 13824, None, 128),
    "Qwen2.5-32B": (5120, 27648, None, 128),
    "Qwen2.5-72B": (8192, 29568, None, 128),
    "Qwen3-0.6B": (1024, 3072, None, 128),
    "Qwen3-1.7B": (2048, 6144, None, 128),
    "Qwen3-4B": (2560, 9728, None, 128),
    "Qwen3-8B": (4096, 12288, None, 128),
    "Qwen3-14B": (5120, 17408, None, 128),
    "Qwen3-32B": (5120, 25600, None, 128),
    "Qwen3-30B-A3B": (2048, 6144, 768, 128),
    "Mixtral-8x7B": (4096, 14336, None, 128),
    "Mistral-7B": (4096, 14336, None, 128),
    "Phi-3-mini": (3072, 8192, None, 96),
    "Phi-4-mini": (3072, 8192, None, 128),
    "SmolLM2-360M": (960, 2560, None, 64),
    "SmolLM2-1.7B": (2048, 8192, None, 64),
}
WIDTHS = sorted({w for dims in PUBLISHED.values() for w in dims if w})


@pytest.mark.parametrize("n", WIDTHS)
def test_every_published_width_has_an_exact_hadamard_transform(n):
    k, power = decompose(n)
    assert k * power == n and power & (power - 1) == 0
    h = hadamard_matrix(k)  # the non-power-of-two factor, checked entry by entry: +-1/sqrt(k), orthogonal
    assert torch.allclose(h.abs(), torch.full_like(h, k**-0.5))
    assert torch.allclose(h @ h.T, torch.eye(k, dtype=h.dtype), atol=1e-10)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = apply_hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))  # orthogonal on the whole width
    assert torch.allclose(apply_hadamard(y, transpose=True), x)  # and inverted by its transpose


def test_a_width_without_one_names_the_nearest_widths_and_the_block_diagonal_alternative():
    with pytest.raises(
        UnsupportedWidthError,
        match=r"Nearest supported widths: 664 and 672; or use "
        r"block_diagonal_hadamard\(668, block=4\)",
    ):
        decompose(668)  # 4 * 167: order 668 has no known Hadamard construction
