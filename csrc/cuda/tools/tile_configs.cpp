// Prints every tensor-core kernel configuration of kernel_configs.h as JSON lines (tools/table.py
// compiles and runs it for .ci/compile_cuda.sh's shared-memory table and check_fragments.py's
// fragment model, so neither restates the tile sizes). Host-only: g++ with
// -DFLASHATTN_CUDA_EMULATE (the emulator's declarations stand in for the CUDA runtime) or nvcc.
#include <cstdio>

#include "../kernel_configs.h"

using namespace flashattn::cuda;

template <class T>
void fwd(const char* role) {
  std::printf(
      "{\"dir\": \"fwd\", \"role\": \"%s\", \"headdim\": %d, \"block_m\": %d, \"block_n\": %d, \"warps\": %d, "
      "\"stages\": %d, \"sub_tiles\": %d, \"extras\": %s, \"smem_bytes\": %d}\n",
      role, T::kHeadDim, T::kBlockM, T::kBlockN, T::kNumWarps, T::kStages, T::kSubTiles, T::kExtras ? "true" : "false",
      T::kSmemBytes);
}

template <class T>
void bwd(const char* role) {
  std::printf(
      "{\"dir\": \"bwd\", \"role\": \"%s\", \"headdim\": %d, \"block_m\": %d, \"block_n\": %d, \"warps\": %d, "
      "\"warps_keys_s\": %d, \"warps_keys_kv\": %d, \"stages\": %d, \"extras\": %s, \"smem_bytes\": %d}\n",
      role, T::kHeadDim, T::kBlockM, T::kBlockN, T::kNumWarps, T::kWarpsKeysS, T::kWarpsKeysKV, T::kStages,
      T::kExtras ? "true" : "false", T::kSmemBytes);
}

int main() {
  for_each_built_bucket([](auto d) {
    constexpr int D = decltype(d)::value;
    using F = FwdConfig<__half, D>;
    using B = BwdConfig<__half, D>;
    fwd<typename F::Traits>("plain");
    fwd<typename F::TraitsPipelined>("pipelined");
    fwd<typename F::TraitsExtras>("extras");
    fwd<typename F::TraitsVarlen>("varlen");
    fwd<typename F::TraitsVarlenExtras>("varlen-extras");
    bwd<typename B::Traits>("plain");
    bwd<typename B::TraitsExtras>("extras");
    bwd<typename B::TraitsVarlen>("varlen");
  });
  return 0;
}
