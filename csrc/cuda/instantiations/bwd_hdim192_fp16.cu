// bwd kernels for head-dim bucket 192, fp16. One instantiation per translation unit.
#include "../launch_impl.cuh"

#if !defined(FLASHATTN_NO_FP16) && !defined(FLASHATTN_NO_HDIM_192)
namespace flashattn::cuda {
template cudaError_t launch_bwd<__half, 192>(const AttentionGradParams&, const LaunchOptions&, cudaStream_t);
}  // namespace flashattn::cuda
#endif
