// FlashAttention forward for Hopper (sm_90a): TMA loads tracked by mbarriers, wgmma for both
// products, warp specialization, persistent CTAs (one per SM, each looping over work tiles of 128
// query rows x (batch, head), heavy causal tiles first). Three warpgroups:
//   warpgroup 0, the producer: gives its registers back (setmaxnreg.dec) and one thread issues
//     every TMA load: per work tile Q (once the consumers released the last one: "Q empty"), then
//     K_j and V_j into a ring of kStages stages (continuing across work tiles), each stage with a
//     "full" barrier per operand (transaction bytes) and an "empty" barrier the consumers arrive
//     on when they are done with it;
//   warpgroups 1 and 2, the consumers: 64 query rows each (one m64 wgmma row block), registers
//     raised (setmaxnreg.inc). Per key block: S = Q K^T on wgmma with both operands in shared
//     memory (K-major, 128-byte swizzle), the band / sequence-end mask and FlashAttention's online
//     softmax in registers (the fp32 accumulators of wgmma have mma.sync's row layout, so
//     OnlineSoftmax and the P fragments are the FA2 kernel's), then O += P V on wgmma with P from
//     registers and V in shared memory (MN-major: no transpose of V anywhere), then release the
//     stage.
// Q, K and V are read through rank-4 tensor maps (head dim, sequence, head, batch) whose boxes are
// 64 columns (128 bytes) wide; a head dim of 128 or 256 is 2 or 4 such column panels. The maps
// zero-fill past the sequence ends and the head dim, so tile edges need no code. Key blocks run
// from last to first as in the FA2 kernel.
// Varlen (cu_seqlens_q set; no seqused_k, pages or splits: those take the FA2 varlen kernel): the
// maps span the packed rows (head dim, total rows, head, 1) and a work tile's boxes start at its
// sequence's first row; rows of a box past the sequence's end are the next sequence's (or, past
// the last row, zeros): their keys are masked like the sequence end of a dense tile (a finite
// value times P = 0), their query rows are neither stored nor given an lse. Work tiles are
// (query block of the longest sequence) x (sequence, head); those past a sequence's end are skipped.
// FA3's two schedules are here: the consumers ping-pong their GEMMs (named barriers), and within a
// consumer the next tile's Q K^T overlaps the softmax while P V runs. Not yet here (see
// csrc/cuda/README.md): the extras (masks, dropout, ALiBi, softcap, block-sparse: those run on the
// FA2 kernel), varlen with a KV cache (seqused_k, pages, split-KV). The backward: bwd_sm90.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../attention_params.h"
#include "online_softmax.h"
#include "ptx.h"
#include "ptx_sm90.h"
#include "tile_masks.h"
#include "warp_gemm.h"

namespace flashattn::cuda {

template <typename Element_, int kHeadDim_>
struct Sm90FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;               // consumer warpgroups, 64 query rows each
  static constexpr int kBlockM = 64 * kConsumers;
  // d = 256: O alone is 128 registers per thread; with 64- or 48-key tiles ptxas spilled (124 and
  // 68 bytes) at 240 registers, with 32 it does not. Four stages of those keep the loads ahead.
  static constexpr int kBlockN = kHeadDim <= 128 ? 128 : 32;
  static constexpr int kStages = kHeadDim <= 128 ? 2 : 4;
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kPanels = kHeadDim / 64;      // 64-column (128-byte) panels of a tile
  static constexpr int kPanelQ = kBlockM * 128, kPanelKV = kBlockN * 128;  // bytes
  static constexpr int kQBytes = kPanels * kPanelQ, kKVBytes = kPanels * kPanelKV;
  static constexpr int kOffK = kQBytes, kOffV = kOffK + kStages * kKVBytes, kOffBars = kOffV + kStages * kKVBytes;
  static constexpr int kBars = 2 + 3 * kStages;      // Q; full K, full V, empty per stage; Q empty
  // + 1024: the buffers are aligned to the 128-byte swizzle's 1024-byte pattern at run time.
  static constexpr int kSmemBytes = kOffBars + 8 * kBars + 1024;
  // Registers per thread after setmaxnreg: 128 * (24 + 2 * 240) = 64512 <= 65536.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim % 64 == 0 && kHeadDim <= 256, "head dims 64, 128, 256");
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    fwd_sm90_kernel(const AttentionParams p, const __grid_constant__ sm90::TensorMap tm_q,
                    const __grid_constant__ sm90::TensorMap tm_k, const __grid_constant__ sm90::TensorMap tm_v) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FLASHATTN_CUDA_EMULATE)
  using namespace sm90;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages, kPanels = Traits::kPanels;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;
  unsigned char* sQ = smem;
  unsigned char* sK = smem + Traits::kOffK;
  unsigned char* sV = smem + Traits::kOffV;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Traits::kOffBars);
  uint64_t* bar_q = bars;
  uint64_t* full_k = bars + 1;
  uint64_t* full_v = bars + 1 + kStages;
  uint64_t* empty = bars + 1 + 2 * kStages;

  // Persistent: CTA c takes work tiles c, c + gridDim.x, ... of m_blocks x (batch x heads), query
  // block m_blocks - 1 - t / (batch x heads) for tile t, so under a causal band the heavy (late)
  // blocks go first and the light ones fill in behind them (longest-processing-time order).
  const int64_t bhs = p.batch * p.num_heads;
  const int64_t total = (p.seqlen_q + kBlockM - 1) / kBlockM * bhs;
  // A work tile: query rows [m0, m_last] of (b, h), its key blocks [n_min, n_max); its sequence's
  // band, and the sequence's first packed rows (q_row0, k_row0; 0 for dense). Empty past the
  // sequence's end (varlen).
  const bool varlen = p.cu_seqlens_q != nullptr;
  struct Work {
    int b, h, h_k, bh, m0, m_last, n_min, n_max, q_row0, k_row0;  // int: see BandShape
    BandShape band;
    __device__ bool empty() const { return m0 >= band.seqlen_q; }
  };
  auto work_at = [&](int64_t t) {
    Work w;
    w.bh = static_cast<int>(t % bhs);
    w.b = w.bh / p.num_heads, w.h = w.bh % p.num_heads;
    w.h_k = w.h / (p.num_heads / p.num_heads_k);
    w.q_row0 = varlen ? p.cu_seqlens_q[w.b] : 0;
    w.k_row0 = varlen ? p.cu_seqlens_k[w.b] : 0;
    w.band = varlen ? band_shape(p, p.cu_seqlens_q[w.b + 1] - w.q_row0, p.cu_seqlens_k[w.b + 1] - w.k_row0)
                    : band_shape(p, p.seqlen_q, p.seqlen_k);
    w.m0 = static_cast<int>(((p.seqlen_q + kBlockM - 1) / kBlockM - 1 - t / bhs) * kBlockM);
    const int64_t len_q = w.band.seqlen_q;
    w.m_last = static_cast<int>((len_q - w.m0 < kBlockM ? len_q : w.m0 + kBlockM) - 1);
    const int64_t key_begin = band_key_begin(w.band, w.m0), key_end = band_key_end(w.band, w.m_last);
    w.n_min = static_cast<int>(key_begin / kBlockN);
    w.n_max = key_end > key_begin ? static_cast<int>((key_end + kBlockN - 1) / kBlockN) : w.n_min;
    return w;
  };

  uint64_t* q_empty = bars + 1 + 3 * kStages;
  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    mbar_init(q_empty, 4 * Traits::kConsumers);  // every consumer warp is done reading Q
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full_k[s], 1);
      mbar_init(&full_v[s], 1);
      mbar_init(&empty[s], 4 * Traits::kConsumers);  // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (threadIdx.x == 0) {
      int ring = 0, iter = 0;  // K/V tiles and work tiles so far: the stages' and Q's phases
      for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
        const Work w = work_at(t);
        if (w.empty()) continue;  // the consumers skip it too
        const int batch = varlen ? 0 : static_cast<int>(w.b);
        mbar_wait(q_empty, (iter & 1) ^ 1);  // the first work tile finds Q free
        ++iter;
        mbar_arrive_expect_tx(bar_q, Traits::kQBytes);
        for (int pn = 0; pn < kPanels; ++pn)
          tma_load_4d(sQ + pn * Traits::kPanelQ, &tm_q, bar_q, 64 * pn, static_cast<int>(w.q_row0 + w.m0),
                      static_cast<int>(w.h), batch);
        for (int64_t n_block = w.n_max - 1; n_block >= w.n_min; --n_block, ++ring) {
          const int s = ring % kStages;
          const uint32_t phase = (ring / kStages) & 1;
          mbar_wait(&empty[s], phase ^ 1);  // the first pass through the ring finds every stage free
          const int n0 = static_cast<int>(w.k_row0 + n_block * kBlockN);
          mbar_arrive_expect_tx(&full_k[s], Traits::kKVBytes);
          for (int pn = 0; pn < kPanels; ++pn)
            tma_load_4d(sK + s * Traits::kKVBytes + pn * Traits::kPanelKV, &tm_k, &full_k[s], 64 * pn, n0,
                        static_cast<int>(w.h_k), batch);
          mbar_arrive_expect_tx(&full_v[s], Traits::kKVBytes);
          for (int pn = 0; pn < kPanels; ++pn)
            tma_load_4d(sV + s * Traits::kKVBytes + pn * Traits::kPanelKV, &tm_v, &full_v[s], 64 * pn, n0,
                        static_cast<int>(w.h_k), batch);
        }
      }
    }
  } else {
  // ---- consumers ---- (the two roles are the two branches of one if / else: ptxas applies
  // setmaxnreg's budgets per branch only then)
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int row0 = 64 * consumer + 16 * ((threadIdx.x / 32) % 4);  // this warp's first row in the block
  const AccCoord acc;
  const uint32_t q_addr = smem_u32(sQ) + consumer * 64 * 128;
  const uint32_t k_addr = smem_u32(sK), v_addr = smem_u32(sV);
  const bool lane0 = threadIdx.x % 32 == 0;

  // Ping-pong (FA3): the two consumers take turns issuing their GEMMs, so one's softmax runs while
  // the other's products occupy the tensor cores. Named barrier 1 + c is consumer c's turn: it
  // syncs on it (its 128 threads) and the other consumer arrives on it (128 more) once it has
  // issued. Consumer 1 hands consumer 0 the first turn; consumer 0 takes one turn more at the end
  // (consumer 1's last hand-over), so every barrier ends complete.
  constexpr int kTurnThreads = 256;
  auto my_turn = [&] { named_barrier_sync(1 + consumer, kTurnThreads); };
  auto your_turn = [&] { named_barrier_arrive(1 + (1 - consumer), kTurnThreads); };

  float acc_o[1][kHeadDim / 8][4];
  // S = Q K^T of the tile in `stage`: K-major operands, 16 head-dim columns per wgmma (32 bytes
  // into a panel row), committed as one group.
  auto issue_qk = [&](float (&acc_s)[1][kBlockN / 8][4], int stage) {
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      const uint32_t panel = (kk / 4), step = 32 * (kk % 4);
      const uint64_t desc_q = smem_desc_128b(q_addr + panel * Traits::kPanelQ + step, 16, 1024);
      const uint64_t desc_k =
          smem_desc_128b(k_addr + stage * Traits::kKVBytes + panel * Traits::kPanelKV + step, 16, 1024);
      wgmma_ss<Element, kBlockN>(&acc_s[0][0][0], desc_q, desc_k, kk > 0 ? 1 : 0, std::integral_constant<int, 0>{});
    }
    wgmma_commit();
  };
  // O += P V of the tile in `stage`: P from registers, V MN-major (its head dim contiguous), 16
  // keys per wgmma; the next 8 keys 1024 bytes on (SBO), the next 64 head-dim columns one panel on (LBO).
  auto issue_pv = [&](const uint32_t (&p_frag)[1][kBlockN / 16][4], int stage) {
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks) {
      const uint64_t desc_v = smem_desc_128b(v_addr + stage * Traits::kKVBytes + ks * 16 * 128, Traits::kPanelKV, 1024);
      wgmma_rs<Element, kHeadDim>(&acc_o[0][0][0], p_frag[0][ks], desc_v, 1, std::integral_constant<int, 1>{});
    }
    wgmma_commit();
  };
  auto fence_o = [&] {
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) fence_operand(acc_o[0][nt][e]);
  };

  if (consumer == 1) your_turn();
  int ring = 0, iter = 0;
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const Work w = work_at(t);
    if (w.empty()) continue;
    zero(acc_o);
    OnlineSoftmax<1> softmax(static_cast<float>(p.softmax_scale) * kLog2e);
    // The band and the sequence ends, only where the tile needs them; then the softmax step
    // (maxima, sums, P; O's rescale is returned in `correction`) and P as A fragments.
    auto scores_to_probs = [&](float (&acc_s)[1][kBlockN / 8][4], int64_t n_block, float (&correction)[1][2],
                               uint32_t (&p_frag)[1][kBlockN / 16][4]) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) fence_operand(acc_s[0][nt][e]);
      const int64_t n0 = n_block * kBlockN;
      if (!(n0 + kBlockN <= w.band.seqlen_k && band_key_begin(w.band, w.m_last) <= n0 &&
            band_key_end(w.band, w.m0) >= n0 + kBlockN)) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const KeyInterval keys = band_interval<kBlockN>(w.band, w.m0 + row0 + acc.g + 8 * half, n0);
#pragma unroll
          for (int nt = 0; nt < kBlockN / 8; ++nt)
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const int col = acc.col(0, nt, e);
              if (col < keys.lo || col >= keys.hi) acc_s[0][nt][e] = -INFINITY;
            }
        }
      }
      softmax.step_scores(acc_s, correction);
      acc_to_a_fragments<Element>(p_frag, acc_s);
    };

    // FA3's intra-warpgroup overlap: the next key tile's Q K^T is issued together with this
    // one's P V, and its softmax runs while P V is in flight; O is rescaled once P V has landed.
    // Key tile j of this work tile (from the last) is ring entry ring + j.
    const int n_tiles = static_cast<int>(w.n_max - w.n_min);
    auto stage_of = [&](int j) { return (ring + j) % kStages; };
    auto phase_of = [&](int j) { return static_cast<uint32_t>(((ring + j) / kStages) & 1); };
    mbar_wait(bar_q, iter & 1);
    ++iter;
    if (n_tiles == 0) {
      if (lane0) mbar_arrive(q_empty);
    } else {
      uint32_t p_frag[1][kBlockN / 16][4];
      {
        float acc_s[1][kBlockN / 8][4], correction[1][2];
        mbar_wait(&full_k[stage_of(0)], phase_of(0));
        my_turn();
        issue_qk(acc_s, stage_of(0));
        your_turn();
        wgmma_wait<0>();
        if (n_tiles == 1 && lane0) mbar_arrive(q_empty);  // this warp's last read of Q is done
        scores_to_probs(acc_s, w.n_max - 1, correction, p_frag);  // O = 0: no rescale
      }
      for (int j = 1; j < n_tiles; ++j) {
        const int s = stage_of(j), prev = stage_of(j - 1);
        float acc_s[1][kBlockN / 8][4];
        mbar_wait(&full_k[s], phase_of(j));
        mbar_wait(&full_v[prev], phase_of(j - 1));
        my_turn();
        fence_o();
        issue_qk(acc_s, s);
        issue_pv(p_frag, prev);
        your_turn();
        wgmma_wait<1>();  // S_j landed; P_{j-1} V_{j-1} may still run
        if (j == n_tiles - 1 && lane0) mbar_arrive(q_empty);
        float correction[1][2];
        uint32_t next_p[1][kBlockN / 16][4];
        scores_to_probs(acc_s, w.n_max - 1 - j, correction, next_p);
        wgmma_wait<0>();
        fence_o();
        softmax.rescale(acc_o, correction);
        if (lane0) mbar_arrive(&empty[prev]);  // this warp is done with stage prev
#pragma unroll
        for (int ks = 0; ks < kBlockN / 16; ++ks)
#pragma unroll
          for (int r = 0; r < 4; ++r) p_frag[0][ks][r] = next_p[0][ks][r];
      }
      // The last key tile's P V.
      const int last = stage_of(n_tiles - 1);
      mbar_wait(&full_v[last], phase_of(n_tiles - 1));
      fence_o();
      issue_pv(p_frag, last);
      wgmma_wait<0>();
      fence_o();
      if (lane0) mbar_arrive(&empty[last]);
      ring += n_tiles;
    }

    // Epilogue: O /= row_sum, lse; rows that saw no key: O = 0, lse = -inf. Straight from registers.
    // The per-row arrays: (batch, heads, seqlen_q), or (heads, total_q) for varlen.
    float* lse = p.lse + (varlen ? w.h * p.total_q + w.q_row0 : w.bh * p.seqlen_q);
    softmax.finalize(acc_o, 1.f, [&](int, int half, auto&& row_lse) {
      const int64_t row = w.m0 + row0 + acc.g + 8 * half;
      if (acc.t == 0 && row < w.band.seqlen_q) lse[row] = row_lse();
    });
    Element* out = static_cast<Element*>(p.out) + w.b * p.o_batch_stride + w.q_row0 * p.o_row_stride +
                   w.h * p.o_head_stride;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t row = w.m0 + row0 + acc.g + 8 * half;
      if (row >= w.band.seqlen_q) continue;
#pragma unroll
      for (int nt = 0; nt < kHeadDim / 8; ++nt) {
        const int col = acc.col(0, nt, 0);
        if (col < p.headdim_v)
          *reinterpret_cast<uint32_t*>(out + row * p.o_row_stride + col) =
              pack2<Element>(acc_o[0][nt][2 * half], acc_o[0][nt][2 * half + 1]);
      }
    }
  }
  if (consumer == 0) my_turn();  // consumer 1's last hand-over
  }
#endif
}

}  // namespace flashattn::cuda
