// Building blocks shared by the paged and cascade kernels (internal to the extension).
#pragma once

#include <cstdint>
#include <vector>

#include "attention.h"

namespace brorl {

// The r query heads qh [r, D] (KV head g) against the first n tokens of `pages`:
// o [r, D] and l [r] (partial result; n == 0 gives 0 and -inf). sc is scratch.
template <typename T>
void attend_pages(const float* qh, const T* k_cache, const T* v_cache, const KVShape& kv,
                  int64_t g, int64_t r, const int64_t* pages, int64_t n, float scale, float* o,
                  float* l, std::vector<float>& sc);

// Exact log-sum-exp merge of partial result (ob, lb) into (out, lse), n heads of size D.
void merge_into(float* out, float* lse, const float* ob, const float* lb, int64_t n,
                int64_t D);

}  // namespace brorl
