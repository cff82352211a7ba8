// The launcher API of launch.h: picks the tensor-core kernels (dtype x head-dim bucket) or the
// SIMT path, prepares the backward's workspace and runs the kernels in order on the stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "kernel_configs.h"
#include "launch.h"
#include "launch_templates.h"
#include "simt.h"

namespace flashattn::cuda {

namespace {

// Head-dim buckets compiled into this build (setup.py passes -DFLASHATTN_NO_HDIM_<n> for the
// buckets it skipped, -DFLASHATTN_NO_FP16 / -DFLASHATTN_NO_BF16 for dtypes).
constexpr bool bucket_compiled(int d) {
  switch (d) {
#ifndef FLASHATTN_NO_HDIM_32
    case 32:
#endif
#ifndef FLASHATTN_NO_HDIM_64
    case 64:
#endif
#ifndef FLASHATTN_NO_HDIM_96
    case 96:
#endif
#ifndef FLASHATTN_NO_HDIM_128
    case 128:
#endif
#ifndef FLASHATTN_NO_HDIM_192
    case 192:
#endif
#ifndef FLASHATTN_NO_HDIM_256
    case 256:
#endif
      return true;
    default:
      return false;
  }
}
constexpr int kBuckets[] = {32, 64, 96, 128, 192, 256};

bool dtype_compiled(DType dtype) {
#ifndef FLASHATTN_NO_FP16
  if (dtype == DType::kFloat16) return true;
#endif
#ifndef FLASHATTN_NO_BF16
  if (dtype == DType::kBFloat16) return true;
#endif
  return false;
}

// Smallest compiled bucket >= the larger of the two head dims (Ev != E pads to one width),
// 0 if none: a head dim whose own bucket is excluded runs in the next larger compiled one.
int select_bucket(const AttentionParams& p) {
  const int64_t d = p.headdim > p.headdim_v ? p.headdim : p.headdim_v;
  for (int b : kBuckets)
    if (d <= b && bucket_compiled(b)) return b;
  return 0;
}

template <int kHeadDim>
constexpr int fwd_smem_bytes() {
  using Fwd = FwdConfig<__half, kHeadDim>;
  return Fwd::Traits::kSmemBytes > Fwd::TraitsExtras::kSmemBytes ? Fwd::Traits::kSmemBytes
                                                                  : Fwd::TraitsExtras::kSmemBytes;
}
template <int kHeadDim>
constexpr int bwd_smem_bytes() {
  using Bwd = BwdConfig<__half, kHeadDim>;
  return Bwd::Traits::kSmemBytes > Bwd::TraitsExtras::kSmemBytes ? Bwd::Traits::kSmemBytes
                                                                  : Bwd::TraitsExtras::kSmemBytes;
}
// Shared memory per CTA the bucket's kernels of one direction need.
int smem_needed(int bucket, bool backward) {
  switch (bucket) {
    case 32: return backward ? bwd_smem_bytes<32>() : fwd_smem_bytes<32>();
    case 64: return backward ? bwd_smem_bytes<64>() : fwd_smem_bytes<64>();
    case 96: return backward ? bwd_smem_bytes<96>() : fwd_smem_bytes<96>();
    case 128: return backward ? bwd_smem_bytes<128>() : fwd_smem_bytes<128>();
    case 192: return backward ? bwd_smem_bytes<192>() : fwd_smem_bytes<192>();
    default: return backward ? bwd_smem_bytes<256>() : fwd_smem_bytes<256>();
  }
}

int device_attribute(cudaDeviceAttr attr) {
  int device = 0, value = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&value, attr, device) != cudaSuccess) return 0;
  return value;
}
int device_smem_optin() { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin); }

// The forward's K/V pipeline depth: the two-stage ring where it costs no occupancy, i.e. the
// CTAs per SM that the registers allow (255 per thread) still fit in shared memory with it
// (sm90: yes for every bucket; sm80: only d = 32). FLASHATTN_CUDA_KV_STAGES=1|2 overrides (benchmarks).
template <int kHeadDim>
int kv_stages_for() {
  using Pipelined = typename FwdConfig<__half, kHeadDim>::TraitsPipelined;
  static const int forced = [] {
    const char* env = std::getenv("FLASHATTN_CUDA_KV_STAGES");
    return env ? std::atoi(env) : 0;
  }();
  if (Pipelined::kStages == 1) return 1;  // no ring for this bucket
  const bool launchable = Pipelined::kSmemBytes <= device_smem_optin();
  if (forced == 1 || forced == 2) return launchable ? forced : 1;
  const int per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor);
  const int ctas = 65536 / (Pipelined::kThreads * 256) > 0 ? 65536 / (Pipelined::kThreads * 256) : 1;
  return launchable && ctas * (Pipelined::kSmemBytes + 1024) <= per_sm ? 2 : 1;
}
int kv_stages(int bucket) {
  switch (bucket) {
    case 32: return kv_stages_for<32>();
    case 64: return kv_stages_for<64>();
    case 96: return kv_stages_for<96>();
    case 128: return kv_stages_for<128>();
    case 192: return kv_stages_for<192>();
    default: return kv_stages_for<256>();
  }
}

bool aligned16(const void* ptr) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool strides8(int64_t a, int64_t b, int64_t c) { return a % 8 == 0 && b % 8 == 0 && c % 8 == 0; }

bool fwd_vectorized(const AttentionParams& p) {
  return aligned16(p.q) && aligned16(p.k) && aligned16(p.v) && aligned16(p.out) &&
         strides8(p.q_batch_stride, p.q_head_stride, p.q_row_stride) &&
         strides8(p.k_batch_stride, p.k_head_stride, p.k_row_stride) &&
         strides8(p.v_batch_stride, p.v_head_stride, p.v_row_stride) &&
         strides8(p.o_batch_stride, p.o_head_stride, p.o_row_stride);
}
bool bwd_vectorized(const AttentionGradParams& p) {
  return fwd_vectorized(p) && aligned16(p.dout) && aligned16(p.dq) && aligned16(p.dk) && aligned16(p.dv) &&
         strides8(p.do_batch_stride, p.do_head_stride, p.do_row_stride) &&
         strides8(p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride) &&
         strides8(p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
}

bool has_extras(const AttentionParams& p) {
  return p.mask_kind != MaskKind::kNone || p.dropout_p > 0.f || p.alibi_slopes != nullptr || p.softcap > 0.f ||
         p.block_mask != nullptr || !(p.softmax_scale > 0.f);
}

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct BwdWorkspace {
  size_t dq_accum_bytes = 0, semaphore_bytes = 0;
};
BwdWorkspace bwd_workspace(const AttentionGradParams& p, int bucket) {
  BwdWorkspace w;
  const size_t rows = static_cast<size_t>(p.batch * p.num_heads * p.seqlen_q);
  w.dq_accum_bytes = align_up(rows * bucket * sizeof(float));
  const size_t m_blocks = static_cast<size_t>((p.seqlen_q + bwd_block_m(bucket) - 1) / bwd_block_m(bucket));
  w.semaphore_bytes = p.deterministic ? align_up(static_cast<size_t>(p.batch * p.num_heads) * m_blocks * 4) : 0;
  return w;
}

template <typename Element>
cudaError_t launch_fwd_bucket(int bucket, const AttentionParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  switch (bucket) {
#ifndef FLASHATTN_NO_HDIM_32
    case 32: return launch_fwd<Element, 32>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_64
    case 64: return launch_fwd<Element, 64>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_96
    case 96: return launch_fwd<Element, 96>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_128
    case 128: return launch_fwd<Element, 128>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_192
    case 192: return launch_fwd<Element, 192>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_256
    case 256: return launch_fwd<Element, 256>(p, opt, stream);
#endif
    default: return cudaErrorInvalidValue;
  }
}
template <typename Element>
cudaError_t launch_bwd_bucket(int bucket, const AttentionGradParams& p, const LaunchOptions& opt, cudaStream_t stream) {
  switch (bucket) {
#ifndef FLASHATTN_NO_HDIM_32
    case 32: return launch_bwd<Element, 32>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_64
    case 64: return launch_bwd<Element, 64>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_96
    case 96: return launch_bwd<Element, 96>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_128
    case 128: return launch_bwd<Element, 128>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_192
    case 192: return launch_bwd<Element, 192>(p, opt, stream);
#endif
#ifndef FLASHATTN_NO_HDIM_256
    case 256: return launch_bwd<Element, 256>(p, opt, stream);
#endif
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int bwd_block_m(int /*head_dim_bucket*/) { return 64; }  // BwdConfig: block_m = 64 for every bucket

namespace {

// Shared by both directions: everything but the shared-memory budget.
const char* tensor_core_unsupported_reason(const AttentionParams& p, int sm_major) {
  if (p.dtype == DType::kFloat32) return "float32 has no tensor-core kernel; it runs on the SIMT path";
  if (p.dtype == DType::kFloat64) return "float64 has no tensor-core kernel; it runs on the SIMT path";
  if (sm_major < 8) return "the tensor-core kernels need sm80 or newer (mma.sync bf16, cp.async)";
  if (!dtype_compiled(p.dtype)) return "this dtype's tensor-core kernels were not compiled (FLASHATTN_CUDA_DTYPES)";
  if (p.headdim > 256 || p.headdim_v > 256) return "head dim > 256 has no tensor-core kernel";
  if (select_bucket(p) == 0) return "no compiled head-dim bucket is large enough (FLASHATTN_CUDA_HEADDIMS)";
  return nullptr;
}

// The backward's tiles are larger than the forward's: a GPU with ~100 KB of shared memory per
// block (sm86, sm89, sm120) runs the tensor-core forward and the SIMT backward for d >= 96.
const char* bwd_unsupported_reason(const AttentionParams& p, int sm_major) {
  if (const char* why = tensor_core_unsupported_reason(p, sm_major)) return why;
  const int optin = device_smem_optin();
  if (optin > 0 && smem_needed(select_bucket(p), /*backward=*/true) > optin)
    return "the device has too little shared memory per block for this head dim's tensor-core backward";
  return nullptr;
}

}  // namespace

const char* fwd_unsupported_reason(const AttentionParams& p, int sm_major, int /*sm_minor*/) {
  if (const char* why = tensor_core_unsupported_reason(p, sm_major)) return why;
  const int optin = device_smem_optin();
  if (optin > 0 && smem_needed(select_bucket(p), /*backward=*/false) > optin)
    return "the device has too little shared memory per block for this head dim's tensor-core forward";
  return nullptr;
}

size_t bwd_workspace_bytes(const AttentionGradParams& p, int sm_major, int /*sm_minor*/) {
  if (bwd_unsupported_reason(p, sm_major) != nullptr) return 0;
  const BwdWorkspace w = bwd_workspace(p, select_bucket(p));
  return w.dq_accum_bytes + w.semaphore_bytes;
}

cudaError_t run_fwd(const AttentionParams& p, cudaStream_t stream, int sm_major, int sm_minor) {
  if (fwd_unsupported_reason(p, sm_major, sm_minor) != nullptr) return run_simt_fwd(p, stream);
  LaunchOptions opt;
  opt.vectorized = fwd_vectorized(p);
  opt.extras = has_extras(p);
  const int bucket = select_bucket(p);
  opt.kv_stages = kv_stages(bucket);
  if (p.dtype == DType::kFloat16) {
#ifndef FLASHATTN_NO_FP16
    return launch_fwd_bucket<__half>(bucket, p, opt, stream);
#endif
  } else {
#ifndef FLASHATTN_NO_BF16
    return launch_fwd_bucket<__nv_bfloat16>(bucket, p, opt, stream);
#endif
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_bwd(const AttentionGradParams& params, void* workspace, cudaStream_t stream, int sm_major,
                    int /*sm_minor*/) {
  cudaError_t err = run_bwd_preprocess(params, stream);
  if (err != cudaSuccess) return err;
  err = zero_dmask(params, stream);
  if (err != cudaSuccess) return err;
  if (bwd_unsupported_reason(params, sm_major) != nullptr) return run_simt_bwd(params, stream);

  AttentionGradParams p = params;
  const int bucket = select_bucket(p);
  const BwdWorkspace w = bwd_workspace(p, bucket);
  p.dq_accum = static_cast<float*>(workspace);
  p.dq_semaphore = p.deterministic ? reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + w.dq_accum_bytes)
                                   : nullptr;
  if (w.dq_accum_bytes + w.semaphore_bytes > 0) {
    err = cudaMemsetAsync(workspace, 0, w.dq_accum_bytes + w.semaphore_bytes, stream);
    if (err != cudaSuccess) return err;
  }
  LaunchOptions opt;
  opt.vectorized = bwd_vectorized(p);
  opt.extras = has_extras(p);
  if (p.dtype == DType::kFloat16) {
#ifndef FLASHATTN_NO_FP16
    return launch_bwd_bucket<__half>(bucket, p, opt, stream);
#endif
  } else {
#ifndef FLASHATTN_NO_BF16
    return launch_bwd_bucket<__nv_bfloat16>(bucket, p, opt, stream);
#endif
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_dropout_mask(const AttentionParams& p, uint8_t* keep, cudaStream_t stream) {
  return run_dropout_mask_kernel(p, keep, stream);
}

#define FLASHATTN_STR2(x) #x
#define FLASHATTN_STR(x) FLASHATTN_STR2(x)

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FLASHATTN_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

const char* compiled_headdims() {
  static const char* list = [] {
    static char buf[64];
    int n = 0;
    for (int b : kBuckets) {
      if (!bucket_compiled(b)) continue;
      n += snprintf(buf + n, sizeof(buf) - n, n ? ",%d" : "%d", b);
    }
    buf[n] = 0;
    return buf;
  }();
  return list;
}

const char* compiled_dtypes() {
#if !defined(FLASHATTN_NO_FP16) && !defined(FLASHATTN_NO_BF16)
  return "fp16,bf16";
#elif !defined(FLASHATTN_NO_FP16)
  return "fp16";
#elif !defined(FLASHATTN_NO_BF16)
  return "bf16";
#else
  return "";
#endif
}

}  // namespace flashattn::cuda
