// Run-time choice of the CPU kernels' instruction set (csrc/cpu/isa.h). setup.py defines
// FLASHATTN_CPU_BUILT_AVX2 / FLASHATTN_CPU_BUILT_AVX512 for the copies it compiled.

#include <ATen/Version.h>

#include "cpu/kernels.h"

namespace flashattn::cpu {
namespace {

enum class Isa { kDefault, kAvx2, kAvx512 };

Isa choose() {
  const std::string cap = at::get_cpu_capability();  // "DEFAULT", "AVX2", "AVX512", "ZVECTOR", ...
#if defined(FLASHATTN_CPU_BUILT_AVX512)
  if (cap == "AVX512") return Isa::kAvx512;
#endif
#if defined(FLASHATTN_CPU_BUILT_AVX2)
  if (cap == "AVX2" || cap == "AVX512") return Isa::kAvx2;
#endif
  return Isa::kDefault;
}

Isa current() {
  static const Isa chosen = choose();
  return chosen;
}

}  // namespace

const char* isa() {
  switch (current()) {
    case Isa::kAvx512: return "AVX512";
    case Isa::kAvx2: return "AVX2";
    default: return "DEFAULT";
  }
}

std::string isas_built() {
  std::string s = "DEFAULT";
#if defined(FLASHATTN_CPU_BUILT_AVX2)
  s += ",AVX2";
#endif
#if defined(FLASHATTN_CPU_BUILT_AVX512)
  s += ",AVX512";
#endif
  return s;
}

#if defined(FLASHATTN_CPU_BUILT_AVX512)
#define FLASHATTN_CASE_AVX512(call) case Isa::kAvx512: return AVX512::call;
#else
#define FLASHATTN_CASE_AVX512(call)
#endif
#if defined(FLASHATTN_CPU_BUILT_AVX2)
#define FLASHATTN_CASE_AVX2(call) case Isa::kAvx2: return AVX2::call;
#else
#define FLASHATTN_CASE_AVX2(call)
#endif

#define FLASHATTN_CPU_DISPATCH(ret, name, params, args) \
  ret name params {                                     \
    switch (current()) {                                \
      FLASHATTN_CASE_AVX512(name args)                  \
      FLASHATTN_CASE_AVX2(name args)                    \
      default: return DEFAULT::name args;               \
    }                                                   \
  }
FLASHATTN_CPU_KERNELS(FLASHATTN_CPU_DISPATCH)

}  // namespace flashattn::cpu
