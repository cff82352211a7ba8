// Dynamic task scheduling on torch's intra-op thread pool.
//
// at::parallel_for splits a range statically; attention tasks differ in cost (causal rows see more
// keys as they go down), so workers pull task indices from one atomic counter instead. Each worker
// sets up its scratch once and then calls next() until it returns -1.
#pragma once


#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

// ISA-neutral (no vector code): used by the per-ISA kernels and by the op layer (ops_varlen.cpp).
namespace flashattn::cpu {

template <typename Worker>
void run_workers(int64_t num_tasks, Worker&& worker) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> counter{0};
  auto next = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < num_tasks ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) worker(next);
  });
}

}  // namespace flashattn::cpu
