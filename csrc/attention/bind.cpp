// pybind11 binding of the CPU attention kernels (module brorl.kernels._attention_ext). Takes numpy
// arrays (torch tensors via .numpy(), zero-copy; bfloat16 KV as its int16/uint16 bits),
// checks every input, and raises ValueError (std::invalid_argument) or IndexError
// (std::out_of_range) instead of reading out of bounds. The GIL is released while the
// OpenMP kernels run, on copies of the index tables checked while it was held.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"

namespace py = pybind11;

namespace {

using brorl::KVShape;
using brorl::Table;

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

std::string shape_of(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

void check_array(const py::array& a, const char* name, py::ssize_t ndim, char kind,
                 py::ssize_t itemsize, const char* want) {
  const char k = a.dtype().kind();
  const bool kind_ok = k == kind || (kind == 'i' && itemsize == 2 && k == 'u');
  if (!kind_ok || a.dtype().itemsize() != itemsize)
    bad(std::string(name) + " must be " + want + ", got dtype " +
        std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    bad(std::string(name) + " must have " + std::to_string(ndim) + " dims, got shape " +
        shape_of(a));
  // The kernels read native-endian, naturally aligned elements (e.g. a '>f4' array would
  // be read as garbage, and an unaligned one is undefined behaviour for the vector loads).
  const char order = a.dtype().byteorder();
  if (order != '=' && order != '|' && a.dtype().itemsize() > 1)
    bad(std::string(name) + " must be in native byte order, got dtype " +
        std::string(py::str(a.dtype())));
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_))
    bad(std::string(name) + " must be aligned to its element size");
  if (!(a.flags() & py::array::c_style)) bad(std::string(name) + " must be C-contiguous");
}

// Index tables and lengths are copied (into `copy`) while the GIL is held and checked on
// the copy, which the kernels then read: another Python thread may change the caller's
// array once the GIL is released, and a page id changed after its check would be read out
// of bounds. They are small beside the KV.

// An int64 [rows, *] table whose entries lie in [lo, hi) (IndexError otherwise).
Table index_table(const py::array& a, const char* name, int64_t rows, int64_t lo, int64_t hi,
                  std::vector<int64_t>& copy) {
  check_array(a, name, 2, 'i', 8, "int64");
  if (a.shape(0) != rows)
    bad(std::string(name) + " must have " + std::to_string(rows) + " rows, got shape " +
        shape_of(a));
  const auto* src = static_cast<const int64_t*>(a.data());
  copy.assign(src, src + a.shape(0) * a.shape(1));
  Table t{copy.data(), a.shape(0), a.shape(1)};
  for (int64_t i = 0; i < t.rows * t.cols; ++i)
    if (t.data[i] < lo || t.data[i] >= hi)
      throw std::out_of_range(std::string(name) + " holds " + std::to_string(t.data[i]) +
                              ", outside [" + std::to_string(lo) + ", " + std::to_string(hi) +
                              ")");
  return t;
}

// int64 [n] lengths, each in [0, max_len].
const int64_t* lengths(const py::array& a, const char* name, int64_t n, int64_t max_len,
                       std::vector<int64_t>& copy) {
  check_array(a, name, 1, 'i', 8, "int64");
  if (a.shape(0) != n)
    bad(std::string(name) + " must have " + std::to_string(n) + " entries, got shape " +
        shape_of(a));
  const auto* src = static_cast<const int64_t*>(a.data());
  copy.assign(src, src + n);
  const int64_t* p = copy.data();
  for (int64_t i = 0; i < n; ++i)
    if (p[i] < 0 || p[i] > max_len)
      bad(std::string(name) + "[" + std::to_string(i) + "] = " + std::to_string(p[i]) +
          " is outside [0, pages * page_size = " + std::to_string(max_len) + "]");
  return p;
}

struct Inputs {
  KVShape kv;
  bool bf16;
  int64_t batch, heads;
};

Inputs check_qkv(const py::array& q, const py::array& k, const py::array& v) {
  check_array(q, "q", 3, 'f', 4, "float32");
  const bool bf16 = k.dtype().itemsize() == 2;
  const char* want = "float32 or bfloat16 bits (int16/uint16)";
  check_array(k, "k_cache", 4, bf16 ? 'i' : 'f', bf16 ? 2 : 4, want);
  check_array(v, "v_cache", 4, bf16 ? 'i' : 'f', bf16 ? 2 : 4, "the dtype of k_cache");
  for (py::ssize_t i = 0; i < 4; ++i)
    if (k.shape(i) != v.shape(i))
      bad("k_cache " + shape_of(k) + " and v_cache " + shape_of(v) + " differ in shape");
  KVShape kv{k.shape(0), k.shape(1), k.shape(2), k.shape(3)};
  if (kv.page_size < 1 || kv.num_kv_heads < 1) bad("k_cache has an empty page or head axis");
  if (q.shape(2) != kv.head_dim)
    bad("q " + shape_of(q) + " and k_cache " + shape_of(k) + " differ in head_dim");
  if (q.shape(1) % kv.num_kv_heads)
    bad(std::to_string(q.shape(1)) + " query heads do not group over " +
        std::to_string(kv.num_kv_heads) + " KV heads");
  return {kv, bf16, q.shape(0), q.shape(1)};
}

py::tuple paged_decode(const py::array& q, const py::array& k, const py::array& v,
                       const py::array& page_table, const py::array& seq_lens, float scale) {
  const Inputs in = check_qkv(q, k, v);
  std::vector<int64_t> pt_copy, lens_copy;
  const Table pt = index_table(page_table, "page_table", in.batch, 0, in.kv.num_pages, pt_copy);
  const int64_t* lens = lengths(seq_lens, "seq_lens", in.batch, pt.cols * in.kv.page_size,
                                lens_copy);
  py::array_t<float> out({in.batch, in.heads, in.kv.head_dim});
  py::array_t<float> lse({in.batch, in.heads});
  const auto* qp = static_cast<const float*>(q.data());
  float *op = out.mutable_data(), *lp = lse.mutable_data();
  {
    py::gil_scoped_release release;
    if (in.bf16)
      brorl::paged_decode(qp, static_cast<const uint16_t*>(k.data()),
                          static_cast<const uint16_t*>(v.data()), in.kv, in.batch, in.heads, pt,
                          lens, scale, op, lp);
    else
      brorl::paged_decode(qp, static_cast<const float*>(k.data()),
                          static_cast<const float*>(v.data()), in.kv, in.batch, in.heads, pt,
                          lens, scale, op, lp);
  }
  return py::make_tuple(out, lse);
}

py::array_t<float> cascade_decode(const py::array& q, const py::array& k, const py::array& v,
                                  const py::array& group_rows, const py::array& prefix_pages,
                                  const py::array& prefix_lens, const py::array& suffix_pages,
                                  const py::array& suffix_lens, float scale) {
  const Inputs in = check_qkv(q, k, v);
  check_array(group_rows, "group_rows", 2, 'i', 8, "int64");
  const int64_t groups = group_rows.shape(0);
  std::vector<int64_t> gr_copy, pp_copy, pl_copy, sp_copy, sl_copy;
  const Table gr = index_table(group_rows, "group_rows", groups, -1, in.batch, gr_copy);
  std::vector<char> seen(in.batch, 0);
  for (int64_t i = 0; i < gr.rows * gr.cols; ++i) {
    if (gr.data[i] < 0) continue;
    if (seen[gr.data[i]]++) bad("row " + std::to_string(gr.data[i]) + " is in group_rows twice");
  }
  const Table pp = index_table(prefix_pages, "prefix_pages", groups, 0, in.kv.num_pages,
                               pp_copy);
  const int64_t* pl = lengths(prefix_lens, "prefix_lens", groups, pp.cols * in.kv.page_size,
                              pl_copy);
  const Table sp = index_table(suffix_pages, "suffix_pages", in.batch, 0, in.kv.num_pages,
                               sp_copy);
  const int64_t* sl = lengths(suffix_lens, "suffix_lens", in.batch, sp.cols * in.kv.page_size,
                              sl_copy);
  py::array_t<float> out({in.batch, in.heads, in.kv.head_dim});
  if (in.heads == 0) return out;  // nothing to compute (and no query heads per KV head)
  const auto* qp = static_cast<const float*>(q.data());
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (in.bf16)
      brorl::cascade_decode(qp, static_cast<const uint16_t*>(k.data()),
                            static_cast<const uint16_t*>(v.data()), in.kv, in.batch, in.heads,
                            gr, pp, pl, sp, sl, scale, op);
    else
      brorl::cascade_decode(qp, static_cast<const float*>(k.data()),
                            static_cast<const float*>(v.data()), in.kv, in.batch, in.heads, gr,
                            pp, pl, sp, sl, scale, op);
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_attention_ext, m) {
  m.doc() = "CPU (OpenMP) paged and cascade decode attention over the engine's KV pages";
  m.def("paged_decode", &paged_decode, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("page_table"), py::arg("seq_lens"), py::arg("scale"),
        "(out float32 [B, H, D], lse float32 [B, H]) as brorl.kernels.decode_attention."
        "paged_decode_ref returns");
  m.def("cascade_decode", &cascade_decode, py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("group_rows"), py::arg("prefix_pages"),
        py::arg("prefix_lens"), py::arg("suffix_pages"), py::arg("suffix_lens"),
        py::arg("scale"), "out float32 [B, H, D] as brorl.kernels.decode_attention.cascade_decode_ref");
}
