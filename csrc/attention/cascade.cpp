// Cascade (shared-prefix) decode. Stage 1: per group, KV head and block of the group's rows,
// the block's queries x query heads form an [m, D] tile that runs against the group's
// prefix in chunks of LC keys: S = Q K^T for the whole chunk (register-tiled, MR query rows
// x 64 keys in 4 * MR vector accumulators), one exact softmax pass per row over the chunk
// (rescaling earlier chunks online), then O += P V (MR rows x 64 columns). Each chunk's K is
// copied to float once per task, transposed for Q K^T, and V row-major; the prefix of one
// (group, KV head) stays in cache across the blocks of rows. Stage 2: per row and KV head,
// the private suffix (attend_pages), merged exactly into the prefix result.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention.h"
#include "kernels.h"

namespace brorl {

namespace {

constexpr int64_t LC = 256;  // prefix keys per chunk (the chunk's scores stay in L2)
constexpr int64_t NK = 64;   // keys per register tile of Q K^T
constexpr int64_t MB = 128;  // target query vectors per stage-1 task
constexpr int MR = 6;        // query rows per register tile: 6 x 4 accumulators + 4 loads
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline v16 splat(float x) { return v16{} + x; }

// S [R, NK] (row stride lds) = Q [R, D] @ Kt [D, NK] (row stride ldk).
template <int R>
inline void qk_micro(const float* Q, int64_t D, const float* Kt, int64_t ldk, float* S,
                     int64_t lds) {
  v16 acc[R][4] = {};
  for (int64_t d = 0; d < D; ++d) {
    const v16* k = reinterpret_cast<const v16*>(Kt + d * ldk);
    const v16 k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3];
    for (int i = 0; i < R; ++i) {
      const v16 q = splat(Q[i * D + d]);
      acc[i][0] += q * k0;
      acc[i][1] += q * k1;
      acc[i][2] += q * k2;
      acc[i][3] += q * k3;
    }
  }
  for (int i = 0; i < R; ++i) {
    v16* s = reinterpret_cast<v16*>(S + i * lds);
    s[0] = acc[i][0];
    s[1] = acc[i][1];
    s[2] = acc[i][2];
    s[3] = acc[i][3];
  }
}

// O [R, 16 * NV] (row stride D) += P [R, kb] (row stride ldp) @ V [kb, 16 * NV] (stride D).
template <int R, int NV>
inline void pv_micro(const float* P, int64_t ldp, const float* V, int64_t D, int64_t kb,
                     float* O) {
  v16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) acc[i][c] = reinterpret_cast<const v16*>(O + i * D)[c];
  for (int64_t u = 0; u < kb; ++u) {
    const v16* v = reinterpret_cast<const v16*>(V + u * D);
    v16 vv[NV];
    for (int c = 0; c < NV; ++c) vv[c] = v[c];
    for (int i = 0; i < R; ++i) {
      const v16 p = splat(P[i * ldp + u]);
      for (int c = 0; c < NV; ++c) acc[i][c] += p * vv[c];
    }
  }
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < NV; ++c) reinterpret_cast<v16*>(O + i * D)[c] = acc[i][c];
}

// Row counts below MR dispatch to the matching instantiation.
template <int R>
void qk_rows(const float* Q, int64_t D, const float* Kt, int64_t ldk, int64_t kpad, float* S,
             int64_t lds) {
  for (int64_t j = 0; j < kpad; j += NK) qk_micro<R>(Q, D, Kt + j, ldk, S + j, lds);
}

template <int R>
void pv_rows(const float* P, int64_t ldp, const float* V, int64_t D, int64_t kb, float* O) {
  int64_t c = 0;
  for (; c + 64 <= D; c += 64) pv_micro<R, 4>(P, ldp, V + c, D, kb, O + c);
  for (; c + 16 <= D; c += 16) pv_micro<R, 1>(P, ldp, V + c, D, kb, O + c);
  for (int i = 0; i < R; ++i)  // head_dim not a multiple of 16: scalar tail
    for (int64_t u = 0; u < kb; ++u)
      for (int64_t e = c; e < D; ++e) O[i * D + e] += P[i * ldp + u] * V[u * D + e];
}

template <typename F>
void for_row_tiles(int64_t m, F&& f) {
  int64_t i = 0;
  for (; i + MR <= m; i += MR) f(i, std::integral_constant<int, MR>{});
  switch (m - i) {
    case 5: f(i, std::integral_constant<int, 5>{}); break;
    case 4: f(i, std::integral_constant<int, 4>{}); break;
    case 3: f(i, std::integral_constant<int, 3>{}); break;
    case 2: f(i, std::integral_constant<int, 2>{}); break;
    case 1: f(i, std::integral_constant<int, 1>{}); break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> q, o, kt, v, s, mx, l, os, ls, sc;
};

// Loads keys [t0, t0 + kb) of KV head g: kt [D, kpad] transposed (columns from kb on are
// 0), v [kpad, D] (rows from kb on are 0).
template <typename T>
void load_chunk(const T* kc, const T* vc, const KVShape& kv, int64_t g, const int64_t* pages,
                int64_t t0, int64_t kb, int64_t kpad, float* kt, float* v) {
  const int64_t D = kv.head_dim, PS = kv.page_size, tok = kv.num_kv_heads * D;
  for (int64_t u = 0; u < kb; ++u) {
    const int64_t t = t0 + u, off = (pages[t / PS] * PS + t % PS) * tok + g * D;
    const T* k = kc + off;
    const T* vv = vc + off;
    for (int64_t d = 0; d < D; ++d) kt[d * kpad + u] = to_f32(k[d]);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) v[u * D + d] = to_f32(vv[d]);
  }
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * kpad + kb, kt + (d + 1) * kpad, 0.0f);
  std::fill(v + kb * D, v + kpad * D, 0.0f);
}

// Online-softmax update of m query rows with the scores s [m, kpad] of a kb-key chunk:
// s becomes the unnormalised probabilities (0 past kb), o is rescaled.
void softmax_update(float* s, int64_t m, int64_t kb, int64_t kpad, int64_t D, float* mx,
                    float* l, float* o) {
  for (int64_t i = 0; i < m; ++i) {
    float* si = s + i * kpad;
    const float mnew = std::max(mx[i], max_of(si, kb)), alpha = fast_exp(mx[i] - mnew);
    const float sum = exp_shift_sum(si, kb, mnew);
    std::fill(si + kb, si + kpad, 0.0f);
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
  w.kt.resize(D * LC);
  w.v.resize(LC * D);
  w.s.resize(m * LC);
  for (int64_t t0 = 0; t0 < len; t0 += LC) {
    const int64_t kb = std::min(LC, len - t0), kpad = (kb + NK - 1) / NK * NK;
    load_chunk(kc, vc, kv, g, pages, t0, kb, kpad, w.kt.data(), w.v.data());
    const float *Q = w.q.data(), *Kt = w.kt.data(), *V = w.v.data();
    float *S = w.s.data(), *O = w.o.data();
    for_row_tiles(m, [&](int64_t i, auto R) {
      qk_rows<decltype(R)::value>(Q + i * D, D, Kt, kpad, kpad, S + i * kpad, kpad);
    });
    softmax_update(S, m, kb, kpad, D, w.mx.data(), w.l.data(), O);
    for_row_tiles(m, [&](int64_t i, auto R) {
      pv_rows<decltype(R)::value>(S + i * kpad, kpad, V, D, kb, O + i * D);
    });
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
