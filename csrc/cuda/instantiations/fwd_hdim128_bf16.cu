// fwd kernels for head-dim bucket 128, bf16. One instantiation per translation unit.
#include "../launch_impl.cuh"

#if !defined(FLASHATTN_NO_BF16) && !defined(FLASHATTN_NO_HDIM_128)
namespace flashattn::cuda {
template cudaError_t launch_fwd<__nv_bfloat16, 128>(const AttentionParams&, const LaunchOptions&, cudaStream_t);
}  // namespace flashattn::cuda
#endif
