#include "fiber.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#if defined(__x86_64__)
extern "C" void flashattn_emu_switch(void** save_sp, void* load_sp);
extern "C" void flashattn_emu_trampoline();
#endif

namespace flashattn::emu {

namespace {
size_t page_bytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}
}  // namespace

Fiber::Fiber(size_t stack_bytes) {
  const size_t page = page_bytes();
  mapping_bytes_ = (stack_bytes + page - 1) / page * page + page;
  void* m = mmap(nullptr, mapping_bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("flashattn emulator: fiber stack mmap");
    std::abort();
  }
  mapping_ = static_cast<char*>(m);
  mprotect(mapping_, page, PROT_NONE);  // the stack grows down into this page on overflow
}

Fiber::~Fiber() { munmap(mapping_, mapping_bytes_); }

bool Fiber::in_guard_page(const void* addr) const {
  const char* a = static_cast<const char*>(addr);
  return a >= mapping_ && a < mapping_ + page_bytes();
}

#if defined(__x86_64__)

void switch_context(FiberContext* from, FiberContext* to) { flashattn_emu_switch(&from->sp, to->sp); }

void Fiber::reset(Entry entry, void* arg) {
  // The frame flashattn_emu_switch pops: [mxcsr, x87 cw][r15][r14][r13][r12][rbx][rbp][return].
  // r12 = entry and r13 = arg reach the trampoline, which calls entry(arg) with the stack
  // aligned as the ABI wants at a call.
  uintptr_t top = reinterpret_cast<uintptr_t>(mapping_ + mapping_bytes_) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top - 8 * 8);  // sp % 16 == 0; after the pops rsp % 16 == 0
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  __asm__ volatile("stmxcsr %0" : "=m"(mxcsr));
  __asm__ volatile("fnstcw %0" : "=m"(fpucw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpucw) << 32);
  sp[1] = 0;                                   // r15
  sp[2] = 0;                                   // r14
  sp[3] = reinterpret_cast<uint64_t>(arg);     // r13
  sp[4] = reinterpret_cast<uint64_t>(entry);   // r12
  sp[5] = 0;                                   // rbx
  sp[6] = 0;                                   // rbp
  sp[7] = reinterpret_cast<uint64_t>(&flashattn_emu_trampoline);
  context_.sp = sp;
}

#else  // ucontext: portable, one syscall per switch (signal mask), slower

void switch_context(FiberContext* from, FiberContext* to) { swapcontext(&from->uc, &to->uc); }

namespace {
void ucontext_entry(unsigned lo_entry, unsigned hi_entry, unsigned lo_arg, unsigned hi_arg) {
  auto entry = reinterpret_cast<Fiber::Entry>((static_cast<uintptr_t>(hi_entry) << 32) | lo_entry);
  void* arg = reinterpret_cast<void*>((static_cast<uintptr_t>(hi_arg) << 32) | lo_arg);
  entry(arg);
  std::abort();
}
}  // namespace

void Fiber::reset(Entry entry, void* arg) {
  getcontext(&context_.uc);
  context_.uc.uc_stack.ss_sp = mapping_ + page_bytes();
  context_.uc.uc_stack.ss_size = mapping_bytes_ - page_bytes();
  context_.uc.uc_link = nullptr;
  const auto e = reinterpret_cast<uintptr_t>(entry), a = reinterpret_cast<uintptr_t>(arg);
  makecontext(&context_.uc, reinterpret_cast<void (*)()>(&ucontext_entry), 4, unsigned(e), unsigned(e >> 32),
              unsigned(a), unsigned(a >> 32));
}

#endif

}  // namespace flashattn::emu
