// pybind11 bindings of the page allocator and the radix tree: `brorl.engine._cache_ext`.
// engine/cache_ext.py wraps these classes in the Python API of engine/allocator.py and
// engine/radix_cache.py. Caller errors arrive as ValueError (std::invalid_argument),
// IndexError (std::out_of_range), TypeError (a token or page that is not an int),
// RuntimeError (flush while locked) and brorl.engine.allocator.OutOfPages.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "page_allocator.h"
#include "radix_tree.h"

namespace py = pybind11;
using brorl::PageAllocator;
using brorl::RadixTree;

namespace {

struct Tree : RadixTree, std::enable_shared_from_this<Tree> {
  using RadixTree::RadixTree;
};

// A lock handle: the id of a node in one tree. Stale handles raise instead of crashing.
struct NodeRef {
  std::weak_ptr<Tree> tree;
  uint64_t id;

  const brorl::RadixNode& get() const {
    auto t = tree.lock();
    if (!t) throw std::invalid_argument("the radix cache of this node handle is gone");
    return t->node(id);
  }
};

struct RefcountView {
  std::shared_ptr<PageAllocator> alloc;
};

// A list/tuple of Python ints as int64s (a fast path for lists and tuples; any other
// sequence goes through pybind11's caster). Anything else raises TypeError.
std::vector<int64_t> to_ints(py::handle obj, const char* what) {
  if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr())) {
    if (PyUnicode_Check(obj.ptr()) || PyBytes_Check(obj.ptr()) ||
        !PySequence_Check(obj.ptr())) {
      throw py::type_error(std::string(what) + " must be a sequence of ints, got " +
                           std::string(py::str(py::type::of(obj).attr("__name__"))));
    }
    try {
      return obj.cast<std::vector<int64_t>>();
    } catch (const py::cast_error&) {
      throw py::type_error(std::string(what) + " must be a sequence of ints");
    }
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj.ptr());
  PyObject** items = PySequence_Fast_ITEMS(obj.ptr());
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = items[i];
    if (!PyLong_Check(item)) {
      throw py::type_error(std::string(what) + " must be ints, item " + std::to_string(i) +
                           " is " + std::string(Py_TYPE(item)->tp_name));
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0) {
      throw py::type_error(std::string(what) + " must fit in 64 bits, item " +
                           std::to_string(i) + " does not");
    }
    out[static_cast<size_t>(i)] = v;
  }
  return out;
}

py::tuple as_tuple(const std::vector<int64_t>& v) {
  py::tuple t(v.size());
  for (size_t i = 0; i < v.size(); ++i) t[i] = py::int_(v[i]);
  return t;
}

std::shared_ptr<Tree> tree_of(const NodeRef& ref, const Tree& self) {
  auto t = ref.tree.lock();
  if (t.get() != &self) {
    throw std::invalid_argument("this node handle belongs to another radix cache");
  }
  return t;
}

void bind_allocator(py::module_& m) {
  py::class_<RefcountView>(m, "RefcountView", "Read-only view of the reference counts.")
      .def("__len__", [](const RefcountView& v) { return v.alloc->num_pages(); })
      .def("__getitem__", [](const RefcountView& v, int64_t p) { return v.alloc->refcount(p); })
      .def("__getitem__", [](const RefcountView& v, const py::slice& s) {
        size_t start = 0, stop = 0, step = 0, len = 0;
        if (!s.compute(v.alloc->refcounts().size(), &start, &stop, &step, &len)) {
          throw py::error_already_set();
        }
        std::vector<int32_t> out(len);
        for (size_t i = 0; i < len; ++i, start += step) out[i] = v.alloc->refcounts()[start];
        return out;
      })
      .def("__iter__", [](const RefcountView& v) {
        return py::make_iterator(v.alloc->refcounts().begin(), v.alloc->refcounts().end());
      }, py::keep_alive<0, 1>())
      .def("__eq__", [](const RefcountView& v, const py::object& other) {
        return py::list(py::cast(v.alloc->refcounts())).equal(other);
      })
      .def("__repr__", [](const RefcountView& v) {
        return "RefcountView(" + py::repr(py::cast(v.alloc->refcounts())).cast<std::string>() + ")";
      });

  py::class_<PageAllocator, std::shared_ptr<PageAllocator>>(m, "PageAllocator")
      .def(py::init<int64_t>(), py::arg("num_pages"))
      .def_property_readonly("num_pages", &PageAllocator::num_pages)
      .def_property_readonly("num_free", &PageAllocator::num_free)
      .def("alloc", &PageAllocator::alloc, py::arg("n"))
      .def("incref", [](PageAllocator& a, py::handle pages) {
        a.incref(to_ints(pages, "pages"));
      }, py::arg("pages"))
      .def("decref", [](PageAllocator& a, py::handle pages) {
        return a.decref(to_ints(pages, "pages"));
      }, py::arg("pages"))
      .def_property_readonly("refcount", [](const std::shared_ptr<PageAllocator>& a) {
        return RefcountView{a};
      })
      .def("free_stack", &PageAllocator::free_stack)
      .def("check_integrity", [](const PageAllocator& a,
                                 std::optional<std::unordered_map<int64_t, int64_t>> expected) {
        return a.check_integrity(expected ? &*expected : nullptr);
      }, py::arg("expected") = py::none());
}

void bind_tree(py::module_& m) {
  py::class_<NodeRef>(m, "RadixNode", "Handle of a radix node (for lock/unlock).")
      .def_property_readonly("node_id", [](const NodeRef& r) { return r.id; })
      .def_property_readonly("alive", [](const NodeRef& r) {
        auto t = r.tree.lock();
        if (!t) return false;
        try { t->node(r.id); } catch (const std::invalid_argument&) { return false; }
        return true;
      })
      .def_property_readonly("key", [](const NodeRef& r) { return as_tuple(r.get().key); })
      .def_property_readonly("pages", [](const NodeRef& r) { return r.get().pages; })
      .def_property_readonly("lock_ref", [](const NodeRef& r) { return r.get().lock_ref; })
      .def_property_readonly("last_access", [](const NodeRef& r) { return r.get().last_access; })
      .def_property_readonly("parent", [](const NodeRef& r) -> py::object {
        const auto* p = r.get().parent;
        return p ? py::cast(NodeRef{r.tree, p->id}) : py::none();
      })
      .def("__eq__", [](const NodeRef& a, const NodeRef& b) {
        return a.id == b.id && !a.tree.owner_before(b.tree) && !b.tree.owner_before(a.tree);
      })
      .def("__hash__", [](const NodeRef& r) { return std::hash<uint64_t>()(r.id); })
      .def("__repr__", [](const NodeRef& r) { return "<RadixNode " + std::to_string(r.id) + ">"; });

  py::class_<Tree, std::shared_ptr<Tree>>(m, "RadixTree")
      .def(py::init<int64_t, std::shared_ptr<PageAllocator>>(), py::arg("page_size"),
           py::arg("allocator"))
      .def_property_readonly("page_size", &Tree::page_size)
      .def_property_readonly("num_cached_pages", &Tree::num_cached_pages)
      .def_property_readonly("num_evictable_pages", &Tree::num_evictable_pages)
      .def_property_readonly("root", [](Tree& t) { return NodeRef{t.weak_from_this(), 0}; })
      .def("match_prefix", [](Tree& t, py::handle ids) {
        auto [pages, id] = t.match_prefix(to_ints(ids, "token ids"));
        return py::make_tuple(py::cast(pages), NodeRef{t.weak_from_this(), id});
      }, py::arg("token_ids"))
      .def("insert", [](Tree& t, py::handle ids, py::handle pages) {
        auto [canonical, id] = t.insert(to_ints(ids, "token ids"), to_ints(pages, "pages"));
        return py::make_tuple(py::cast(canonical), NodeRef{t.weak_from_this(), id});
      }, py::arg("token_ids"), py::arg("pages"))
      .def("lock", [](Tree& t, const NodeRef& r) { tree_of(r, t)->lock(r.id); }, py::arg("node"))
      .def("unlock", [](Tree& t, const NodeRef& r) { tree_of(r, t)->unlock(r.id); },
           py::arg("node"))
      .def("evict", &Tree::evict, py::arg("num_pages"))
      .def("flush", &Tree::flush)
      .def("cached_pages", &Tree::cached_pages)
      .def("check_integrity", &Tree::check_integrity);
}

}  // namespace

PYBIND11_MODULE(_cache_ext, m) {
  m.doc() = "C++ page allocator and radix prefix cache (see engine/cache_ext.py)";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const brorl::OutOfPagesError& e) {
      try {
        py::object cls = py::module_::import("brorl.engine.allocator").attr("OutOfPages");
        PyErr_SetString(cls.ptr(), e.what());
      } catch (py::error_already_set&) {
        PyErr_SetString(PyExc_RuntimeError, e.what());
      }
    }
  });
  bind_allocator(m);
  bind_tree(m);
}
