// Page allocator with reference counts: the C++ twin of engine/allocator.py.
// A page is free exactly when its count is 0. Free pages sit on a stack popped from the
// back, so a fresh pool hands out ascending, contiguous pages (as the Python one does).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace brorl {

// Thrown by alloc when too few pages are free; the binding maps it to
// brorl.engine.allocator.OutOfPages.
struct OutOfPagesError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

class PageAllocator {
 public:
  explicit PageAllocator(int64_t num_pages);

  int64_t num_pages() const { return static_cast<int64_t>(refcount_.size()); }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }

  // n fresh pages with one reference each; throws OutOfPagesError and takes nothing.
  std::vector<int32_t> alloc(int64_t n);
  // One more reference to each page; every page must be held. All-or-nothing.
  void incref(const std::vector<int64_t>& pages);
  // Drops one reference of each page; returns how many became free. All-or-nothing:
  // on a free page (std::invalid_argument) the counts are restored.
  int64_t decref(const std::vector<int64_t>& pages);

  // Reference count of one page; negative indices count from the end as in Python.
  int32_t refcount(int64_t page) const;
  const std::vector<int32_t>& refcounts() const { return refcount_; }
  const std::vector<int32_t>& free_stack() const { return free_; }

  // Throws std::out_of_range unless 0 <= page < num_pages.
  void check_page(int64_t page) const;
  // "" when the free stack and the counts agree (and equal `expected`, page -> holders,
  // when given); otherwise the first problem found.
  std::string check_integrity(const std::unordered_map<int64_t, int64_t>* expected) const;

 private:
  std::vector<int32_t> refcount_;
  std::vector<int32_t> free_;
};

}  // namespace brorl
