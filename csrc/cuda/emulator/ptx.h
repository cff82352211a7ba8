// The emulator's versions of the PTX wrappers of csrc/cuda/ptx.h: same names and signatures,
// implemented by the host emulator (the semantics are the PTX ISA's, see tensor_core.cpp and
// shared_memory.cpp). Included by csrc/cuda/ptx.h under FLASHATTN_CUDA_EMULATE only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "emulator.h"

namespace flashattn::cuda {

inline uint32_t smem_u32(const void* ptr, FLASHATTN_EMU_SITE_PARAMS) {
  return emu::shared_address(ptr, FLASHATTN_EMU_SITE);
}

inline void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes, FLASHATTN_EMU_SITE_PARAMS) {
  emu::cp_async_16(smem_dst, gmem_src, src_bytes, FLASHATTN_EMU_SITE);
}
inline void cp_async_commit(FLASHATTN_EMU_SITE_PARAMS) { emu::cp_async_commit(FLASHATTN_EMU_SITE); }
template <int kPending>
inline void cp_async_wait(FLASHATTN_EMU_SITE_PARAMS) {
  emu::cp_async_wait(kPending, FLASHATTN_EMU_SITE);
}

inline void ldsm_x4(uint32_t (&r)[4], uint32_t smem_addr, FLASHATTN_EMU_SITE_PARAMS) {
  emu::ldmatrix_x4(r, smem_addr, /*trans=*/false, FLASHATTN_EMU_SITE);
}
inline void ldsm_x4_trans(uint32_t (&r)[4], uint32_t smem_addr, FLASHATTN_EMU_SITE_PARAMS) {
  emu::ldmatrix_x4(r, smem_addr, /*trans=*/true, FLASHATTN_EMU_SITE);
}

template <typename Element>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, FLASHATTN_EMU_SITE_PARAMS) {
  static_assert(std::is_same_v<Element, __half> || std::is_same_v<Element, __nv_bfloat16>, "f16 or bf16 operands");
  emu::mma_m16n8k16(d, a, b0, b1, std::is_same_v<Element, __half> ? emu::MmaType::kF16 : emu::MmaType::kBF16,
                    FLASHATTN_EMU_SITE);
}

inline void red_add_f32(float* ptr, float v) { emu::red_add_f32(ptr, v); }
inline void red_add_f32x2(float* ptr, float lo, float hi) {
  if (reinterpret_cast<uintptr_t>(ptr) % 8 != 0) emu::fail("red.global.add.v2.f32: address %p is not 8-byte aligned", ptr);
  emu::red_add_f32(ptr, lo);
  emu::red_add_f32(ptr + 1, hi);
}
inline float fast_exp2(float x) { return emu::ex2_approx_ftz(x); }
inline int ld_acquire(const int* ptr) { return emu::ld_acquire(ptr); }

}  // namespace flashattn::cuda
