// Exact log-sum-exp merge of two partial attention results over disjoint key sets (see
// merge_states_ref in kernels/decode_attention.py): one block per (row, head) pair.
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_kernels.h"

namespace {

__global__ void merge_kernel(const float* o_a, const float* lse_a, const float* o_b,
                             const float* lse_b, int64_t head_dim, float* out,
                             float* lse_out) {
  const int64_t i = blockIdx.x;
  const float la = lse_a[i], lb = lse_b[i];
  float m = fmaxf(la, lb);
  const bool empty = isinf(m) && m < 0.0f;
  m = empty ? 0.0f : m;
  const float wa = __expf(la - m), wb = __expf(lb - m), total = wa + wb;
  const float inv = empty ? 0.0f : 1.0f / total;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x)
    out[i * head_dim + d] = (o_a[i * head_dim + d] * wa + o_b[i * head_dim + d] * wb) * inv;
  if (lse_out != nullptr && threadIdx.x == 0) lse_out[i] = m + logf(total);
}

}  // namespace

int brorl_cuda_merge_states(const float* o_a, const float* lse_a, const float* o_b,
                            const float* lse_b, int64_t n, int64_t head_dim, float* out,
                            float* lse_out, void* stream) {
  if (n == 0) return 0;
  const int threads = head_dim >= 128 ? 128 : (head_dim >= 64 ? 64 : 32);
  merge_kernel<<<static_cast<unsigned>(n), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      o_a, lse_a, o_b, lse_b, head_dim, out, lse_out);
  return static_cast<int>(cudaGetLastError());
}

const char* brorl_cuda_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}
