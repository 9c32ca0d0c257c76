// pybind11 binding of the CUDA decode-attention kernels (module brorl.kernels._cuda_ext) on raw
// device pointers passed as ints, with shapes as ints; no CUDA or torch headers. The typed,
// checking launcher is kernels/cascade_cuda.py; this layer checks what it can without
// touching device memory (sizes, ratios, null pointers) and turns CUDA errors into
// RuntimeError.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cuda_kernels.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

void check(int code, const char* what) {
  if (code != 0)
    throw std::runtime_error(std::string(what) + ": " + brorl_cuda_error_string(code));
}

BrorlKV make_kv(uintptr_t k, uintptr_t v, bool bf16, int64_t page_size, int64_t kv_heads,
                int64_t head_dim, int64_t num_heads) {
  if (!k || !v) throw std::invalid_argument("k_cache and v_cache pointers must be non-null");
  if (page_size < 1 || kv_heads < 1 || head_dim < 1)
    throw std::invalid_argument("page_size, num_kv_heads and head_dim must be positive");
  if (head_dim > BRORL_CUDA_MAX_HEAD_DIM)
    throw std::invalid_argument("head_dim " + std::to_string(head_dim) + " exceeds " +
                                std::to_string(BRORL_CUDA_MAX_HEAD_DIM));
  if (num_heads % kv_heads || num_heads / kv_heads > BRORL_CUDA_MAX_GROUP_RATIO)
    throw std::invalid_argument(std::to_string(num_heads) + " query heads must be a multiple "
                                "of, and at most 32x, " + std::to_string(kv_heads) +
                                " KV heads");
  return BrorlKV{ptr<const void>(k), ptr<const void>(v), bf16 ? 1 : 0, page_size, kv_heads,
                 head_dim};
}

void paged_decode(uintptr_t q, uintptr_t k, uintptr_t v, bool bf16, int64_t page_size,
                  int64_t kv_heads, int64_t head_dim, int64_t batch, int64_t num_heads,
                  uintptr_t pages, int64_t pages_cols, uintptr_t lens, float scale,
                  uintptr_t out, uintptr_t lse, uintptr_t stream) {
  const BrorlKV kv = make_kv(k, v, bf16, page_size, kv_heads, head_dim, num_heads);
  py::gil_scoped_release release;
  check(brorl_cuda_paged_decode(ptr<const float>(q), kv, batch, num_heads,
                                ptr<const int64_t>(pages), pages_cols, ptr<const int64_t>(lens),
                                scale, ptr<float>(out), ptr<float>(lse), ptr<void>(stream)),
        "paged_decode");
}

void cascade_decode(uintptr_t q, uintptr_t k, uintptr_t v, bool bf16, int64_t page_size,
                    int64_t kv_heads, int64_t head_dim, int64_t batch, int64_t num_heads,
                    uintptr_t group_rows, int64_t groups, int64_t group_cols,
                    uintptr_t prefix_pages, int64_t prefix_cols, uintptr_t prefix_lens,
                    uintptr_t suffix_pages, int64_t suffix_cols, uintptr_t suffix_lens,
                    float scale, uintptr_t o_p, uintptr_t l_p, uintptr_t o_s, uintptr_t l_s,
                    uintptr_t out, uintptr_t stream) {
  const BrorlKV kv = make_kv(k, v, bf16, page_size, kv_heads, head_dim, num_heads);
  py::gil_scoped_release release;
  check(brorl_cuda_cascade_decode(
            ptr<const float>(q), kv, batch, num_heads, ptr<const int64_t>(group_rows), groups,
            group_cols, ptr<const int64_t>(prefix_pages), prefix_cols,
            ptr<const int64_t>(prefix_lens), ptr<const int64_t>(suffix_pages), suffix_cols,
            ptr<const int64_t>(suffix_lens), scale, ptr<float>(o_p), ptr<float>(l_p),
            ptr<float>(o_s), ptr<float>(l_s), ptr<float>(out), ptr<void>(stream)),
        "cascade_decode");
}

void merge_states(uintptr_t o_a, uintptr_t lse_a, uintptr_t o_b, uintptr_t lse_b, int64_t n,
                  int64_t head_dim, uintptr_t out, uintptr_t lse_out, uintptr_t stream) {
  if (n < 0 || head_dim < 1) throw std::invalid_argument("n must be >= 0 and head_dim >= 1");
  py::gil_scoped_release release;
  check(brorl_cuda_merge_states(ptr<const float>(o_a), ptr<const float>(lse_a),
                                ptr<const float>(o_b), ptr<const float>(lse_b), n, head_dim,
                                ptr<float>(out), ptr<float>(lse_out), ptr<void>(stream)),
        "merge_states");
}

}  // namespace

PYBIND11_MODULE(_cuda_ext, m) {
  m.doc() = "CUDA cascade decode attention and LSE merge on raw device pointers";
  m.def("paged_decode", &paged_decode, "paged decode into out [B, H, D], lse [B, H]");
  m.def("cascade_decode", &cascade_decode,
        "cascade decode into out [B, H, D] (workspace o_p/l_p initialised to 0/-inf)");
  m.def("merge_states", &merge_states, "LSE merge of two partial results");
}
