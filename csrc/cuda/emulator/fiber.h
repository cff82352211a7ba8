// Cooperative fibers, one per emulated CUDA thread: a stack of their own (with a guard page
// below it) and a saved register context. A switch is a plain function call that saves the
// callee-saved registers and the stack pointer of one fiber and loads those of another
// (hand-written for x86-64, no syscall; ucontext elsewhere).
#pragma once

#include <cstddef>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace flashattn::emu {

struct FiberContext {
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// Saves the running context into `from` and resumes `to`.
void switch_context(FiberContext* from, FiberContext* to);

class Fiber {
 public:
  using Entry = void (*)(void* arg);
  explicit Fiber(size_t stack_bytes);
  ~Fiber();
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;

  // Prepares the fiber so that the next switch to it calls entry(arg); entry must never return
  // (it switches away for good when it is done).
  void reset(Entry entry, void* arg);
  FiberContext* context() { return &context_; }
  // Whether addr lies in the guard page under the stack (a stack overflow).
  bool in_guard_page(const void* addr) const;

 private:
  char* mapping_ = nullptr;
  size_t mapping_bytes_ = 0;
  FiberContext context_;
};

}  // namespace flashattn::emu
