// Global-memory operations (reductions, atomics, acquire loads: plain host operations, since one
// thread runs at a time), ex2.approx, and the fault handler that turns a segmentation fault on a
// guard page into a report of the access and aborts the launch (never a crash, never a hang).
#include <signal.h>
#include <ucontext.h>

#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "guarded_buffers.h"
#include "internal.h"

namespace flashattn::emu {

void red_add_f32(float* ptr, float value) { *ptr += value; }
float atomic_add(float* ptr, float value) {
  const float old = *ptr;
  *ptr = old + value;
  return old;
}
double atomic_add(double* ptr, double value) {
  const double old = *ptr;
  *ptr = old + value;
  return old;
}
int atomic_add(int* ptr, int value) {
  const int old = *ptr;
  *ptr = old + value;
  return old;
}
int ld_acquire(const int* ptr) { return *ptr; }

// ex2.approx.ftz.f32: 2^x; a subnormal input counts as 0 and a subnormal result is flushed to
// +0 (ftz); 2^-inf = +0, 2^+inf = +inf, NaN stays NaN. The GPU's result is within 2 ulp of the
// exact value; the emulator returns the correctly rounded one.
float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = 0.f;
  const float y = static_cast<float>(std::exp2(static_cast<double>(x)));
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.f : y;
}

namespace {

struct sigaction g_old_segv, g_old_bus;
stack_t g_old_stack;
bool g_installed = false;
char* g_alt_stack = nullptr;
constexpr size_t kAltStackBytes = 256 * 1024;

void on_fault(int sig, siginfo_t* info, void* raw_context) {
  if (!in_kernel()) {  // not ours: restore the previous handler and let the access fault again
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    return;
  }
  bool write = false;
#if defined(__x86_64__)
  write = (static_cast<ucontext_t*>(raw_context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  (void)raw_context;
#endif
  abort_kernel(describe_fault(info->si_addr, write) + (sig == SIGBUS ? " (SIGBUS)" : ""));
}

}  // namespace

std::string describe_fault(const void* addr, bool write) {
  if (g_guarded != nullptr) {
    std::string d = g_guarded->describe(addr, write);
    if (!d.empty()) return d;
  }
  if (address_in_fiber_guard(addr)) return "stack overflow of an emulated thread (fiber guard page)";
  char buf[128];
  snprintf(buf, sizeof(buf), "segmentation fault at %p (outside every buffer the emulator placed)", addr);
  return buf;
}

void install_fault_handler() {
  if (g_installed) return;
  // Our own signal stack while a launch runs (a fault may be a fiber's stack overflow); the
  // previous one (Python's faulthandler has one) comes back afterwards.
  if (g_alt_stack == nullptr) g_alt_stack = new char[kAltStackBytes];
  stack_t ss{};
  ss.ss_sp = g_alt_stack;
  ss.ss_size = kAltStackBytes;
  sigaltstack(&ss, &g_old_stack);
  struct sigaction sa {};
  sa.sa_sigaction = &on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  g_installed = true;
}

void remove_fault_handler() {
  if (!g_installed) return;
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaltstack(&g_old_stack, nullptr);
  g_installed = false;
}

}  // namespace flashattn::emu
