#include "page_allocator.h"

#include <limits>

namespace brorl {

PageAllocator::PageAllocator(int64_t num_pages) {
  if (num_pages < 1) {
    throw std::invalid_argument("the KV pool needs at least one page, got " +
                                std::to_string(num_pages));
  }
  if (num_pages > std::numeric_limits<int32_t>::max()) {
    throw std::invalid_argument("at most 2**31 - 1 pages, got " + std::to_string(num_pages));
  }
  refcount_.assign(static_cast<size_t>(num_pages), 0);
  free_.reserve(static_cast<size_t>(num_pages));
  for (int64_t p = num_pages - 1; p >= 0; --p) free_.push_back(static_cast<int32_t>(p));
}

void PageAllocator::check_page(int64_t page) const {
  if (page < 0 || page >= num_pages()) {
    throw std::out_of_range("page " + std::to_string(page) + " is not in the pool of " +
                            std::to_string(num_pages()) + " pages");
  }
}

std::vector<int32_t> PageAllocator::alloc(int64_t n) {
  if (n < 0) throw std::invalid_argument("cannot allocate " + std::to_string(n) + " pages");
  if (n > num_free()) {
    throw OutOfPagesError("need " + std::to_string(n) + " KV pages, " +
                          std::to_string(num_free()) + " free");
  }
  std::vector<int32_t> pages(static_cast<size_t>(n));
  for (auto& p : pages) {
    p = free_.back();
    free_.pop_back();
    refcount_[p] = 1;
  }
  return pages;
}

void PageAllocator::incref(const std::vector<int64_t>& pages) {
  for (int64_t p : pages) {
    check_page(p);
    if (refcount_[p] == 0) throw std::invalid_argument("incref of free page " + std::to_string(p));
  }
  for (int64_t p : pages) ++refcount_[p];
}

int64_t PageAllocator::decref(const std::vector<int64_t>& pages) {
  for (int64_t p : pages) check_page(p);
  int64_t freed = 0;
  size_t i = 0;
  for (; i < pages.size(); ++i) {
    int32_t& rc = refcount_[pages[i]];
    if (rc == 0) break;
    if (--rc == 0) {
      free_.push_back(static_cast<int32_t>(pages[i]));
      ++freed;
    }
  }
  if (i == pages.size()) return freed;
  // A page was already free (or listed more often than it is held): undo, newest first,
  // so a page freed by this call is the last one on the free stack when it is restored.
  const int64_t bad = pages[i];
  for (size_t k = i; k-- > 0;) {
    int32_t& rc = refcount_[pages[k]];
    if (rc == 0) free_.pop_back();
    ++rc;
  }
  throw std::invalid_argument("decref of free page " + std::to_string(bad));
}

int32_t PageAllocator::refcount(int64_t page) const {
  if (page < 0) page += num_pages();
  check_page(page);
  return refcount_[page];
}

std::string PageAllocator::check_integrity(
    const std::unordered_map<int64_t, int64_t>* expected) const {
  std::vector<char> on_free(refcount_.size(), 0);
  for (int32_t p : free_) {
    if (p < 0 || p >= num_pages()) return "free stack holds page " + std::to_string(p);
    if (on_free[p]) return "a page is on the free list twice";
    on_free[p] = 1;
  }
  for (size_t p = 0; p < refcount_.size(); ++p) {
    const int32_t rc = refcount_[p];
    if (rc < 0) return "page " + std::to_string(p) + " has negative refcount";
    if ((rc == 0) != (on_free[p] != 0)) {
      return "page " + std::to_string(p) + ": refcount " + std::to_string(rc) +
             ", free=" + (on_free[p] ? "True" : "False");
    }
    if (expected != nullptr) {
      auto it = expected->find(static_cast<int64_t>(p));
      const int64_t want = it == expected->end() ? 0 : it->second;
      if (rc != want) {
        return "page " + std::to_string(p) + ": refcount " + std::to_string(rc) + " but " +
               std::to_string(want) + " holders";
      }
    }
  }
  return "";
}

}  // namespace brorl
