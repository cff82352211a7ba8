// FlashAttention-2 forward on mma.sync (sm80+): one CTA per (query block, head, batch).
//
//   load Q (block_m x d) once; stream K_j, V_j (block_n x d) through shared memory with cp.async,
//   in one of two pipelines (kStages):
//    2: a ring of two K/V stages: tile j - 2 is fetched while tile j - 1 waits and tile j is
//       computed, a whole iteration of lead (sm90: 2 CTAs/SM still fit at d = 128);
//    1: one K and one V buffer, FlashAttention-2's interleave: V_j is fetched while S = Q K_j^T
//       and the softmax run, K_{j-1} while O += P V_j runs (half the shared memory: sm80).
//   Each warp owns block_m / num_warps query rows, keeps its S, P, O, row_max and row_sum in
//   registers (online softmax with exp2, scale folded into the exponent), and P goes straight from
//   the S accumulators into the A operand of P V. Writes O (through shared memory, 16-byte stores)
//   and lse (fp32, natural log, -inf for a row that sees no key; its O is 0).
//
// Key blocks run from last to first, so with a causal band the tiles that need element masking
// come first; tiles outside the band are never visited, tiles wholly inside it skip masking.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../attention_params.h"
#include "kernel_traits.h"
#include "online_softmax.h"
#include "ptx.h"
#include "score_mod.h"
#include "smem_layout.h"
#include "tile_masks.h"
#include "warp_gemm.h"

namespace flashattn::cuda {

// kVarlen: params hold packed sequences (cu_seqlens); this block works on its sequence's rows only
// (select_sequence). A separate instantiation, so the dense kernels keep their registers: the
// per-sequence lengths and pointers come from global memory, where the dense ones are constants.
template <class Traits, bool kVarlen = false>
__global__ void __launch_bounds__(Traits::kThreads) fwd_kernel(const AttentionParams params, const bool vectorized) {
  using Element = typename Traits::Element;
  using TileQ = typename Traits::TileQ;
  using TileK = typename Traits::TileK;
  using TileV = typename Traits::TileV;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kMT = Traits::kMT, kOutNT = Traits::kOutNT;
  constexpr bool kExtras = Traits::kExtras;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  // sm80 never runs the hd128 ring (two 96 KB CTAs do not fit in its 164 KB per SM; dispatch.cu
  // picks the interleave there) and ptxas spills it for sm80: that instantiation is built as the
  // interleave instead (correct, same shared-memory layout, stage 0 only).
  constexpr bool kRing = Traits::kStages == 2 && Traits::kHeadDim != 128;
#else
  constexpr bool kRing = Traits::kStages == 2;
#endif
  constexpr int kStages = kRing ? 2 : 1;
  constexpr int kSubTiles = kRing ? Traits::kSubTiles : 1;
  constexpr int kSubN = kBlockN / kSubTiles, kScoreNT = kSubN / 8;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + TileQ::kElements;                   // [Traits::kStages] K tiles
  Element* sV = sK + Traits::kStages * TileK::kElements;  // [Traits::kStages] V tiles

  // Which (batch, head) and query block. Heavy (late, under a causal band) blocks start first.
  // (For varlen, of sequence b: a block past its last row has nothing to do.)
  const int64_t bh = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  if (bh >= params.batch * params.num_heads) return;
  if (kExtras && bh == 0 && blockIdx.x == 0 && threadIdx.x == 0) record_rng_state(params);
  int64_t b = bh / params.num_heads;
  const int64_t h = bh % params.num_heads;
  AttentionParams seq_storage;
  const AttentionParams& p = block_params<kVarlen>(params, seq_storage, b);
  const int64_t h_k = h / (p.num_heads / p.num_heads_k);
  // Split-KV (varlen only): blockIdx.x = query block * num_splits + split. (The split and the
  // sequence are recomputed from blockIdx where needed: nothing more held through the key loop.)
  const int splits = kVarlen ? params.num_splits : 1;
  auto split_index = [&] { return kVarlen ? static_cast<int>(blockIdx.x % splits) : 0; };
  const int64_t m0 = kVarlen ? static_cast<int64_t>(gridDim.x / splits - 1 - blockIdx.x / splits) * kBlockM
                             : static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;
  if (kVarlen && m0 >= p.seqlen_q) return;
  const int rows = static_cast<int>(p.seqlen_q - m0 < kBlockM ? p.seqlen_q - m0 : kBlockM);
  const int64_t m_last = m0 + rows - 1;

  const ScoreMods mods(p, b, h);

  // Key blocks that meet the band of rows [m0, m_last].
  const int64_t key_begin = band_key_begin(p, m0), key_end = band_key_end(p, m_last);
  int64_t n_block_min = key_begin / kBlockN;
  int64_t n_block_max = key_end > key_begin ? (key_end + kBlockN - 1) / kBlockN : n_block_min;
  if (kVarlen && splits > 1) {  // this split's share (possibly none: its rows then see no key)
    const int64_t per = (n_block_max - n_block_min + splits - 1) / splits;
    const int64_t first = n_block_min + split_index() * per;
    const int64_t lo = first < n_block_max ? first : n_block_max;
    n_block_min = lo;
    n_block_max = lo + per < n_block_max ? lo + per : n_block_max;
  }

  const Element* q = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + m0 * p.q_row_stride;
  const Element* k = static_cast<const Element*>(p.k) + b * p.k_batch_stride + h_k * p.k_head_stride;
  const Element* v = static_cast<const Element*>(p.v) + b * p.v_batch_stride + h_k * p.v_head_stride;
  // Key block n_block's first row in k / v: contiguous rows, or (varlen over a paged cache) row
  // n0 % page of page block_table[n0 / page] (a key block never straddles two pages). The paging
  // fields are read from the launch parameters, not the sequence's copy: no registers held. Only
  // the plain kernels page (in the extras ones ptxas spilled at d = 64 / 96); fwd_split_plan says so.
  auto block_offset = [&](int64_t n_block, int64_t page_stride, int64_t row_stride) -> int64_t {
    const int64_t n0 = n_block * kBlockN;
    if (kVarlen && !kExtras && params.block_table != nullptr) {  // 32-bit: positions, (batch, head) fit
      const uint32_t seq = (blockIdx.y + gridDim.y * blockIdx.z) / static_cast<uint32_t>(params.num_heads);
      const uint32_t pos = static_cast<uint32_t>(n0), page = static_cast<uint32_t>(params.page_block_size);
      const int32_t* pages = params.block_table + seq * params.block_table_batch_stride;
      return pages[pos / page] * page_stride + static_cast<int64_t>(pos % page) * row_stride;
    }
    return n0 * row_stride;
  };
  auto keys_in = [&](int64_t n_block) {
    const int64_t left = p.seqlen_k - n_block * kBlockN;
    return static_cast<int>(left < kBlockN ? left : kBlockN);
  };
  auto load_k = [&](int64_t n_block, int stage) {
    load_tile_async<TileK, Traits::kThreads>(sK + stage * TileK::kElements, k + (kVarlen ? block_offset(n_block, params.k_batch_stride, p.k_row_stride) : n_block * kBlockN * p.k_row_stride),
                                             p.k_row_stride, keys_in(n_block), static_cast<int>(p.headdim), vectorized);
  };
  auto load_v = [&](int64_t n_block, int stage) {
    load_tile_async<TileV, Traits::kThreads>(sV + stage * TileV::kElements,
                                             v + (kVarlen ? block_offset(n_block, params.v_batch_stride, p.v_row_stride) : n_block * kBlockN * p.v_row_stride),
                                             p.v_row_stride, keys_in(n_block), static_cast<int>(p.headdim_v),
                                             vectorized);
  };

  // Prologue. Ring: tiles n_max - 1 and n_max - 2 in flight (two commit groups). Interleave: K only.
  load_tile_async<TileQ, Traits::kThreads>(sQ, q, p.q_row_stride, rows, static_cast<int>(p.headdim), vectorized);
  if (n_block_max > n_block_min) {
    load_k(n_block_max - 1, 0);
    if (kStages == 2) load_v(n_block_max - 1, 0);
  }
  cp_async_commit();
  if (kStages == 2) {
    if (n_block_max - 1 > n_block_min) {
      load_k(n_block_max - 2, 1);
      load_v(n_block_max - 2, 1);
    }
    cp_async_commit();
  }

  const int warp = threadIdx.x / 32;
  const int warp_row0 = warp * Traits::kWarpRows;  // first row of this warp inside the block
  const AccCoord acc;                               // where a thread's accumulator elements lie
  const FragA<TileQ> frag_q(sQ, warp_row0);

  float acc_o[kMT][kOutNT][4];
  zero(acc_o);
  // exp2 argument = score * exp_scale - row_max * exp_scale. Raw scores carry the softmax scale
  // in exp_scale; transformed scores (softcap, ALiBi, float mask) are already scaled logits.
  const bool has_transform = kExtras && mods.has_transform;
  OnlineSoftmax<kMT> softmax(has_transform ? kLog2e : static_cast<float>(p.softmax_scale) * kLog2e);
  const bool dropout = kExtras && p.dropout_p > 0.f;

  // One K/V tile. The ring's stage is a compile-time constant (the loop below is unrolled by
  // two), so both stages' ldmatrix addresses are immediates off the same base registers.
  const FragB<TileK> frag_k0(sK, 0);
  const FragBTrans<TileV> frag_v0(sV, 0);
  auto iteration = [&](auto stage_constant, int64_t n_block) {
    constexpr int stage = decltype(stage_constant)::value;
    FragB<TileK> frag_k = frag_k0;
    FragBTrans<TileV> frag_v = frag_v0;
    if (stage == 1) {
      frag_k.advance(TileK::kBytes);
      frag_v.advance(TileV::kBytes);
    }
    const int64_t n0 = n_block * kBlockN;
    if constexpr (kStages == 2) {
      cp_async_wait<1>();  // this tile's group is done; the next one may still be in flight
      __syncthreads();
    } else {
      cp_async_wait<0>();
      __syncthreads();  // K_j (and Q) landed; every warp is done with V_{j+1}
      load_v(n_block, 0);
      cp_async_commit();
    }

    bool skip = kExtras && mods.tile_skipped(p, m0, m_last, n0, n0 + kBlockN - 1);
    if (kExtras && p.mask_kind != MaskKind::kNone && !skip) {
      // A tile the attn_mask removes entirely (all false / -inf) skips both products.
      skip = tile_masked_out(p, mods, [&](auto&& visit) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) visit(acc.row(m0 + warp_row0, mt, e), acc.col(n0, nt, e));
      });
    }
    // Scores of keys [n0s, n0s + kSubN) -> masked, online-softmax step, dropout -> P fragments.
    auto scores_to_probs = [&](float (&acc_s)[kMT][kScoreNT][4], int64_t n0s,
                               uint32_t (&p_frag)[kMT][kScoreNT / 2][4]) {
      // The band and the sequence ends, only where this tile needs them: one visible key
      // interval [lo, hi) per row, two compares per score.
      if (!mods.tile_inside_band(p, m0, m_last, n0s, n0s + kSubN - 1)) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const KeyInterval keys = band_interval<kSubN>(p, acc.row(m0 + warp_row0, mt, 2 * half), n0s);
#pragma unroll
            for (int nt = 0; nt < kScoreNT; ++nt)
#pragma unroll
              for (int e = 2 * half; e < 2 * half + 2; ++e) {
                const int col = acc.col(0, nt, e);
                if (col < keys.lo || col >= keys.hi) acc_s[mt][nt][e] = -INFINITY;
              }
          }
      }
      // Everything else (softcap, ALiBi, attn_mask, block mask): per element, rare.
      if (kExtras && (mods.has_transform || mods.has_element_mask)) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int nt = 0; nt < kScoreNT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int64_t i = acc.row(m0 + warp_row0, mt, e), j = acc.col(n0s, nt, e);
              float& s = acc_s[mt][nt][e];
              if (s == -INFINITY || i >= p.seqlen_q || j >= p.seqlen_k) continue;
              if (mods.has_transform) s = mods.logit(p, s, i, j);
              if (mods.has_element_mask && !mods.visible(p, i, j)) s = -INFINITY;
            }
      }

      softmax.step(acc_s, acc_o);

      // Dropout after the normaliser is counted: dropped probabilities leave P V only
      // (1 / (1 - dropout_p) is folded into the final normalisation).
      if (dropout) {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t i = acc.row(m0 + warp_row0, mt, 2 * half);
#pragma unroll
            for (int nt = 0; nt < kScoreNT; ++nt) {
              const int64_t j = acc.col(n0s, nt, 0);  // even: j, j + 1 share one Philox draw
              const uint32_t bits = mods.keep_bits(p, i, j & ~int64_t(3)) >> (j & 3);
              if (!(bits & 1u)) acc_s[mt][nt][2 * half] = 0.f;
              if (!(bits & 2u)) acc_s[mt][nt][2 * half + 1] = 0.f;
            }
          }
      }
      acc_to_a_fragments<Element>(p_frag, acc_s);
    };

    if constexpr (kStages == 2) {
      // Ring: S, softmax and O += P V per sub-tile, then refill this stage with tile j - 2 once
      // every warp is done with it.
      if (!skip) {
#pragma unroll
        for (int sub = 0; sub < kSubTiles; ++sub) {
          float acc_s[kMT][kScoreNT][4];
          zero(acc_s);
          warp_gemm<kMT, kScoreNT, kHeadDim / 16, false, false, 1, Element>(acc_s, frag_q, frag_k, sub * kSubN / 16);
          uint32_t p_frag[kMT][kScoreNT / 2][4];
          scores_to_probs(acc_s, n0 + sub * kSubN, p_frag);
          warp_gemm_ra<kMT, kOutNT, kSubN / 16, true, Element>(acc_o, p_frag, frag_v, sub * kSubN);
        }
      }
      __syncthreads();
      if (n_block - 2 >= n_block_min) {
        load_k(n_block - 2, stage);
        load_v(n_block - 2, stage);
      }
      cp_async_commit();  // possibly empty: keeps one group per iteration for wait<1>
    } else {
      // Interleave: S = Q K_j^T and the softmax while V_j arrives, then O += P V_j while K_{j-1} arrives.
      uint32_t p_frag[kMT][kScoreNT / 2][4];
      if (!skip) {
        float acc_s[kMT][kScoreNT][4];
        zero(acc_s);
        warp_gemm<kMT, kScoreNT, kHeadDim / 16, false, false, 1, Element>(acc_s, frag_q, frag_k);
        scores_to_probs(acc_s, n0, p_frag);
      }
      cp_async_wait<0>();
      __syncthreads();  // V_j landed; every warp is done with K_j
      if (n_block - 1 >= n_block_min) load_k(n_block - 1, 0);
      cp_async_commit();
      if (!skip) warp_gemm_ra<kMT, kOutNT, kBlockN / 16, true, Element>(acc_o, p_frag, frag_v);
    }
  };
  if constexpr (kStages == 2) {
    for (int64_t n_block = n_block_max - 1; n_block >= n_block_min; n_block -= 2) {
      iteration(std::integral_constant<int, 0>{}, n_block);
      if (n_block - 1 < n_block_min) break;
      iteration(std::integral_constant<int, 1>{}, n_block - 1);
    }
  } else {
    for (int64_t n_block = n_block_max - 1; n_block >= n_block_min; --n_block)
      iteration(std::integral_constant<int, 0>{}, n_block);
  }

  // Epilogue: O /= row_sum, lse (natural log); rows that saw no key: O = 0, lse = -inf. A split
  // writes both, O in fp32, to its part of the partial arrays.
  const bool to_partial = kVarlen && splits > 1;
  const int64_t row0 = to_partial ? split_row(p, split_index(), row_array_offset<kVarlen>(p, b, h) + m0)
                                  : row_array_offset<kVarlen>(p, b, h) + m0;
  float* lse = (to_partial ? params.partial_lse : p.lse) + row0;
  softmax.finalize(acc_o, dropout ? dropout_keep_scale<float>(p.dropout_p) : 1.f, [&](int mt, int half, auto&& row_lse) {
    const int row = acc.row(warp_row0, mt, 2 * half);
    if (acc.t == 0 && row < rows) lse[row] = row_lse();
  });

  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sQ
  if (to_partial) {
    float* po = params.partial_out + row0 * p.headdim_v;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int nt = 0; nt < kOutNT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = acc.row(warp_row0, mt, e), col = acc.col(0, nt, e);
          if (row < rows && col < p.headdim_v) po[row * p.headdim_v + col] = acc_o[mt][nt][e];
        }
    return;
  }
  store_acc_to_smem<TileQ>(sQ, acc_o, warp_row0, 0);
  __syncthreads();
  Element* out = static_cast<Element*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride + m0 * p.o_row_stride;
  store_tile<TileQ, Traits::kThreads>(out, p.o_row_stride, sQ, rows, static_cast<int>(p.headdim_v), vectorized);
}

}  // namespace flashattn::cuda
