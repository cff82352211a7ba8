// The CUDA runtime calls the launchers make, answered for the emulated GPU (config().sm_major /
// sm_minor): errors are sticky per call as cudaGetLastError reports them, memsets are checked
// against the buffers the emulator placed.
#include <cstring>

#include "guarded_buffers.h"
#include "internal.h"
#include "runtime.h"

cudaError_t cudaGetLastError() {
  cudaError_t& e = flashattn::emu::last_error();
  const cudaError_t out = e;
  e = cudaSuccess;
  return out;
}

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure (emulator report)";
    case cudaErrorNotSupported: return "operation not supported";
    default: return "emulated CUDA error";
  }
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t /*stream*/) {
  using namespace flashattn::emu;
  if (bytes == 0) return cudaSuccess;
  if (g_guarded != nullptr && !g_guarded->contains(dst, bytes)) {
    if (!failed()) fail_host("cudaMemsetAsync of %zu bytes at %p reaches outside every buffer of the call", bytes, dst);
    return last_error() = cudaErrorInvalidValue;
  }
  std::memset(dst, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  using namespace flashattn::emu;
  if (device != 0) return cudaErrorInvalidDevice;
  const DeviceProps p = device_props();
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = p.smem_per_block_optin; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = p.smem_per_block_default; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = p.smem_per_sm; break;
    case cudaDevAttrComputeCapabilityMajor: *value = config().sm_major; break;
    case cudaDevAttrComputeCapabilityMinor: *value = config().sm_minor; break;
    case cudaDevAttrMultiProcessorCount: *value = p.multiprocessors; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = p.max_threads_per_block; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
