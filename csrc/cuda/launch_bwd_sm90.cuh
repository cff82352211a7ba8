// Definition of launch_bwd_sm90 for one (dtype, head-dim bucket): the tensor maps of Q, K, V and
// dO (dense, or over the packed rows of a varlen call), the launch of bwd_sm90_kernel, then dq_convert. Included only by the
// instantiations/bwd_sm90_*.cu files.
#pragma once

#include "bwd_sm90.cuh"
#include "dq_convert.cuh"
#include "grid.h"
#include "kernel_configs.h"
#include "launch_templates.h"
#include "tensor_map_sm90.h"

namespace flashattn::cuda {

// cudaErrorNotSupported (before anything ran): the maps cannot describe these tensors.
template <typename Element, int kHeadDim>
cudaError_t launch_bwd_sm90(const AttentionGradParams& p, cudaStream_t stream) {
  using Traits = Sm90BwdTraits<Element, kHeadDim>;
  static_assert(Traits::kBlockM == kBwdBlockM, "dq_semaphore is laid out in the FA2 backward's query blocks");
  const int64_t n_blocks = ceil_div(p.seqlen_k, Traits::kBlockN);
  if (n_blocks > 0 && p.batch * p.num_heads_k > 0) {
    sm90::TensorMap tm_q, tm_k, tm_v, tm_do, tm_lse, tm_delta;
    using namespace sm90_detail;
    const int64_t rows = row_array_rows(p);
    const MapRows r = map_rows(p);
    if (make_qkv_maps(p, Traits::kBlockM, Traits::kBlockN, &tm_q, &tm_k, &tm_v) != cudaSuccess ||
        make_map(&tm_do, p.dout, p.headdim_v, r.q, p.num_heads, r.batch, p.do_row_stride, p.do_head_stride,
                 p.do_batch_stride, Traits::kBlockM) != cudaSuccess ||
        make_rows_map(&tm_lse, p.lse, rows, Traits::kBlockM) != cudaSuccess ||
        make_rows_map(&tm_delta, p.delta, rows, Traits::kBlockM) != cudaSuccess)
      return cudaErrorNotSupported;
    auto kernel = bwd_sm90_kernel<Traits>;
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
    if (err != cudaSuccess) return err;
    FLASHATTN_LAUNCH(tile_grid(n_blocks, p.batch * p.num_heads_k), Traits::kThreads, Traits::kSmemBytes, stream,
                     bwd_sm90_kernel<Traits>)(p, tm_q, tm_k, tm_v, tm_do, tm_lse, tm_delta);
    if (const cudaError_t launched = cudaGetLastError(); launched != cudaSuccess) return launched;
  }
  return launch_dq_convert<Element>(p, kHeadDim, stream);
}

}  // namespace flashattn::cuda
