#include "radix_tree.h"

#include <algorithm>
#include <queue>
#include <stdexcept>
#include <tuple>

namespace brorl {

RadixTree::RadixTree(int64_t page_size, std::shared_ptr<PageAllocator> allocator)
    : page_size_(page_size), allocator_(std::move(allocator)) {
  if (page_size < 1) {
    throw std::invalid_argument("page_size must be >= 1, got " + std::to_string(page_size));
  }
  if (!allocator_) throw std::invalid_argument("the radix cache needs a page allocator");
  cached_.assign(static_cast<size_t>(allocator_->num_pages()), 0);
  auto root = std::make_unique<RadixNode>();
  root->id = 0;
  root->lock_ref = 1;  // never evicted
  root_ = root.get();
  nodes_.emplace(0, std::move(root));
}

// -- nodes and children --------------------------------------------------------------------
const RadixNode& RadixTree::node(uint64_t id) const {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    throw std::invalid_argument("radix node " + std::to_string(id) +
                                " is no longer in the cache (evicted or flushed)");
  }
  return *it->second;
}

RadixNode* RadixTree::get(uint64_t id) { return const_cast<RadixNode*>(&node(id)); }

RadixNode* RadixTree::new_node(RadixNode* parent, std::vector<int64_t> key,
                               std::vector<int32_t> pages) {
  auto n = std::make_unique<RadixNode>();
  n->id = next_id_++;
  n->key = std::move(key);
  n->pages = std::move(pages);
  n->parent = parent;
  RadixNode* raw = n.get();
  nodes_.emplace(raw->id, std::move(n));
  return raw;
}

uint64_t RadixTree::page_hash(const int64_t* tokens) const {
  uint64_t h = 0x9E3779B97F4A7C15ULL;
  for (int64_t i = 0; i < page_size_; ++i) {
    uint64_t x = static_cast<uint64_t>(tokens[i]) + h;  // splitmix64 of the running value
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    h = x ^ (x >> 31);
  }
  return h;
}

RadixNode* RadixTree::find_child(RadixNode* node, const int64_t* first_page) const {
  auto range = node->index.equal_range(page_hash(first_page));
  for (auto it = range.first; it != range.second; ++it) {
    if (std::equal(first_page, first_page + page_size_, it->second->key.data())) {
      return it->second;
    }
  }
  return nullptr;
}

void RadixTree::add_child(RadixNode* parent, RadixNode* child) {
  parent->children.push_back(child);
  parent->index.emplace(page_hash(child->key.data()), child);
  child->parent = parent;
}

void RadixTree::remove_child(RadixNode* parent, RadixNode* child) {
  auto& ch = parent->children;
  ch.erase(std::find(ch.begin(), ch.end(), child));
  auto range = parent->index.equal_range(page_hash(child->key.data()));
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == child) {
      parent->index.erase(it);
      return;
    }
  }
}

// -- lookup --------------------------------------------------------------------------------
size_t RadixTree::common_pages(const RadixNode* child, const std::vector<int64_t>& ids,
                               size_t first_page) const {
  const size_t ps = static_cast<size_t>(page_size_);
  const size_t n = std::min(child->pages.size(), ids.size() / ps - first_page);
  const int64_t* base = ids.data() + first_page * ps;
  size_t j = 1;  // the first page matched through the index
  while (j < n && std::equal(base + j * ps, base + (j + 1) * ps, child->key.data() + j * ps)) {
    ++j;
  }
  return j;
}

RadixNode* RadixTree::split(RadixNode* node, size_t j) {
  const size_t ps = static_cast<size_t>(page_size_);
  RadixNode* parent = node->parent;
  RadixNode* mid =
      new_node(parent, std::vector<int64_t>(node->key.begin(), node->key.begin() + j * ps),
               std::vector<int32_t>(node->pages.begin(), node->pages.begin() + j));
  mid->lock_ref = node->lock_ref;
  mid->last_access = node->last_access;
  // mid takes node's place among parent's children (same first page, same position).
  *std::find(parent->children.begin(), parent->children.end(), node) = mid;
  auto range = parent->index.equal_range(page_hash(mid->key.data()));
  for (auto it = range.first; it != range.second; ++it) {
    if (it->second == node) it->second = mid;
  }
  node->key.erase(node->key.begin(), node->key.begin() + j * ps);
  node->pages.erase(node->pages.begin(), node->pages.begin() + j);
  add_child(mid, node);
  return mid;
}

std::pair<std::vector<int32_t>, uint64_t> RadixTree::match_prefix(
    const std::vector<int64_t>& ids) {
  const size_t ps = static_cast<size_t>(page_size_);
  const size_t n_pages = ids.size() / ps;
  RadixNode* node = root_;
  std::vector<int32_t> pages;
  const uint64_t now = ++clock_;
  node->last_access = now;
  size_t i = 0;
  while (i < n_pages) {
    RadixNode* child = find_child(node, ids.data() + i * ps);
    if (child == nullptr) break;
    const size_t j = common_pages(child, ids, i);
    if (j < child->pages.size()) child = split(child, j);
    pages.insert(pages.end(), child->pages.begin(), child->pages.end());
    child->last_access = now;
    node = child;
    i += j;
  }
  return {std::move(pages), node->id};
}

// -- insertion -----------------------------------------------------------------------------
std::pair<std::vector<int32_t>, uint64_t> RadixTree::insert(const std::vector<int64_t>& ids,
                                                            const std::vector<int64_t>& pages) {
  const size_t ps = static_cast<size_t>(page_size_);
  if (ids.size() % ps != 0 || ids.size() / ps != pages.size()) {  // no pages * ps: it wraps
    throw std::invalid_argument("insert needs whole pages: " + std::to_string(ids.size()) +
                                " tokens, " + std::to_string(pages.size()) + " pages of " +
                                std::to_string(ps));
  }
  for (int64_t p : pages) {  // checked before anything changes
    allocator_->check_page(p);
    if (allocator_->refcounts()[p] == 0) {
      throw std::invalid_argument("insert of free page " + std::to_string(p) +
                                  " (the caller must hold the pages it inserts)");
    }
  }
  auto [cached, node_id] = match_prefix(ids);
  const size_t i = cached.size();
  if (i == pages.size()) return {std::move(cached), node_id};
  // The pages to adopt must not be cached already (one page holds one prefix's KV) nor be
  // listed twice; checked with the cached-page map before anything changes (match_prefix
  // may have split a node and refreshed LRU times, which changes no cached set).
  for (size_t k = i; k < pages.size(); ++k) {
    char& c = cached_[static_cast<size_t>(pages[k])];
    if (c != 0) {
      for (size_t u = i; u < k; ++u) cached_[static_cast<size_t>(pages[u])] = 0;
      throw std::invalid_argument("insert of page " + std::to_string(pages[k]) +
                                  ", which is cached already or listed twice");
    }
    c = 1;
  }
  RadixNode* parent = get(node_id);
  std::vector<int32_t> fresh(pages.begin() + i, pages.end());
  RadixNode* n = new_node(parent, std::vector<int64_t>(ids.begin() + i * ps, ids.end()), fresh);
  n->last_access = ++clock_;
  add_child(parent, n);
  allocator_->incref(std::vector<int64_t>(fresh.begin(), fresh.end()));
  num_cached_ += static_cast<int64_t>(fresh.size());
  num_evictable_ += static_cast<int64_t>(fresh.size());
  cached.insert(cached.end(), fresh.begin(), fresh.end());
  return {std::move(cached), n->id};
}

// -- locks ---------------------------------------------------------------------------------
void RadixTree::lock(uint64_t id) {
  RadixNode* node = get(id);
  ++node->handles;
  ++total_handles_;
  for (; node != nullptr; node = node->parent) {
    if (node->lock_ref == 0) num_evictable_ -= static_cast<int64_t>(node->pages.size());
    ++node->lock_ref;
  }
}

void RadixTree::unlock(uint64_t id) {
  RadixNode* node = get(id);
  if (node->handles == 0) {
    throw std::invalid_argument("unlock without a lock (radix node " + std::to_string(id) + ")");
  }
  --node->handles;
  --total_handles_;
  for (; node != nullptr; node = node->parent) {
    if (--node->lock_ref == 0) num_evictable_ += static_cast<int64_t>(node->pages.size());
  }
}

// -- eviction ------------------------------------------------------------------------------
int64_t RadixTree::evict(int64_t num_pages) {
  if (num_pages < 0) {
    throw std::invalid_argument("cannot evict " + std::to_string(num_pages) + " pages");
  }
  using Entry = std::tuple<uint64_t, uint64_t, RadixNode*>;  // LRU time, id, node
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> leaves;
  for (const RadixNode* n : nodes()) {
    if (n->children.empty() && n->lock_ref == 0) {
      leaves.emplace(n->last_access, n->id, const_cast<RadixNode*>(n));
    }
  }
  int64_t freed = 0;
  while (!leaves.empty() && freed < num_pages) {
    RadixNode* node = std::get<2>(leaves.top());
    // decref first: it is all-or-nothing, so if a caller dropped the cache's own
    // reference to one of these pages (it throws), the node stays linked and intact
    // instead of lingering unlinked with a parent pointer that a later eviction frees.
    freed += allocator_->decref(std::vector<int64_t>(node->pages.begin(), node->pages.end()));
    leaves.pop();
    RadixNode* parent = node->parent;
    remove_child(parent, node);
    const auto n_pages = static_cast<int64_t>(node->pages.size());
    num_cached_ -= n_pages;
    num_evictable_ -= n_pages;
    for (int32_t p : node->pages) cached_[p] = 0;
    nodes_.erase(node->id);
    if (parent != root_ && parent->children.empty() && parent->lock_ref == 0) {
      leaves.emplace(parent->last_access, parent->id, parent);
    }
  }
  return freed;
}

void RadixTree::flush() {
  if (total_handles_ > 0) {
    throw std::runtime_error("cannot flush the prefix cache while requests hold locks");
  }
  // One all-or-nothing decref of every cached page: if one was already free (a caller
  // dropped the cache's reference), nothing changes and the error propagates.
  std::vector<int64_t> all;
  all.reserve(static_cast<size_t>(num_cached_));
  for (const RadixNode* n : nodes()) all.insert(all.end(), n->pages.begin(), n->pages.end());
  allocator_->decref(all);
  std::fill(cached_.begin(), cached_.end(), 0);
  root_->children.clear();
  root_->index.clear();
  for (auto it = nodes_.begin(); it != nodes_.end();) {
    it = it->second.get() == root_ ? std::next(it) : nodes_.erase(it);
  }
  num_cached_ = num_evictable_ = 0;
}

// -- checks --------------------------------------------------------------------------------
std::vector<const RadixNode*> RadixTree::nodes() const {
  std::vector<const RadixNode*> out;
  std::vector<const RadixNode*> stack(root_->children.begin(), root_->children.end());
  while (!stack.empty()) {
    const RadixNode* n = stack.back();
    stack.pop_back();
    out.push_back(n);
    stack.insert(stack.end(), n->children.begin(), n->children.end());
  }
  return out;
}

std::vector<int32_t> RadixTree::cached_pages() const {
  std::vector<int32_t> out;
  for (const RadixNode* n : nodes()) out.insert(out.end(), n->pages.begin(), n->pages.end());
  return out;
}

std::string RadixTree::check_node(const RadixNode* node, std::vector<char>& seen,
                                  int64_t& cached, int64_t& evictable) const {
  int64_t below = 0;
  if (node->index.size() != node->children.size()) return "child index out of sync";
  for (const RadixNode* c : node->children) {
    if (c->parent != node || find_child(const_cast<RadixNode*>(node), c->key.data()) != c) {
      return "bad child link";
    }
    below += c->lock_ref;
  }
  if (node == root_) return "";
  if (node->key.size() != node->pages.size() * static_cast<size_t>(page_size_) ||
      node->pages.empty()) {
    return "key/page mismatch";
  }
  if (node->lock_ref != node->handles + below) return "bad lock_ref";
  for (int32_t p : node->pages) {
    if (p < 0 || p >= allocator_->num_pages()) {
      return "cached page " + std::to_string(p) + " is not in the pool";
    }
    if (seen[p]) return "page " + std::to_string(p) + " cached twice";
    if (!cached_[p]) return "page " + std::to_string(p) + " missing from the cached-page map";
    if (allocator_->refcounts()[p] < 1) return "cached page " + std::to_string(p) + " is free";
    seen[p] = 1;
  }
  cached += static_cast<int64_t>(node->pages.size());
  if (node->lock_ref == 0) evictable += static_cast<int64_t>(node->pages.size());
  return "";
}

std::string RadixTree::check_integrity() const {
  std::vector<char> seen(static_cast<size_t>(allocator_->num_pages()), 0);
  int64_t cached = 0, evictable = 0, handles = 0;
  std::vector<const RadixNode*> all = nodes();
  all.push_back(root_);
  if (all.size() != nodes_.size()) return "a node is unreachable from the root";
  for (const RadixNode* n : all) {
    std::string err = check_node(n, seen, cached, evictable);
    if (!err.empty()) return err;
    handles += n->handles;
  }
  if (root_->lock_ref != 1 + root_->handles + [&] {
        int64_t s = 0;
        for (const RadixNode* c : root_->children) s += c->lock_ref;
        return s;
      }()) {
    return "bad lock_ref at the root";
  }
  if (handles != total_handles_) return "lock handle count out of sync";
  if (std::count(cached_.begin(), cached_.end(), 1) != num_cached_) {
    return "the cached-page map holds pages no node holds";
  }
  if (cached != num_cached_) return "num_cached_pages out of sync";
  if (evictable != num_evictable_) return "num_evictable_pages out of sync";
  return "";
}

}  // namespace brorl
