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

// exp(x) for x <= ~88 with relative error ~2e-7, written without branches or libm calls so
// that loops over it vectorise; exp(-inf) and anything below 2^-126 give 0.
inline float fast_exp(float x) {
  float y = x * 1.4426950408889634f;  // log2(e)
  const bool tiny = y < -126.0f;
  y = tiny ? -126.0f : y;
  const float n = __builtin_floorf(y + 0.5f);
  const float f = y - n;  // [-0.5, 0.5]
  // 2^f = e^(f ln 2): Taylor series to degree 7.
  float p = 1.5252733e-5f;
  p = p * f + 1.5403530e-4f;
  p = p * f + 1.3333558e-3f;
  p = p * f + 9.6181291e-3f;
  p = p * f + 5.5504109e-2f;
  p = p * f + 2.4022651e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof s);
  return tiny ? 0.0f : p * s;
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
