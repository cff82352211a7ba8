// The Hopper pipeline's planted bugs (see selftest.cu): a producer warpgroup loads two 64 x 64
// bf16 tiles with TMA into a one-stage ring, twice, and a consumer warpgroup multiplies them on
// wgmma and releases the stage. "sm90_correct_pipeline" does it right and must pass; each other
// kernel plants one bug the emulator must report.
#include <cstring>

#include "../ptx.h"
#include "../ptx_sm90.h"
#include "../runtime.h"

namespace flashattn::cuda {

namespace {
enum Bug {
  kNone,
  kWrongPhase,       // the consumer waits for the wrong parity of the full barrier
  kNoExpectTx,       // the producer arrives without expect_tx
  kEarlyRead,        // the consumer reads the accumulators before wgmma.wait_group
  kSwizzleMismatch,  // the B descriptor says 64-byte swizzle, TMA wrote 128-byte
  kNoEmptyWait,      // the producer reloads the stage without waiting for the consumers' release
  kNoFence,          // wgmma without wgmma.fence
  kRegisterBudget,   // the consumers raise their registers while the producer keeps its own
};
constexpr int kTile = 64 * 64 * 2;  // bytes
}  // namespace

template <int kBug>
__global__ void selftest_sm90_pipeline(const __grid_constant__ sm90::TensorMap map, int* out) {
  using namespace sm90;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* a = smem_raw;
  unsigned char* b = smem_raw + kTile;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem_raw + 2 * kTile);
  uint64_t* empty = full + 1;
  if (threadIdx.x == 0) {
    mbar_init(full, 1);
    mbar_init(empty, 4);
    fence_barrier_init();
  }
  __syncthreads();
  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    if (kBug != kRegisterBudget) setmaxnreg_dec<24>();
    if (threadIdx.x == 0)
      for (int i = 0; i < 2; ++i) {
        if (kBug != kNoEmptyWait) mbar_wait(empty, (i & 1) ^ 1);
        if (kBug == kNoExpectTx) mbar_arrive(full);
        else mbar_arrive_expect_tx(full, 2 * kTile);
        tma_load_4d(a, &map, full, 0, 0, 0, 0);
        tma_load_4d(b, &map, full, 0, 64, 0, 0);
      }
    return;
  }
  setmaxnreg_inc<240>();
  if (wg != 1) return;
  float acc[32];
  for (int i = 0; i < 2; ++i) {
    mbar_wait(full, kBug == kWrongPhase ? (i & 1) ^ 1 : i & 1);
    if (kBug != kNoFence) wgmma_fence();
    const uint32_t sa = smem_u32(a), sb = smem_u32(b);
    for (int kk = 0; kk < 4; ++kk) {
      uint64_t desc_b = smem_desc_128b(sb + 32 * kk, 16, 1024);
      if (kBug == kSwizzleMismatch) desc_b = (desc_b & ~(uint64_t(3) << 62)) | uint64_t(2) << 62;
      wgmma_ss<__nv_bfloat16, 64>(acc, smem_desc_128b(sa + 32 * kk, 16, 1024), desc_b, kk > 0,
                                  std::integral_constant<int, 0>{});
    }
    wgmma_commit();
    if (kBug == kEarlyRead) out[threadIdx.x] = acc[0] > 0.f;
    wgmma_wait<0>();
    if (threadIdx.x % 32 == 0) mbar_arrive(empty);
  }
  out[threadIdx.x] = acc[1] == acc[1];
}

// in: 8192 floats, read as a 128 x 64 bf16 matrix (rows 0..63 the A tile, 64..127 the B tile).
cudaError_t run_emulator_selftest_sm90(const char* name, float* in, int* out) {
  static const struct {
    const char* name;
    int bug;
  } kKernels[] = {{"sm90_correct_pipeline", kNone},          {"sm90_wrong_mbarrier_phase", kWrongPhase},
                  {"sm90_missing_expect_tx", kNoExpectTx},   {"sm90_wgmma_wait_too_early", kEarlyRead},
                  {"sm90_swizzle_mismatch", kSwizzleMismatch}, {"sm90_reload_without_release", kNoEmptyWait},
                  {"sm90_missing_wgmma_fence", kNoFence},    {"sm90_register_budget", kRegisterBudget}};
  int bug = -1;
  for (const auto& k : kKernels)
    if (!std::strcmp(name, k.name)) bug = k.bug;
  if (bug < 0) return cudaErrorInvalidValue;
  sm90::TensorMap map;
  const uint64_t dims[4] = {64, 128, 1, 1}, strides[3] = {128, 128 * 128, 128 * 128};
  const uint32_t box[4] = {64, 64, 1, 1};
  if (sm90::encode_tensor_map(&map, in, 4, 2, dims, strides, box, 128) != cudaSuccess) return cudaErrorInvalidValue;
  const size_t smem = 2 * kTile + 16;
  const dim3 block(bug == kRegisterBudget ? 384 : 256);
  auto launch = [&](auto kernel) {
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    FLASHATTN_LAUNCH(dim3(1), block, smem, nullptr, kernel)(map, out);
  };
  switch (bug) {
    case kNone: launch(selftest_sm90_pipeline<kNone>); break;
    case kWrongPhase: launch(selftest_sm90_pipeline<kWrongPhase>); break;
    case kNoExpectTx: launch(selftest_sm90_pipeline<kNoExpectTx>); break;
    case kEarlyRead: launch(selftest_sm90_pipeline<kEarlyRead>); break;
    case kSwizzleMismatch: launch(selftest_sm90_pipeline<kSwizzleMismatch>); break;
    case kNoEmptyWait: launch(selftest_sm90_pipeline<kNoEmptyWait>); break;
    case kNoFence: launch(selftest_sm90_pipeline<kNoFence>); break;
    case kRegisterBudget: launch(selftest_sm90_pipeline<kRegisterBudget>); break;
  }
  return cudaGetLastError();
}

}  // namespace flashattn::cuda
