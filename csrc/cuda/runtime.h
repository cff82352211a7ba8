// The CUDA runtime the kernels and launchers are written against: nvcc's, or, when g++ compiles
// the same sources for the host emulator (FLASHATTN_CUDA_EMULATE, see emulator/), the emulator's.
// Kernels are launched with FLASHATTN_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...),
// which is exactly kernel<<<grid, block, smem_bytes, stream>>>(args...) under nvcc.
#pragma once

#ifdef FLASHATTN_CUDA_EMULATE
#include "emulator/runtime.h"
#else
#include <cuda_runtime.h>
#define FLASHATTN_LAUNCH(grid, block, smem_bytes, stream, ...) __VA_ARGS__<<<grid, block, smem_bytes, stream>>>
#endif
