// fwd kernels for head-dim bucket 64, fp16. One instantiation per translation unit.
#include "../launch_impl.cuh"

#if !defined(FLASHATTN_NO_FP16) && !defined(FLASHATTN_NO_HDIM_64)
namespace flashattn::cuda {
template cudaError_t launch_fwd<__half, 64>(const AttentionParams&, const LaunchOptions&, cudaStream_t);
}  // namespace flashattn::cuda
#endif
