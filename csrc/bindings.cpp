// pybind11 module flashattn_ext._C: loading it registers the dispatcher ops (flashattn_ext::fwd,
// bwd, dropout_mask); it also exposes what the build contains and a test switch.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "cpu/blas.h"
#include "cpu/kernels.h"
#include "ops.h"

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list devices;
  devices.append("cpu");
  info["torch_version"] = TORCH_VERSION;
  info["cpu_capability"] = std::string(flashattn::cpu::isa());  // the copy of the CPU kernels in use
  info["cpu_isas_built"] = flashattn::cpu::isas_built();
  info["cpu_dtypes"] = std::vector<std::string>{"float32", "float64", "float16", "bfloat16"};
  info["cpu_gemm"] = std::string(flashattn::cpu::have_brgemm_f32() ? "onednn-brgemm" : "aten-mm") +
                     (flashattn::cpu::have_brgemm_bf16_vnni() ? "+bf16-vnni" : "");
  info["features"] = std::vector<std::string>{"causal", "window", "attn_mask", "mask_grad", "dropout", "gqa",
                                              "alibi", "softcap", "block_sparse", "headdim_v"};
#ifdef FLASHATTN_WITH_CUDA
  devices.append("cuda");
  info["cuda"] = true;
  info["cuda_archs"] = flashattn::cuda_build_archs();
  info["cuda_headdims"] = flashattn::cuda_build_headdims();
  info["cuda_dtypes"] = flashattn::cuda_build_dtypes();
#else
  info["cuda"] = false;
#endif
  info["cuda_max_headdim"] = flashattn::kCudaMaxHeadDim;
  info["devices"] = devices;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashattn_ext compiled core: dispatcher ops flashattn_ext::fwd / bwd / dropout_mask";
  m.def("_cpu_gemm_hot_tile_gflops", &flashattn::cpu::gemm_hot_tile_gflops,
        "Benchmarks: GFLOP/s of the CPU kernels' GEMM (bf16, M, N, K, iters) on a hot tile, all threads.");
  m.def("build_info", &build_info, "What this build contains: devices, dtypes, features, CUDA archs.");
  m.def("block_mask_range", &flashattn::block_mask_range,
        "(min, max) of an int32 block_mask, remembered for the tensor's current version (BlockSparseMask).");
  m.def("set_poison_outputs", &flashattn::set_poison_outputs,
        "Testing: fill every output buffer with NaN before the kernels write it.");
  m.def("poison_outputs", &flashattn::poison_outputs);
  m.def("emulator_load", &flashattn::emulator_load,
        "Testing: dlopen libflashattn_emulator.so (the CUDA kernels on the host emulator); '' or why not.");
  m.def("emulator_configure", &flashattn::emulator_configure,
        "Testing: route CPU tensors through the emulated CUDA kernels (schedule 0 lockstep, 1 warp "
        "ascending, 2 warp descending, 3 random; cp.async landing; emulated sm; the sm_90a kernels).");
  m.def("emulating_cuda", &flashattn::emulating_cuda);
  m.def("emulator_stats", &flashattn::emulator_stats, "Testing: (launches, blocks, threads, wgmma ops) the emulator has run.");
  m.def("emulator_compiled", &flashattn::emulator_compiled);
  m.def("emulator_selftest", &flashattn::emulator_selftest,
        "Testing: run one of the emulator's planted-bug kernels; its report ('' if it found nothing).");
}
