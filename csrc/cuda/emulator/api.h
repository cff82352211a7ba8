// The emulated CUDA backend as a library (libflashattn_emulator.so): the launch interface of
// csrc/cuda/launch.h (run_fwd, run_bwd, the dropout mask) executed by the host emulator on host
// memory. The op layer loads it with dlopen for the cuda_emulated tests (a torch-free C ABI, so
// the library needs no torch and no GPU, and its kernel symbols never meet a GPU build's).
#pragma once

#include <cstddef>
#include <cstdint>

#include "../../attention_params.h"

extern "C" {

struct FlashattnEmulatorOptions {
  int schedule = 0;               // 0 lockstep, 1 warp ascending, 2 warp descending, 3 random
  uint64_t seed = 1;              // of the random schedule
  int copies_land_at_issue = 0;   // 0: a cp.async writes shared memory at its wait_group; 1: at issue
  int sm_major = 9, sm_minor = 0;  // the emulated GPU: its shared-memory limits (and so the K/V pipeline)
  int hopper = 0;                  // 1: the sm_90a kernels run where they apply (sm_major 9)
};

struct FlashattnEmulatorStats {
  uint64_t launches, blocks, threads, wgmma;  // wgmma: warpgroup wgmma ops (the Hopper kernels ran)
};

struct FlashattnEmulatorApi {
  int abi_version;
  size_t params_bytes, grad_params_bytes;  // sizeof(AttentionParams), sizeof(AttentionGradParams) here
  const char* (*compiled_headdims)();
  const char* (*compiled_dtypes)();
  // 0 on success; otherwise nonzero and *report (valid until the next call) says what went wrong.
  int (*run_fwd)(const flashattn::AttentionParams* p, const FlashattnEmulatorOptions* o, const char** report);
  size_t (*bwd_workspace_bytes)(const flashattn::AttentionGradParams* p, const FlashattnEmulatorOptions* o);
  int (*run_bwd)(const flashattn::AttentionGradParams* p, void* workspace, size_t workspace_bytes,
                 const FlashattnEmulatorOptions* o, const char** report);
  int (*dropout_mask)(const flashattn::AttentionParams* p, uint8_t* keep, const FlashattnEmulatorOptions* o,
                      const char** report);
  void (*stats)(FlashattnEmulatorStats* out);
  // cuda/launch.h fwd_split_plan for the emulated GPU.
  void (*fwd_split_plan)(const flashattn::AttentionParams* p, int requested_splits, const FlashattnEmulatorOptions* o,
                         int* num_splits, int* page_multiple);
  // Runs one of selftest.cu's kernels (each with one planted bug, and "correct_pipeline");
  // 0 if the emulator found nothing, else nonzero with its report.
  int (*selftest)(const char* name, const FlashattnEmulatorOptions* o, const char** report);
};

constexpr int kFlashattnEmulatorAbi = 4;

// The library's one exported symbol.
__attribute__((visibility("default"))) const FlashattnEmulatorApi* flashattn_emulator_api();
}
