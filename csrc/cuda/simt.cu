// Launchers of the SIMT path (every element type; dense and varlen kernels), the backward preprocessing, the dmask zeroing
// and the test-only dropout mask. Always compiled.
#include "bwd_preprocess.cuh"
#include "grid.h"
#include "launch.h"
#include "simt.h"
#include "simt_kernel.cuh"

namespace flashattn::cuda {

namespace {

template <typename T>
cudaError_t simt_fwd(const AttentionParams& p, cudaStream_t stream) {
  using Acc = typename SimtAcc<T>::type;
  const int64_t tiles = ceil_div(p.seqlen_q, kSimtWarps);
  if (tiles == 0 || p.batch * p.num_heads == 0) return cudaSuccess;
  const size_t smem = kSimtWarps * p.headdim * sizeof(Acc);
  if (p.cu_seqlens_q != nullptr)
    FLASHATTN_LAUNCH(tile_grid(tiles, p.batch * p.num_heads), 32 * kSimtWarps, smem, stream, simt_fwd_kernel<T, true>)(p);
  else
    FLASHATTN_LAUNCH(tile_grid(tiles, p.batch * p.num_heads), 32 * kSimtWarps, smem, stream, simt_fwd_kernel<T>)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t simt_bwd(const AttentionGradParams& p, cudaStream_t stream) {
  using Acc = typename SimtAcc<T>::type;
  const size_t smem = kSimtWarps * (p.headdim + p.headdim_v) * sizeof(Acc);
  const int64_t q_tiles = ceil_div(p.seqlen_q, kSimtWarps), k_tiles = ceil_div(p.seqlen_k, kSimtWarps);
  if (q_tiles > 0 && p.batch * p.num_heads > 0) {
    const dim3 grid = tile_grid(q_tiles, p.batch * p.num_heads);
    if (p.cu_seqlens_q != nullptr)
      FLASHATTN_LAUNCH(grid, 32 * kSimtWarps, smem, stream, simt_bwd_dq_kernel<T, true>)(p);
    else
      FLASHATTN_LAUNCH(grid, 32 * kSimtWarps, smem, stream, simt_bwd_dq_kernel<T>)(p);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (k_tiles > 0 && p.batch * p.num_heads_k > 0) {
    const dim3 grid = tile_grid(k_tiles, p.batch * p.num_heads_k);
    if (p.cu_seqlens_q != nullptr)
      FLASHATTN_LAUNCH(grid, 32 * kSimtWarps, smem, stream, simt_bwd_dkdv_kernel<T, true>)(p);
    else
      FLASHATTN_LAUNCH(grid, 32 * kSimtWarps, smem, stream, simt_bwd_dkdv_kernel<T>)(p);
    return cudaGetLastError();
  }
  return cudaSuccess;
}

template <typename T, typename Acc>
cudaError_t preprocess(const AttentionGradParams& params, cudaStream_t stream) {
  const AttentionGradParams p = packed_rows(params);
  const int64_t rows = row_array_rows(p);
  if (rows == 0) return cudaSuccess;
  FLASHATTN_LAUNCH(static_cast<unsigned>(ceil_div(rows, 4)), 128, 0, stream, bwd_preprocess_kernel<T, Acc>)(p);
  return cudaGetLastError();
}

// Zeroes every element of dmask that some (b, h, i, j) reads (broadcast dims have stride 0).
__global__ void zero_dmask_kernel(const AttentionGradParams p, int64_t nb, int64_t nh, int64_t ni, int64_t nj) {
  const int64_t total = nb * nh * ni * nj;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % nj, i = (idx / nj) % ni, h = (idx / (nj * ni)) % nh, b = idx / (nj * ni * nh);
    if (p.dmask64 != nullptr)
      p.dmask64[p.dmask_view.offset(b, h, i, j)] = 0.0;
    else
      p.dmask[p.dmask_view.offset(b, h, i, j)] = 0.f;
  }
}

__global__ void dropout_mask_kernel(const AttentionParams p, uint8_t* keep) {
  const int64_t groups = (p.seqlen_k + 3) / 4;
  const int64_t total = p.batch * p.num_heads * p.seqlen_q * groups;
  const ScoreMods seed_source(p, 0, 0);  // resolves seed / offset (graph-capture pointers included)
  const uint32_t threshold = dropout_keep_threshold(p.dropout_p);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j0 = (idx % groups) * 4, row = idx / groups;  // row over (b * H + h) * L + i
    const int64_t i = row % p.seqlen_q, bh = row / p.seqlen_q;
    const uint32_t bits = dropout_keep_bits(seed_source.seed, seed_source.offset, bh, i, j0, threshold);
    for (int t = 0; t < 4 && j0 + t < p.seqlen_k; ++t) keep[row * p.seqlen_k + j0 + t] = (bits >> t) & 1u;
  }
}

}  // namespace

cudaError_t run_simt_fwd(const AttentionParams& p, cudaStream_t stream) {
  if (p.headdim > kSimtMaxHeadDim || p.headdim_v > kSimtMaxHeadDim) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return simt_fwd<float>(p, stream);
    case DType::kFloat64: return simt_fwd<double>(p, stream);
    case DType::kFloat16: return simt_fwd<__half>(p, stream);
    case DType::kBFloat16: return simt_fwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_simt_bwd(const AttentionGradParams& p, cudaStream_t stream) {
  if (p.headdim > kSimtMaxHeadDim || p.headdim_v > kSimtMaxHeadDim) return cudaErrorInvalidValue;
  switch (p.dtype) {
    case DType::kFloat32: return simt_bwd<float>(p, stream);
    case DType::kFloat64: return simt_bwd<double>(p, stream);
    case DType::kFloat16: return simt_bwd<__half>(p, stream);
    case DType::kBFloat16: return simt_bwd<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t run_bwd_preprocess(const AttentionGradParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return preprocess<float, float>(p, stream);
    case DType::kFloat64: return preprocess<double, double>(p, stream);
    case DType::kFloat16: return preprocess<__half, float>(p, stream);
    case DType::kBFloat16: return preprocess<__nv_bfloat16, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t zero_dmask(const AttentionGradParams& p, cudaStream_t stream) {
  if (p.dmask == nullptr && p.dmask64 == nullptr) return cudaSuccess;
  const bool batch_varies = p.dmask_view.batch_stride != 0 || p.dmask_view.batch_outer_stride != 0;
  const int64_t nb = batch_varies ? p.batch : 1, nh = p.dmask_view.head_stride != 0 ? p.num_heads : 1;
  const int64_t ni = p.dmask_view.row_stride != 0 ? p.seqlen_q : 1, nj = p.dmask_view.col_stride != 0 ? p.seqlen_k : 1;
  const int64_t total = nb * nh * ni * nj;
  if (total == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, 256) < 65535 ? ceil_div(total, 256) : 65535;
  FLASHATTN_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, zero_dmask_kernel)(p, nb, nh, ni, nj);
  return cudaGetLastError();
}

cudaError_t run_dropout_mask(const AttentionParams& p, uint8_t* keep, cudaStream_t stream) {
  const int64_t total = p.batch * p.num_heads * p.seqlen_q * ((p.seqlen_k + 3) / 4);
  if (total == 0) return cudaSuccess;
  const int64_t blocks = ceil_div(total, 256) < 65535 ? ceil_div(total, 256) : 65535;
  FLASHATTN_LAUNCH(static_cast<unsigned>(blocks), 256, 0, stream, dropout_mask_kernel)(p, keep);
  return cudaGetLastError();
}

}  // namespace flashattn::cuda
