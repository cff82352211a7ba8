// The SIMT path: plain CUDA cores, any element type (fp32 and fp64 accumulate in their own
// precision, fp16/bf16 in fp32), any head dim up to kSimtMaxHeadDim, any sm. Every feature of
// the tensor-core path (band, GQA, masks, dropout, ALiBi, softcap, block mask) goes through the
// same ScoreMods. Still the FlashAttention algorithm: keys in tiles of 32 (one per lane), online
// softmax, lse saved, P recomputed in the backward; no L x S buffer. Simple beats fast here.
//
// forward:      one warp per query row; lane l scores key j0 + l, the warp reduces the tile's max
//               and sum, then every lane accumulates its head-dim columns of O.
// backward dQ:  one warp per query row (dQ row written once: deterministic), also dmask.
// backward dKV: one warp per key row, looping over the query heads of its group and over the
//               query rows that see the key (dK, dV written once: deterministic).
#pragma once

#include <cmath>
#include <cstdint>

#include "../attention_params.h"
#include "bwd_preprocess.cuh"
#include "score_mod.h"

namespace flashattn::cuda {

constexpr int kSimtMaxHeadDim = static_cast<int>(kCudaMaxHeadDim);
constexpr int kSimtChunks = kSimtMaxHeadDim / 32;  // head-dim columns per lane
constexpr int kSimtWarps = 4;

template <typename T> struct SimtAcc { using type = float; };
template <> struct SimtAcc<double> { using type = double; };

__device__ __forceinline__ void store_from_acc(__half* dst, float x) { *dst = __float2half_rn(x); }
__device__ __forceinline__ void store_from_acc(__nv_bfloat16* dst, float x) { *dst = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_from_acc(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void store_from_acc(double* dst, double x) { *dst = x; }

// max that propagates NaN (fmax drops it: a query row of NaNs would see every score "masked",
// skip every tile and come out as O = 0 instead of NaN as on the CPU and in SDPA).
template <typename Acc>
__device__ __forceinline__ Acc nan_max(Acc a, Acc b) {
  return (a != a || b != b) ? a + b : fmax(a, b);
}
template <typename Acc>
__device__ __forceinline__ Acc warp_max(Acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}
template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Dot product of a shared-memory row (Acc) with a global row (T), computed by one lane.
template <typename T, typename Acc>
__device__ __forceinline__ Acc row_dot(const Acc* a, const T* b, int64_t n) {
  Acc sum = 0;
  for (int64_t d = 0; d < n; ++d) sum += a[d] * to_float_acc(b[d]);
  return sum;
}

template <typename T, bool kVarlen = false>
__global__ void __launch_bounds__(32 * kSimtWarps) simt_fwd_kernel(const AttentionParams params) {
  using Acc = typename SimtAcc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  Acc* s_q = reinterpret_cast<Acc*>(smem_raw) + warp * params.headdim;

  const int64_t bh = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp;
  if (bh >= params.batch * params.num_heads) return;
  if (bh == 0 && blockIdx.x == 0 && threadIdx.x == 0) record_rng_state(params);
  int64_t b = bh / params.num_heads;
  AttentionParams seq_storage;
  const AttentionParams& p = block_params<kVarlen>(params, seq_storage, b);
  if (i >= p.seqlen_q) return;
  const int64_t h = bh % p.num_heads, h_k = h / (p.num_heads / p.num_heads_k);
  const ScoreMods mods(p, b, h);

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride;
  for (int64_t d = lane; d < p.headdim; d += 32) s_q[d] = to_float_acc(q[d]);
  __syncwarp();

  Acc o[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) o[c] = 0;
  Acc row_max = -INFINITY, row_sum = 0;
  const int64_t key_begin = band_key_begin(p, i), key_end = band_key_end(p, i);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc x = -INFINITY;
    if (j < key_end && mods.visible(p, i, j)) {
      const Acc s = row_dot(s_q, k + j * p.k_row_stride, p.headdim);
      x = mods.has_transform ? mods.logit(p, s, i, j) : s * static_cast<Acc>(p.softmax_scale);
    }
    const Acc tile_max = nan_max(row_max, warp_max(x));
    if (tile_max == -INFINITY) continue;  // nothing visible yet (a NaN score does not skip)
    const Acc correction = row_max == -INFINITY ? Acc(0) : exp(row_max - tile_max);
    Acc prob = exp(x - tile_max);
    row_sum = row_sum * correction + warp_sum(prob);
    row_max = tile_max;
#pragma unroll
    for (int c = 0; c < kSimtChunks; ++c) o[c] *= correction;
    if (p.dropout_p > 0.f && j < key_end && !mods.keep(p, i, j)) prob = 0;
    const int64_t tile_keys = key_end - j0 < 32 ? key_end - j0 : 32;
    for (int jj = 0; jj < tile_keys; ++jj) {
      const Acc pj = __shfl_sync(0xffffffffu, prob, jj);
      if (pj == Acc(0)) continue;
      const T* v_row = v + (j0 + jj) * p.v_row_stride;
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < p.headdim_v) o[c] += pj * to_float_acc(v_row[d]);
      }
    }
  }

  const Acc keep_scale = dropout_keep_scale<Acc>(p.dropout_p);
  const Acc inv = row_sum > Acc(0) ? keep_scale / row_sum : Acc(0);
  T* out = static_cast<T*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + i * p.o_row_stride;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.headdim_v) store_from_acc(out + d, o[c] * inv);
  }
  if (lane == 0)
    row_lse(p, Acc{})[row_array_offset<kVarlen>(p, b, h) + i] = row_sum > Acc(0) ? row_max + log(row_sum) : Acc(-INFINITY);
}

// Shared by both backward kernels: P, dP and dS of one visible (i, j) pair.
// prob_dropped multiplies dO in dV; ds_qk is the gradient w.r.t. q_i . k_j (scale included).
template <typename T, typename Acc>
__device__ __forceinline__ void simt_grad_element(const AttentionGradParams& p, const ScoreMods& mods, int64_t b,
                                                  int64_t h, int64_t i, int64_t j, Acc s, Acc dprob, Acc lse,
                                                  Acc delta, bool with_dmask, Acc* prob_dropped, Acc* ds_qk) {
  Acc softcap_grad = 1;
  const Acc x = mods.has_transform ? mods.logit(p, s, i, j, &softcap_grad) : s * static_cast<Acc>(p.softmax_scale);
  const Acc prob = exp(x - lse);
  const bool kept = !(p.dropout_p > 0.f) || mods.keep(p, i, j);
  const Acc keep_scale = dropout_keep_scale<Acc>(p.dropout_p);
  dprob = kept ? dprob * keep_scale : Acc(0);
  const Acc ds = prob * (dprob - delta);
  if (with_dmask) add_dmask(p, b, h, i, j, ds);  // in Acc: float64 for a float64 mask
  *prob_dropped = kept ? prob * keep_scale : Acc(0);
  *ds_qk = ds * softcap_grad * static_cast<Acc>(p.softmax_scale);
}

template <typename T, bool kVarlen = false>
__global__ void __launch_bounds__(32 * kSimtWarps) simt_bwd_dq_kernel(const AttentionGradParams params) {
  using Acc = typename SimtAcc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  Acc* s_q = reinterpret_cast<Acc*>(smem_raw) + warp * (params.headdim + params.headdim_v);
  Acc* s_do = s_q + params.headdim;

  const int64_t bh = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp;
  if (bh >= params.batch * params.num_heads) return;
  int64_t b = bh / params.num_heads;
  AttentionGradParams seq_storage;
  const AttentionGradParams& p = block_params<kVarlen>(params, seq_storage, b);
  if (i >= p.seqlen_q) return;
  const int64_t h = bh % p.num_heads, h_k = h / (p.num_heads / p.num_heads_k);
  const ScoreMods mods(p, b, h);
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + i * p.q_row_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + i * p.do_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride;
  for (int64_t d = lane; d < p.headdim; d += 32) s_q[d] = to_float_acc(q[d]);
  for (int64_t d = lane; d < p.headdim_v; d += 32) s_do[d] = to_float_acc(dout[d]);
  __syncwarp();

  Acc dq[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dq[c] = 0;
  const Acc lse = row_lse(p, Acc{})[row_array_offset<kVarlen>(p, b, h) + i];
  const Acc delta = row_delta(p, Acc{})[row_array_offset<kVarlen>(p, b, h) + i];
  const int64_t key_begin = band_key_begin(p, i), key_end = lse == -INFINITY ? key_begin : band_key_end(p, i);
  for (int64_t j0 = key_begin; j0 < key_end; j0 += 32) {
    const int64_t j = j0 + lane;
    Acc ds = 0;
    if (j < key_end && mods.visible(p, i, j)) {
      const Acc s = row_dot(s_q, k + j * p.k_row_stride, p.headdim);
      const Acc dprob = row_dot(s_do, v + j * p.v_row_stride, p.headdim_v);
      Acc unused;
      simt_grad_element<T, Acc>(p, mods, b, h, i, j, s, dprob, lse, delta, p.dmask != nullptr || p.dmask64 != nullptr, &unused, &ds);
    }
    const int64_t tile_keys = key_end - j0 < 32 ? key_end - j0 : 32;
    for (int jj = 0; jj < tile_keys; ++jj) {
      const Acc dsj = __shfl_sync(0xffffffffu, ds, jj);
      if (dsj == Acc(0)) continue;
      const T* k_row = k + (j0 + jj) * p.k_row_stride;
#pragma unroll
      for (int c = 0; c < kSimtChunks; ++c) {
        const int64_t d = lane + 32 * c;
        if (d < p.headdim) dq[c] += dsj * to_float_acc(k_row[d]);
      }
    }
  }
  T* dq_row = static_cast<T*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + i * p.dq_row_stride;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.headdim) store_from_acc(dq_row + d, dq[c]);
  }
}

template <typename T, bool kVarlen = false>
__global__ void __launch_bounds__(32 * kSimtWarps) simt_bwd_dkdv_kernel(const AttentionGradParams params) {
  using Acc = typename SimtAcc<T>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  Acc* s_k = reinterpret_cast<Acc*>(smem_raw) + warp * (params.headdim + params.headdim_v);
  Acc* s_v = s_k + params.headdim;

  const int64_t bh_k = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSimtWarps + warp;
  if (bh_k >= params.batch * params.num_heads_k) return;
  int64_t b = bh_k / params.num_heads_k;
  AttentionGradParams seq_storage;
  const AttentionGradParams& p = block_params<kVarlen>(params, seq_storage, b);
  if (j >= p.seqlen_k) return;
  const int64_t h_k = bh_k % p.num_heads_k, group = p.num_heads / p.num_heads_k;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride + j * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride + j * p.v_row_stride;
  for (int64_t d = lane; d < p.headdim; d += 32) s_k[d] = to_float_acc(k[d]);
  for (int64_t d = lane; d < p.headdim_v; d += 32) s_v[d] = to_float_acc(v[d]);
  __syncwarp();

  // Query rows that see key j under the band: band_key_end(i) > j and band_key_begin(i) <= j,
  // both monotone in i.
  auto first_row = [&](auto pred) {
    int64_t lo = 0, hi = p.seqlen_q;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (pred(mid)) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  };
  const int64_t row_begin = first_row([&](int64_t i) { return band_key_end(p, i) > j; });
  const int64_t row_end = first_row([&](int64_t i) { return band_key_begin(p, i) > j; });

  Acc dk[kSimtChunks], dv[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) dk[c] = 0, dv[c] = 0;
  for (int64_t h = h_k * group; h < (h_k + 1) * group; ++h) {
    const ScoreMods mods(p, b, h);
    const int64_t rows = row_array_offset<kVarlen>(p, b, h);
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
    for (int64_t i0 = row_begin; i0 < row_end; i0 += 32) {
      const int64_t i = i0 + lane;
      Acc prob_dropped = 0, ds = 0;
      if (i < row_end && mods.visible(p, i, j)) {
        const Acc lse = row_lse(p, Acc{})[rows + i];
        if (lse != -INFINITY) {
          const Acc s = row_dot(s_k, q + i * p.q_row_stride, p.headdim);
          const Acc dprob = row_dot(s_v, dout + i * p.do_row_stride, p.headdim_v);
          simt_grad_element<T, Acc>(p, mods, b, h, i, j, s, dprob, lse, row_delta(p, Acc{})[rows + i], false,
                                    &prob_dropped, &ds);
        }
      }
      const int64_t tile_rows = row_end - i0 < 32 ? row_end - i0 : 32;
      for (int ii = 0; ii < tile_rows; ++ii) {
        const Acc pi = __shfl_sync(0xffffffffu, prob_dropped, ii);
        const Acc dsi = __shfl_sync(0xffffffffu, ds, ii);
        if (pi != Acc(0)) {
          const T* do_row = dout + (i0 + ii) * p.do_row_stride;
#pragma unroll
          for (int c = 0; c < kSimtChunks; ++c) {
            const int64_t d = lane + 32 * c;
            if (d < p.headdim_v) dv[c] += pi * to_float_acc(do_row[d]);
          }
        }
        if (dsi != Acc(0)) {
          const T* q_row = q + (i0 + ii) * p.q_row_stride;
#pragma unroll
          for (int c = 0; c < kSimtChunks; ++c) {
            const int64_t d = lane + 32 * c;
            if (d < p.headdim) dk[c] += dsi * to_float_acc(q_row[d]);
          }
        }
      }
    }
  }
  T* dk_row = static_cast<T*>(p.dk) + b * p.dk_batch_stride + h_k * p.dk_head_stride + j * p.dk_row_stride;
  T* dv_row = static_cast<T*>(p.dv) + b * p.dv_batch_stride + h_k * p.dv_head_stride + j * p.dv_row_stride;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int64_t d = lane + 32 * c;
    if (d < p.headdim) store_from_acc(dk_row + d, dk[c]);
    if (d < p.headdim_v) store_from_acc(dv_row + d, dv[c]);
  }
}

}  // namespace flashattn::cuda
