// The launcher API of launch.h: picks the tensor-core kernels (dtype x head-dim bucket) or the
// SIMT path, prepares the backward's workspace and runs the kernels in order on the stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cmath>
#include <utility>
#include <mutex>
#include <string>
#include <vector>

#include "grid.h"
#include "kernel_configs.h"
#include "launch.h"
#include "launch_templates.h"
#include "simt.h"

namespace flashattn::cuda {

namespace {

// Smallest compiled bucket >= the larger of the two head dims (Ev != E pads to one width), 0 if
// none: a head dim whose own bucket is excluded runs in the next larger compiled one.
int select_bucket(const AttentionParams& p) {
  const int64_t d = p.headdim > p.headdim_v ? p.headdim : p.headdim_v;
  int bucket = 0;
  for_each_built_bucket([&](auto b) {
    if (bucket == 0 && d <= b()) bucket = b();
  });
  return bucket;
}

bool dtype_compiled(DType dtype) {
  bool found = false;
  for_each_built_dtype([&](auto element) { found |= dtype_of<typename decltype(element)::type>() == dtype; });
  return found;
}

// What a device offers the kernels, read once per (device, compute capability).
struct DeviceLimits {
  int smem_optin = 0, smem_per_sm = 0, sms = 0;
};
DeviceLimits device_limits(int sm_major, int sm_minor) {
  struct Entry {
    int device, major, minor;
    DeviceLimits limits;
  };
  static std::mutex mutex;
  static std::vector<Entry> cache;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return {};
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : cache)
    if (e.device == device && e.major == sm_major && e.minor == sm_minor) return e.limits;
  DeviceLimits l;
  if (cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return {};
  cache.push_back({device, sm_major, sm_minor, l});
  return l;
}

// FLASHATTN_CUDA_KV_STAGES=1|2 forces the forward's K/V pipeline (benchmarks, tests); read once.
int forced_kv_stages() {
  static const int forced = [] {
    const char* env = std::getenv("FLASHATTN_CUDA_KV_STAGES");
    return env ? std::atoi(env) : 0;
  }();
  return forced;
}

// Per bucket: the shared memory its kernels need and the forward's K/V pipeline depth.
struct BucketPlan {
  int fwd_smem = 0, bwd_smem = 0, kv_stages = 1;
};
BucketPlan bucket_plan(int bucket, const DeviceLimits& dev) {
  BucketPlan plan;
  for_each_built_bucket([&](auto b) {
    constexpr int D = decltype(b)::value;
    if (D != bucket) return;
    using Fwd = FwdConfig<__half, D>;
    using Bwd = BwdConfig<__half, D>;
    plan.fwd_smem = Fwd::Traits::kSmemBytes > Fwd::TraitsExtras::kSmemBytes ? Fwd::Traits::kSmemBytes
                                                                          : Fwd::TraitsExtras::kSmemBytes;
    plan.bwd_smem = Bwd::Traits::kSmemBytes > Bwd::TraitsExtras::kSmemBytes ? Bwd::Traits::kSmemBytes
                                                                          : Bwd::TraitsExtras::kSmemBytes;
    // The two-stage ring where it costs no occupancy: the CTAs per SM the registers allow (255
    // per thread) still fit in shared memory with it.
    using Pipelined = typename Fwd::TraitsPipelined;
    if (Pipelined::kStages == 1) return;  // no ring for this bucket
    const bool launchable = Pipelined::kSmemBytes <= dev.smem_optin;
    const int forced = forced_kv_stages();
    if (forced == 1 || forced == 2) {
      plan.kv_stages = launchable ? forced : 1;
      return;
    }
    const int ctas = 65536 / (Pipelined::kThreads * 256) > 0 ? 65536 / (Pipelined::kThreads * 256) : 1;
    plan.kv_stages = launchable && ctas * (Pipelined::kSmemBytes + 1024) <= dev.smem_per_sm ? 2 : 1;
  });
  return plan;
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
  const size_t rows = static_cast<size_t>(row_array_rows(p));
  w.dq_accum_bytes = align_up(rows * bucket * sizeof(float));
  const size_t m_blocks = static_cast<size_t>((p.seqlen_q + kBwdBlockM - 1) / kBwdBlockM);
  w.semaphore_bytes = p.deterministic ? align_up(static_cast<size_t>(p.batch * p.num_heads) * m_blocks * 4) : 0;
  return w;
}

// The tensor-core launcher of (p.dtype, bucket): launch(Type<Element>, integral_constant<D>).
template <class Launch>
cudaError_t with_kernels(DType dtype, int bucket, Launch&& launch) {
  cudaError_t err = cudaErrorInvalidValue;
  for_each_built_dtype([&](auto element) {
    if (dtype_of<typename decltype(element)::type>() != dtype) return;
    for_each_built_bucket([&](auto d) {
      if (d() == bucket) err = launch(element, d);
    });
  });
  return err;
}

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

// The shared-memory budget: a GPU with ~100 KB per block (sm86, sm89, sm120) runs the tensor-core
// forward and the SIMT backward for d >= 96 (the backward's tiles are larger).
const char* unsupported_reason(const AttentionParams& p, int sm_major, int sm_minor, bool backward) {
  if (const char* why = tensor_core_unsupported_reason(p, sm_major)) return why;
  const DeviceLimits dev = device_limits(sm_major, sm_minor);
  const BucketPlan plan = bucket_plan(select_bucket(p), dev);
  if (dev.smem_optin > 0 && (backward ? plan.bwd_smem : plan.fwd_smem) > dev.smem_optin)
    return backward ? "the device has too little shared memory per block for this head dim's tensor-core backward"
                    : "the device has too little shared memory per block for this head dim's tensor-core forward";
  return nullptr;
}

}  // namespace

const char* fwd_unsupported_reason(const AttentionParams& p, int sm_major, int sm_minor) {
  return unsupported_reason(p, sm_major, sm_minor, /*backward=*/false);
}

size_t bwd_workspace_bytes(const AttentionGradParams& p, int sm_major, int sm_minor) {
  if (unsupported_reason(p, sm_major, sm_minor, /*backward=*/true) != nullptr) return 0;
  const BwdWorkspace w = bwd_workspace(p, select_bucket(p));
  return w.dq_accum_bytes + w.semaphore_bytes;
}

namespace {

// The Hopper forward: compiled (sm_90a in the arch list, or the emulator with hopper=True), on an
// sm90 device, not switched off by FLASHATTN_CUDA_SM90A=0 (read once).
bool sm90_kernels_enabled(int sm_major) {
  if (sm_major != 9) return false;
#if defined(FLASHATTN_CUDA_EMULATE)
  return emu::hopper_kernels_enabled();
#elif defined(FLASHATTN_CUDA_SM90A)
  static const bool enabled = [] {
    const char* env = std::getenv("FLASHATTN_CUDA_SM90A");
    return env == nullptr || std::atoi(env) != 0;
  }();
  return enabled;
#else
  return false;
#endif
}

// The smallest compiled bucket with a Hopper forward that holds max(E, Ev), 0 if none.
int select_sm90_bucket(const AttentionParams& p) {
  const int64_t d = p.headdim > p.headdim_v ? p.headdim : p.headdim_v;
  int bucket = 0;
  for_each_built_bucket([&](auto b) {
    if (table::is_sm90_bucket(b()) && bucket == 0 && d <= b()) bucket = b();
  });
  return bucket;
}

// The Hopper forward where it takes the call (plain attention, dense or packed sequences, 16-byte
// aligned rows; not a KV cache's seqused_k, pages or split-KV); cudaErrorNotSupported where it does not.
cudaError_t run_fwd_sm90(const AttentionParams& p, cudaStream_t stream, int sm_major) {
  const bool cache_varlen = p.seqused_k != nullptr || p.block_table != nullptr || p.num_splits > 1;
  if (!sm90_kernels_enabled(sm_major) || has_extras(p) || cache_varlen || !fwd_vectorized(p) ||
      tensor_core_unsupported_reason(p, sm_major) != nullptr)
    return cudaErrorNotSupported;
  const int bucket = select_sm90_bucket(p);
  cudaError_t err = cudaErrorNotSupported;
  for_each_built_dtype([&](auto element) {
    if (dtype_of<typename decltype(element)::type>() != p.dtype) return;
    for_each_built_bucket([&](auto d) {
      if constexpr (table::is_sm90_bucket(decltype(d)::value))
        if (d() == bucket) err = launch_fwd_sm90<typename decltype(element)::type, decltype(d)::value>(p, stream);
    });
  });
  return err;
}

// The Hopper backward where it takes the call: plain attention (dense or packed sequences, either
// mode), 16-byte aligned rows, a head dim whose FA2 bucket (the dq_accum row stride) has a Hopper
// backward; cudaErrorNotSupported where it does not (before anything ran).
cudaError_t run_bwd_sm90(const AttentionGradParams& p, cudaStream_t stream, int sm_major) {
  if (!sm90_kernels_enabled(sm_major) || has_extras(p) ||
      !bwd_vectorized(p) || tensor_core_unsupported_reason(p, sm_major) != nullptr)
    return cudaErrorNotSupported;
  const int bucket = select_bucket(p);
  cudaError_t err = cudaErrorNotSupported;
  for_each_built_dtype([&](auto element) {
    if (dtype_of<typename decltype(element)::type>() != p.dtype) return;
    for_each_built_bucket([&](auto d) {
      if constexpr (table::is_sm90_bwd_bucket(decltype(d)::value))
        if (d() == bucket) err = launch_bwd_sm90<typename decltype(element)::type, decltype(d)::value>(p, stream);
    });
  });
  return err;
}

}  // namespace

namespace {

// Whether the varlen forward kernel p runs on reads a paged cache in place: the plain kernels do,
// the extras ones (and d = 96, whose varlen kernel is the extras tile) do not.
bool varlen_fwd_pages(const AttentionParams& p) {
  bool pages = false;
  const int bucket = select_bucket(p);
  for_each_built_bucket([&](auto b) {
    if (decltype(b)::value == bucket) pages = !has_extras(p) && !FwdConfig<__half, decltype(b)::value>::TraitsVarlen::kExtras;
  });
  return pages;
}

// The varlen forward's tile (block_m, block_n) for p's bucket and kernel (plain or extras).
std::pair<int, int> varlen_fwd_tile(const AttentionParams& p) {
  std::pair<int, int> tile{0, 0};
  const int bucket = select_bucket(p);
  for_each_built_bucket([&](auto b) {
    constexpr int D = decltype(b)::value;
    if (D != bucket) return;
    using Config = FwdConfig<__half, D>;
    tile = has_extras(p) ? std::pair<int, int>{Config::TraitsVarlenExtras::kBlockM, Config::TraitsVarlenExtras::kBlockN}
                         : std::pair<int, int>{Config::TraitsVarlen::kBlockM, Config::TraitsVarlen::kBlockN};
  });
  return tile;
}

// Splits of n_blocks key blocks over `tiles` blocks of work on `slots` concurrent CTAs: 1 when the
// tiles already fill 80 % of a wave; otherwise the fewest splits whose last wave is at least 85 %
// as full as the best count's (more splits cost partial writes and a longer combine), each split
// one key block or more, counts that would give the same split length skipped.
int auto_num_splits(int64_t tiles, int64_t slots, int64_t n_blocks, int max_splits) {
  if (tiles <= 0 || slots <= 0 || n_blocks <= 1 || tiles * 5 >= slots * 4) return 1;
  const int64_t most = n_blocks < max_splits ? n_blocks : max_splits;
  auto fill = [&](int64_t s) {
    const double waves = static_cast<double>(tiles * s) / static_cast<double>(slots);
    return waves / std::ceil(waves);
  };
  auto eligible = [&](int64_t s) { return s == 1 || ceil_div(n_blocks, s) != ceil_div(n_blocks, s - 1); };
  double best = 0;
  for (int64_t s = 1; s <= most; ++s)
    if (eligible(s)) best = std::max(best, fill(s));
  for (int64_t s = 1; s <= most; ++s)
    if (eligible(s) && fill(s) >= 0.85 * best) return static_cast<int>(s);
  return 1;
}

}  // namespace

FwdSplitPlan fwd_split_plan(const AttentionParams& p, int requested_splits, int sm_major, int sm_minor) {
  FwdSplitPlan plan;
  if (p.cu_seqlens_q == nullptr || fwd_unsupported_reason(p, sm_major, sm_minor) != nullptr) return plan;
  const auto [block_m, block_n] = varlen_fwd_tile(p);
  plan.page_multiple = varlen_fwd_pages(p) ? block_n : 0;
  const int64_t n_blocks = ceil_div(p.seqlen_k, block_n);
  if (requested_splits > 0) {
    plan.num_splits = static_cast<int>(std::min<int64_t>({requested_splits, kMaxSplits, std::max<int64_t>(n_blocks, 1)}));
    return plan;
  }
  const DeviceLimits dev = device_limits(sm_major, sm_minor);
  // Two CTAs per SM: the forward tiles' occupancy on sm80/sm90 (kernel_configs.h).
  const int64_t tiles = p.batch * p.num_heads * ceil_div(p.seqlen_q, block_m);
  plan.num_splits = auto_num_splits(tiles, 2 * static_cast<int64_t>(dev.sms), n_blocks, kMaxSplits);
  return plan;
}

cudaError_t run_fwd(const AttentionParams& p, cudaStream_t stream, int sm_major, int sm_minor) {
  if (const cudaError_t err = run_fwd_sm90(p, stream, sm_major); err != cudaErrorNotSupported) return err;
  if (fwd_unsupported_reason(p, sm_major, sm_minor) != nullptr) {
    // fwd_split_plan never asks the SIMT path for splits or pages.
    if (p.num_splits > 1 || p.block_table != nullptr) return cudaErrorInvalidValue;
    return run_simt_fwd(p, stream);
  }
  LaunchOptions opt;
  opt.vectorized = fwd_vectorized(p);
  opt.extras = has_extras(p);
  const int bucket = select_bucket(p);
  opt.kv_stages = bucket_plan(bucket, device_limits(sm_major, sm_minor)).kv_stages;
  return with_kernels(p.dtype, bucket, [&](auto element, auto d) {
    return launch_fwd<typename decltype(element)::type, decltype(d)::value>(p, opt, stream);
  });
}

cudaError_t run_bwd(const AttentionGradParams& params, void* workspace, cudaStream_t stream, int sm_major,
                    int sm_minor) {
  cudaError_t err = run_bwd_preprocess(params, stream);
  if (err != cudaSuccess) return err;
  err = zero_dmask(params, stream);
  if (err != cudaSuccess) return err;
  if (unsupported_reason(params, sm_major, sm_minor, /*backward=*/true) != nullptr)
    return run_simt_bwd(params, stream);

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
  if (err = run_bwd_sm90(p, stream, sm_major); err != cudaErrorNotSupported) return err;
  LaunchOptions opt;
  opt.vectorized = bwd_vectorized(p);
  opt.extras = has_extras(p);
  return with_kernels(p.dtype, bucket, [&](auto element, auto d) {
    return launch_bwd<typename decltype(element)::type, decltype(d)::value>(p, opt, stream);
  });
}

// Variadic: with several archs in one nvcc call __CUDA_ARCH_LIST__ is "800,900".
#define FLASHATTN_STR2(...) #__VA_ARGS__
#define FLASHATTN_STR(...) FLASHATTN_STR2(__VA_ARGS__)

const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FLASHATTN_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

const char* compiled_headdims() {
  static const std::string list = [] {
    std::string out;
    for_each_built_bucket([&](auto b) { out += (out.empty() ? "" : ",") + std::to_string(b()); });
    return out;
  }();
  return list.c_str();
}

const char* compiled_dtypes() {
  static const std::string list = [] {
    std::string out;
    for_each_built_dtype([&](auto element) {
      out += out.empty() ? "" : ",";
      out += dtype_of<typename decltype(element)::type>() == DType::kFloat16 ? "fp16" : "bf16";
    });
    return out;
  }();
  return list.c_str();
}

}  // namespace flashattn::cuda
