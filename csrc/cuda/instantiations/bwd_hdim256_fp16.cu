// bwd kernels for head-dim bucket 256, fp16. One instantiation per translation unit.
#include "../launch_impl.cuh"

#if !defined(FLASHATTN_NO_FP16) && !defined(FLASHATTN_NO_HDIM_256)
namespace flashattn::cuda {
template cudaError_t launch_bwd<__half, 256>(const AttentionGradParams&, const LaunchOptions&, cudaStream_t);
}  // namespace flashattn::cuda
#endif
