// FlashAttention backward for Hopper (sm_90a): TMA loads tracked by mbarriers, wgmma for all five
// products, warp specialization. One CTA per (key block of 128 keys, kv head, batch), as in the
// FA2 backward (bwd_kernel.cuh: the same loop over the GQA group's query heads and the query
// blocks that meet the key block, the same dq_accum / dq_convert), three warpgroups:
//   warpgroup 0, the producer: gives its registers back (setmaxnreg.dec); one thread loads K_j
//     and V_j once, then Q_i and dO_i of every (query head, query block) into a ring of kStages
//     stages, each with a "full" barrier (transaction bytes) and an "empty" barrier the consumer
//     warps arrive on when they are done with it;
//   warpgroups 1 and 2, the consumers: 64 keys each (one m64 wgmma row block), registers raised.
//     Per query block of 64 rows:
//       S^T  = K_c Q_i^T,  dP^T = V_c dO_i^T             (wgmma, both operands in shared memory)
//       P^T  = exp2(S^T * scale * log2e - lse_i * log2e), dS^T = P^T o (dP^T - D_i)   (registers)
//       dV_c += P^T dO_i,  dK_c += dS^T Q_i              (wgmma, A = P^T / dS^T from registers,
//                                                         B = dO_i / Q_i MN-major: no transposes)
//       dQ_i += dS_c K_c                                 (wgmma: dS stored to shared memory
//                                                         transposed, K-major; K_c MN-major),
//                                                         fp32 red.add into dq_accum
//     dK_c, dV_c stay in fp32 registers across the loop and are stored once (dK scaled).
// The accumulators of wgmma have mma.sync's row layout, so the band / sequence-end masks are the
// FA2 backward's (keys are the rows of S^T, queries the columns). Q, K, V, dO are read through the
// forward's rank-4 tensor maps (64-column panels, 128-byte swizzle; zero-fill past the ends).
// Varlen: as the forward's (fwd_sm90.cuh), one CTA per (key block of the longest sequence, kv head,
// sequence); those past their sequence's keys return.
// Deterministic mode: dQ_i's additions in a fixed order (key blocks by a counter, consumer 0 then 1).
// Not here (the FA2 backward runs): the extras, head dim 256 (dK and dV alone would be 256
// registers per thread).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "../attention_params.h"
#include "ptx.h"
#include "ptx_sm90.h"
#include "tile_masks.h"
#include "warp_gemm.h"

namespace flashattn::cuda {

template <typename Element_, int kHeadDim_>
struct Sm90BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kConsumers = 2;           // consumer warpgroups, 64 keys each
  static constexpr int kBlockN = 64 * kConsumers;  // keys per CTA
  static constexpr int kBlockM = 64;             // query rows per step
  static constexpr int kStages = 2;              // Q / dO ring
  static constexpr int kThreads = 128 * (1 + kConsumers);
  static constexpr int kPanels = kHeadDim / 64;  // 64-column (128-byte) panels of a tile
  static constexpr int kPanelQ = kBlockM * 128, kPanelKV = kBlockN * 128;  // bytes
  static constexpr int kQBytes = kPanels * kPanelQ, kKVBytes = kPanels * kPanelKV;
  static constexpr int kDsBytes = kBlockM * 128;  // one consumer's dS: 64 queries x 64 keys
  static constexpr int kOffV = kKVBytes, kOffQ = 2 * kKVBytes, kOffDo = kOffQ + kStages * kQBytes;
  static constexpr int kOffDs = kOffDo + kStages * kQBytes;
  static constexpr int kRowsBytes = 2 * kBlockM * 4;  // a stage's lse and D rows (fp32)
  static constexpr int kOffRows = kOffDs + kConsumers * kDsBytes;
  static constexpr int kOffBars = kOffRows + kStages * kRowsBytes;
  static constexpr int kStageTx = 2 * kQBytes + kRowsBytes;  // a stage's TMA bytes
  static constexpr int kBars = 1 + 2 * kStages;  // K/V; full, empty per stage
  static constexpr int kSmemBytes = kOffBars + 8 * kBars + 1024;  // + 1024: aligned at run time
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128");
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_sm90_kernel(const AttentionGradParams p, const __grid_constant__ sm90::TensorMap tm_q,
                    const __grid_constant__ sm90::TensorMap tm_k, const __grid_constant__ sm90::TensorMap tm_v,
                    const __grid_constant__ sm90::TensorMap tm_do, const __grid_constant__ sm90::TensorMap tm_lse,
                    const __grid_constant__ sm90::TensorMap tm_delta) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(FLASHATTN_CUDA_EMULATE)
  using namespace sm90;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kStages = Traits::kStages, kPanels = Traits::kPanels;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - smem_u32(smem_raw) % 1024) % 1024;
  unsigned char* sK = smem;
  unsigned char* sV = smem + Traits::kOffV;
  unsigned char* sQ = smem + Traits::kOffQ;
  unsigned char* sdO = smem + Traits::kOffDo;
  unsigned char* sdS = smem + Traits::kOffDs;
  float* s_rows = reinterpret_cast<float*>(smem + Traits::kOffRows);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Traits::kOffBars);
  uint64_t* bar_kv = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;

  const int64_t bh_k = blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z;
  if (bh_k >= p.batch * p.num_heads_k) return;
  const int b = static_cast<int>(bh_k / p.num_heads_k), h_k = static_cast<int>(bh_k % p.num_heads_k);
  const int group = static_cast<int>(p.num_heads / p.num_heads_k);
  const int n0 = static_cast<int>(blockIdx.x) * kBlockN, n_last = n0 + kBlockN - 1;
  // Varlen (cu_seqlens_q set): sequence b's first packed rows, its band; the maps span the packed
  // rows as one batch, boxes past a sequence's end hold the next one's rows (masked, not stored).
  const bool varlen = p.cu_seqlens_q != nullptr;
  const int q_row0 = varlen ? p.cu_seqlens_q[b] : 0, k_row0 = varlen ? p.cu_seqlens_k[b] : 0;
  const BandShape band = varlen ? band_shape(p, p.cu_seqlens_q[b + 1] - q_row0, p.cu_seqlens_k[b + 1] - k_row0)
                                : band_shape(p, p.seqlen_q, p.seqlen_k);
  if (n0 >= band.seqlen_k) return;  // varlen: past this sequence's keys (grid of the longest)
  const int batch = varlen ? 0 : b;  // the maps' batch coordinate

  // Query blocks whose rows meet keys [n0, n_last] under the sequence's band (a range).
  const BlockRange blocks = query_blocks_meeting(band, kBlockM, n0, n_last);
  const int i_lo = static_cast<int>(blocks.lo), count = static_cast<int>(blocks.hi - blocks.lo);
  const int total = group * count;  // (query head, query block) steps, head-major

  auto row_array_offset = [&](int h) {
    return varlen ? h * p.total_q + q_row0 : (static_cast<int64_t>(b) * p.num_heads + h) * p.seqlen_q;
  };

  if (threadIdx.x == 0) {
    mbar_init(bar_kv, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 4 * Traits::kConsumers);  // one arrive per consumer warp
    }
    fence_barrier_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Traits::kProducerRegs>();
    if (threadIdx.x == 0 && total > 0) {
      mbar_arrive_expect_tx(bar_kv, 2 * Traits::kKVBytes);
      for (int pn = 0; pn < kPanels; ++pn) {
        tma_load_4d(sK + pn * Traits::kPanelKV, &tm_k, bar_kv, 64 * pn, k_row0 + n0, h_k, batch);
        tma_load_4d(sV + pn * Traits::kPanelKV, &tm_v, bar_kv, 64 * pn, k_row0 + n0, h_k, batch);
      }
      for (int it = 0; it < total; ++it) {
        const int s = it % kStages;
        const uint32_t phase = (it / kStages) & 1;
        const int h = h_k * group + it / count, m0 = (i_lo + it % count) * kBlockM;
        mbar_wait(&empty[s], phase ^ 1);  // the first pass through the ring finds every stage free
        mbar_arrive_expect_tx(&full[s], Traits::kStageTx);
        for (int pn = 0; pn < kPanels; ++pn) {
          tma_load_4d(sQ + s * Traits::kQBytes + pn * Traits::kPanelQ, &tm_q, &full[s], 64 * pn, q_row0 + m0, h, batch);
          tma_load_4d(sdO + s * Traits::kQBytes + pn * Traits::kPanelQ, &tm_do, &full[s], 64 * pn, q_row0 + m0, h,
                      batch);
        }
        // lse and D of the 64 rows from the flat per-row arrays ((batch, heads, seqlen_q), varlen
        // (heads, total_q)): rows past the sequence's end are another's (or zeros), masked below.
        const int row = static_cast<int>(row_array_offset(h) + m0);
        float* rows = s_rows + s * 2 * kBlockM;
        tma_load_1d(rows, &tm_lse, &full[s], row);
        tma_load_1d(rows + kBlockM, &tm_delta, &full[s], row);
      }
    }
  } else {
  // ---- consumers ---- (one if / else: ptxas applies setmaxnreg's budgets per branch only then)
  setmaxnreg_inc<Traits::kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int key0 = 64 * consumer;                       // this consumer's first key in the block
  const int row0 = 16 * ((threadIdx.x / 32) % 4);        // this warp's first row of the m64 block
  const AccCoord acc;
  const uint32_t k_addr = smem_u32(sK) + key0 * 128, v_addr = smem_u32(sV) + key0 * 128;
  unsigned char* my_ds = sdS + consumer * Traits::kDsBytes;
  const uint32_t ds_addr = smem_u32(my_ds);
  const bool lane0 = threadIdx.x % 32 == 0;
  const int my_barrier = 1 + consumer;  // named barrier of this consumer's 128 threads
  const float scale = static_cast<float>(p.softmax_scale), scale_log2 = scale * kLog2e;

  float acc_dk[1][kHeadDim / 8][4], acc_dv[1][kHeadDim / 8][4];
  zero(acc_dk);
  zero(acc_dv);
  auto fence_acc = [](auto& a) {
#pragma unroll
    for (int nt = 0; nt < int(sizeof(a[0]) / sizeof(a[0][0])); ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) fence_operand(a[0][nt][e]);
  };

  if (total > 0) mbar_wait(bar_kv, 0);
  for (int it = 0; it < total; ++it) {
    const int s = it % kStages;
    const uint32_t phase = (it / kStages) & 1;
    const int h = h_k * group + it / count, m0 = (i_lo + it % count) * kBlockM;
    const int64_t m_last = m0 + kBlockM <= band.seqlen_q ? m0 + kBlockM - 1 : band.seqlen_q - 1;
    // Every thread is done with the last step's dQ wgmma, which read my_ds.
    named_barrier_sync(my_barrier, 128);

    const uint32_t q_addr = smem_u32(sQ) + s * Traits::kQBytes, do_addr = smem_u32(sdO) + s * Traits::kQBytes;
    mbar_wait(&full[s], phase);
    float acc_s[1][kBlockM / 8][4], acc_dp[1][kBlockM / 8][4];
    // S^T = K_c Q^T and dP^T = V_c dO^T: K-major operands, 16 head-dim columns per wgmma.
    auto issue_kmajor = [&](float* acc, uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        const uint32_t panel = kk / 4, step = 32 * (kk % 4);
        wgmma_ss<Element, kBlockM>(acc, smem_desc_128b(a_addr + panel * Traits::kPanelKV + step, 16, 1024),
                                   smem_desc_128b(b_addr + panel * Traits::kPanelQ + step, 16, 1024), kk > 0 ? 1 : 0,
                                   std::integral_constant<int, 0>{});
      }
    };
    wgmma_fence();
    issue_kmajor(&acc_s[0][0][0], k_addr, q_addr);
    issue_kmajor(&acc_dp[0][0][0], v_addr, do_addr);
    wgmma_commit();
    wgmma_wait<0>();
    fence_acc(acc_s);
    fence_acc(acc_dp);

    // The band and the sequence ends, only where the tile needs them: each query column sees the
    // keys [lo, hi) of this consumer's 64.
    const int64_t c0 = n0 + key0;
    if (!(c0 + 64 <= band.seqlen_k && m0 + kBlockM <= band.seqlen_q && band_key_begin(band, m_last) <= c0 &&
          band_key_end(band, m0) >= c0 + 64)) {
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const KeyInterval keys = band_interval<64>(band, acc.col(int64_t{m0}, nt, e), c0);
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int key = acc.row(row0, 0, 2 * half);
            if (key < keys.lo || key >= keys.hi) acc_s[0][nt][2 * half + e] = -INFINITY;
          }
        }
    }
    // P = exp2(S * scale * log2e - lse * log2e): 0 for masked (-inf) scores; an empty row's lse
    // (-inf) counts as +inf, so that it gives 0 too.
    const float* s_lse = s_rows + s * 2 * kBlockM;
    const float* s_delta = s_lse + kBlockM;
#pragma unroll
    for (int nt = 0; nt < kBlockM / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = acc.col(0, nt, e);
        const float lse = s_lse[col], lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
        const float prob = fast_exp2(acc_s[0][nt][e] * scale_log2 - lse2);
        acc_dp[0][nt][e] = prob * (acc_dp[0][nt][e] - s_delta[col]);
        acc_s[0][nt][e] = prob;
      }
    uint32_t p_frag[1][kBlockM / 16][4], ds_frag[1][kBlockM / 16][4];
    acc_to_a_fragments<Element>(p_frag, acc_s);
    acc_to_a_fragments<Element>(ds_frag, acc_dp);

    // dS (queries x this consumer's keys) into shared memory, K-major for dQ's A operand: row q
    // at 128 q bytes, key k at 2 k, 16-byte chunks XOR-swizzled by q % 8 (128-byte swizzle).
    // Query q = 8 nt + q8 (q8 < 8): its row is 1024 nt bytes after row q8, with the same swizzle,
    // so four addresses per thread serve every nt (32 live addresses spilled at d = 128).
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int q8 = 2 * acc.t + e % 2, key = row0 + acc.g + 8 * (e / 2);
      unsigned char* at = my_ds + q8 * 128 + ((key * 2) ^ (q8 << 4));
#pragma unroll
      for (int nt = 0; nt < kBlockM / 8; ++nt) {
        const uint32_t reg = ds_frag[0][nt / 2][2 * (nt % 2) + e / 2];
        *reinterpret_cast<uint16_t*>(at + 1024 * nt) = static_cast<uint16_t>(e % 2 ? reg >> 16 : reg & 0xffff);
      }
    }
    fence_proxy_async();  // the generic-proxy stores, before the async proxy (wgmma) reads them

    // dV_c += P^T dO, dK_c += dS^T Q: 16 query rows per wgmma; B MN-major (head dim contiguous),
    // the next 8 rows 1024 bytes on (SBO), the next 64 head-dim columns one panel on (LBO).
    fence_acc(acc_dk);
    fence_acc(acc_dv);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlockM / 16; ++ks)
      wgmma_rs<Element, kHeadDim>(&acc_dv[0][0][0], p_frag[0][ks],
                                  smem_desc_128b(do_addr + ks * 16 * 128, Traits::kPanelQ, 1024), 1,
                                  std::integral_constant<int, 1>{});
#pragma unroll
    for (int ks = 0; ks < kBlockM / 16; ++ks)
      wgmma_rs<Element, kHeadDim>(&acc_dk[0][0][0], ds_frag[0][ks],
                                  smem_desc_128b(q_addr + ks * 16 * 128, Traits::kPanelQ, 1024), 1,
                                  std::integral_constant<int, 1>{});
    wgmma_commit();
    named_barrier_sync(my_barrier, 128);  // all of this consumer's dS is in shared memory
    // dV, dK landed before dQ starts: P^T and dS^T (their A registers) are free then, which keeps
    // d = 128 within 240 registers (waiting after dQ's first panel spilled 12 bytes).
    wgmma_wait<0>();
    fence_acc(acc_dk);
    fence_acc(acc_dv);
    // This warp's last read of Q_i, dO_i is done. (Deterministic mode: after its dQ turn, which
    // keeps consumer 0 from getting two steps ahead of consumer 1 on the hand-over barriers.)
    if (lane0 && !p.deterministic) mbar_arrive(&empty[s]);

    // Deterministic mode: the key blocks add into dQ_i in key-block order, as in the FA2 backward
    // (a counter per (sequence, head, query block), dq_semaphore), and within a CTA consumer 0
    // before consumer 1 (named barrier 3 + step parity: consumer 0 arrives after its adds, consumer
    // 1 waits for that); consumer 1 then advances the counter.
    int* semaphore = nullptr;
    const int handover = 3 + (it & 1);
    if (p.deterministic) {
      const int64_t m_blocks_all = (p.seqlen_q + kBlockM - 1) / kBlockM;  // varlen: the longest sequence's
      semaphore = p.dq_semaphore + (static_cast<int64_t>(b) * p.num_heads + h) * m_blocks_all + m0 / kBlockM;
      const int turn = static_cast<int>(blockIdx.x) - static_cast<int>(band_key_begin(band, m0) / kBlockN);
      if (consumer == 0) {
        if (threadIdx.x % 128 == 0)
          while (ld_acquire(semaphore) != turn) __nanosleep(40);
        named_barrier_sync(my_barrier, 128);
      } else {
        named_barrier_sync(handover, 256);
      }
    }

    // dQ_i += dS_c K_c, one 64-column panel of the head dim at a time (32 accumulators), into
    // the fp32 dq_accum (scale applied by dq_convert).
    float* dq_accum = p.dq_accum + (row_array_offset(h) + m0) * kHeadDim;
#pragma unroll
    for (int pn = 0; pn < kPanels; ++pn) {
      float acc_dq[1][8][4];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        wgmma_ss<Element, 64>(&acc_dq[0][0][0], smem_desc_128b(ds_addr + 32 * ks, 16, 1024),
                              smem_desc_128b(k_addr + pn * Traits::kPanelKV + ks * 16 * 128, Traits::kPanelKV, 1024),
                              ks > 0 ? 1 : 0, std::integral_constant<int, 1>{});
      wgmma_commit();
      wgmma_wait<0>();
      fence_acc(acc_dq);
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int row = acc.row(row0, 0, 2 * half), col = 64 * pn + acc.col(0, nt, 0);
          if (m0 + row < band.seqlen_q)
            red_add_f32x2(dq_accum + static_cast<int64_t>(row) * kHeadDim + col, acc_dq[0][nt][2 * half],
                          acc_dq[0][nt][2 * half + 1]);
        }
    }
    if (p.deterministic) {
      __threadfence();
      if (consumer == 0) {
        named_barrier_arrive(handover, 256);
      } else {
        named_barrier_sync(my_barrier, 128);  // every thread of consumer 1 has added and fenced
        if (threadIdx.x % 128 == 0) atomicAdd(semaphore, 1);
      }
      if (lane0) mbar_arrive(&empty[s]);
    }
  }

  // dK = scale * sum dS^T Q, dV: straight from registers (rows past the sequence's end dropped).
  Element* dk = static_cast<Element*>(p.dk) + batch * p.dk_batch_stride + k_row0 * p.dk_row_stride +
               h_k * p.dk_head_stride;
  Element* dv = static_cast<Element*>(p.dv) + batch * p.dv_batch_stride + k_row0 * p.dv_row_stride +
               h_k * p.dv_head_stride;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t key = n0 + key0 + acc.row(row0, 0, 2 * half);
    if (key >= band.seqlen_k) continue;
#pragma unroll
    for (int nt = 0; nt < kHeadDim / 8; ++nt) {
      const int col = acc.col(0, nt, 0);
      if (col < p.headdim)
        *reinterpret_cast<uint32_t*>(dk + key * p.dk_row_stride + col) =
            pack2<Element>(acc_dk[0][nt][2 * half] * scale, acc_dk[0][nt][2 * half + 1] * scale);
      if (col < p.headdim_v)
        *reinterpret_cast<uint32_t*>(dv + key * p.dv_row_stride + col) =
            pack2<Element>(acc_dv[0][nt][2 * half], acc_dv[0][nt][2 * half + 1]);
    }
  }
  }
#endif
}

}  // namespace flashattn::cuda
