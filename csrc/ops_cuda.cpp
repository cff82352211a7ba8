// The CUDA side of the op layer: device guard, current stream, the GPU's compute capability,
// Philox seeds from torch's CUDA generator, the backward's workspace. Compiled only in CUDA builds.

#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <mutex>

#include "cuda/launch.h"
#include "ops.h"

namespace flashattn {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "flashattn_ext: CUDA ", what, " failed: ", cudaGetErrorString(err));
}

struct Device {
  int major, minor;
  cudaStream_t stream;
};

// Compute capability per device, read once.
std::pair<int, int> capability(int device) {
  static std::array<std::pair<int, int>, 64> cache{};
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  auto& cc = cache.at(device);
  if (cc.first == 0) {
    check_cuda(cudaDeviceGetAttribute(&cc.first, cudaDevAttrComputeCapabilityMajor, device), "device query");
    check_cuda(cudaDeviceGetAttribute(&cc.second, cudaDevAttrComputeCapabilityMinor, device), "device query");
  }
  return cc;
}

Device current(const at::Tensor& t) {
  const auto [major, minor] = capability(t.get_device());
  return {major, minor, c10::cuda::getCurrentCUDAStream(t.get_device()).stream()};
}

// The kernels read (seed, offset) saved by the forward through device pointers: no host sync,
// and it works inside CUDA graphs.
void philox_from_rng_state(AttentionParams& p, const at::Tensor& rng_state) {
  TORCH_CHECK_VALUE(rng_state.is_cuda() && rng_state.is_contiguous(),
                    "flashattn_ext: rng_state must be the contiguous CUDA tensor the forward returned");
  p.philox_seed_ptr = rng_state.data_ptr<int64_t>();
  p.philox_offset_ptr = rng_state.data_ptr<int64_t>() + 1;
  p.philox_offset_intragraph = 0;
}

}  // namespace

void cuda_draw_philox(AttentionParams& p, const at::Tensor& rng_state) {
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    // A call uses the Philox counter offsets [offset, offset + n) (philox.h): n = 1, or one per
    // sequence for varlen (select_sequence); the generator advances in multiples of 4.
    const uint64_t used = p.cu_seqlens_q != nullptr ? static_cast<uint64_t>(p.batch) : 1;
    state = gen->philox_cuda_state(4 * ((used + 3) / 4));
  }
  if (state.captured_) {
    p.philox_seed_ptr = state.seed_.ptr;
    p.philox_offset_ptr = state.offset_.ptr;
    p.philox_offset_intragraph = state.offset_intragraph_;
  } else {
    p.philox_seed = state.seed_.val;
    p.philox_offset = state.offset_.val;
  }
  p.rng_state = rng_state.data_ptr<int64_t>();  // the forward kernel records what it used
}

bool cuda_stream_capturing(const at::Tensor& t) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(t.get_device()).stream(), &status),
             "cudaStreamIsCapturing");
  return status != cudaStreamCaptureStatusNone;
}

void cuda_forward(AttentionParams& p, const at::Tensor& q, at::Tensor& rng_state) {
  c10::cuda::CUDAGuard guard(q.device());
  const Device d = current(q);
  if (p.dropout_p > 0) cuda_draw_philox(p, rng_state);
  check_cuda(cuda::run_fwd(p, d.stream, d.major, d.minor), "forward kernel");
}

void cuda_backward(AttentionGradParams& p, const at::Tensor& q, const at::Tensor& rng_state) {
  c10::cuda::CUDAGuard guard(q.device());
  const Device d = current(q);
  if (p.dropout_p > 0) philox_from_rng_state(p, rng_state);
  const size_t bytes = cuda::bwd_workspace_bytes(p, d.major, d.minor);
  at::Tensor workspace;
  if (bytes > 0) workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
  check_cuda(cuda::run_bwd(p, bytes > 0 ? workspace.data_ptr() : nullptr, d.stream, d.major, d.minor),
             "backward kernel");
}

at::Tensor cuda_dropout_mask(AttentionParams& p, const at::Tensor& rng_state) {
  c10::cuda::CUDAGuard guard(rng_state.device());
  const Device d = current(rng_state);
  philox_from_rng_state(p, rng_state);
  at::Tensor keep = at::empty({p.batch * p.num_heads * p.seqlen_q * p.seqlen_k}, rng_state.options().dtype(at::kByte));
  check_cuda(cuda::run_dropout_mask(p, keep.data_ptr<uint8_t>(), d.stream), "dropout mask kernel");
  return keep.view(at::kBool);
}

SplitPlan cuda_split_plan(const AttentionParams& p, const at::Tensor& q, int64_t requested_splits) {
  c10::cuda::CUDAGuard guard(q.device());
  const Device d = current(q);
  const cuda::FwdSplitPlan plan = cuda::fwd_split_plan(p, static_cast<int>(requested_splits), d.major, d.minor);
  return {plan.num_splits, plan.page_multiple};
}

const char* cuda_build_archs() { return cuda::compiled_archs(); }
const char* cuda_build_headdims() { return cuda::compiled_headdims(); }
const char* cuda_build_dtypes() { return cuda::compiled_dtypes(); }

}  // namespace flashattn
