// CPU decode attention over the engine's paged KV layout (see kernels/decode_attention.py):
// k_cache, v_cache [num_pages, page_size, num_kv_heads, head_dim] as float32 or bfloat16
// (raw uint16 bits); q [B, num_heads, head_dim] float32; query head h reads KV head
// h / (num_heads / num_kv_heads). Outputs are float32; lse is the natural-log
// log-sum-exp of the scaled scores, and an empty key set gives out 0 and lse -inf.
// Inputs are validated by the binding (bind.cpp); these functions trust them.
#pragma once

#include <cstdint>
#include <cstring>

namespace brorl {

struct KVShape {
  int64_t num_pages, page_size, num_kv_heads, head_dim;
};

// A [rows, cols] int64 table (row-major, contiguous).
struct Table {
  const int64_t* data;
  int64_t rows, cols;
  const int64_t* row(int64_t r) const { return data + r * cols; }
};

inline float to_f32(float x) { return x; }
inline float to_f32(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// GCC/Clang vectors of 16 lanes (one AVX-512 register, two AVX2 ones); aligned(4) lets
// them load from any float address.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4)));

// exp(x) for x <= ~88 with relative error ~2e-7, without branches or libm calls: 2^(x log2 e)
// split into a rounded integer n (the 1.5 * 2^23 trick: round to nearest even) and f in
// [-0.5, 0.5], 2^f by its degree-7 Taylor polynomial, 2^n built from bits. exp(-inf) and
// anything below 2^-126 give 0. The scalar and the 16-lane version give identical bits.
constexpr float kLog2e = 1.4426950408889634f, kRound = 12582912.0f;

template <typename V>
inline V exp2_poly(V f) {
  V p = f * 0.0f + 1.5252733e-5f;
  p = p * f + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  return p * f + 1.0f;
}

inline float fast_exp(float x) {
  float y = x * kLog2e;
  const bool tiny = y < -126.0f;
  y = tiny ? -126.0f : y;
  const float n = (y + kRound) - kRound;
  const float p = exp2_poly(y - n);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return tiny ? 0.0f : p * s;
}

inline v16 fast_exp(v16 x) {
  v16 y = x * kLog2e;
  const auto tiny = y < -126.0f;
  y = tiny ? v16{} - 126.0f : y;
  const v16 n = (y + kRound) - kRound;
  const v16 p = exp2_poly(y - n);
  const vi16 bits = (__builtin_convertvector(n, vi16) + 127) << 23;
  return tiny ? v16{} : p * (v16)bits;  // vector casts reinterpret the bits
}

// max(a[0], ..., a[n-1]); -inf for n == 0.
inline float max_of(const float* a, int64_t n) {
  const float neg_inf = -__builtin_inff();
  v16 m = v16{} + neg_inf;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 x = *reinterpret_cast<const v16*>(a + i);
    m = x > m ? x : m;
  }
  float r = neg_inf;
  for (int j = 0; j < 16; ++j) r = m[j] > r ? m[j] : r;
  for (; i < n; ++i) r = a[i] > r ? a[i] : r;
  return r;
}

// a[i] = exp(a[i] - m) for i < n; returns their sum.
inline float exp_shift_sum(float* a, int64_t n, float m) {
  v16 acc{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    v16* x = reinterpret_cast<v16*>(a + i);
    *x = fast_exp(*x - m);
    acc += *x;
  }
  float sum = 0.0f;
  for (int j = 0; j < 16; ++j) sum += acc[j];
  for (; i < n; ++i) {
    a[i] = fast_exp(a[i] - m);
    sum += a[i];
  }
  return sum;
}

// out [B, H, D], lse [B, H]: each row b against the first lens[b] tokens of its pages.
template <typename T>
void paged_decode(const float* q, const T* k_cache, const T* v_cache, KVShape kv,
                  int64_t batch, int64_t num_heads, Table page_table, const int64_t* lens,
                  float scale, float* out, float* lse);

// Cascade decode: the rows of each group (group_rows, -1 = padding) against the group's
// prefix pages, each row against its suffix pages, merged exactly. out [B, H, D].
template <typename T>
void cascade_decode(const float* q, const T* k_cache, const T* v_cache, KVShape kv,
                    int64_t batch, int64_t num_heads, Table group_rows, Table prefix_pages,
                    const int64_t* prefix_lens, Table suffix_pages, const int64_t* suffix_lens,
                    float scale, float* out);

}  // namespace brorl
