// A small cache of large CPU buffers for the kernels' gradients and scratch tensors.
//
// Why: a fresh 40 MB gradient each training step costs more than the kernel pass that fills it. glibc
// serves blocks of 32 MB and more with a new mmap each time (and returns them on free), and the first
// touch of every page then faults and the OS zeroes it: measured here 16.5 ms to allocate and fill a
// (1, 13, 1024, 768) fp32 tensor against 1.4 ms to fill one that is already mapped. PyTorch's CUDA
// caching allocator keeps freed blocks for the same reason; its CPU allocator does not. This cache does
// it for our own large outputs and scratch only:
//   - a request of >= kMinCachedBytes is rounded up to whole 2 MiB huge pages and served from a free
//     block of exactly that size when there is one (a hit), else by a new 2 MiB-aligned allocation
//     advised to use transparent huge pages (a miss);
//   - a miss first releases every free block: a size that was not cached means the shapes changed, so
//     the old blocks are stale, and the cache never holds more than the latest calls needed;
//   - when the tensor dies, its block returns to the cache unless the cache would then hold more than
//     its limit (REPA_KERNELS_CPU_CACHE_MB, default 2048; 0 turns caching off), in which case it is
//     freed;
//   - every block is written in full by the kernel that asks for it (no zeroing is promised).
// release_cached() frees the free blocks (torch.ops.repa_kernels.buffer_cache_release, exposed as
// repa_kernels.ops.cpp.release_cached_buffers()); the cache is thread-safe.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace repa {

class BufferCache {
 public:
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kMinCachedBytes = kHugePage;  // smaller requests go to at::empty

  struct Stats {
    int64_t limit_bytes, cached_bytes, cached_blocks, hits, misses;
  };

  // Never destroyed: a tensor may outlive static destruction at interpreter exit and still return its
  // block here.
  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
    if (bytes < kMinCachedBytes) return at::empty(sizes, options);
    const size_t block_bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* block = take(block_bytes);
    return at::from_blob(block, sizes, [block_bytes](void* data) { instance().give_back(data, block_bytes); },
                         options);
  }

  // Frees every free block; returns the bytes freed.
  int64_t release_cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(release_locked());
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(limit_bytes_), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(free_.size()), hits_, misses_};
  }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };

  BufferCache() : limit_bytes_(limit_from_environment()) {}

  static size_t limit_from_environment() {
    const char* text = std::getenv("REPA_KERNELS_CPU_CACHE_MB");
    if (text == nullptr || *text == '\0') return size_t(2048) << 20;
    char* end = nullptr;
    const long long megabytes = std::strtoll(text, &end, 10);
    TORCH_CHECK(end != text && *end == '\0' && megabytes >= 0 && megabytes <= (1LL << 30),
                "REPA_KERNELS_CPU_CACHE_MB must be a whole number of megabytes from 0 to 1073741824 (0 turns "
                "the CPU buffer cache off), got '", text, "'");
    return static_cast<size_t>(megabytes) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          void* data = free_[i].data;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          cached_bytes_ -= bytes;
          ++hits_;
          return data;
        }
      }
      ++misses_;
      release_locked();
    }
    void* data = std::aligned_alloc(kHugePage, bytes);  // bytes is a multiple of the alignment
    if (data == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE) && !defined(REPA_NO_HUGE_PAGES)
    madvise(data, bytes, MADV_HUGEPAGE);  // advice only: without huge pages it is just slower
#endif
    return data;
  }

  void give_back(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + bytes <= limit_bytes_) {
        free_.push_back({data, bytes});
        cached_bytes_ += bytes;
        return;
      }
    }
    std::free(data);
  }

  size_t release_locked() {
    const size_t released = cached_bytes_;
    for (const Block& block : free_) std::free(block.data);
    free_.clear();
    cached_bytes_ = 0;
    return released;
  }

  std::mutex mutex_;
  std::vector<Block> free_;
  size_t limit_bytes_;
  size_t cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

// An uninitialised tensor for a kernel output or scratch buffer, from the cache when it is large.
inline at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return BufferCache::instance().empty(sizes, options);
}

}  // namespace repa
