// Paged decode and the per-row (suffix) stage of cascade decode: one task per row and KV
// head; the query heads sharing that KV head are handled together, so each K/V row is
// loaded once for all of them. Two passes: scores for all tokens, then softmax and the
// weighted sum of V.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "kernels.h"

namespace brorl {

namespace {

template <typename T>
inline float dot(const float* q, const T* k, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < n; ++d) s += q[d] * to_f32(k[d]);
  return s;
}

template <typename T>
inline void axpy(float a, const T* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t d = 0; d < n; ++d) y[d] += a * to_f32(x[d]);
}

}  // namespace

template <typename T>
void attend_pages(const float* qh, const T* k_cache, const T* v_cache, const KVShape& kv,
                  int64_t g, int64_t r, const int64_t* pages, int64_t n, float scale, float* o,
                  float* l, std::vector<float>& sc) {
  const int64_t D = kv.head_dim, PS = kv.page_size, tok = kv.num_kv_heads * D;
  std::fill(o, o + r * D, 0.0f);
  if (n <= 0) {
    std::fill(l, l + r, -std::numeric_limits<float>::infinity());
    return;
  }
  sc.resize(static_cast<size_t>(r * n));
  float* s = sc.data();
  for (int64_t t0 = 0, p = 0; t0 < n; t0 += PS, ++p) {
    const int64_t cnt = std::min(PS, n - t0);
    const T* k = k_cache + pages[p] * PS * tok + g * D;
    for (int64_t u = 0; u < cnt; ++u, k += tok)
      for (int64_t j = 0; j < r; ++j) s[j * n + t0 + u] = dot(qh + j * D, k, D) * scale;
  }
  for (int64_t j = 0; j < r; ++j) {
    float* sj = s + j * n;
    const float m = max_of(sj, n), sum = exp_shift_sum(sj, n, m);
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t t = 0; t < n; ++t) sj[t] *= inv;
    l[j] = m + std::log(sum);
  }
  for (int64_t t0 = 0, p = 0; t0 < n; t0 += PS, ++p) {
    const int64_t cnt = std::min(PS, n - t0);
    const T* v = v_cache + pages[p] * PS * tok + g * D;
    for (int64_t u = 0; u < cnt; ++u, v += tok)
      for (int64_t j = 0; j < r; ++j) axpy(s[j * n + t0 + u], v, o + j * D, D);
  }
}

template <typename T>
void paged_decode(const float* q, const T* k_cache, const T* v_cache, KVShape kv,
                  int64_t batch, int64_t num_heads, Table page_table, const int64_t* lens,
                  float scale, float* out, float* lse) {
  const int64_t hkv = kv.num_kv_heads, r = num_heads / hkv, D = kv.head_dim;
#pragma omp parallel
  {
    std::vector<float> sc;
#pragma omp for schedule(dynamic, 4)
    for (int64_t bg = 0; bg < batch * hkv; ++bg) {
      const int64_t b = bg / hkv, g = bg % hkv, h0 = b * num_heads + g * r;
      attend_pages(q + h0 * D, k_cache, v_cache, kv, g, r, page_table.row(b), lens[b], scale,
                   out + h0 * D, lse + h0, sc);
    }
  }
}

// out/lse hold a partial result a; merges b (ob [n, D], lb [n]) into them, n heads.
void merge_into(float* out, float* lse, const float* ob, const float* lb, int64_t n,
                int64_t D) {
  for (int64_t j = 0; j < n; ++j) {
    const float la = lse[j], m0 = std::max(la, lb[j]);
    if (std::isinf(m0) && m0 < 0) {  // both empty
      std::fill(out + j * D, out + (j + 1) * D, 0.0f);
      continue;
    }
    const float wa = fast_exp(la - m0), wb = fast_exp(lb[j] - m0), total = wa + wb;
    const float ca = wa / total, cb = wb / total;
    float* o = out + j * D;
    const float* b = ob + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = o[d] * ca + b[d] * cb;
    lse[j] = m0 + std::log(total);
  }
}

template void attend_pages<float>(const float*, const float*, const float*, const KVShape&,
                                  int64_t, int64_t, const int64_t*, int64_t, float, float*,
                                  float*, std::vector<float>&);
template void attend_pages<uint16_t>(const float*, const uint16_t*, const uint16_t*,
                                     const KVShape&, int64_t, int64_t, const int64_t*,
                                     int64_t, float, float*, float*, std::vector<float>&);
template void paged_decode<float>(const float*, const float*, const float*, KVShape, int64_t,
                                  int64_t, Table, const int64_t*, float, float*, float*);
template void paged_decode<uint16_t>(const float*, const uint16_t*, const uint16_t*, KVShape,
                                     int64_t, int64_t, Table, const int64_t*, float, float*,
                                     float*);

}  // namespace brorl
