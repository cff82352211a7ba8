// bwd kernels for head-dim bucket 256, bf16. One instantiation per translation unit.
#include "../launch_impl.cuh"

#if !defined(FLASHATTN_NO_BF16) && !defined(FLASHATTN_NO_HDIM_256)
namespace flashattn::cuda {
template cudaError_t launch_bwd<__nv_bfloat16, 256>(const AttentionGradParams&, const LaunchOptions&, cudaStream_t);
}  // namespace flashattn::cuda
#endif
