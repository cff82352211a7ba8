// FlashAttention-2 backward on mma.sync (sm80+): one CTA per (key block, kv head, batch).
//
//   load K_j, V_j (block_n x d) once; keep dK_j, dV_j in fp32 registers;
//   for every query head of the GQA group, for every query block i that meets the band:
//     S^T  = K_j Q_i^T,  P^T = exp2(S^T * scale * log2e - lse_i * log2e)   (recomputed, never stored)
//     dP^T = V_j dO_i^T, dS^T = P^T o (dP^T - D_i)                          (D = rowsum(dO o O))
//     dV_j += P^T dO_i,  dK_j += dS^T Q_i,  dQ_i += dS K_j  (fp32 atomics into dq_accum)
//   dK_j *= scale; write dK_j, dV_j (summed over the group: no per-query-head copies of K/V).
//
// Q_i / dO_i stream through shared memory with cp.async, double-buffered where shared memory
// allows (the next block's copy overlaps this block's five matrix products). P^T and dS^T go
// through shared memory because the products that read them want other warp layouts.
// Deterministic mode: the dQ_i additions of the key blocks run in key-block order, enforced by a
// per-(batch, head, query block) counter (dq_semaphore), so fp32 sums come out bitwise identical.
#pragma once

#include <cmath>
#include <cstdint>

#include "../attention_params.h"
#include "kernel_traits.h"
#include "ptx.h"
#include "score_mod.h"
#include "smem_layout.h"
#include "tile_masks.h"
#include "warp_gemm.h"

namespace flashattn::cuda {

// kVarlen as in fwd_kernel.
template <class Traits, bool kVarlen = false>
__global__ void __launch_bounds__(Traits::kThreads, 1) bwd_kernel(const AttentionGradParams params, const bool vectorized) {
  using Element = typename Traits::Element;
  using TileK = typename Traits::TileK;
  using TileQ = typename Traits::TileQ;
  using TileP = typename Traits::TileP;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages;
  constexpr bool kExtras = Traits::kExtras;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);
  Element* sV = sK + TileK::kElements;
  Element* sP = sV + TileK::kElements;
  Element* sdS = sP + TileP::kElements;
  Element* sQ_base = sdS + TileP::kElements;            // [kStages] Q tiles
  Element* sdO_base = sQ_base + kStages * TileQ::kElements;  // [kStages] dO tiles
  float* s_lse_base = reinterpret_cast<float*>(sdO_base + kStages * TileQ::kElements);  // [kStages][kBlockM], log2 units
  float* s_delta_base = s_lse_base + kStages * kBlockM;                                 // [kStages][kBlockM]

  // (For varlen, of sequence `seq`: a block past its last key has nothing to do.)
  const int64_t bh_k = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  if (bh_k >= params.batch * params.num_heads_k) return;
  const int64_t seq = bh_k / params.num_heads_k, h_k = bh_k % params.num_heads_k;
  int64_t b = seq;
  AttentionGradParams seq_storage;
  const AttentionGradParams& p = block_params<kVarlen>(params, seq_storage, b);
  const int64_t group = p.num_heads / p.num_heads_k;
  const int64_t n_block = blockIdx.x, n0 = n_block * kBlockN, n_last = n0 + kBlockN - 1;
  if (kVarlen && n0 >= p.seqlen_k) return;
  const int keys = static_cast<int>(p.seqlen_k - n0 < kBlockN ? p.seqlen_k - n0 : kBlockN);

  // Query blocks whose rows meet keys [n0, n_last] under the band (a range).
  const BlockRange blocks = query_blocks_meeting(p, kBlockM, n0, n_last);
  const int64_t i_lo = blocks.lo, count = blocks.hi - blocks.lo;
  const int64_t total = group * count;  // (query head, query block) pairs, head-major

  auto load_stage = [&](int64_t it, int stage) {
    const int64_t h = h_k * group + it / count, m0 = (i_lo + it % count) * kBlockM;
    const int rows = static_cast<int>(p.seqlen_q - m0 < kBlockM ? p.seqlen_q - m0 : kBlockM);
    const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
    const Element* dout =
        static_cast<const Element*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride + m0 * p.do_row_stride;
    load_tile_async<TileQ, Traits::kThreads>(sQ_base + stage * TileQ::kElements, q, p.q_row_stride, rows,
                                             static_cast<int>(p.headdim), vectorized);
    load_tile_async<TileQ, Traits::kThreads>(sdO_base + stage * TileQ::kElements, dout, p.do_row_stride, rows,
                                             static_cast<int>(p.headdim_v), vectorized);
    const int64_t row_base = row_array_offset<kVarlen>(p, b, h) + m0;
    for (int r = threadIdx.x; r < kBlockM; r += Traits::kThreads) {
      const float lse = r < rows ? p.lse[row_base + r] : -INFINITY;
      // An empty row (lse = -inf) must give P = 0: exp2(x - (+inf)) = 0.
      s_lse_base[stage * kBlockM + r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      s_delta_base[stage * kBlockM + r] = r < rows ? p.delta[row_base + r] : 0.f;
    }
  };

  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride + n0 * p.k_row_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride + n0 * p.v_row_stride;
  load_tile_async<TileK, Traits::kThreads>(sK, k, p.k_row_stride, keys, static_cast<int>(p.headdim), vectorized);
  load_tile_async<TileK, Traits::kThreads>(sV, v, p.v_row_stride, keys, static_cast<int>(p.headdim_v), vectorized);
  if (total > 0) load_stage(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32;
  const AccCoord acc;  // where a thread's accumulator elements lie
  const int s_key0 = (warp % Traits::kWarpsKeysS) * (kBlockN / Traits::kWarpsKeysS);
  const int s_query0 = (warp / Traits::kWarpsKeysS) * (kBlockM / Traits::kWarpsQueriesS);
  const int kv_key0 = (warp % Traits::kWarpsKeysKV) * (kBlockN / Traits::kWarpsKeysKV);
  const int kv_group = warp / Traits::kWarpsKeysKV;  // column pairs kv_group + kWarpsColsKV * n
  const int dq_row0 = (warp % Traits::kWarpsRowsDq) * 16;
  const int dq_group = warp / Traits::kWarpsRowsDq;  // column pairs dq_group + kWarpsColsDq * n
  const FragA<TileK> frag_k(sK, s_key0), frag_v(sV, s_key0);
  const FragA<TileP> frag_p(sP, kv_key0), frag_ds(sdS, kv_key0);
  const FragATrans<TileP> frag_ds_t(sdS, 0, dq_row0 / 8);
  const FragBTrans<TileK> frag_k_t(sK, 0, 2 * dq_group);

  float acc_dk[Traits::kKVMT][Traits::kKVNT][4], acc_dv[Traits::kKVMT][Traits::kKVNT][4];
  zero(acc_dk);
  zero(acc_dv);
  const float scale = static_cast<float>(p.softmax_scale), scale_log2 = scale * kLog2e;
  const bool dropout = kExtras && p.dropout_p > 0.f;
  const float keep_scale = dropout ? dropout_keep_scale<float>(p.dropout_p) : 1.f;
  const bool float_mask_grad = kExtras && p.dmask != nullptr;

  for (int64_t it = 0; it < total; ++it) {
    const int stage = kStages == 2 ? static_cast<int>(it & 1) : 0;
    if (kStages == 2 && it + 1 < total) {
      load_stage(it + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // Q_i, dO_i, lse_i, D_i of this stage are in shared memory

    const int64_t h = h_k * group + it / count, m_block = i_lo + it % count, m0 = m_block * kBlockM;
    const int64_t m_last = m0 + kBlockM <= p.seqlen_q ? m0 + kBlockM - 1 : p.seqlen_q - 1;
    const Element* sQ = sQ_base + stage * TileQ::kElements;
    const Element* sdO = sdO_base + stage * TileQ::kElements;
    const float* s_lse = s_lse_base + stage * kBlockM;
    const float* s_delta = s_delta_base + stage * kBlockM;
    const ScoreMods mods(p, b, h);
    bool skip = kExtras && mods.tile_skipped(p, m0, m_last, n0, n_last);
    if (kExtras && p.mask_kind != MaskKind::kNone && !skip) {
      // A tile the attn_mask removes entirely (all false / -inf) contributes nothing.
      skip = tile_masked_out(p, mods, [&](auto&& visit) {
#pragma unroll
        for (int mt = 0; mt < Traits::kSMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < Traits::kSNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) visit(acc.col(m0 + s_query0, nt, e), acc.row(n0 + s_key0, mt, e));
      });
    }

    if (!skip) {
      // dP^T = V dO^T, then S^T = K Q^T (this order keeps the softcap derivative out of registers).
      float acc_dp[Traits::kSMT][Traits::kSNT][4], acc_s[Traits::kSMT][Traits::kSNT][4];
      zero(acc_dp);
      warp_gemm<Traits::kSMT, Traits::kSNT, kHeadDim / 16, false, false, 1, Element>(
          acc_dp, frag_v, FragB<TileQ>(sdO, s_query0));
      zero(acc_s);
      warp_gemm<Traits::kSMT, Traits::kSNT, kHeadDim / 16, false, false, 1, Element>(
          acc_s, frag_k, FragB<TileQ>(sQ, s_query0));
      // Band and sequence ends: each query column i sees the keys [lo, hi) of this tile (S^T:
      // keys are the accumulator rows, queries the columns).
      if (!mods.tile_inside_band(p, m0, m_last, n0, n_last)) {
#pragma unroll
        for (int nt = 0; nt < Traits::kSNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const KeyInterval keys = band_interval<kBlockN>(p, acc.col(m0 + s_query0, nt, e), n0);
#pragma unroll
            for (int mt = 0; mt < Traits::kSMT; ++mt)
#pragma unroll
              for (int half = 0; half < 2; ++half) {
                const int key = acc.row(s_key0, mt, 2 * half);
                if (key < keys.lo || key >= keys.hi) acc_s[mt][nt][2 * half + e] = -INFINITY;
              }
          }
      }
      const bool elementwise =
          kExtras && (mods.has_transform || mods.has_element_mask || dropout || float_mask_grad);
#pragma unroll
      for (int mt = 0; mt < Traits::kSMT; ++mt)
#pragma unroll
        for (int nt = 0; nt < Traits::kSNT; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = acc.col(s_query0, nt, e);
            const float lse2 = s_lse[col], delta = s_delta[col];
            float dprob = acc_dp[mt][nt][e];
            if (!elementwise) {
              // P = exp2(S * scale * log2e - lse * log2e): 0 for masked (-inf) scores and empty rows.
              const float prob = fast_exp2(acc_s[mt][nt][e] * scale_log2 - lse2);
              acc_dp[mt][nt][e] = prob * (dprob - delta);
              acc_s[mt][nt][e] = prob;
              continue;
            }
            const int64_t i = m0 + col, j = acc.row(n0 + s_key0, mt, e);
            float ds = 0.f, prob = 0.f;
            if (acc_s[mt][nt][e] != -INFINITY && i < p.seqlen_q && j < p.seqlen_k &&
                (!mods.has_element_mask || mods.visible(p, i, j))) {
              float softcap_grad = 1.f;
              const float x = mods.has_transform ? mods.logit(p, acc_s[mt][nt][e], i, j, &softcap_grad) * kLog2e
                                                 : acc_s[mt][nt][e] * scale_log2;
              prob = fast_exp2(x - lse2);
              const bool kept = !dropout || mods.keep(p, i, j);
              dprob = kept ? dprob * keep_scale : 0.f;  // gradient through the dropped probability
              ds = prob * (dprob - delta);
              if (float_mask_grad) add_dmask(p, b, h, i, j, ds);
              ds *= softcap_grad;
              prob = kept ? prob * keep_scale : 0.f;
            }
            acc_s[mt][nt][e] = prob;  // P^T with dropout applied: what multiplies dO in dV
            acc_dp[mt][nt][e] = ds;
          }
      store_acc_to_smem<TileP>(sP, acc_s, s_key0, s_query0 / 16);
      store_acc_to_smem<TileP>(sdS, acc_dp, s_key0, s_query0 / 16);
    }
    __syncthreads();  // P^T and dS^T complete

    if (!skip) {
      constexpr int kGroupsKV = Traits::kWarpsColsKV;
      warp_gemm<Traits::kKVMT, Traits::kKVNT, kBlockM / 16, false, true, kGroupsKV, Element>(
          acc_dv, frag_p, FragBTrans<TileQ>(sdO, 0, 2 * kv_group));
      warp_gemm<Traits::kKVMT, Traits::kKVNT, kBlockM / 16, false, true, kGroupsKV, Element>(
          acc_dk, frag_ds, FragBTrans<TileQ>(sQ, 0, 2 * kv_group));
    }
    int* semaphore = nullptr;
    if (p.deterministic) {
      // Wait for the key blocks before this one (in band order) to have added their dQ_i.
      // One counter per (sequence, head, query block); varlen: blocks of the longest sequence.
      const int64_t m_blocks_all = (params.seqlen_q + kBlockM - 1) / kBlockM;
      semaphore = p.dq_semaphore + (seq * p.num_heads + h) * m_blocks_all + m_block;
      const int turn = static_cast<int>(n_block - band_key_begin(p, m0) / kBlockN);
      if (threadIdx.x == 0)
        while (ld_acquire(semaphore) != turn) __nanosleep(40);
      __syncthreads();
    }
    if (!skip) {
      // dQ_i += dS K_j, straight into the fp32 accumulator (scale applied when converting).
      float* dq_accum = p.dq_accum + (row_array_offset<kVarlen>(p, b, h) + m0) * kHeadDim;
      constexpr int kGroupsDq = Traits::kWarpsColsDq, kChunkPairs = Traits::kDqChunk / 16;
#pragma unroll
      for (int chunk = 0; chunk < Traits::kDqCols / Traits::kDqChunk; ++chunk) {
        float acc_dq[1][Traits::kDqChunk / 8][4];
        zero(acc_dq);
        const int pair_begin = kGroupsDq * kChunkPairs * chunk;
        warp_gemm<1, Traits::kDqChunk / 8, kBlockN / 16, true, true, kGroupsDq, Element>(acc_dq, frag_ds_t, frag_k_t,
                                                                                          pair_begin);
#pragma unroll
        for (int nt = 0; nt < Traits::kDqChunk / 8; ++nt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int row = acc.row(dq_row0, 0, 2 * half);
            const int col = acc.col(16 * (pair_begin + kGroupsDq * (nt / 2) + dq_group), nt % 2, 0);
            if (m0 + row < p.seqlen_q)
              red_add_f32x2(dq_accum + static_cast<int64_t>(row) * kHeadDim + col, acc_dq[0][nt][2 * half],
                            acc_dq[0][nt][2 * half + 1]);
          }
      }
    }
    if (p.deterministic) {
      __threadfence();
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(semaphore, 1);
    }
    __syncthreads();  // every warp is done with this stage, P^T and dS^T
    if (kStages == 1 && it + 1 < total) {
      load_stage(it + 1, 0);
      cp_async_commit();
    }
  }

  // dK = scale * dS^T Q; write dK, dV through shared memory (K/V tiles are free now).
  cp_async_wait<0>();
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < Traits::kKVMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < Traits::kKVNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_dk[mt][nt][e] *= scale;
  store_acc_to_smem<TileK, Traits::kWarpsColsKV>(sK, acc_dk, kv_key0, kv_group);
  store_acc_to_smem<TileK, Traits::kWarpsColsKV>(sV, acc_dv, kv_key0, kv_group);
  __syncthreads();
  Element* dk = static_cast<Element*>(p.dk) + b * p.dk_batch_stride + h_k * p.dk_head_stride + n0 * p.dk_row_stride;
  Element* dv = static_cast<Element*>(p.dv) + b * p.dv_batch_stride + h_k * p.dv_head_stride + n0 * p.dv_row_stride;
  store_tile<TileK, Traits::kThreads>(dk, p.dk_row_stride, sK, keys, static_cast<int>(p.headdim), vectorized);
  store_tile<TileK, Traits::kThreads>(dv, p.dv_row_stride, sV, keys, static_cast<int>(p.headdim_v), vectorized);
}

}  // namespace flashattn::cuda
