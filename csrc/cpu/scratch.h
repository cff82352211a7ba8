// Scratch buffers of the CPU kernels' workspaces: std::vector without resize()'s zero-fill.
//
// Every element a kernel reads from its workspace it has written first: the workspace is reused
// across tiles of every shape, so nothing may count on a zero anyway. FLASHATTN_POISON_SCRATCH
// fills new elements with 0xff bytes (NaN in every float type) to show it: the CPU suite passes
// built so. The zero-fill was ~4 % of a varlen forward+backward over 32 sequences of 128 tokens,
// whose kernels build their workspace once per sequence.
#pragma once

#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

namespace flashattn::cpu {

template <class T>
struct UninitializedAllocator : std::allocator<T> {
  template <class U>
  struct rebind {
    using other = UninitializedAllocator<U>;
  };
  UninitializedAllocator() = default;
  template <class U>
  UninitializedAllocator(const UninitializedAllocator<U>&) noexcept {}

  template <class U>
  void construct(U* p) noexcept {
    static_assert(std::is_trivially_destructible_v<U>, "scratch holds plain values");
#ifdef FLASHATTN_POISON_SCRATCH
    std::memset(static_cast<void*>(p), 0xff, sizeof(U));
#endif
    ::new (static_cast<void*>(p)) U;  // default-initialised: no zero
  }
  template <class U, class... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <class T>
using Scratch = std::vector<T, UninitializedAllocator<T>>;

}  // namespace flashattn::cpu
