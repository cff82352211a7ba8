// FlashAttention forward on the CPU (Dao et al. 2022, Algorithm 1, in FlashAttention-2's order).
//
// A task is one block of block_m query rows of one (batch, head). It streams the visible K/V tiles
// of block_n keys, computes S = Q Kᵀ with a block GEMM, updates the online softmax (row_max,
// row_sum) and accumulates O += P V, then writes O / row_sum and lse = row_max + log(row_sum).
// Nothing of size L × S exists: per worker memory is O(block_m · (block_n + headdim)).
// Tasks are (batch × heads × query blocks), pulled dynamically by the workers.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/matmul_policy.h"
#include "cpu/online_softmax.h"
#include "cpu/parallel.h"
#include "cpu/scores.h"
#include "cpu/scratch.h"
#include "cpu/tiling.h"

namespace flashattn::cpu::CPU_CAPABILITY {
namespace {

template <typename Policy>
struct ForwardWorkspace {
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  Scratch<op_t> q;       // Q tile widened (only when A cannot be used in place)
  Scratch<op_t> k_t;     // Kᵀ tile as the B operand of S = Q Kᵀ
  Scratch<op_t> v;       // V tile as the B operand of O += P V (when not in place)
  Scratch<acc_t> s;      // scores, then P, row-major block_m × block_n
  Scratch<op_t> p;       // P as the A operand (when op_t differs from acc_t)
  Scratch<acc_t> o;      // output accumulator, block_m × headdim_v
  Scratch<acc_t> row_max, row_sum;

  ForwardWorkspace(const AttentionParams& prm, const Tiling& t) {
    if (!Policy::kInPlaceA) q.resize(t.block_m * prm.headdim);
    k_t.resize(Policy::b_elems(prm.headdim, t.block_n));
    if (!Policy::kInPlaceB) v.resize(Policy::b_elems(t.block_n, prm.headdim_v));
    s.resize(t.block_m * t.block_n);
    if (!std::is_same_v<op_t, acc_t>) p.resize(t.block_m * t.block_n);
    o.resize(t.block_m * prm.headdim_v);
    row_max.resize(t.block_m);
    row_sum.resize(t.block_m);
  }
};

// The key slice width of a tile the band cuts (see forward_impl).
constexpr int64_t kBandSubTile = 64;

template <typename Policy>
void forward_impl(const AttentionParams& p) {
  using scalar_t = typename Policy::scalar_t;
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  const Tiling tiling = forward_tiling(p, tiling_threads(p));
  const int64_t heads = p.batch * p.num_heads;
  const int64_t num_tasks = heads * tiling.num_m_blocks;
  const int64_t group = p.num_heads / p.num_heads_k;
  const uint32_t keep_threshold = dropout_keep_threshold(p.dropout_p);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);

  run_workers(num_tasks, [&](auto next) {
    ForwardWorkspace<Policy> ws(p, tiling);
    for (int64_t task; (task = next()) >= 0;) {
      // Last query blocks first: under a causal band they see the most keys (longest job first).
      const int64_t m_block = tiling.num_m_blocks - 1 - task / heads;
      const int64_t b = (task % heads) / p.num_heads, h = task % p.num_heads, hk = h / group;
      const HeadContext hc = head_context(p, b, h);
      const int64_t row0 = m_block * tiling.block_m;
      const int64_t rows = std::min(tiling.block_m, p.seqlen_q - row0);

      const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
      const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
      int64_t lda_q;
      const op_t* a_q = Policy::a_rows(q + row0 * p.q_row_stride, p.q_row_stride, rows, p.headdim, ws.q.data(), &lda_q);

      std::fill(ws.row_max.begin(), ws.row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(ws.row_sum.begin(), ws.row_sum.end(), acc_t(0));
      std::fill(ws.o.begin(), ws.o.begin() + rows * p.headdim_v, acc_t(0));

      // One tile: rows [t.row0, t.row0 + t.rows) of this block (a subset, on the band's edge)
      // against keys [t.col0, t.col0 + t.cols).
      auto run_tile = [&](const TileShape& t, const TileMasking& tm) {
        const int64_t r_off = t.row0 - row0;
        // S = Q Kᵀ
        Policy::b_transposed(k + t.col0 * p.k_row_stride, p.k_row_stride, t.cols, p.headdim, ws.k_t.data());
        Policy::gemm(t.rows, t.cols, p.headdim, a_q + r_off * lda_q, lda_q, ws.k_t.data(), Policy::b_ld(t.cols),
                     ws.s.data(), t.cols, false);

        // Scores, online softmax, P (dropped out for the product, not for row_sum).
        for (int64_t r = 0; r < t.rows; ++r) {
          acc_t* s_row = ws.s.data() + r * t.cols;
          make_score_row(p, hc, t.row0 + r, t, tm, s_row);
          online_softmax_row(s_row, t.cols, pending_scale<acc_t>(p, tm), ws.row_max[r_off + r], ws.row_sum[r_off + r],
                             ws.o.data() + (r_off + r) * p.headdim_v, p.headdim_v);
          if (p.dropout_p > 0) apply_dropout_row(p, hc, t.row0 + r, t, keep_threshold, keep_scale, s_row);
          if constexpr (!std::is_same_v<op_t, acc_t>) Policy::a_from_acc(s_row, t.cols, ws.p.data() + r * t.cols);
        }

        // O += P V
        int64_t ldb_v;
        const op_t* b_v = Policy::b_rows(v + t.col0 * p.v_row_stride, p.v_row_stride, t.cols, p.headdim_v,
                                         ws.v.data(), &ldb_v);
        const op_t* a_p;
        if constexpr (std::is_same_v<op_t, acc_t>)
          a_p = ws.s.data();
        else
          a_p = ws.p.data();
        Policy::gemm(t.rows, p.headdim_v, t.cols, a_p, t.cols, b_v, ldb_v, ws.o.data() + r_off * p.headdim_v,
                     p.headdim_v, true);
      };

      const auto [col_begin, col_end] = visible_key_range(p, row0, rows, tiling.block_n);
      for (int64_t col0 = col_begin; col0 < col_end; col0 += tiling.block_n) {
        const TileShape t{row0, rows, col0, std::min(tiling.block_n, p.seqlen_k - col0)};
        const TileMasking tm = tile_masking(p, hc, t);
        if (!tm.visible) continue;
        if (!tm.band_cuts || p.block_mask || t.cols <= kBandSubTile) {
          run_tile(t, tm);
          continue;
        }
        // A tile the band cuts (the causal diagonal, a window's edges): in narrower key slices,
        // each over only the rows that see some key in it (from a multiple of 16 rows, for the
        // GEMM), so the masked-out triangle is mostly not computed.
        for (int64_t c0 = col0; c0 < col0 + t.cols; c0 += kBandSubTile) {
          const int64_t cols = std::min(kBandSubTile, col0 + t.cols - c0);
          const auto [q_begin, q_end] = visible_query_range(p, c0, cols);
          const int64_t lo = std::max(row0, q_begin), hi = std::min(row0 + rows, q_end);
          if (lo >= hi) continue;
          const int64_t first = row0 + (lo - row0) / 16 * 16;
          const int64_t last = std::min(row0 + rows, row0 + ceil_div(hi - row0, 16) * 16);
          const TileShape sub{first, last - first, c0, cols};
          const TileMasking sub_tm = tile_masking(p, hc, sub);
          if (sub_tm.visible) run_tile(sub, sub_tm);
        }
      }

      // O / row_sum and lse; a row that saw no key gets O = 0 and lse = -inf.
      scalar_t* out = static_cast<scalar_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride;
      acc_t* lse = lse_pointer<acc_t>(p) + (b * p.num_heads + h) * p.seqlen_q;
      for (int64_t r = 0; r < rows; ++r) {
        acc_t* o_row = ws.o.data() + r * p.headdim_v;
        const acc_t sum = ws.row_sum[r];
        const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
        at::vec::map([inv](Vectorized<acc_t> x) { return x * Vectorized<acc_t>(inv); }, o_row, o_row, p.headdim_v);
        store_row(o_row, p.headdim_v, out + (row0 + r) * p.o_row_stride);
        lse[row0 + r] = sum > 0 ? ws.row_max[r] + std::log(sum) : -std::numeric_limits<acc_t>::infinity();
      }
    }
    gemm_release();
  });
}

}  // namespace

void forward(const AttentionParams& p) {
  if (p.batch * p.num_heads * p.seqlen_q == 0) return;
  have_brgemm_f32();  // probe outside the parallel region
  have_brgemm_bf16_vnni();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "flashattn_cpu_forward", [&] {
    with_policy<scalar_t>([&](auto policy) { forward_impl<decltype(policy)>(p); });
  });
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
