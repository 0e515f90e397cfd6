"""One-pass rotate + quantize on Hopper: CUDA thread-block clusters (kernels/csrc/rotate_quant_cluster.cu).

Built from our own source with torch's extension loader the first time it is needed, on a machine with a CUDA
build of torch, nvcc and an sm_90 GPU; the build lands in cache/kernels_build/. Everywhere else `applies` is
False and kernels/rotate_quant.py runs its Triton kernels instead.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "rotate_quant_cluster.cu"
BUILD_DIR = Path(__file__).resolve().parents[1] / "cache" / "kernels_build"
MAX_BLOCKS = 96  # 16 CTAs x 6 resident 128 x 128 blocks: d <= 12288
BLOCK = 128

_BINDING = r"""
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

int spinscope_rotate_quant_cluster(const void* x, long long stride_x, const void* blocks, int n_blocks, void* q,
                                   long long stride_q, float* scales, int M, int bits, cudaStream_t stream,
                                   long long* trace);
int spinscope_rotate_quant_cluster_max_clusters();

int64_t max_active_clusters() { return spinscope_rotate_quant_cluster_max_clusters(); }

void rotate_quant_cluster(torch::Tensor x, torch::Tensor blocks, torch::Tensor q, torch::Tensor scales,
                          int64_t bits) {
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int err = spinscope_rotate_quant_cluster(x.data_ptr(), x.stride(0), blocks.data_ptr(), (int)blocks.size(0),
                                           q.data_ptr(), q.stride(0), scales.data_ptr<float>(), (int)x.size(0),
                                           (int)bits, stream, nullptr);
  TORCH_CHECK(err == 0, "rotate_quant_cluster launch failed: ", cudaGetErrorString((cudaError_t)err));
}

void rotate_quant_cluster_trace(torch::Tensor x, torch::Tensor blocks, torch::Tensor q, torch::Tensor scales,
                                int64_t bits, torch::Tensor trace) {
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  int err = spinscope_rotate_quant_cluster(x.data_ptr(), x.stride(0), blocks.data_ptr(), (int)blocks.size(0),
                                           q.data_ptr(), q.stride(0), scales.data_ptr<float>(), (int)x.size(0),
                                           (int)bits, stream, (long long*)trace.data_ptr<int64_t>());
  TORCH_CHECK(err == 0, "rotate_quant_cluster launch failed: ", cudaGetErrorString((cudaError_t)err));
}
"""


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension, or None (with the reason in build_error()) where it cannot be built."""
    global _BUILD_ERROR
    try:
        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise RuntimeError("needs a CUDA build of torch and a GPU")
        if torch.cuda.get_device_capability() < (9, 0):
            raise RuntimeError(f"needs thread-block clusters (sm_90), this GPU is sm_{''.join(map(str, torch.cuda.get_device_capability()))}")
        if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            raise RuntimeError("needs nvcc to build the CUDA source")
        from torch.utils.cpp_extension import load_inline
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        return load_inline("spinscope_rotate_quant_cluster", cpp_sources=_BINDING, cuda_sources=SOURCE.read_text(),
                           functions=["rotate_quant_cluster", "rotate_quant_cluster_trace", "max_active_clusters"], extra_cuda_cflags=["-O3", "-std=c++17"],
                           build_directory=str(BUILD_DIR), verbose=False)
    except Exception as err:  # noqa: BLE001 - the Triton path runs instead; build_error() says why
        _BUILD_ERROR = f"{type(err).__name__}: {err}"
        return None


_BUILD_ERROR = ""


def build_error() -> str:
    """Why the extension is unavailable ('' when it built or was not tried)."""
    return _BUILD_ERROR


def applies(x: torch.Tensor, blocks: torch.Tensor, bits: int) -> bool:
    """True when the cluster kernel can run this call (shapes, dtype, alignment) and its extension builds."""
    return (x.is_cuda and x.dtype == torch.float16 and blocks.dtype == torch.float16 and bits in (4, 8)
            and blocks.dim() == 3 and blocks.shape[1] == blocks.shape[2] == BLOCK
            and 1 <= blocks.shape[0] <= MAX_BLOCKS and x.shape[-1] == blocks.shape[0] * BLOCK
            and extension() is not None)


def rotate_quantize_cluster(x2: torch.Tensor, blocks: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
                            bits: int) -> None:
    """Fill q and scales for x2 [M, d] (rows contiguous, 16-byte aligned) in one launch."""
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # cp.async moves aligned 16-byte chunks
        x2 = x2.clone(memory_format=torch.contiguous_format)
    extension().rotate_quant_cluster(x2, blocks.contiguous(), q, scales, bits)
