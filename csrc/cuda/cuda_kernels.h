// Host entry points of the CUDA decode-attention kernels (cascade_decode.cu,
// merge_states.cu). Plain C types only, so that the pybind11 binding compiles without CUDA
// or torch headers. Pointers are device pointers; `stream` is a cudaStream_t (0: default).
// Each returns a cudaError_t as int (0 = success); brorl_cuda_error_string describes one.
// Layout as kernels/decode_attention.py: KV [num_pages, page_size, num_kv_heads, head_dim]
// (float32, or bfloat16 when kv_bf16), q [B, H, D] float32, outputs float32.
#pragma once

#include <cstdint>

struct BrorlKV {
  const void* k;
  const void* v;
  int kv_bf16;
  int64_t page_size, num_kv_heads, head_dim;
};

// Paged decode: row b against the first lens[b] tokens of pages[b, :]. out [B, H, D], lse [B, H].
int brorl_cuda_paged_decode(const float* q, BrorlKV kv, int64_t batch, int64_t num_heads,
                            const int64_t* pages, int64_t pages_cols, const int64_t* lens,
                            float scale, float* out, float* lse, void* stream);

// Cascade decode. Workspace: o_p, o_s [B, H, D], l_p, l_s [B, H]; o_p must hold 0 and l_p
// -inf for rows in no group (the prefix stage writes only grouped rows). out [B, H, D].
int brorl_cuda_cascade_decode(const float* q, BrorlKV kv, int64_t batch, int64_t num_heads,
                              const int64_t* group_rows, int64_t groups, int64_t group_cols,
                              const int64_t* prefix_pages, int64_t prefix_cols,
                              const int64_t* prefix_lens, const int64_t* suffix_pages,
                              int64_t suffix_cols, const int64_t* suffix_lens, float scale,
                              float* o_p, float* l_p, float* o_s, float* l_s, float* out,
                              void* stream);

// Exact LSE merge of n partial results of size D: out [n, D] (lse_out [n] unless null).
int brorl_cuda_merge_states(const float* o_a, const float* lse_a, const float* o_b,
                            const float* lse_b, int64_t n, int64_t head_dim, float* out,
                            float* lse_out, void* stream);

const char* brorl_cuda_error_string(int code);

// Largest supported values (checked by the binding).
constexpr int64_t BRORL_CUDA_MAX_HEAD_DIM = 256;
constexpr int64_t BRORL_CUDA_MAX_GROUP_RATIO = 32;
