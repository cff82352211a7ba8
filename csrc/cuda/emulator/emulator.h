// The host emulator's core interface: what the emulated built-ins (runtime.h) and PTX
// instructions (ptx.h) call. Torch-free; everything runs on the calling CPU thread.
//
// Execution model: a launch runs its blocks one at a time in block-index order (x fastest). A
// block's threads are cooperative fibers; a thread runs until it reaches a collective (barrier,
// shuffle, ldmatrix, mma, ...), a spin (__nanosleep, __threadfence) or, in the random schedule,
// a shared-memory access, and then the schedule picks the next thread. Collectives complete when
// every thread they involve has arrived. The first error (a race, a deadlock, an out-of-bounds
// access, lanes meeting different collectives, ...) aborts the launch with a report.
#pragma once

#include <driver_types.h>  // cudaError_t (types only: no CUDA runtime is linked)
#include <vector_types.h>  // dim3, uint3

#include <cstddef>
#include <cstdint>
#include <functional>

namespace flashattn::emu {

// Where a collective or an asynchronous copy was issued (reported when lanes disagree).
struct Site {
  const char* file;
  int line;
};
#define FLASHATTN_EMU_SITE_PARAMS const char *site_file = __builtin_FILE(), int site_line = __builtin_LINE()
#define FLASHATTN_EMU_SITE (::flashattn::emu::Site{site_file, site_line})

// What a running thread knows about itself (read by threadIdx and by every built-in).
struct LaneInfo {
  uint3 thread_idx;
  int linear;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  int warp, lane;
};
extern LaneInfo* g_lane;  // the running thread
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;

inline const LaneInfo& current_lane() { return *g_lane; }
inline const uint3& block_idx() { return g_block_idx; }
inline const dim3& block_dim() { return g_block_dim; }
inline const dim3& grid_dim() { return g_grid_dim; }

// Aborts the current launch with this report (never returns into the kernel).
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Block and warp collectives.
void syncthreads(Site site);
int syncthreads_or(int predicate, Site site);
void syncwarp(unsigned mask, Site site);
enum class ShflMode { kIdx, kXor };
uint64_t shfl(ShflMode mode, unsigned mask, uint64_t value, int lane_arg, int width, Site site);
// A spin-loop step (__nanosleep, __threadfence): yields; spinning with nothing else able to run
// is reported as a deadlock.
void spin_yield(const char* what, Site site);

// Shared memory and asynchronous copies (cp.async.cg: 16-byte chunks, zero-fill past src_bytes).
uint32_t shared_address(const void* generic, Site site);
void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes, Site site);
void cp_async_commit(Site site);
void cp_async_wait(int pending, Site site);

// Tensor-core instructions, from the PTX ISA's fragment layouts.
void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans, Site site);
enum class MmaType { kF16, kBF16 };
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type, Site site);

// Hopper (sm_90a) instructions, from the PTX ISA's text (hopper.cpp).
// mbarrier objects live in shared memory (8 bytes, 8-aligned); the emulator keeps their state.
void mbarrier_init(uint64_t* bar, int count, Site site);
void mbarrier_fence_init(Site site);  // fence.mbarrier_init.release.cluster
void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes, Site site);
void mbarrier_arrive(uint64_t* bar, Site site);  // arrive-on; with expect_tx first for arrive.expect_tx
bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity, Site site);
void fence_proxy_async(Site site);  // fence.proxy.async.shared::cta
// A tensor map as the emulator encodes it (the 128-byte CUtensorMap of a GPU build).
struct TensorMapData {
  const void* global;
  int rank, element_bytes, swizzle_bytes;  // swizzle 0 (none), 32, 64, 128
  uint64_t dims[5], strides_bytes[5];      // strides_bytes[0] = element_bytes
  uint32_t box[5];
  uint32_t magic;
};
// cuTensorMapEncodeTiled's equivalent (host code): nullptr, or why the arguments are refused.
// strides_bytes: of dimensions 1 .. rank - 1 (dimension 0 is contiguous).
const char* encode_tensor_map(TensorMapData* out, const void* global, int rank, int element_bytes,
                              const uint64_t* dims, const uint64_t* strides_bytes, const uint32_t* box,
                              int swizzle_bytes);
// cp.async.bulk.tensor.<rank>d.shared::cluster.global.mbarrier::complete_tx::bytes
void tma_load(void* smem_dst, const TensorMapData* map, uint64_t* bar, const int* coords, Site site);
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}: A from a descriptor (a_regs == nullptr)
// or registers, B from a descriptor; d holds N / 2 accumulators per thread.
void wgmma_fence(Site site);
void wgmma_mma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d, int trans_a,
               int trans_b, MmaType type, Site site);
void wgmma_commit(Site site);
void wgmma_wait(int pending, Site site);
void setmaxnreg(int regs, bool increase, Site site);
void named_barrier(int id, int threads, bool wait, Site site);  // bar.sync / bar.arrive

// Global-memory operations and special functions.
void red_add_f32(float* ptr, float value);
float atomic_add(float* ptr, float value);
double atomic_add(double* ptr, double value);
int atomic_add(int* ptr, int value);
int ld_acquire(const int* ptr);
float ex2_approx_ftz(float x);

// One kernel launch: runs `thread_body` once per thread of every block. Errors (bad launch
// configuration, a kernel failure) are returned and also kept for cudaGetLastError.
struct LaunchConfig {
  dim3 grid, block;
  size_t smem_bytes;
  const void* kernel;
  const char* kernel_name;  // the launch expression
  const char* launcher;     // __PRETTY_FUNCTION__ of the launching function (template arguments)
};
cudaError_t launch(const LaunchConfig& config, const std::function<void()>& thread_body);

// Whether the emulated GPU runs the Hopper (sm_90a) kernels (emulated_cuda(hopper=True)).
bool hopper_kernels_enabled();

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);

}  // namespace flashattn::emu
