// The CUDA kernels run on the host emulator, for tests: while flashattn_ext.testing.emulated_cuda()
// is active, CPU tensors go through the CUDA launch path (csrc/cuda/launch.h: run_fwd, run_bwd,
// the dropout mask) compiled by g++ into libflashattn_emulator.so (csrc/cuda/emulator), loaded
// here with dlopen. This mirrors ops_cuda.cpp: Philox seeds recorded by the forward kernel and
// read back through device pointers by the backward, the backward's workspace, fp32 lse.

#include <ATen/CPUGeneratorImpl.h>
#include <dlfcn.h>

#include <mutex>
#include <string>

#include "cuda/emulator/api.h"
#include "ops.h"

namespace flashattn {
namespace {

struct Emulator {
  std::mutex mutex;  // the emulator runs one call at a time
  const FlashattnEmulatorApi* api = nullptr;
  std::string load_error = "not loaded";
  bool enabled = false;
  FlashattnEmulatorOptions options;
};

Emulator& emulator() {
  static Emulator e;
  return e;
}

const FlashattnEmulatorApi& api() {
  Emulator& e = emulator();
  TORCH_CHECK(e.api != nullptr, "flashattn_ext: the CUDA emulator is not loaded: ", e.load_error);
  return *e.api;
}

// Runs one emulator call (it sets *report when it fails) and raises its report.
template <class Call>
void run_checked(const char* what, Call&& call) {
  const char* report = nullptr;
  const int rc = call(&report);
  TORCH_CHECK(rc == 0, "flashattn_ext: emulated CUDA ", what, " failed:\n", report ? report : "(no report)");
}

}  // namespace

std::string emulator_load(const std::string& path) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (e.api != nullptr) return "";
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return e.load_error = std::string("dlopen failed: ") + dlerror();
  auto entry = reinterpret_cast<const FlashattnEmulatorApi* (*)()>(dlsym(handle, "flashattn_emulator_api"));
  if (entry == nullptr) return e.load_error = path + " has no flashattn_emulator_api";
  const FlashattnEmulatorApi* a = entry();
  if (a->abi_version != kFlashattnEmulatorAbi || a->params_bytes != sizeof(AttentionParams) ||
      a->grad_params_bytes != sizeof(AttentionGradParams))
    return e.load_error = path + " was built from other sources (ABI mismatch): rebuild with FLASHATTN_BUILD_EMULATOR=1";
  e.api = a;
  e.load_error.clear();
  return "";
}

void emulator_configure(bool enabled, int schedule, int64_t seed, bool copies_land_at_issue, int64_t sm_major,
                        int64_t sm_minor, bool hopper) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  TORCH_CHECK_VALUE(!enabled || e.api != nullptr, "flashattn_ext: the CUDA emulator is not loaded: ", e.load_error);
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 3, "flashattn_ext: emulator schedule must be 0..3, got ", schedule);
  e.enabled = enabled;
  e.options.schedule = schedule;
  e.options.seed = static_cast<uint64_t>(seed);
  e.options.copies_land_at_issue = copies_land_at_issue ? 1 : 0;
  e.options.sm_major = static_cast<int>(sm_major);
  e.options.sm_minor = static_cast<int>(sm_minor);
  e.options.hopper = hopper ? 1 : 0;
}

bool emulating_cuda() { return emulator().enabled; }

std::vector<int64_t> emulator_stats() {
  FlashattnEmulatorStats st{};
  api().stats(&st);
  return {static_cast<int64_t>(st.launches), static_cast<int64_t>(st.blocks), static_cast<int64_t>(st.threads),
          static_cast<int64_t>(st.wgmma)};
}

std::string emulator_compiled(bool headdims) {
  const FlashattnEmulatorApi& a = api();
  return headdims ? a.compiled_headdims() : a.compiled_dtypes();
}

void emulated_forward(AttentionParams& p, at::Tensor& rng_state) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (p.dropout_p > 0) {
    // As ops_cuda.cpp does with the CUDA generator: the kernel records what it used in rng_state.
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> gen_lock(gen->mutex_);
    p.philox_seed = gen->random64();
    p.philox_offset = gen->random64();
    p.rng_state = rng_state.data_ptr<int64_t>();
  }
  run_checked("forward", [&](const char** report) { return api().run_fwd(&p, &e.options, report); });
}

void emulated_backward(AttentionGradParams& p, const at::Tensor& rng_state) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  if (p.dropout_p > 0) {  // the forward's (seed, offset), read by the kernels through pointers
    p.philox_seed_ptr = rng_state.data_ptr<int64_t>();
    p.philox_offset_ptr = rng_state.data_ptr<int64_t>() + 1;
  }
  const size_t bytes = api().bwd_workspace_bytes(&p, &e.options);
  at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, rng_state.options().dtype(at::kByte));
  run_checked("backward", [&](const char** report) {
    return api().run_bwd(&p, bytes ? workspace.data_ptr() : nullptr, bytes, &e.options, report);
  });
}

std::string emulator_selftest(const std::string& name, int schedule) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  FlashattnEmulatorOptions o = e.options;
  o.schedule = schedule;
  const char* report = nullptr;
  return api().selftest(name.c_str(), &o, &report) ? std::string(report ? report : "(no report)") : std::string();
}

at::Tensor emulated_dropout_mask(AttentionParams& p, const at::Tensor& rng_state) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  p.philox_seed_ptr = rng_state.data_ptr<int64_t>();
  p.philox_offset_ptr = rng_state.data_ptr<int64_t>() + 1;
  at::Tensor keep = at::empty({p.batch * p.num_heads * p.seqlen_q * p.seqlen_k}, rng_state.options().dtype(at::kByte));
  run_checked("dropout mask",
              [&](const char** report) { return api().dropout_mask(&p, keep.data_ptr<uint8_t>(), &e.options, report); });
  return keep.view(at::kBool);
}

SplitPlan emulated_split_plan(const AttentionParams& p, int64_t requested_splits) {
  Emulator& e = emulator();
  std::lock_guard<std::mutex> lock(e.mutex);
  SplitPlan plan;
  api().fwd_split_plan(&p, static_cast<int>(requested_splits), &e.options, &plan.num_splits, &plan.page_multiple);
  return plan;
}

}  // namespace flashattn
