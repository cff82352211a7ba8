// The forward's online softmax over a warp's 16-row strips (FlashAttention's running max and
// sum): per key tile, the new row maxima rescale O and the running sum, and the scores become
// unnormalized probabilities P = exp2(S * exp_scale - max * exp_scale); at the end O is divided
// by the sum and the log-sum-exp comes out. Rows live in the accumulator layout of warp_gemm.h:
// element e of tile (mt, nt) is row 16 mt + g + 8 (e / 2) of the strip, so each thread holds two
// rows (half = 0, 1) per strip and the four threads of a quad share a row (two shuffles reduce it).
#pragma once

#include <cmath>

#include "ptx.h"
#include "runtime.h"

namespace flashattn::cuda {

template <int kMT>
struct OnlineSoftmax {
  float row_max[kMT][2], row_sum[kMT][2];
  float exp_scale;  // log2(e) times the softmax scale (1 for scores that are already logits)

  __device__ __forceinline__ explicit OnlineSoftmax(float exp_scale_) : exp_scale(exp_scale_) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) row_max[mt][half] = -INFINITY, row_sum[mt][half] = 0.f;
  }

  // Folds one tile of scores into the running maxima and sums: acc_o is rescaled by the change of
  // its rows' maxima and acc_s becomes P (masked scores, -inf, give 0).
  template <int kNT, int kOutNT>
  __device__ __forceinline__ void step(float (&acc_s)[kMT][kNT][4], float (&acc_o)[kMT][kOutNT][4]) {
    float correction[kMT][2];
    step_scores(acc_s, correction);
    rescale(acc_o, correction);
  }

  // step() in two halves, for a kernel whose O += P V of the previous tile is still in flight
  // while this tile's scores are folded in: the maxima, sums and P now, O's rescale later.
  template <int kNT>
  __device__ __forceinline__ void step_scores(float (&acc_s)[kMT][kNT][4], float (&correction)[kMT][2]) {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float tile_max = row_max[mt][half];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
          tile_max = fmaxf(tile_max, fmaxf(acc_s[mt][nt][2 * half], acc_s[mt][nt][2 * half + 1]));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        const float max_scaled = tile_max == -INFINITY ? 0.f : tile_max * exp_scale;
        correction[mt][half] =
            row_max[mt][half] == -INFINITY ? 0.f : fast_exp2(row_max[mt][half] * exp_scale - max_scaled);
        row_max[mt][half] = tile_max;
        row_sum[mt][half] *= correction[mt][half];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e) {
            const float prob = fast_exp2(acc_s[mt][nt][e] * exp_scale - max_scaled);
            acc_s[mt][nt][e] = prob;
            row_sum[mt][half] += prob;
          }
      }
  }

  template <int kOutNT>
  __device__ __forceinline__ void rescale(float (&acc_o)[kMT][kOutNT][4], const float (&correction)[kMT][2]) const {
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < kOutNT; ++nt) {
          acc_o[mt][nt][2 * half] *= correction[mt][half];
          acc_o[mt][nt][2 * half + 1] *= correction[mt][half];
        }
  }

  // O *= keep_scale / row_sum per row (O = 0 for a row that saw no key), and
  // write_lse(mt, half, lse) for each row, where lse() computes the row's log-sum-exp (natural
  // log, -inf for an empty row) only if called: the caller writes it from one thread per row.
  template <int kOutNT, class WriteLse>
  __device__ __forceinline__ void finalize(float (&acc_o)[kMT][kOutNT][4], float keep_scale, WriteLse&& write_lse) {
    constexpr float kLn2 = 0.6931471805599453f;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float sum = row_sum[mt][half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const bool empty = !(sum > 0.f);
        const float inv = empty ? 0.f : keep_scale / sum;
#pragma unroll
        for (int nt = 0; nt < kOutNT; ++nt) {
          acc_o[mt][nt][2 * half] *= inv;
          acc_o[mt][nt][2 * half + 1] *= inv;
        }
        write_lse(mt, half, [&] { return empty ? -INFINITY : (row_max[mt][half] * exp_scale) * kLn2 + logf(sum); });
      }
  }
};

}  // namespace flashattn::cuda
