// Page-granular radix prefix cache: the C++ twin of engine/radix_cache.py (same contract,
// same page order on every path, so both hand out identical pages for identical calls).
// Every edge holds whole pages; nodes split only at page boundaries. Nodes are addressed
// by ids that are never reused, so a stale handle is detected instead of dereferenced.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "page_allocator.h"

namespace brorl {

struct RadixNode {
  uint64_t id = 0;
  std::vector<int64_t> key;    // len(pages) * page_size token ids
  std::vector<int32_t> pages;
  RadixNode* parent = nullptr;
  // Children in insertion order (a replaced child keeps its place, as in a Python dict),
  // plus an index from the hash of a child's first page.
  std::vector<RadixNode*> children;
  std::unordered_multimap<uint64_t, RadixNode*> index;
  int64_t lock_ref = 0;  // lock handles held at this node or below
  int64_t handles = 0;   // lock handles held at this node
  uint64_t last_access = 0;
};

class RadixTree {
 public:
  RadixTree(int64_t page_size, std::shared_ptr<PageAllocator> allocator);

  int64_t page_size() const { return page_size_; }
  const std::shared_ptr<PageAllocator>& allocator() const { return allocator_; }
  int64_t num_cached_pages() const { return num_cached_; }
  int64_t num_evictable_pages() const { return num_evictable_; }
  uint64_t root_id() const { return 0; }

  // Longest cached whole-page prefix: its pages and the id of the node where it ends.
  std::pair<std::vector<int32_t>, uint64_t> match_prefix(const std::vector<int64_t>& ids);
  // Caches ids (len == pages * page_size); returns canonical pages and the deepest node.
  // std::invalid_argument (nothing cached) when a page is free, or when a page it would
  // adopt is cached already or listed twice.
  std::pair<std::vector<int32_t>, uint64_t> insert(const std::vector<int64_t>& ids,
                                                   const std::vector<int64_t>& pages);
  void lock(uint64_t id);
  void unlock(uint64_t id);
  // Both leave the tree as it was for a node whose pages the allocator refuses to decref
  // (a caller dropped the cache's own reference): evict stops there, flush changes nothing.
  int64_t evict(int64_t num_pages);
  void flush();

  // Every cached page, once per node that holds it, in Python's `_nodes()` order.
  std::vector<int32_t> cached_pages() const;
  std::string check_integrity() const;
  // The live node with this id; throws std::invalid_argument for a stale or unknown id.
  const RadixNode& node(uint64_t id) const;

 private:
  RadixNode* get(uint64_t id);
  RadixNode* new_node(RadixNode* parent, std::vector<int64_t> key, std::vector<int32_t> pages);
  uint64_t page_hash(const int64_t* tokens) const;
  RadixNode* find_child(RadixNode* node, const int64_t* first_page) const;
  void add_child(RadixNode* parent, RadixNode* child);
  void remove_child(RadixNode* parent, RadixNode* child);
  size_t common_pages(const RadixNode* child, const std::vector<int64_t>& ids,
                      size_t first_page) const;
  RadixNode* split(RadixNode* node, size_t j);
  std::vector<const RadixNode*> nodes() const;  // Python's `_nodes()` order
  std::string check_node(const RadixNode* node, std::vector<char>& seen, int64_t& cached,
                         int64_t& evictable) const;

  int64_t page_size_;
  std::shared_ptr<PageAllocator> allocator_;
  std::unordered_map<uint64_t, std::unique_ptr<RadixNode>> nodes_;
  RadixNode* root_;
  uint64_t next_id_ = 1;
  uint64_t clock_ = 0;
  int64_t total_handles_ = 0;
  int64_t num_cached_ = 0;
  int64_t num_evictable_ = 0;
  std::vector<char> cached_;  // page -> 1 while a node holds it
};

}  // namespace brorl
