// FlashAttention backward on the CPU (Dao et al. 2022, Algorithm 2, in FlashAttention-2's order).
//
// delta = rowsum(dO ∘ O) first. Then a task owns a chunk of key blocks of one (batch, kv head):
// for each key block it keeps dK and dV in a per-worker accumulator and visits every query block
// of every query head of its GQA group that can see it, recomputing P = exp(S − lse) from the saved
// lse, so nothing of size L × S is ever stored:
//   dV += Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − delta),  dK += dSᵀ Q,  dQ += dS K.
// dQ rows are shared by all key chunks: each chunk adds into its own fp32 partial sum, reduced in
// a fixed order at the end, so the result does not depend on thread timing (deterministic).
// Tasks are (batch × kv heads × key chunks), with as many chunks as the threads need.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/matmul_policy.h"
#include "cpu/parallel.h"
#include "cpu/scores.h"
#include "cpu/scratch.h"
#include "cpu/tiling.h"

namespace flashattn::cpu::CPU_CAPABILITY {
namespace {

template <typename Policy>
struct BackwardWorkspace {
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  Scratch<op_t> q, dout;        // A operands widened (when not in place)
  Scratch<op_t> k_t, v_t, k_b;  // Kᵀ, Vᵀ (B of S and dP), K (B of dQ)
  Scratch<op_t> q_b, dout_b;    // Q, dO as B operands of dK, dV
  Scratch<acc_t> s, dp;         // P and dP → dS, block_m × block_n
  Scratch<acc_t> softcap_grad;  // 1 - tanh² of the softcap
  Scratch<acc_t> staging;       // transposes before rounding to op_t
  Scratch<op_t> p_t, ds_t, ds;  // Pᵀ, dSᵀ, dS as GEMM operands
  Scratch<acc_t> dk, dv;        // block_n × headdim, block_n × headdim_v

  BackwardWorkspace(const AttentionParams& prm, const Tiling& t) {
    const int64_t bm = t.block_m, bn = t.block_n, d = prm.headdim, dv_ = prm.headdim_v;
    if (!Policy::kInPlaceA) {
      q.resize(bm * d);
      dout.resize(bm * dv_);
    }
    k_t.resize(Policy::b_elems(d, bn));
    v_t.resize(Policy::b_elems(dv_, bn));
    if (!Policy::kInPlaceB) {
      k_b.resize(Policy::b_elems(bn, d));
      q_b.resize(Policy::b_elems(bm, d));
      dout_b.resize(Policy::b_elems(bm, dv_));
    }
    s.resize(bm * bn);
    dp.resize(bm * bn);
    if (prm.softcap > 0) softcap_grad.resize(bm * bn);
    if (!std::is_same_v<op_t, acc_t>) {
      staging.resize(bm * bn);
      ds.resize(bm * bn);
    }
    p_t.resize(bm * bn);
    ds_t.resize(bm * bn);
    dk.resize(bn * d);
    dv.resize(bn * dv_);
  }
};

// dst (cols × rows, op_t) = srcᵀ (rows × cols, acc_t).
template <typename Policy>
void transpose_to_operand(const typename Policy::acc_t* src, int64_t rows, int64_t cols, typename Policy::op_t* dst,
                          typename Policy::acc_t* staging) {
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  if constexpr (std::is_same_v<op_t, acc_t>) {
    transpose_plain(src, cols, dst, rows, rows, cols);
  } else {
    transpose_plain(src, cols, staging, rows, rows, cols);
    for (int64_t c = 0; c < cols; ++c) Policy::a_from_acc(staging + c * rows, rows, dst + c * rows);
  }
}

// With a dmask, two tasks must never add into the same element: a dimension the mask broadcasts
// over is walked inside one task instead of across tasks.
struct TaskSpans {
  int64_t batch = 1, kv_heads = 1, chunks = 1;  // how many of each one task walks
};

inline TaskSpans task_spans(const AttentionGradParams& p, const Tiling& t) {
  TaskSpans spans;
  if (!p.dmask && !p.dmask64) return spans;
  const int64_t outer = p.batch / p.dmask_view.batch_inner;
  const bool batch_shared = (p.dmask_view.batch_inner > 1 && p.dmask_view.batch_stride == 0) ||
                            (outer > 1 && p.dmask_view.batch_outer_stride == 0);
  if (batch_shared) spans.batch = p.batch;
  if (p.dmask_view.head_stride == 0 && p.num_heads > 1) spans.kv_heads = p.num_heads_k;
  if (p.dmask_view.col_stride == 0 && p.seqlen_k > 1) spans.chunks = t.num_chunks;
  return spans;
}

template <typename Policy>
void compute_delta(const AttentionGradParams& p, typename Policy::acc_t* delta_out) {
  using scalar_t = typename Policy::scalar_t;
  using acc_t = typename Policy::acc_t;
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> o_row(p.headdim_v), do_row(p.headdim_v);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % p.seqlen_q, bh = r / p.seqlen_q, b = bh / p.num_heads, h = bh % p.num_heads;
      const scalar_t* o = static_cast<const scalar_t*>(p.out) + b * p.o_batch_stride + h * p.o_head_stride +
                          i * p.o_row_stride;
      const scalar_t* d = static_cast<const scalar_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride +
                          i * p.do_row_stride;
      acc_t sum = 0;
      if constexpr (std::is_same_v<acc_t, scalar_t>) {
        sum = at::vec::map2_reduce_all<acc_t>([](auto x, auto y) { return x * y; },
                                              [](auto x, auto y) { return x + y; }, o, d, p.headdim_v);
      } else {
        widen_row(o, p.headdim_v, o_row.data());
        widen_row(d, p.headdim_v, do_row.data());
        sum = at::vec::map2_reduce_all<acc_t>([](auto x, auto y) { return x * y; },
                                              [](auto x, auto y) { return x + y; }, o_row.data(), do_row.data(),
                                              p.headdim_v);
      }
      delta_out[r] = sum;
    }
  });
}

// Where the dQ += dS K products go:
//   kDirect     fp32/fp64, one key chunk: straight into dq;
//   kTaskLocal  bf16/fp16, one key chunk: the task owns its heads' dQ rows, so it accumulates them in
//               a per-worker fp32 buffer (group × L × E) and converts them when it is done;
//   kPartials   several key chunks: one fp32 partial sum per chunk, added up in chunk order at the end.
enum class DqMode { kDirect, kTaskLocal, kPartials };

// The GEMMs add into dq (direct) or the partial sums: both start at zero.
template <typename Policy>
void zero_dq_destination(const AttentionGradParams& p, bool dq_direct, int64_t num_chunks) {
  using scalar_t = typename Policy::scalar_t;
  using acc_t = typename Policy::acc_t;
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (dq_direct) {
        const int64_t i = r % p.seqlen_q, bh = r / p.seqlen_q, b = bh / p.num_heads, h = bh % p.num_heads;
        scalar_t* row = static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + i * p.dq_row_stride;
        std::fill(row, row + p.headdim, scalar_t(0));
      } else {
        for (int64_t c = 0; c < num_chunks; ++c) {
          acc_t* row = reinterpret_cast<acc_t*>(p.dq_accum) + (c * rows + r) * p.headdim;
          std::fill(row, row + p.headdim, acc_t(0));
        }
      }
    }
  });
}

template <typename Policy>
void backward_impl(const AttentionGradParams& p) {
  using scalar_t = typename Policy::scalar_t;
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  using Vec = Vectorized<acc_t>;
  const Tiling tiling = backward_tiling(p, tiling_threads(p));
  const int64_t group = p.num_heads / p.num_heads_k;
  const int64_t blocks_per_chunk = ceil_div(tiling.num_n_blocks, tiling.num_chunks);
  const uint32_t keep_threshold = dropout_keep_threshold(p.dropout_p);
  const acc_t keep_scale = dropout_keep_scale<acc_t>(p.dropout_p);
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const DqMode dq_mode = tiling.num_chunks > 1 ? DqMode::kPartials
                         : (std::is_same_v<acc_t, scalar_t> ? DqMode::kDirect : DqMode::kTaskLocal);
  acc_t* dq_accum = reinterpret_cast<acc_t*>(p.dq_accum);
  TORCH_INTERNAL_ASSERT((dq_mode == DqMode::kPartials) == (dq_accum != nullptr));

  // delta in acc_t (not p.delta, which is float): fp64 gradients keep fp64 precision.
  std::vector<acc_t> delta_rows(p.batch * p.num_heads * p.seqlen_q);
  compute_delta<Policy>(p, delta_rows.data());
  if (dq_mode != DqMode::kTaskLocal) zero_dq_destination<Policy>(p, dq_mode == DqMode::kDirect, tiling.num_chunks);

  const TaskSpans spans = task_spans(p, tiling);
  const int64_t task_b = p.batch / spans.batch, task_h = p.num_heads_k / spans.kv_heads,
                task_c = tiling.num_chunks / spans.chunks;
  const int64_t num_tasks = task_b * task_h * task_c;

  run_workers(num_tasks, [&](auto next) {
    BackwardWorkspace<Policy> ws(p, tiling);
    Scratch<acc_t> dq_local;  // kTaskLocal: the task's dQ rows, group × seqlen_q × headdim
    if (dq_mode == DqMode::kTaskLocal) dq_local.resize(group * p.seqlen_q * p.headdim);
    auto process = [&](int64_t b, int64_t hk, int64_t chunk) {
      if (dq_mode == DqMode::kTaskLocal) std::fill(dq_local.begin(), dq_local.end(), acc_t(0));
      const scalar_t* k = static_cast<const scalar_t*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
      const scalar_t* v = static_cast<const scalar_t*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
      scalar_t* dk = static_cast<scalar_t*>(p.dk) + b * p.dk_batch_stride + hk * p.dk_head_stride;
      scalar_t* dv = static_cast<scalar_t*>(p.dv) + b * p.dv_batch_stride + hk * p.dv_head_stride;
      const int64_t n_block_end = std::min(tiling.num_n_blocks, (chunk + 1) * blocks_per_chunk);
      for (int64_t n_block = chunk * blocks_per_chunk; n_block < n_block_end; ++n_block) {
        const int64_t col0 = n_block * tiling.block_n, cols = std::min(tiling.block_n, p.seqlen_k - col0);
        const scalar_t* k_tile = k + col0 * p.k_row_stride;
        const scalar_t* v_tile = v + col0 * p.v_row_stride;
        Policy::b_transposed(k_tile, p.k_row_stride, cols, p.headdim, ws.k_t.data());
        Policy::b_transposed(v_tile, p.v_row_stride, cols, p.headdim_v, ws.v_t.data());
        int64_t ldb_k;
        const op_t* b_k = Policy::b_rows(k_tile, p.k_row_stride, cols, p.headdim, ws.k_b.data(), &ldb_k);
        std::fill(ws.dk.begin(), ws.dk.begin() + cols * p.headdim, acc_t(0));
        std::fill(ws.dv.begin(), ws.dv.begin() + cols * p.headdim_v, acc_t(0));

        const auto [q_begin, q_end] = visible_query_range(p, col0, cols);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const HeadContext hc = head_context(p, b, h);
          const scalar_t* q = static_cast<const scalar_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
          const scalar_t* dout = static_cast<const scalar_t*>(p.dout) + b * p.do_batch_stride + h * p.do_head_stride;
          const acc_t* lse = lse_pointer<acc_t>(p) + (b * p.num_heads + h) * p.seqlen_q;
          const acc_t* delta = delta_rows.data() + (b * p.num_heads + h) * p.seqlen_q;
          for (int64_t row0 = q_begin / tiling.block_m * tiling.block_m; row0 < q_end; row0 += tiling.block_m) {
            const TileShape t{row0, std::min(tiling.block_m, p.seqlen_q - row0), col0, cols};
            const TileMasking tm = tile_masking(p, hc, t);
            if (!tm.visible) continue;
            const int64_t rows = t.rows;
            const scalar_t* q_tile = q + row0 * p.q_row_stride;
            const scalar_t* do_tile = dout + row0 * p.do_row_stride;

            // S = Q Kᵀ and dP = dO Vᵀ
            int64_t lda_q, lda_do;
            const op_t* a_q = Policy::a_rows(q_tile, p.q_row_stride, rows, p.headdim, ws.q.data(), &lda_q);
            const op_t* a_do = Policy::a_rows(do_tile, p.do_row_stride, rows, p.headdim_v, ws.dout.data(), &lda_do);
            Policy::gemm(rows, cols, p.headdim, a_q, lda_q, ws.k_t.data(), Policy::b_ld(cols), ws.s.data(), cols,
                         false);
            Policy::gemm(rows, cols, p.headdim_v, a_do, lda_do, ws.v_t.data(), Policy::b_ld(cols), ws.dp.data(),
                         cols, false);

            // P from lse; dS = P ∘ (dP − delta), through dropout and softcap; scaled for dQ, dK.
            for (int64_t r = 0; r < rows; ++r) {
              const int64_t i = row0 + r;
              acc_t* s_row = ws.s.data() + r * cols;
              acc_t* dp_row = ws.dp.data() + r * cols;
              acc_t* cap_row = p.softcap > 0 ? ws.softcap_grad.data() + r * cols : nullptr;
              make_score_row(p, hc, i, t, tm, s_row, cap_row);
              const acc_t row_lse = lse[i];
              if (row_lse == -std::numeric_limits<acc_t>::infinity())
                std::fill(s_row, s_row + cols, acc_t(0));
              else
                exp_row(s_row, cols, pending_scale<acc_t>(p, tm), row_lse);
              if (p.dropout_p > 0) {
                // dP ∘ Z / (1 − p) for dS; P ∘ Z / (1 − p) for dV, written after dS is formed.
                apply_dropout_row(p, hc, i, t, keep_threshold, keep_scale, dp_row);
              }
              const Vec v_delta(delta[i]);
              if (!p.dmask && !p.dmask64 && !cap_row) {  // dS = P ∘ (dP − delta) · scale in one pass
                const Vec v_scale(scale);
                at::vec::map2([&](Vec pv, Vec dpv) { return pv * (dpv - v_delta) * v_scale; }, dp_row, s_row,
                              dp_row, cols);
              } else {
                at::vec::map2([&](Vec pv, Vec dpv) { return pv * (dpv - v_delta); }, dp_row, s_row, dp_row, cols);
                if (p.dmask) {
                  float* gm = p.dmask + p.dmask_view.offset(b, h, i, col0);
                  for (int64_t j = 0; j < cols; ++j) gm[j * p.dmask_view.col_stride] += static_cast<float>(dp_row[j]);
                } else if (p.dmask64) {
                  double* gm = p.dmask64 + p.dmask_view.offset(b, h, i, col0);
                  for (int64_t j = 0; j < cols; ++j) gm[j * p.dmask_view.col_stride] += static_cast<double>(dp_row[j]);
                }
                if (cap_row)
                  at::vec::map2([&](Vec x, Vec g) { return x * g * Vec(scale); }, dp_row, dp_row, cap_row, cols);
                else
                  at::vec::map([&](Vec x) { return x * Vec(scale); }, dp_row, dp_row, cols);
              }
              if (p.dropout_p > 0) apply_dropout_row(p, hc, i, t, keep_threshold, keep_scale, s_row);
            }

            // dV += Pᵀ dO
            transpose_to_operand<Policy>(ws.s.data(), rows, cols, ws.p_t.data(), ws.staging.data());
            int64_t ldb_do;
            const op_t* b_do = Policy::b_rows(do_tile, p.do_row_stride, rows, p.headdim_v, ws.dout_b.data(), &ldb_do);
            Policy::gemm(cols, p.headdim_v, rows, ws.p_t.data(), rows, b_do, ldb_do, ws.dv.data(), p.headdim_v, true);

            // dK += dSᵀ Q
            transpose_to_operand<Policy>(ws.dp.data(), rows, cols, ws.ds_t.data(), ws.staging.data());
            int64_t ldb_q;
            const op_t* b_q = Policy::b_rows(q_tile, p.q_row_stride, rows, p.headdim, ws.q_b.data(), &ldb_q);
            Policy::gemm(cols, p.headdim, rows, ws.ds_t.data(), rows, b_q, ldb_q, ws.dk.data(), p.headdim, true);

            // dQ += dS K
            const op_t* a_ds;
            if constexpr (std::is_same_v<op_t, acc_t>) {
              a_ds = ws.dp.data();
            } else {
              for (int64_t r = 0; r < rows; ++r) Policy::a_from_acc(ws.dp.data() + r * cols, cols, ws.ds.data() + r * cols);
              a_ds = ws.ds.data();
            }
            acc_t* dq_out;
            int64_t ldc_dq;
            if (dq_mode == DqMode::kDirect) {
              dq_out = reinterpret_cast<acc_t*>(static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride +
                                                h * p.dq_head_stride + row0 * p.dq_row_stride);
              ldc_dq = p.dq_row_stride;
            } else if (dq_mode == DqMode::kTaskLocal) {
              dq_out = dq_local.data() + ((h - hk * group) * p.seqlen_q + row0) * p.headdim;
              ldc_dq = p.headdim;
            } else {
              dq_out = dq_accum + (((chunk * p.batch + b) * p.num_heads + h) * p.seqlen_q + row0) * p.headdim;
              ldc_dq = p.headdim;
            }
            Policy::gemm(rows, p.headdim, cols, a_ds, cols, b_k, ldb_k, dq_out, ldc_dq, true);
          }
        }
        for (int64_t r = 0; r < cols; ++r) {
          store_row(ws.dk.data() + r * p.headdim, p.headdim, dk + (col0 + r) * p.dk_row_stride);
          store_row(ws.dv.data() + r * p.headdim_v, p.headdim_v, dv + (col0 + r) * p.dv_row_stride);
        }
      }
      if (dq_mode == DqMode::kTaskLocal) {
        for (int64_t g = 0; g < group; ++g) {
          scalar_t* dq = static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride + (hk * group + g) * p.dq_head_stride;
          for (int64_t i = 0; i < p.seqlen_q; ++i)
            store_row(dq_local.data() + (g * p.seqlen_q + i) * p.headdim, p.headdim, dq + i * p.dq_row_stride);
        }
      }
    };
    for (int64_t task; (task = next()) >= 0;) {
      // Chunk-major: under a causal band the first key chunks are seen by the most queries.
      const int64_t c_index = task / (task_b * task_h), bh_index = task % (task_b * task_h);
      const int64_t b_index = bh_index / task_h, h_index = bh_index % task_h;
      for (int64_t c = c_index * spans.chunks; c < (c_index + 1) * spans.chunks; ++c)
        for (int64_t b = b_index * spans.batch; b < (b_index + 1) * spans.batch; ++b)
          for (int64_t hk = h_index * spans.kv_heads; hk < (h_index + 1) * spans.kv_heads; ++hk) process(b, hk, c);
    }
    gemm_release();
  });

  if (dq_mode == DqMode::kPartials) {
    // dQ = Σ_chunks partial sums, in chunk order.
    const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
    const int64_t chunk_stride = rows * p.headdim;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sum(p.headdim);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t i = r % p.seqlen_q, bh = r / p.seqlen_q, b = bh / p.num_heads, h = bh % p.num_heads;
        std::copy(dq_accum + r * p.headdim, dq_accum + (r + 1) * p.headdim, sum.begin());
        for (int64_t c = 1; c < tiling.num_chunks; ++c) {
          const acc_t* part = dq_accum + c * chunk_stride + r * p.headdim;
          at::vec::map2([](Vec x, Vec y) { return x + y; }, sum.data(), sum.data(), part, p.headdim);
        }
        store_row(sum.data(), p.headdim,
                  static_cast<scalar_t*>(p.dq) + b * p.dq_batch_stride + h * p.dq_head_stride + i * p.dq_row_stride);
      }
    });
  }
}

}  // namespace

int64_t backward_dq_accum_elems(const AttentionGradParams& p) {
  const Tiling t = backward_tiling(p, tiling_threads(p));
  if (t.num_chunks == 1) return 0;  // DqMode::kDirect or kTaskLocal
  return t.num_chunks * p.batch * p.num_heads * p.seqlen_q * p.headdim;
}

void backward(const AttentionGradParams& p) {
  have_brgemm_f32();
  have_brgemm_bf16_vnni();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.dtype), "flashattn_cpu_backward", [&] {
    with_policy<scalar_t>([&](auto policy) { backward_impl<decltype(policy)>(p); });
  });
}

void dropout_mask(const AttentionParams& p, uint8_t* keep) {
  const uint32_t threshold = dropout_keep_threshold(p.dropout_p);
  const int64_t rows = p.batch * p.num_heads * p.seqlen_q;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = r % p.seqlen_q, bh = r / p.seqlen_q;
      for (int64_t j4 = 0; j4 < p.seqlen_k; j4 += 4) {
        const uint32_t bits = dropout_keep_bits(p.philox_seed, p.philox_offset, bh, i, j4, threshold);
        for (int64_t u = 0; u < 4 && j4 + u < p.seqlen_k; ++u) keep[r * p.seqlen_k + j4 + u] = (bits >> u) & 1u;
      }
    }
  });
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
