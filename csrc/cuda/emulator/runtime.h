// The CUDA runtime as the kernels and launchers see it when g++ compiles them for the host
// emulator (FLASHATTN_CUDA_EMULATE): built-in variables, device built-ins, the few runtime API
// calls the launchers make, and FLASHATTN_LAUNCH. Included through csrc/cuda/runtime.h only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <driver_types.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#include "emulator.h"

// CUDA's attributes mean nothing to g++; plain inline keeps compile time down.
#undef __forceinline__
#define __forceinline__ inline
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__

#define threadIdx (::flashattn::emu::current_lane().thread_idx)
#define blockIdx (::flashattn::emu::block_idx())
#define blockDim (::flashattn::emu::block_dim())
#define gridDim (::flashattn::emu::grid_dim())

// ---- device built-ins --------------------------------------------------------------------------

inline void __syncthreads(FLASHATTN_EMU_SITE_PARAMS) { ::flashattn::emu::syncthreads(FLASHATTN_EMU_SITE); }
inline int __syncthreads_or(int predicate, FLASHATTN_EMU_SITE_PARAMS) {
  return ::flashattn::emu::syncthreads_or(predicate, FLASHATTN_EMU_SITE);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, FLASHATTN_EMU_SITE_PARAMS) {
  ::flashattn::emu::syncwarp(mask, FLASHATTN_EMU_SITE);
}

namespace flashattn::emu {
template <typename T>
inline T shfl_as(ShflMode mode, unsigned mask, T var, int lane_arg, int width, Site site) {
  static_assert(std::is_trivially_copyable_v<T> && (sizeof(T) == 4 || sizeof(T) == 8), "shuffle of 4 or 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl(mode, mask, bits, lane_arg, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace flashattn::emu

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32, FLASHATTN_EMU_SITE_PARAMS) {
  return ::flashattn::emu::shfl_as(::flashattn::emu::ShflMode::kXor, mask, var, lane_mask, width, FLASHATTN_EMU_SITE);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32, FLASHATTN_EMU_SITE_PARAMS) {
  return ::flashattn::emu::shfl_as(::flashattn::emu::ShflMode::kIdx, mask, var, src_lane, width, FLASHATTN_EMU_SITE);
}

inline void __nanosleep(unsigned /*ns*/, FLASHATTN_EMU_SITE_PARAMS) {
  ::flashattn::emu::spin_yield("__nanosleep", FLASHATTN_EMU_SITE);
}
inline void __threadfence(FLASHATTN_EMU_SITE_PARAMS) { ::flashattn::emu::spin_yield("__threadfence", FLASHATTN_EMU_SITE); }
inline float atomicAdd(float* address, float value) { return ::flashattn::emu::atomic_add(address, value); }
inline double atomicAdd(double* address, double value) { return ::flashattn::emu::atomic_add(address, value); }
inline int atomicAdd(int* address, int value) { return ::flashattn::emu::atomic_add(address, value); }
inline size_t __cvta_generic_to_shared(const void* ptr, FLASHATTN_EMU_SITE_PARAMS) {
  return ::flashattn::emu::shared_address(ptr, FLASHATTN_EMU_SITE);
}

// ---- runtime API (the subset the launchers call) -------------------------------------------
// cuda_runtime_api.h (which cuda_fp16.h includes) declares cudaGetLastError, cudaGetErrorString,
// cudaMemsetAsync, cudaGetDevice and cudaDeviceGetAttribute; cuda_runtime_api.cpp defines them
// for the emulated GPU (hidden in libflashattn_emulator.so: no CUDA runtime is linked).

template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorNotSupported;
  return ::flashattn::emu::set_max_dynamic_smem(reinterpret_cast<const void*>(entry), value);
}

// ---- launches ------------------------------------------------------------------------------

namespace flashattn::emu {
// FLASHATTN_LAUNCH(grid, block, smem, stream, kernel)(args...): the arguments are copied once,
// as CUDA copies them into the parameter space, and every thread calls kernel(args...).
template <class Kernel>
struct BoundLaunch {
  LaunchConfig config;
  Kernel kernel;
  template <class... Args>
  void operator()(Args&&... args) const {
    const std::tuple<std::decay_t<Args>...> params(std::forward<Args>(args)...);
    launch(config, [&] { std::apply(kernel, params); });
  }
};
template <class Kernel>
inline BoundLaunch<Kernel*> bind_launch(dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/, Kernel* kernel,
                                        const char* name, const char* launcher) {
  return {{grid, block, smem, reinterpret_cast<const void*>(kernel), name, launcher}, kernel};
}
}  // namespace flashattn::emu

#define FLASHATTN_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::flashattn::emu::bind_launch(grid, block, smem_bytes, stream, __VA_ARGS__, #__VA_ARGS__, __PRETTY_FUNCTION__)
