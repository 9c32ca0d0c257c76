// Cascade (shared-prefix) decode on CUDA. One kernel, `attend_kernel`, runs a set of query
// vectors of one KV head against a list of pages with an online softmax; K/V tiles of KT
// tokens are staged in shared memory once per block and reused by all its query vectors.
// - prefix stage: a block per (group, KV head, chunk of the group's rows); its query
//   vectors are those rows x the query heads sharing the KV head, so the prefix is read
//   from global memory once per (group, KV head, chunk), not once per row.
// - suffix stage (and plain paged decode): a block per (row, KV head).
// - merge: merge_states.cu.
// Each warp owns up to MAX_PER_WARP query vectors; a lane holds head_dim / 32 outputs.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"

namespace {

constexpr int WARPS = 4;
constexpr int THREADS = WARPS * 32;
constexpr int KT = 32;  // keys per shared-memory tile (one per lane in the score step)
constexpr int MAX_PER_WARP = 8;
constexpr int MAX_Q = WARPS * MAX_PER_WARP;  // query vectors per block
constexpr int MAX_E = BRORL_CUDA_MAX_HEAD_DIM / 32;

__device__ __forceinline__ float load(float x) { return x; }
__device__ __forceinline__ float load(uint16_t x) {
  return __uint_as_float(static_cast<uint32_t>(x) << 16);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct Shape {
  int64_t page_size, hkv, D, H;
};

// rows == nullptr: block x is the row itself (suffix / paged); otherwise block x is a group,
// block z a chunk of rows_per_block entries of rows[x, :] (-1 = padding).
template <typename T>
__global__ void __launch_bounds__(THREADS)
attend_kernel(const float* __restrict__ q, const T* __restrict__ kc, const T* __restrict__ vc,
              Shape s, const int64_t* __restrict__ rows, int64_t rows_cols,
              int64_t rows_per_block, const int64_t* __restrict__ pages, int64_t pages_cols,
              const int64_t* __restrict__ lens, float scale, float* __restrict__ out,
              float* __restrict__ lse) {
  extern __shared__ float smem[];
  const int64_t D = s.D, r = s.H / s.hkv, g = blockIdx.y;
  float* qs = smem;                  // [MAX_Q, D]
  float* ks = qs + MAX_Q * D;        // [KT, D + 1] (padded against bank conflicts)
  float* vs = ks + KT * (D + 1);     // [KT, D]
  const int64_t* my_rows = rows ? rows + blockIdx.x * rows_cols + blockIdx.z * rows_per_block
                                : nullptr;
  const int64_t nrows = rows ? min(rows_per_block, rows_cols - blockIdx.z * rows_per_block) : 1;
  const int64_t* my_pages = pages + blockIdx.x * pages_cols;
  const int64_t len = lens[blockIdx.x];
  const int m = static_cast<int>(nrows * r);
  auto row_of = [&](int64_t a) -> int64_t { return my_rows ? my_rows[a] : blockIdx.x; };
  for (int64_t idx = threadIdx.x; idx < m * D; idx += THREADS) {
    const int64_t a = idx / (r * D), rem = idx % (r * D), row = row_of(a);
    qs[idx] = row >= 0 ? q[(row * s.H + g * r) * D + rem] * scale : 0.0f;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float acc[MAX_PER_WARP][MAX_E], mx[MAX_PER_WARP], l[MAX_PER_WARP];
#pragma unroll
  for (int j = 0; j < MAX_PER_WARP; ++j) {
    mx[j] = -INFINITY;
    l[j] = 0.0f;
#pragma unroll
    for (int e = 0; e < MAX_E; ++e) acc[j][e] = 0.0f;
  }
  for (int64_t t0 = 0; t0 < len; t0 += KT) {
    const int kt = static_cast<int>(min(static_cast<int64_t>(KT), len - t0));
    __syncthreads();  // the previous tile is consumed (and qs written, the first time)
    for (int64_t idx = threadIdx.x; idx < kt * D; idx += THREADS) {
      const int64_t u = idx / D, d = idx % D, t = t0 + u;
      const int64_t off = ((my_pages[t / s.page_size] * s.page_size + t % s.page_size) * s.hkv
                           + g) * D + d;
      ks[u * (D + 1) + d] = load(kc[off]);
      vs[u * D + d] = load(vc[off]);
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < MAX_PER_WARP; ++j) {
      const int i = warp + j * WARPS;
      if (i >= m) break;  // warp-uniform
      float sc = -INFINITY;
      if (lane < kt) {
        sc = 0.0f;
        for (int64_t d = 0; d < D; ++d) sc += qs[i * D + d] * ks[lane * (D + 1) + d];
      }
      const float mnew = fmaxf(mx[j], warp_max(sc));
      const float alpha = __expf(mx[j] - mnew);
      const float p = lane < kt ? __expf(sc - mnew) : 0.0f;
      l[j] = l[j] * alpha + warp_sum(p);
      mx[j] = mnew;
#pragma unroll
      for (int e = 0; e < MAX_E; ++e) acc[j][e] *= alpha;
      for (int u = 0; u < kt; ++u) {
        const float pu = __shfl_sync(0xffffffffu, p, u);
#pragma unroll
        for (int e = 0; e < MAX_E; ++e) {
          const int64_t d = lane + 32 * e;
          if (d < D) acc[j][e] += pu * vs[u * D + d];
        }
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MAX_PER_WARP; ++j) {
    const int i = warp + j * WARPS;
    if (i >= m) break;
    const int64_t row = row_of(i / r);
    if (row < 0) continue;
    const int64_t h = row * s.H + g * r + i % r;
    const float inv = len > 0 ? 1.0f / l[j] : 0.0f;
#pragma unroll
    for (int e = 0; e < MAX_E; ++e) {
      const int64_t d = lane + 32 * e;
      if (d < D) out[h * D + d] = acc[j][e] * inv;
    }
    if (lane == 0) lse[h] = len > 0 ? mx[j] + logf(l[j]) : -INFINITY;
  }
}

template <typename T>
int launch_attend(const float* q, const BrorlKV& kv, int64_t num_heads, int64_t grid_x,
                  const int64_t* rows, int64_t rows_cols, const int64_t* pages,
                  int64_t pages_cols, const int64_t* lens, float scale, float* out, float* lse,
                  cudaStream_t stream) {
  if (grid_x == 0) return 0;
  const Shape s{kv.page_size, kv.num_kv_heads, kv.head_dim, num_heads};
  const int64_t r = num_heads / kv.num_kv_heads;
  const int64_t per_block = rows ? (MAX_Q / r > 0 ? MAX_Q / r : 1) : 1;
  const int64_t chunks = rows ? (rows_cols + per_block - 1) / per_block : 1;
  if (chunks == 0) return 0;
  const size_t smem = sizeof(float) * (MAX_Q * s.D + KT * (s.D + 1) + KT * s.D);
  auto kernel = attend_kernel<T>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
  if (err != cudaSuccess) return static_cast<int>(err);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(s.hkv),
                  static_cast<unsigned>(chunks));
  kernel<<<grid, THREADS, smem, stream>>>(q, static_cast<const T*>(kv.k),
                                          static_cast<const T*>(kv.v), s, rows, rows_cols,
                                          per_block, pages, pages_cols, lens, scale, out, lse);
  return static_cast<int>(cudaGetLastError());
}

int attend(const float* q, const BrorlKV& kv, int64_t num_heads, int64_t grid_x,
           const int64_t* rows, int64_t rows_cols, const int64_t* pages, int64_t pages_cols,
           const int64_t* lens, float scale, float* out, float* lse, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  return kv.kv_bf16 ? launch_attend<uint16_t>(q, kv, num_heads, grid_x, rows, rows_cols, pages,
                                              pages_cols, lens, scale, out, lse, st)
                    : launch_attend<float>(q, kv, num_heads, grid_x, rows, rows_cols, pages,
                                           pages_cols, lens, scale, out, lse, st);
}

}  // namespace

int brorl_cuda_paged_decode(const float* q, BrorlKV kv, int64_t batch, int64_t num_heads,
                            const int64_t* pages, int64_t pages_cols, const int64_t* lens,
                            float scale, float* out, float* lse, void* stream) {
  // Every row is in exactly one block, so `out` and `lse` are fully written.
  return attend(q, kv, num_heads, batch, nullptr, 0, pages, pages_cols, lens, scale, out, lse,
                stream);
}

int brorl_cuda_cascade_decode(const float* q, BrorlKV kv, int64_t batch, int64_t num_heads,
                              const int64_t* group_rows, int64_t groups, int64_t group_cols,
                              const int64_t* prefix_pages, int64_t prefix_cols,
                              const int64_t* prefix_lens, const int64_t* suffix_pages,
                              int64_t suffix_cols, const int64_t* suffix_lens, float scale,
                              float* o_p, float* l_p, float* o_s, float* l_s, float* out,
                              void* stream) {
  int err = attend(q, kv, num_heads, groups, group_rows, group_cols, prefix_pages, prefix_cols,
                   prefix_lens, scale, o_p, l_p, stream);
  if (err) return err;
  err = brorl_cuda_paged_decode(q, kv, batch, num_heads, suffix_pages, suffix_cols,
                                suffix_lens, scale, o_s, l_s, stream);
  if (err) return err;
  return brorl_cuda_merge_states(o_p, l_p, o_s, l_s, batch * num_heads, kv.head_dim, out,
                                 nullptr, stream);
}
