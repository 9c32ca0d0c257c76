// Cascade (shared-prefix) decode. Stage 1: per group, KV head and block of the group's rows,
// the block's queries x query heads form an [m, D] tile that runs against the group's
// prefix as blocked matrix products with an online softmax (key blocks of KB tokens copied
// to float once per task: K transposed for the Q K^T product, V row-major for P V); the
// prefix of one (group, KV head) stays in cache across the blocks. Stage 2: per row and
// KV head, the private suffix (attend_pages), merged exactly into the prefix result.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "attention.h"
#include "kernels.h"

namespace brorl {

namespace {

constexpr int64_t KB = 64;  // keys per block
constexpr int64_t DC = 64;  // head_dim chunk held in registers in P V
constexpr int64_t MB = 128;  // target query vectors per stage-1 task
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// S [NR, KB] = Q [NR, D] @ Kt [D, KB].
template <int NR>
inline void qk_tile(const float* Q, int64_t D, const float* Kt, float* S) {
  float acc[NR][KB] = {};
  for (int64_t d = 0; d < D; ++d) {
    const float* k = Kt + d * KB;
    for (int i = 0; i < NR; ++i) {
      const float qv = Q[i * D + d];
#pragma omp simd
      for (int64_t u = 0; u < KB; ++u) acc[i][u] += qv * k[u];
    }
  }
  for (int i = 0; i < NR; ++i) std::copy(acc[i], acc[i] + KB, S + i * KB);
}

// O [NR, D] += P [NR, :kb] (row stride KB) @ V [kb, D].
template <int NR>
inline void pv_tile(const float* P, const float* V, int64_t D, int64_t kb, float* O) {
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    if (d0 + DC > D) {  // ragged tail of head_dim
      for (int i = 0; i < NR; ++i)
        for (int64_t u = 0; u < kb; ++u)
          for (int64_t c = d0; c < D; ++c) O[i * D + c] += P[i * KB + u] * V[u * D + c];
      break;
    }
    float acc[NR][DC];
    for (int i = 0; i < NR; ++i) std::copy(O + i * D + d0, O + i * D + d0 + DC, acc[i]);
    for (int64_t u = 0; u < kb; ++u) {
      const float* v = V + u * D + d0;
      for (int i = 0; i < NR; ++i) {
        const float p = P[i * KB + u];
#pragma omp simd
        for (int64_t c = 0; c < DC; ++c) acc[i][c] += p * v[c];
      }
    }
    for (int i = 0; i < NR; ++i) std::copy(acc[i], acc[i] + DC, O + i * D + d0);
  }
}

struct Scratch {
  std::vector<float> q, o, kt, v, s, mx, l, os, ls, sc;
};

// Loads keys [t0, t0 + kb) of KV head g: kt [D, KB] transposed, v [kb, D].
template <typename T>
void load_block(const T* kc, const T* vc, const KVShape& kv, int64_t g, const int64_t* pages,
                int64_t t0, int64_t kb, float* kt, float* v) {
  const int64_t D = kv.head_dim, PS = kv.page_size, tok = kv.num_kv_heads * D;
  for (int64_t u = 0; u < kb; ++u) {
    const int64_t t = t0 + u, off = (pages[t / PS] * PS + t % PS) * tok + g * D;
    const T* k = kc + off;
    const T* vv = vc + off;
    for (int64_t d = 0; d < D; ++d) kt[d * KB + u] = to_f32(k[d]);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[u * D + d] = to_f32(vv[d]);
  }
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * KB + kb, kt + (d + 1) * KB, 0.0f);
}

// Online-softmax update of m query rows with the scores s [m, KB] of a kb-key block:
// s becomes the unnormalised probabilities, o is rescaled.
void softmax_update(float* s, int64_t m, int64_t kb, int64_t D, float* mx, float* l,
                    float* o) {
  for (int64_t i = 0; i < m; ++i) {
    float* si = s + i * KB;
    float bm = si[0];
    for (int64_t u = 1; u < kb; ++u) bm = std::max(bm, si[u]);
    const float mnew = std::max(mx[i], bm), alpha = fast_exp(mx[i] - mnew);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t u = 0; u < kb; ++u) {
      si[u] = fast_exp(si[u] - mnew);
      sum += si[u];
    }
    l[i] = l[i] * alpha + sum;
    mx[i] = mnew;
    if (alpha != 1.0f) {
      float* oi = o + i * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) oi[d] *= alpha;
    }
  }
}

// Stage 1 for `nrows` rows of one group and KV head g: writes out and lse of their heads.
template <typename T>
void prefix_task(const float* q, const T* kc, const T* vc, const KVShape& kv, int64_t H,
                 const int64_t* rows, int64_t nrows, int64_t g, const int64_t* pages,
                 int64_t len, float scale, float* out, float* lse, Scratch& w) {
  const int64_t D = kv.head_dim, r = H / kv.num_kv_heads, m = nrows * r;
  w.q.resize(m * D);
  for (int64_t a = 0; a < nrows; ++a) {
    const float* src = q + (rows[a] * H + g * r) * D;
    for (int64_t e = 0; e < r * D; ++e) w.q[a * r * D + e] = src[e] * scale;
  }
  w.o.assign(m * D, 0.0f);
  w.mx.assign(m, NEG_INF);
  w.l.assign(m, 0.0f);
  w.kt.resize(D * KB);
  w.v.resize(KB * D);
  w.s.resize(m * KB);
  for (int64_t t0 = 0; t0 < len; t0 += KB) {
    const int64_t kb = std::min(KB, len - t0);
    load_block(kc, vc, kv, g, pages, t0, kb, w.kt.data(), w.v.data());
    int64_t i = 0;
    for (; i + 4 <= m; i += 4) qk_tile<4>(w.q.data() + i * D, D, w.kt.data(), w.s.data() + i * KB);
    for (; i < m; ++i) qk_tile<1>(w.q.data() + i * D, D, w.kt.data(), w.s.data() + i * KB);
    softmax_update(w.s.data(), m, kb, D, w.mx.data(), w.l.data(), w.o.data());
    for (i = 0; i + 4 <= m; i += 4)
      pv_tile<4>(w.s.data() + i * KB, w.v.data(), D, kb, w.o.data() + i * D);
    for (; i < m; ++i) pv_tile<1>(w.s.data() + i * KB, w.v.data(), D, kb, w.o.data() + i * D);
  }
  for (int64_t a = 0; a < nrows; ++a) {
    for (int64_t j = 0; j < r; ++j) {
      const int64_t i = a * r + j, h = rows[a] * H + g * r + j;
      const float inv = len > 0 ? 1.0f / w.l[i] : 0.0f;
      for (int64_t d = 0; d < D; ++d) out[h * D + d] = w.o[i * D + d] * inv;
      lse[h] = len > 0 ? w.mx[i] + std::log(w.l[i]) : NEG_INF;
    }
  }
}

struct Task {
  int64_t group, start, count, g;
};

}  // namespace

template <typename T>
void cascade_decode(const float* q, const T* k_cache, const T* v_cache, KVShape kv,
                    int64_t batch, int64_t num_heads, Table group_rows, Table prefix_pages,
                    const int64_t* prefix_lens, Table suffix_pages, const int64_t* suffix_lens,
                    float scale, float* out) {
  const int64_t hkv = kv.num_kv_heads, r = num_heads / hkv, D = kv.head_dim;
  std::fill(out, out + batch * num_heads * D, 0.0f);
  std::vector<float> lse(batch * num_heads, NEG_INF);
  // Valid rows of each group, compacted in place order; tasks over blocks of them.
  std::vector<int64_t> rows, first(group_rows.rows + 1, 0);
  std::vector<Task> tasks;
  const int64_t per_task = std::max<int64_t>(1, MB / r);
  for (int64_t gi = 0; gi < group_rows.rows; ++gi) {
    for (int64_t c = 0; c < group_rows.cols; ++c)
      if (group_rows.row(gi)[c] >= 0) rows.push_back(group_rows.row(gi)[c]);
    first[gi + 1] = static_cast<int64_t>(rows.size());
    for (int64_t s = first[gi]; s < first[gi + 1]; s += per_task)
      for (int64_t g = 0; g < hkv; ++g)
        tasks.push_back({gi, s, std::min(per_task, first[gi + 1] - s), g});
  }
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel
  {
    Scratch w;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < num_tasks; ++k) {
      const Task& t = tasks[k];
      prefix_task(q, k_cache, v_cache, kv, num_heads, rows.data() + t.start, t.count, t.g,
                  prefix_pages.row(t.group), prefix_lens[t.group], scale, out, lse.data(), w);
    }
    w.os.resize(r * D);
    w.ls.resize(r);
#pragma omp for schedule(dynamic, 4)
    for (int64_t bg = 0; bg < batch * hkv; ++bg) {
      const int64_t b = bg / hkv, g = bg % hkv, h0 = b * num_heads + g * r;
      attend_pages(q + h0 * D, k_cache, v_cache, kv, g, r, suffix_pages.row(b), suffix_lens[b],
                   scale, w.os.data(), w.ls.data(), w.sc);
      merge_into(out + h0 * D, lse.data() + h0, w.os.data(), w.ls.data(), r, D);
    }
  }
}

template void cascade_decode<float>(const float*, const float*, const float*, KVShape, int64_t,
                                    int64_t, Table, Table, const int64_t*, Table,
                                    const int64_t*, float, float*);
template void cascade_decode<uint16_t>(const float*, const uint16_t*, const uint16_t*, KVShape,
                                       int64_t, int64_t, Table, Table, const int64_t*, Table,
                                       const int64_t*, float, float*);

}  // namespace brorl
