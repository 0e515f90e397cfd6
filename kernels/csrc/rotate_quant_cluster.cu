// One-pass block-diagonal rotation (b = 128) + per-token symmetric int4/int8 quantization on Hopper (sm_90).
//
// Why CUDA: a token's scale needs the maximum over its whole rotated row (d / 128 blocks). Triton programs can
// only agree on it through global memory by waiting on each other (1.6x to 3.2x a copy on the H100), or by
// reading x twice (1.47x to 1.62x): docs/BENCHMARKS.md. Here a thread-block cluster of 16 CTAs owns a band of
// 32 tokens. Each CTA keeps up to 6 of the 128 x 128 blocks resident in shared memory (192 KB), rotates its
// columns of the band with tensor-core mma.sync into fp32 registers (kept until the scale is known), and the
// CTAs exchange row maxima through distributed shared memory with one cluster barrier per band.
//
// Memory pipeline: shared memory is nearly all B, so x cannot be staged deep enough there to cover HBM latency.
// Instead each CTA asks L2 for its x two bands ahead (cp.async.bulk.prefetch.L2) and streams the current band
// from L2 through two 16 KB stages (cp.async), one pair of blocks at a time. x is read from HBM once.
//
// Work split inside a CTA (8 warps): warps 0-3 rotate the CTA's even-numbered blocks, warps 4-7 the odd ones,
// both halves on the same pair at once; warp w owns output columns [32 (w % 4), 32 (w % 4) + 32) of its block
// for all 32 tokens: per block 4 x (8 KB of x) + 32 KB of B read from shared memory.
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
constexpr int PAIRS = MAX_BLOCKS_PER_CTA / 2;
constexpr int BAND = 32;                // tokens per band (two mma M tiles)
constexpr int THREADS = 256;            // 8 warps
constexpr int B_BYTES = 128 * 128 * 2;  // one block in shared memory
constexpr int X_BYTES = BAND * 128 * 2; // one band's slice of one block (8 KB)
constexpr int STAGE_BYTES = 2 * X_BYTES;  // a pair of blocks
constexpr int PREFETCH_BANDS = 2;       // default: how far ahead (in this cluster's bands) x is requested into L2
constexpr int SMEM_BYTES = MAX_BLOCKS_PER_CTA * B_BYTES + 2 * STAGE_BYTES;

// 16-byte chunk c of row r of a [rows][128] fp16 tile lives at chunk c ^ (r & 7): ldmatrix's 8 row addresses
// then hit 8 different bank groups.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return row * 256 + ((chunk ^ (row & 7)) << 4);
}

__device__ __forceinline__ void cp_async16(uint32_t smem, const void* gmem, bool valid) {
  int size = valid ? 16 : 0;  // 0: fill with zeros (rows past M)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::); }

__device__ __forceinline__ void prefetch_l2(const void* gmem, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                  uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int quantize(float y, float s, int qmax) {
  int q = __float2int_rn(__fmul_rn(y, s));  // round half to even, as torch.round
  return min(max(q, -qmax), qmax);
}

__device__ __forceinline__ long long now() { return clock64(); }

template <bool INT4>
__global__ void __launch_bounds__(THREADS, 1)
rotate_quant_cluster_kernel(const __half* __restrict__ x, long long stride_x, const __half* __restrict__ blocks,
                            int n_blocks, uint8_t* __restrict__ q, long long stride_q, float* __restrict__ scales,
                            int M, int prefetch_bands, long long* __restrict__ trace) {
  extern __shared__ __align__(128) uint8_t smem[];
  __shared__ float warp_max[8][BAND];
  __shared__ float band_max[2][BAND];  // this CTA's partial maxima, by band parity (read by the whole cluster)
  __shared__ float row_absmax[BAND];

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = (int)cluster.block_rank();
  const int cluster_id = blockIdx.x / CLUSTER;
  const int n_clusters = gridDim.x / CLUSTER;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int half = warp >> 2, cgroup = warp & 3;  // block parity, 32-column group
  const int g = lane >> 2, t = lane & 3;
  const int my_blocks = rank < n_blocks ? (n_blocks - rank + CLUSTER - 1) / CLUSTER : 0;  // blocks rank + 16 i
  const int my_pairs = (my_blocks + 1) / 2;
  const int qmax = INT4 ? 7 : 127;
  const int n_bands = (M + BAND - 1) / BAND;

  // experiments: thread 0 of CTAs 0 and 15 records clock64 at 8 points of its first 40 bands
  long long* tr = nullptr;
  if (trace != nullptr && tid == 0 && (blockIdx.x == 0 || blockIdx.x == 15)) tr = trace + (blockIdx.x == 15) * 8 * 41;
  if (tr) tr[0] = now();
  int it = 0;
#define TRACE(k) do { if (tr && it < 40) tr[8 + it * 8 + (k)] = now(); } while (0)
  const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t b_smem = smem_base;                                 // [6][128 k][128 n]
  const uint32_t x_smem = smem_base + MAX_BLOCKS_PER_CTA * B_BYTES;  // [2 stages][2 blocks][32 rows][128 k]

  // Ask L2 for this CTA's x of one band: one bulk prefetch per (row, block), 256 bytes each.
  auto prefetch_band = [&](int band) {
    for (int i = tid; i < my_blocks * BAND; i += THREADS) {
      const int blk = i / BAND, row = band * BAND + i % BAND;
      if (row < M) prefetch_l2(x + (long long)row * stride_x + (rank + blk * CLUSTER) * 128, 256);
    }
  };
  // cp.async the x of pair p of one band into a stage: up to 2 blocks x 32 rows x 16 chunks of 16 bytes.
  auto load_pair = [&](int band, int p, int stage) {
    const int n = min(2, my_blocks - 2 * p);
    for (int i = tid; i < n * BAND * 16; i += THREADS) {
      const int slot = i / (BAND * 16), r = (i / 16) % BAND, c = i % 16;
      const int row = band * BAND + r, col = (rank + (2 * p + slot) * CLUSTER) * 128 + c * 8;
      const bool valid = row < M;
      const __half* src = x + (long long)(valid ? row : 0) * stride_x + col;
      cp_async16(x_smem + stage * STAGE_BYTES + slot * X_BYTES + swz(r, c), src, valid);
    }
  };

  int band = cluster_id;
  for (int a = 0; a < prefetch_bands; ++a)
    if (band + a * n_clusters < n_bands) prefetch_band(band + a * n_clusters);
  // the CTA's blocks, once
  for (int i = tid; i < my_blocks * 128 * 16; i += THREADS) {
    const int blk = i / (128 * 16), k = (i / 16) % 128, c = i % 16;
    const __half* src = blocks + ((long long)(rank + blk * CLUSTER) * 128 + k) * 128 + c * 8;
    cp_async16(b_smem + blk * B_BYTES + swz(k, c), src, true);
  }
  int stage = 0;
  if (band < n_bands) load_pair(band, 0, stage);
  cp_async_commit();

  const int m = lane >> 3, r8 = lane & 7;
  int parity = 0;
  for (; band < n_bands; band += n_clusters, parity ^= 1, ++it) {
    TRACE(0);
    if (prefetch_bands > 0 && band + prefetch_bands * n_clusters < n_bands)
      prefetch_band(band + prefetch_bands * n_clusters);

    float acc[PAIRS][2][4][4];  // [pair][m tile][n tile][fragment]
#pragma unroll
    for (int p = 0; p < PAIRS; ++p)
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[p][mt][nt][e] = 0.f;

#pragma unroll
    for (int p = 0; p < PAIRS; ++p) {
      if (p < my_pairs) {  // uniform over the CTA
        cp_async_wait_all();
        __syncthreads();  // pair p has landed for every thread; the other stage is free
        TRACE(1 + p);
        // next load: pair p + 1 of this band, or pair 0 of this cluster's next band
        if (p + 1 < my_pairs) load_pair(band, p + 1, stage ^ 1);
        else if (band + n_clusters < n_bands) load_pair(band + n_clusters, 0, stage ^ 1);
        cp_async_commit();
        const int blk = 2 * p + half;
        if (blk < my_blocks) {
          const uint32_t xs = x_smem + stage * STAGE_BYTES + half * X_BYTES;
          const uint32_t bs = b_smem + blk * B_BYTES;
#pragma unroll
          for (int ks = 0; ks < 8; ++ks) {
            uint32_t a[2][4];
            // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
              ldmatrix_x4(xs + swz(mt * 16 + r8 + 8 * (m & 1), ks * 2 + (m >> 1)), a[mt][0], a[mt][1], a[mt][2],
                          a[mt][3]);
            // B (stored [k][n], loaded transposed), 16 columns at a time:
            // (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
#pragma unroll
            for (int np = 0; np < 2; ++np) {
              uint32_t b0, b1, b2, b3;
              ldmatrix_x4_trans(bs + swz(ks * 16 + r8 + 8 * (m & 1), cgroup * 4 + np * 2 + (m >> 1)), b0, b1, b2,
                                b3);
#pragma unroll
              for (int mt = 0; mt < 2; ++mt) {
                mma16816(acc[p][mt][2 * np], a[mt], b0, b1);
                mma16816(acc[p][mt][2 * np + 1], a[mt], b2, b3);
              }
            }
          }
        }
        stage ^= 1;
      }
    }

    TRACE(4);
    // row maxima: lane holds rows 16 mt + g (fragments 0, 1) and 16 mt + g + 8 (fragments 2, 3)
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      float lo = 0.f, hi = 0.f;
#pragma unroll
      for (int p = 0; p < PAIRS; ++p)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) {
          lo = fmaxf(lo, fmaxf(fabsf(acc[p][mt][nt][0]), fabsf(acc[p][mt][nt][1])));
          hi = fmaxf(hi, fmaxf(fabsf(acc[p][mt][nt][2]), fabsf(acc[p][mt][nt][3])));
        }
      lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 1));
      lo = fmaxf(lo, __shfl_xor_sync(0xffffffffu, lo, 2));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 1));
      hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, 2));
      if (t == 0) {
        warp_max[warp][mt * 16 + g] = lo;
        warp_max[warp][mt * 16 + g + 8] = hi;
      }
    }
    __syncthreads();
    if (tid < BAND) {
      float mx = 0.f;
#pragma unroll
      for (int w = 0; w < 8; ++w) mx = fmaxf(mx, warp_max[w][tid]);
      band_max[parity][tid] = mx;
    }
    TRACE(5);
    cluster.sync();  // every CTA's band_max[parity] is written and visible to the cluster
    if (tid < BAND) {
      float remote[CLUSTER];
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) remote[r] = cluster.map_shared_rank(&band_max[parity][0], r)[tid];
      float mx = 0.f;
#pragma unroll
      for (int r = 0; r < CLUSTER; ++r) mx = fmaxf(mx, remote[r]);
      row_absmax[tid] = fmaxf(mx, 1e-8f);
    }
    __syncthreads();
    TRACE(6);
    // band_max[parity] is written again two bands later, after the next cluster.sync, which every CTA reaches
    // only once it has read this band's maxima: one barrier per band is enough

    const int row0 = band * BAND;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const float am_lo = row_absmax[mt * 16 + g], am_hi = row_absmax[mt * 16 + g + 8];
      const float s_lo = __fdiv_rn((float)qmax, am_lo), s_hi = __fdiv_rn((float)qmax, am_hi);
      const int row_lo = row0 + mt * 16 + g, row_hi = row_lo + 8;
#pragma unroll
      for (int p = 0; p < PAIRS; ++p) {
        const int blk = 2 * p + half;
        if (blk < my_blocks) {
#pragma unroll
          for (int nt = 0; nt < 4; ++nt) {
            const int col = (rank + blk * CLUSTER) * 128 + cgroup * 32 + nt * 8 + 2 * t;  // this lane's pair
            const float* c = acc[p][mt][nt];
            const int q0 = quantize(c[0], s_lo, qmax), q1 = quantize(c[1], s_lo, qmax);
            const int q2 = quantize(c[2], s_hi, qmax), q3 = quantize(c[3], s_hi, qmax);
            if (INT4) {
              if (row_lo < M) q[(long long)row_lo * stride_q + col / 2] = (uint8_t)((q0 & 0xF) | ((q1 & 0xF) << 4));
              if (row_hi < M) q[(long long)row_hi * stride_q + col / 2] = (uint8_t)((q2 & 0xF) | ((q3 & 0xF) << 4));
            } else {
              if (row_lo < M)
                *reinterpret_cast<char2*>(q + (long long)row_lo * stride_q + col) = make_char2((char)q0, (char)q1);
              if (row_hi < M)
                *reinterpret_cast<char2*>(q + (long long)row_hi * stride_q + col) = make_char2((char)q2, (char)q3);
            }
          }
        }
      }
    }
    if (rank == 0 && tid < BAND && row0 + tid < M) scales[row0 + tid] = __fdiv_rn(row_absmax[tid], (float)qmax);
    TRACE(7);
  }
  if (tr) tr[1] = it;
  if (tr) tr[2] = now();
  cp_async_wait_all();
  cluster.sync();  // no CTA leaves while another may still read its band_max
}

int g_max_clusters[2][64] = {};  // per variant (int8, int4) and device: cudaOccupancyMaxActiveClusters

}  // namespace

// Host launcher: returns a cudaError_t (cudaSuccess when launched); n_blocks <= 96, D = 128 * n_blocks.
int spinscope_rotate_quant_cluster(const void* x, long long stride_x, const void* blocks, int n_blocks, void* q,
                                   long long stride_q, float* scales, int M, int bits, cudaStream_t stream,
                                   long long* trace) {
  if (n_blocks < 1 || n_blocks > CLUSTER * MAX_BLOCKS_PER_CTA || (bits != 4 && bits != 8)) return cudaErrorInvalidValue;
  const int smem = SMEM_BYTES;
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
  int prefetch = PREFETCH_BANDS;
  if (const char* env = getenv("SPINSCOPE_RQC_PREFETCH")) prefetch = atoi(env);  // experiments only
  return cudaLaunchKernelEx(&config, kernel, (const __half*)x, stride_x, (const __half*)blocks, n_blocks,
                            (uint8_t*)q, stride_q, scales, M, prefetch, trace);
}

// The occupancy query's answer for the int4 variant on the current device (0 before its first launch).
int spinscope_rotate_quant_cluster_max_clusters() {
  int device = 0;
  cudaGetDevice(&device);
  return g_max_clusters[1][device & 63];
}
