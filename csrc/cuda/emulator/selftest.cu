// Small kernels with one planted bug each (in namespace flashattn::cuda itself: under the
// emulator `extern __shared__ smem_raw` must name flashattn::cuda::smem_raw), compiled exactly like the real kernels: the test suite
// runs them (flashattn_ext.testing.emulator_selftest) to show that every check of the emulator
// fires, on every schedule, in every CI run. mutate.py does the same on copies of the real kernels.
#include <cstring>

#include "../ptx.h"
#include "../runtime.h"

namespace flashattn::cuda {
__global__ void selftest_race_read_after_write(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  if (threadIdx.x / 32 == 0) s[threadIdx.x] = 1.f;  // warp 0 writes ...
  if (threadIdx.x / 32 == 1) out[threadIdx.x] = static_cast<int>(s[threadIdx.x - 32]);  // ... warp 1 reads: no barrier
}

__global__ void selftest_race_write_after_read(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x] = 1.f;
  __syncthreads();
  if (threadIdx.x / 32 == 1) out[threadIdx.x] = static_cast<int>(s[threadIdx.x - 32]);  // warp 1 reads ...
  if (threadIdx.x / 32 == 0) s[threadIdx.x] = 2.f;  // ... warp 0 overwrites: no barrier between
}

__global__ void selftest_copy_not_waited(const float* in, int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  cp_async_16(s + 4 * threadIdx.x, in + 4 * threadIdx.x, 16);
  cp_async_commit();
  out[threadIdx.x] = static_cast<int>(s[4 * threadIdx.x]);  // read before cp.async.wait_group
}

__global__ void selftest_wait_one_group_too_few(const float* in, int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  cp_async_16(s + 4 * threadIdx.x, in + 4 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_16(s + 4 * (threadIdx.x + 64), in + 4 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_wait<1>();  // the first group landed, the second may not have
  __syncthreads();
  out[threadIdx.x] = static_cast<int>(s[4 * (threadIdx.x + 64)]);
}

__global__ void selftest_divergent_barriers(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void selftest_divergent_shuffles(int* out) {
  int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  else v = __shfl_xor_sync(0xffffffffu, v, 2);
  out[threadIdx.x] = v;
}

__global__ void selftest_lane_exits_before_shuffle(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

__global__ void selftest_spin_forever(int* flag) {
  if (threadIdx.x == 0)
    while (ld_acquire(flag) != 1) __nanosleep(32);  // nobody ever sets it
  __syncthreads();
}

__global__ void selftest_barrier_never_reached(int* out) {
  // Lanes 32..47 wait at a shuffle that lanes 48..63 never reach (they wait at the barrier).
  if (threadIdx.x >= 32 && threadIdx.x < 48) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1, 1);
  __syncthreads();
}

__global__ void selftest_global_read_past_end(const float* in, int n, int* out) {
  out[threadIdx.x] = static_cast<int>(in[n + threadIdx.x]);  // n elements exist
}

__global__ void selftest_shared_past_end(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  s[threadIdx.x + 64] = 1.f;  // 256 bytes of dynamic shared memory = 64 floats
  out[threadIdx.x] = 0;
}

__global__ void selftest_misaligned_ldmatrix(int* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint32_t r[4];
  ldsm_x4(r, smem_u32(smem_raw + 16 * (threadIdx.x % 32) + 4));
  out[threadIdx.x] = static_cast<int>(r[0]);
}

__global__ void selftest_correct_pipeline(const float* in, int* out) {
  // The same traffic done right: copies waited for, barriers in place. Must pass.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);
  cp_async_16(s + 4 * threadIdx.x, in + 4 * threadIdx.x, 16);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  const float mine = s[4 * ((threadIdx.x + 32) % 64)];
  __syncthreads();
  s[4 * threadIdx.x] = mine;
  __syncthreads();
  out[threadIdx.x] = static_cast<int>(s[4 * threadIdx.x]) + __shfl_xor_sync(0xffffffffu, 1, 3);
}

cudaError_t run_emulator_selftest_sm90(const char* name, float* in, int* out);

// Runs one self-test kernel (64 threads, 2 warps) on fresh buffers; the emulator's report, if
// any, is what the caller asserts on. Names: see the table below (and selftest_sm90.cu's).
cudaError_t run_emulator_selftest(const char* name, float* in, int* out, int* flag) {
  const dim3 grid(1), block(64);
  const size_t smem = 2048;
  if (!std::strcmp(name, "race_read_after_write")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_race_read_after_write)(out);
  else if (!std::strcmp(name, "race_write_after_read")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_race_write_after_read)(out);
  else if (!std::strcmp(name, "copy_not_waited")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_copy_not_waited)(in, out);
  else if (!std::strcmp(name, "wait_one_group_too_few"))
    FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_wait_one_group_too_few)(in, out);
  else if (!std::strcmp(name, "divergent_barriers")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_divergent_barriers)(out);
  else if (!std::strcmp(name, "divergent_shuffles")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_divergent_shuffles)(out);
  else if (!std::strcmp(name, "lane_exits_before_shuffle"))
    FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_lane_exits_before_shuffle)(out);
  else if (!std::strcmp(name, "spin_forever")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_spin_forever)(flag);
  else if (!std::strcmp(name, "barrier_never_reached"))
    FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_barrier_never_reached)(out);
  else if (!std::strcmp(name, "global_read_past_end"))
    FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_global_read_past_end)(in, 8192, out);
  else if (!std::strcmp(name, "shared_past_end")) FLASHATTN_LAUNCH(grid, block, 256, nullptr, selftest_shared_past_end)(out);
  else if (!std::strcmp(name, "misaligned_ldmatrix")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_misaligned_ldmatrix)(out);
  else if (!std::strcmp(name, "correct_pipeline")) FLASHATTN_LAUNCH(grid, block, smem, nullptr, selftest_correct_pipeline)(in, out);
  else return run_emulator_selftest_sm90(name, in, out);
  return cudaGetLastError();
}

}  // namespace flashattn::cuda
