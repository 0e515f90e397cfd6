// One-pass block-diagonal rotation (b = 128) + per-token symmetric int4/int8 quantization on Hopper (sm_90).
//
// Why CUDA and not Triton: a token's scale needs the maximum over its whole rotated row, which is spread over
// d / 128 blocks. Triton programs can only agree on it through global memory and by waiting on each other,
// which measured 1.6x to 3.2x a copy on the H100 (docs/BENCHMARKS.md). Here a thread-block cluster of 16 CTAs
// owns a band of 16 tokens: each CTA keeps up to 6 of the 128x128 blocks resident in shared memory, rotates
// its columns of the band with tensor-core mma.sync, and the CTAs exchange their row maxima through
// distributed shared memory and one cluster barrier per band. x is read from HBM once, the rotated values stay
// in registers, and the next band's x is loading while this band is quantized.
//
// Layouts: x [M, D] fp16 (row stride stride_x), blocks [n, 128, 128] fp16 (y = x @ blockdiag(B), B_j[k][n]),
// q uint8 [M, D/2] (int4: element 2k in the low nibble) or int8 [M, D], scales fp32 [M].
// The quantizer matches kernels/rotate_quant.py: absmax = max(max|y|, 1e-8), s = qmax / absmax (IEEE
// division), q = round-half-even(y * s) clamped to [-qmax, qmax], scale = absmax / qmax.

#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

namespace cg = cooperative_groups;

namespace {

constexpr int CLUSTER = 16;             // CTAs per cluster (non-portable size: Hopper allows 16)
constexpr int MAX_BLOCKS_PER_CTA = 6;   // so n <= 96 blocks, d <= 12288
constexpr int BAND = 16;                // tokens per band (one mma M tile)
constexpr int THREADS = 256;            // 8 warps; warp w owns output columns [16w, 16w + 16) of every block
constexpr int B_BYTES = 128 * 128 * 2;  // one block in shared memory
constexpr int X_BYTES = BAND * 128 * 2; // one band's slice of one block

// 16-byte chunk c of row r of a [rows][128] fp16 tile lives at chunk c ^ (r & 7): ldmatrix's 8 row addresses
// then hit 8 different bank groups.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return row * 256 + ((chunk ^ (row & 7)) << 4);
}

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  int size = valid ? 16 : 0;  // 0: fill with zeros (rows past M)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(size));
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int quantize(float y, float s, int qmax) {
  int q = __float2int_rn(__fmul_rn(y, s));  // round half to even, as torch.round
  return min(max(q, -qmax), qmax);
}

template <bool INT4>
__global__ void __launch_bounds__(THREADS, 1)
rotate_quant_cluster_kernel(const __half* __restrict__ x, long long stride_x, const __half* __restrict__ blocks,
                            int n_blocks, uint8_t* __restrict__ q, long long stride_q, float* __restrict__ scales,
                            int M) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float warp_max[8][BAND];
  __shared__ float band_max[2][BAND];  // this CTA's partial maxima, by band parity (read by the whole cluster)
  __shared__ float row_absmax[BAND];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = (int)cluster.block_rank();
  const int cluster_id = blockIdx.x / CLUSTER;
  const int n_clusters = gridDim.x / CLUSTER;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int my_blocks = rank < n_blocks ? (n_blocks - rank + CLUSTER - 1) / CLUSTER : 0;  // blocks rank + 16 i
  const int qmax = INT4 ? 7 : 127;
  const int n_bands = (M + BAND - 1) / BAND;

  const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t b_smem = smem_base;                                  // [6][128 k][128 n]
  const uint32_t x_smem = smem_base + MAX_BLOCKS_PER_CTA * B_BYTES;   // [6][16 rows][128 k]

  // every x chunk of one band for this CTA: 16 rows x my_blocks x 16 chunks, 16 bytes each
  auto load_band = [&](int band) {
    const int row0 = band * BAND;
    for (int i = tid; i < my_blocks * BAND * 16; i += THREADS) {
      const int blk = i / (BAND * 16), r = (i / 16) % BAND, c = i % 16;
      const int row = row0 + r, col = (rank + blk * CLUSTER) * 128 + c * 8;
      const bool valid = row < M;
      const __half* src = x + (long long)(valid ? row : 0) * stride_x + col;
      cp_async16(x_smem + blk * X_BYTES + swz(r, c), src, valid);
    }
  };

  // the CTA's blocks, once
  for (int i = tid; i < my_blocks * 128 * 16; i += THREADS) {
    const int blk = i / (128 * 16), k = (i / 16) % 128, c = i % 16;
    const __half* src = blocks + ((long long)(rank + blk * CLUSTER) * 128 + k) * 128 + c * 8;
    cp_async16(b_smem + blk * B_BYTES + swz(k, c), src, true);
  }
  int band = cluster_id;
  if (band < n_bands) load_band(band);
  cp_async_wait_all();
  __syncthreads();

  int parity = 0;
  for (; band < n_bands; band += n_clusters, parity ^= 1) {
    float acc[MAX_BLOCKS_PER_CTA][2][4];
#pragma unroll
    for (int blk = 0; blk < MAX_BLOCKS_PER_CTA; ++blk)
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[blk][j][e] = 0.f;

    // rotate: y[16 x 16w..16w+15] of every block
#pragma unroll
    for (int blk = 0; blk < MAX_BLOCKS_PER_CTA; ++blk) {
      if (blk < my_blocks) {
#pragma unroll
        for (int ks = 0; ks < 8; ++ks) {
          uint32_t a0, a1, a2, a3, b0, b1, b2, b3;
          const int m = lane >> 3, r8 = lane & 7;
          // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
          const int a_row = r8 + 8 * (m & 1), a_chunk = ks * 2 + (m >> 1);
          ldmatrix_x4(x_smem + blk * X_BYTES + swz(a_row, a_chunk), a0, a1, a2, a3);
          // B (stored [k][n], loaded transposed): (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
          const int b_k = ks * 16 + r8 + 8 * (m & 1), b_chunk = warp * 2 + (m >> 1);
          ldmatrix_x4_trans(b_smem + blk * B_BYTES + swz(b_k, b_chunk), b0, b1, b2, b3);
          mma16816(acc[blk][0], a0, a1, a2, a3, b0, b1);
          mma16816(acc[blk][1], a0, a1, a2, a3, b2, b3);
        }
      }
    }
    __syncthreads();  // every warp is done with this band's x in shared memory
    const int next = band + n_clusters;
    if (next < n_bands) load_band(next);  // overlaps the exchange and the quantization below

    // row maxima: lane holds rows g (acc[..][0..1]) and g + 8 (acc[..][2..3])
    float lo = 0.f, hi = 0.f;
#pragma unroll
    for (int blk = 0; blk < MAX_BLOCKS_PER_CTA; ++blk)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        lo = fmaxf(lo, fmaxf(fabsf(acc[blk][j][0]), fabsf(acc[blk][j][1])));
        hi = fmaxf(hi, fmaxf(fabsf(acc[blk][j][2]), fabsf(acc[blk][j][3])));
      }
    lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 1));
    lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 2));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 1));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 2));
    if (t == 0) {
      warp_max[warp][g] = lo;
      warp_max[warp][g + 8] = hi;
    }
    __syncthreads();
    if (tid < BAND) {
      float m = 0.f;
#pragma unroll
      for (int w = 0; w < 8; ++w) m = fmaxf(m, warp_max[w][tid]);
      band_max[parity][tid] = m;
    }
    cluster.sync();  // every CTA's band_max[parity] is written and visible to the cluster
    if (tid < BAND) {
      float m = 0.f;
      for (int r = 0; r < CLUSTER; ++r) m = fmaxf(m, cluster.map_shared_rank(&band_max[parity][0], r)[tid]);
      row_absmax[tid] = fmaxf(m, 1e-8f);
    }
    __syncthreads();
    // band_max[parity] is written again two bands later, after the next cluster.sync, which every CTA reaches
    // only once it has read this band's maxima: one barrier per band is enough

    const int row0 = band * BAND;
    const float am_lo = row_absmax[g], am_hi = row_absmax[g + 8];
    const float s_lo = __fdiv_rn((float)qmax, am_lo), s_hi = __fdiv_rn((float)qmax, am_hi);
    const int row_lo = row0 + g, row_hi = row0 + g + 8;
#pragma unroll
    for (int blk = 0; blk < MAX_BLOCKS_PER_CTA; ++blk) {
      if (blk < my_blocks) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const int col = (rank + blk * CLUSTER) * 128 + warp * 16 + j * 8 + 2 * t;  // this lane's column pair
          const float* c = acc[blk][j];
          const int q0 = quantize(c[0], s_lo, qmax), q1 = quantize(c[1], s_lo, qmax);
          const int q2 = quantize(c[2], s_hi, qmax), q3 = quantize(c[3], s_hi, qmax);
          if (INT4) {
            if (row_lo < M) q[(long long)row_lo * stride_q + col / 2] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
            if (row_hi < M) q[(long long)row_hi * stride_q + col / 2] = (uint8_t)((q2 & 0xF) | ((q3 & 0xF) << 4));
          } else {
            if (row_lo < M) {
              char2 v = make_char2((char)q0, (char)q1);
              *reinterpret_cast<char2*>(q + (long long)row_lo * stride_q + col) = v;
            }
            if (row_hi < M) {
              char2 v = make_char2((char)q2, (char)q3);
              *reinterpret_cast<char2*>(q + (long long)row_hi * stride_q + col) = v;
            }
          }
        }
      }
    }
    if (rank == 0 && tid < BAND && row0 + tid < M) scales[row0 + tid] = __fdiv_rn(row_absmax[tid], (float)qmax);
    cp_async_wait_all();
    __syncthreads();  // the next band's x has landed
  }
  cluster.sync();  // no CTA leaves while another may still read its band_max
}

int g_max_clusters[2][64] = {};  // per variant (int8, int4) and device: cudaOccupancyMaxActiveClusters

}  // namespace

// Host launcher: returns a cudaError_t (cudaSuccess when launched); n_blocks <= 96, D = 128 * n_blocks.
int spinscope_rotate_quant_cluster(const void* x, long long stride_x, const void* blocks, int n_blocks, void* q,
                                   long long stride_q, float* scales, int M, int bits, cudaStream_t stream) {
  if (n_blocks < 1 || n_blocks > CLUSTER * MAX_BLOCKS_PER_CTA || (bits != 4 && bits != 8)) return cudaErrorInvalidValue;
  const int smem = MAX_BLOCKS_PER_CTA * (B_BYTES + X_BYTES);
  auto kernel = bits == 4 ? rotate_quant_cluster_kernel<true> : rotate_quant_cluster_kernel<false>;
  // attributes and the occupancy query once per variant and device (not stream work: fine before a graph
  // capture, and kept out of one)
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int& max_clusters = g_max_clusters[bits == 4][device & 63];
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = CLUSTER;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  config.blockDim = dim3(THREADS, 1, 1);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.gridDim = dim3(CLUSTER, 1, 1);
  if (max_clusters == 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveClusters(&max_clusters, (void*)kernel, &config);
    if (err != cudaSuccess) return err;
    if (max_clusters < 1) return cudaErrorInvalidConfiguration;
  }
  const int n_bands = (M + BAND - 1) / BAND;
  int wanted = max_clusters;
  if (const char* env = getenv("SPINSCOPE_RQC_CLUSTERS")) wanted = atoi(env);  // experiments only
  const int clusters = n_bands < wanted ? n_bands : wanted;
  config.gridDim = dim3(CLUSTER * clusters, 1, 1);
  return cudaLaunchKernelEx(&config, kernel, (const __half*)x, stride_x, (const __half*)blocks, n_blocks,
                            (uint8_t*)q, stride_q, scales, M);
}

// The occupancy query's answer for the int4 variant on the current device (0 before its first launch).
int spinscope_rotate_quant_cluster_max_clusters() {
  int device = 0;
  cudaGetDevice(&device);
  return g_max_clusters[1][device & 63];
}
