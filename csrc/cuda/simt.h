// Host entry points of simt.cu (the SIMT path and the small helper kernels).
#pragma once

#include "runtime.h"

#include <cstdint>

#include "../attention_params.h"

namespace flashattn::cuda {

cudaError_t run_simt_fwd(const AttentionParams& p, cudaStream_t stream);
cudaError_t run_simt_bwd(const AttentionGradParams& p, cudaStream_t stream);  // needs delta
cudaError_t run_bwd_preprocess(const AttentionGradParams& p, cudaStream_t stream);  // delta = rowsum(dO o O)
cudaError_t zero_dmask(const AttentionGradParams& p, cudaStream_t stream);

}  // namespace flashattn::cuda
