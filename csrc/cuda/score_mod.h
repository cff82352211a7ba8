// What happens to a score between Q K^T and the softmax, shared by every CUDA kernel:
// the band (causal / sliding window, top-left or bottom-right), the key bound, the optional
// attn_mask (bool or additive float, through its strides), ALiBi, softcap, block-sparse mask and
// dropout's keep decision. Everything is a runtime value; kernels decide per tile whether any of
// it applies (uniform branches), so the common tile pays nothing.
//
// logit(i, j) = softcap_transform(scale * q_i . k_j) - slope * |i + S - L - j| + float_mask(i, j)
// (the order the CPU path uses too: softcap on the scaled score, then the additive terms; the
// gradient of a float mask is d loss / d logit).
// softcap_transform(x) = softcap * tanh(x / softcap) when softcap > 0.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "../attention_params.h"
#include "../philox.h"

namespace flashattn::cuda {

// The call's Philox (seed, offset): the values, or under CUDA graph capture what the pointers hold.
__device__ __forceinline__ void philox_seed_offset(const AttentionParams& p, uint64_t& seed, uint64_t& offset) {
  seed = p.philox_seed;
  offset = p.philox_offset;
  if (p.philox_seed_ptr != nullptr) {
    seed = static_cast<uint64_t>(*p.philox_seed_ptr);
    offset = static_cast<uint64_t>(*p.philox_offset_ptr) + p.philox_offset_intragraph;
  }
}

// A forward with dropout records the (seed, offset) it used in rng_state, from the call's params
// (before select_sequence: varlen sequence b adds b itself). One thread of the grid calls it.
__device__ __forceinline__ void record_rng_state(const AttentionParams& p) {
  if (p.rng_state == nullptr || !(p.dropout_p > 0.f)) return;
  uint64_t seed, offset;
  philox_seed_offset(p, seed, offset);
  p.rng_state[0] = static_cast<int64_t>(seed);
  p.rng_state[1] = static_cast<int64_t>(offset);
}

// Per-(batch, head) state. It holds no reference to the params: every method takes them, so a
// kernel's by-value params stay in the parameter space (a stored reference would force a local
// copy of the whole struct).
struct ScoreMods {
  int64_t b, h, bh;
  float alibi_slope;        // 0 without ALiBi
  int64_t mask_base;        // mask element offset of (b, h, 0, 0)
  int64_t block_mask_base;  // block mask offset of (b, h, 0, 0)
  bool has_transform;       // scale applied per element (softcap, ALiBi or float mask present)
  bool has_element_mask;    // bool mask or block mask: every tile checks elements
  uint64_t seed, offset;
  uint32_t keep_threshold;

  __device__ __forceinline__ ScoreMods(const AttentionParams& p, int64_t b_, int64_t h_) : b(b_), h(h_) {
    bh = b * p.num_heads + h;
    alibi_slope = p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f;
    mask_base = p.mask_kind != MaskKind::kNone ? p.mask_view.row_offset(b, h, 0) : 0;
    block_mask_base = b * p.block_mask_batch_stride + h * p.block_mask_head_stride;
    const bool float_mask = p.mask_kind != MaskKind::kNone && p.mask_kind != MaskKind::kBool;
    // A non-positive scale also takes the per-element path: folding it into exp2 would turn
    // masked (-inf) scores into NaN.
    has_transform = p.softcap > 0.f || p.alibi_slopes != nullptr || float_mask || !(p.softmax_scale > 0.f);
    has_element_mask = p.mask_kind == MaskKind::kBool || p.block_mask != nullptr;
    philox_seed_offset(p, seed, offset);
    keep_threshold = dropout_keep_threshold(p.dropout_p);
  }

  template <typename F>
  __device__ __forceinline__ F mask_value(const AttentionParams& p, int64_t i, int64_t j) const {
    const int64_t off = mask_base + i * p.mask_view.row_stride + j * p.mask_view.col_stride;
    switch (p.mask_kind) {
      case MaskKind::kFloat32: return static_cast<F>(static_cast<const float*>(p.mask)[off]);
      case MaskKind::kFloat64: return static_cast<F>(static_cast<const double*>(p.mask)[off]);
      case MaskKind::kFloat16: return static_cast<F>(__half2float(static_cast<const __half*>(p.mask)[off]));
      case MaskKind::kBFloat16: return static_cast<F>(__bfloat162float(static_cast<const __nv_bfloat16*>(p.mask)[off]));
      default: return F(0);
    }
  }

  // Scaled, transformed logit from the raw product s = q_i . k_j (only when has_transform).
  // *softcap_grad receives d logit / d (scale * s) (1 without softcap).
  // F is float in the tensor-core kernels, the accumulation type (float or double) in the SIMT ones.
  template <typename F>
  __device__ __forceinline__ F logit(const AttentionParams& p, F s, int64_t i, int64_t j, F* softcap_grad = nullptr) const {
    F x = s * static_cast<F>(p.softmax_scale);
    F grad = F(1);
    if (p.softcap > 0.f) {
      const F cap = static_cast<F>(p.softcap);
      const F t = tanh(x / cap);
      x = cap * t;
      grad = F(1) - t * t;
    }
    if (p.alibi_slopes != nullptr) {
      const int64_t d = i + p.seqlen_k - p.seqlen_q - j;
      x -= static_cast<F>(alibi_slope) * static_cast<F>(d < 0 ? -d : d);
    }
    if (p.mask_kind != MaskKind::kNone && p.mask_kind != MaskKind::kBool) x += mask_value<F>(p, i, j);
    if (softcap_grad) *softcap_grad = grad;
    return x;
  }

  // Band and key bound only.
  __device__ __forceinline__ bool in_band(const AttentionParams& p, int64_t i, int64_t j) const {
    return j < p.seqlen_k && j >= band_key_begin(p, i) && j < band_key_end(p, i);
  }
  // Block mask, and inside a kept partial block its compact element mask (block_elem_index >= 0).
  __device__ __forceinline__ bool block_kept(const AttentionParams& p, int64_t i, int64_t j) const {
    const int64_t bi = i / p.block_sparse_m, bj = j / p.block_sparse_n;
    const int64_t off = block_mask_base + bi * p.block_mask_row_stride + bj * p.block_mask_col_stride;
    if (p.block_mask[off] == 0) return false;
    if (p.block_elem_index == nullptr) return true;
    const int32_t e = p.block_elem_index[off];
    if (e < 0) return true;  // a full block
    const int64_t r = i - bi * p.block_sparse_m, c = j - bj * p.block_sparse_n;
    return p.block_elem_masks[(e * p.block_sparse_m + r) * p.block_sparse_n + c] != 0;
  }
  // Everything that removes an element (band, bound, bool mask, block mask).
  __device__ __forceinline__ bool visible(const AttentionParams& p, int64_t i, int64_t j) const {
    if (!in_band(p, i, j)) return false;
    if (p.mask_kind == MaskKind::kBool &&
        static_cast<const uint8_t*>(p.mask)[mask_base + i * p.mask_view.row_stride + j * p.mask_view.col_stride] == 0)
      return false;
    if (p.block_mask != nullptr && !block_kept(p, i, j)) return false;
    return true;
  }

  // Whether the attn_mask lets (i, j) take part at all (bool true, or a float other than -inf).
  __device__ __forceinline__ bool mask_allows(const AttentionParams& p, int64_t i, int64_t j) const {
    if (p.mask_kind == MaskKind::kNone) return true;
    if (p.mask_kind == MaskKind::kBool)
      return static_cast<const uint8_t*>(p.mask)[mask_base + i * p.mask_view.row_stride + j * p.mask_view.col_stride] != 0;
    return mask_value<float>(p, i, j) != -INFINITY;
  }

  // True if every element of rows [m0, m_last] x keys [n0, n_last] lies inside the band and the
  // key bound, so the tile needs no element masking for the band.
  __device__ __forceinline__ bool tile_inside_band(const AttentionParams& p, int64_t m0, int64_t m_last, int64_t n0, int64_t n_last) const {
    return n_last < p.seqlen_k && band_key_begin(p, m_last) <= n0 && band_key_end(p, m0) > n_last;
  }
  // True if the block mask removes the whole tile. The tile's last row / key are clamped to the
  // sequence: a tile reaching past it (the last key tile is rarely full) would otherwise read
  // block rows / columns beyond ceil(L / block_m) x ceil(S / block_n) whenever the sparse block
  // is smaller than the kernel tile or does not divide it (e.g. 64-key tiles, 32- or 96-key blocks).
  __device__ __forceinline__ bool tile_skipped(const AttentionParams& p, int64_t m0, int64_t m_last, int64_t n0, int64_t n_last) const {
    if (p.block_mask == nullptr) return false;
    if (m_last >= p.seqlen_q) m_last = p.seqlen_q - 1;
    if (n_last >= p.seqlen_k) n_last = p.seqlen_k - 1;
    for (int64_t bi = m0 / p.block_sparse_m; bi <= m_last / p.block_sparse_m; ++bi)
      for (int64_t bj = n0 / p.block_sparse_n; bj <= n_last / p.block_sparse_n; ++bj)
        if (p.block_mask[block_mask_base + bi * p.block_mask_row_stride + bj * p.block_mask_col_stride] != 0)
          return false;
    return true;
  }

  // Dropout keep bits of keys j0 .. j0 + 3 (j0 a multiple of 4) of row i (philox.h).
  __device__ __forceinline__ uint32_t keep_bits(const AttentionParams& p, int64_t i, int64_t j0) const {
    return dropout_keep_bits(seed, offset, bh, i, j0, keep_threshold);
  }
  __device__ __forceinline__ bool keep(const AttentionParams& p, int64_t i, int64_t j) const { return (keep_bits(p, i, j & ~int64_t(3)) >> (j & 3)) & 1u; }
};

// Gradient of a float attn_mask (zeroed first): contributions of broadcast elements add up in the
// one element they read. Where no element is broadcast each one receives exactly one addition
// onto zero, so the result is bitwise deterministic even though it is an atomic.
__device__ __forceinline__ void add_dmask(const AttentionGradParams& p, int64_t b, int64_t h, int64_t i, int64_t j,
                                          float value) {
  float* dst = p.dmask + p.dmask_view.offset(b, h, i, j);
  atomicAdd(dst, value);
}
// The fp64 SIMT backward: a float64 mask's gradient accumulates in float64 (dmask64), a float32
// mask's in float32.
__device__ __forceinline__ void add_dmask(const AttentionGradParams& p, int64_t b, int64_t h, int64_t i, int64_t j,
                                          double value) {
  const int64_t at = p.dmask_view.offset(b, h, i, j);
  if (p.dmask64 != nullptr)
    atomicAdd(p.dmask64 + at, value);
  else
    atomicAdd(p.dmask + at, static_cast<float>(value));
}

}  // namespace flashattn::cuda
