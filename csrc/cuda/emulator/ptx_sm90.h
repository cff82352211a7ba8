// The emulator's versions of the Hopper wrappers of csrc/cuda/ptx_sm90.h: same names and
// signatures, implemented by hopper.cpp from the PTX ISA's semantics. Included by ptx_sm90.h
// under FLASHATTN_CUDA_EMULATE only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>

#include <cstdint>
#include <type_traits>

#include "emulator.h"

namespace flashattn::cuda::sm90 {

struct alignas(64) TensorMap {
  emu::TensorMapData data;
};

inline cudaError_t encode_tensor_map(TensorMap* out, const void* global, int rank, int element_bytes,
                                     const uint64_t* dims, const uint64_t* strides_bytes, const uint32_t* box,
                                     int swizzle_bytes) {
  return emu::encode_tensor_map(&out->data, global, rank, element_bytes, dims, strides_bytes, box, swizzle_bytes)
             ? cudaErrorInvalidValue
             : cudaSuccess;
}

inline void mbar_init(uint64_t* bar, int count, FLASHATTN_EMU_SITE_PARAMS) { emu::mbarrier_init(bar, count, FLASHATTN_EMU_SITE); }
inline void fence_barrier_init(FLASHATTN_EMU_SITE_PARAMS) { emu::mbarrier_fence_init(FLASHATTN_EMU_SITE); }
inline void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes, FLASHATTN_EMU_SITE_PARAMS) {
  emu::mbarrier_expect_tx(bar, bytes, FLASHATTN_EMU_SITE);
  emu::mbarrier_arrive(bar, FLASHATTN_EMU_SITE);
}
inline void mbar_arrive(uint64_t* bar, FLASHATTN_EMU_SITE_PARAMS) { emu::mbarrier_arrive(bar, FLASHATTN_EMU_SITE); }
inline bool mbar_try_wait(uint64_t* bar, uint32_t parity, FLASHATTN_EMU_SITE_PARAMS) {
  return emu::mbarrier_try_wait_parity(bar, parity, FLASHATTN_EMU_SITE);
}
inline void mbar_wait(uint64_t* bar, uint32_t parity, FLASHATTN_EMU_SITE_PARAMS) {
  while (!emu::mbarrier_try_wait_parity(bar, parity, FLASHATTN_EMU_SITE)) {
  }
}
inline void fence_proxy_async(FLASHATTN_EMU_SITE_PARAMS) { emu::fence_proxy_async(FLASHATTN_EMU_SITE); }

inline void tma_load_4d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3,
                        FLASHATTN_EMU_SITE_PARAMS) {
  const int coords[4] = {c0, c1, c2, c3};
  emu::tma_load(dst, &map->data, bar, coords, FLASHATTN_EMU_SITE);
}

inline void tma_load_1d(void* dst, const TensorMap* map, uint64_t* bar, int c0, FLASHATTN_EMU_SITE_PARAMS) {
  const int coords[1] = {c0};
  emu::tma_load(dst, &map->data, bar, coords, FLASHATTN_EMU_SITE);
}

inline void wgmma_fence(FLASHATTN_EMU_SITE_PARAMS) { emu::wgmma_fence(FLASHATTN_EMU_SITE); }
inline void wgmma_commit(FLASHATTN_EMU_SITE_PARAMS) { emu::wgmma_commit(FLASHATTN_EMU_SITE); }
template <int kPending>
inline void wgmma_wait(FLASHATTN_EMU_SITE_PARAMS) {
  emu::wgmma_wait(kPending, FLASHATTN_EMU_SITE);
}
inline void fence_operand(float&) {}

template <typename Element>
constexpr emu::MmaType mma_type() {
  static_assert(std::is_same_v<Element, __half> || std::is_same_v<Element, __nv_bfloat16>, "f16 or bf16 operands");
  return std::is_same_v<Element, __half> ? emu::MmaType::kF16 : emu::MmaType::kBF16;
}
template <typename Element, int N, int kTransB>
inline void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, int scale_d, std::integral_constant<int, kTransB>,
                     FLASHATTN_EMU_SITE_PARAMS) {
  emu::wgmma_mma(d, N, desc_a, nullptr, desc_b, scale_d, 0, kTransB, mma_type<Element>(), FLASHATTN_EMU_SITE);
}
template <typename Element, int N, int kTransB>
inline void wgmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc_b, int scale_d, std::integral_constant<int, kTransB>,
                     FLASHATTN_EMU_SITE_PARAMS) {
  emu::wgmma_mma(d, N, 0, a, desc_b, scale_d, 0, kTransB, mma_type<Element>(), FLASHATTN_EMU_SITE);
}

template <int kRegs>
inline void setmaxnreg_inc(FLASHATTN_EMU_SITE_PARAMS) {
  emu::setmaxnreg(kRegs, true, FLASHATTN_EMU_SITE);
}
template <int kRegs>
inline void setmaxnreg_dec(FLASHATTN_EMU_SITE_PARAMS) {
  emu::setmaxnreg(kRegs, false, FLASHATTN_EMU_SITE);
}
inline void named_barrier_sync(int id, int threads, FLASHATTN_EMU_SITE_PARAMS) {
  emu::named_barrier(id, threads, true, FLASHATTN_EMU_SITE);
}
inline void named_barrier_arrive(int id, int threads, FLASHATTN_EMU_SITE_PARAMS) {
  emu::named_barrier(id, threads, false, FLASHATTN_EMU_SITE);
}

}  // namespace flashattn::cuda::sm90
