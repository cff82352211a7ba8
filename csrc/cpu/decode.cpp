// Attention of a few new query rows against a (paged) KV cache on the CPU: flash-decoding.
//
// A task is one (batch, kv head, split). GQA packing: the query rows of every query head of the
// kv head's group (group × seqlen_q rows) form the rows of one tile, so each K/V element is read
// from memory once per group, not once per query head. Split-KV: the keys of a (batch, kv head)
// are cut into num_splits ranges so that one sequence's decode occupies every core; each split
// writes its normalised partial output and lse, and a combine step merges them with the weights
// exp(lse_split - lse). The key loop follows block_table for a paged cache (tiles never cross a
// page). Otherwise it is the forward kernel's tile loop: S = Q Kᵀ, score rules (scores.h), online
// softmax, O += P V.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/decode_microkernels.h"
#include "cpu/kernels.h"
#include "kvcache_params.h"
#include "cpu/matmul_policy.h"
#include "cpu/online_softmax.h"
#include "cpu/parallel.h"
#include "cpu/scores.h"
#include "cpu/tiling.h"

namespace flashattn::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t kBlockN = 256;

template <typename Policy>
struct DecodeWorkspace {
  using scalar_t = typename Policy::scalar_t;
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  std::vector<scalar_t> q_pack;  // the group's query rows, (group · seqlen_q) × headdim
  std::vector<op_t> q, k_t, v, p;
  std::vector<acc_t> s, o, row_max, row_sum;
  std::vector<HeadContext> heads;

  DecodeWorkspace(const AttentionParams& a, int64_t rows, int64_t group, int64_t block_n) {
    q_pack.resize(rows * a.headdim);
    if (!Policy::kInPlaceA) q.resize(rows * a.headdim);
    k_t.resize(Policy::b_elems(a.headdim, block_n));
    if (!Policy::kInPlaceB) v.resize(Policy::b_elems(block_n, a.headdim_v));
    s.resize(rows * block_n);
    if (!std::is_same_v<op_t, acc_t>) p.resize(rows * block_n);
    o.resize(rows * a.headdim_v);
    row_max.resize(rows);
    row_sum.resize(rows);
    heads.resize(group);
  }
};

// Few query rows per kv head (up to kDirectRows: one-token decode with GQA groups or MQA, or a few
// tokens): GEMMs would spend more time packing K and V into operand layouts than multiplying, and
// one kv head's rows are small strided pieces of the cache. So a task takes one (batch, split)
// with all its heads and walks the cache a block of keys at a time (all kv heads of a key are
// adjacent, so a block is one stretch of memory); each kv head's keys and values are read where
// they lie by the register-blocked loops of cpu/decode_microkernels.h, once per group.
constexpr int64_t kDirectRows = 32;

// Which kernel a call runs, and its block of keys: the direct kernel takes all kv heads of a block
// of keys (about 32 KB of each of K and V per block), the GEMM path one kv head's kBlockN keys.
// Blocks never cross a page. decode_num_splits cuts the key range in these units too.
inline bool runs_direct(const AttentionParams& a) {
  return a.dtype != DType::kFloat64 && (a.num_heads / std::max<int64_t>(1, a.num_heads_k)) * a.seqlen_q <= kDirectRows;
}
inline int64_t decode_block_n(const KvCacheParams& kp) {
  const AttentionParams& a = kp.attn;
  const int64_t n = runs_direct(a)
                        ? std::clamp<int64_t>(32768 / std::max<int64_t>(1, a.num_heads_k * std::max(a.headdim, a.headdim_v)), 8, 64)
                        : kBlockN;
  return kp.block_table ? std::min(n, kp.page_block_size) : n;
}

template <typename scalar_t>
void decode_direct(const KvCacheParams& kp) {
  const AttentionParams& a = kp.attn;
  const int64_t Hk = a.num_heads_k, group = a.num_heads / Hk, seqlen_q = a.seqlen_q, R = group * seqlen_q;
  const int64_t all_rows = Hk * R, D = a.headdim, Dv = a.headdim_v, num_splits = kp.num_splits;
  const int64_t block_n = decode_block_n(kp);
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr bool kF32 = std::is_same_v<scalar_t, float>;
  // bf16 with AVX512-BF16: the bf16 rows as they are. Otherwise fp32 (fp16 and bf16 widened).
  const bool dp = std::is_same_v<scalar_t, c10::BFloat16> && have_bf16_dp() && D % 32 == 0 && Dv % 32 == 0;
  const int64_t ldpb = block_n + block_n % 2;
  // Many rows per kv head: scores from the block of keys transposed once (decode_microkernels.h).
  // Words of a bf16 key are its element pairs, so its row stride must be even.
  const bool packed = dp && R >= kPackedScoreRows && a.k_row_stride % 2 == 0;
  const int64_t ldk = ceil_div(block_n, 16) * 16;
  const auto* k_base = static_cast<const scalar_t*>(a.k);
  const auto* v_base = static_cast<const scalar_t*>(a.v);

  run_workers(a.batch * num_splits, [&](auto next) {
    std::vector<float> q_f(dp ? 0 : all_rows * D), s(all_rows * block_n), o(all_rows * Dv), row_max(all_rows),
        row_sum(all_rows), o_out(Dv);
    std::vector<uint16_t> q_b(dp ? all_rows * D : 0), pb(dp ? all_rows * ldpb : 0);
    std::vector<float> k_f(kF32 || dp ? 0 : block_n * D), v_f(kF32 || dp ? 0 : block_n * Dv);
    std::vector<float> k_t(packed ? D / 2 * ldk : 0);
    std::vector<HeadContext> heads(a.num_heads);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t split = task / a.batch, b = task % a.batch;
      AttentionParams ps = a;
      ps.seqlen_k = kp.seqlens_k[b];
      for (int64_t h = 0; h < a.num_heads; ++h) heads[h] = head_context(ps, b, h);
      // Row rr = hk · R + g · seqlen_q + i holds query head hk · group + g at token i.
      for (int64_t rr = 0; rr < all_rows; ++rr) {
        const int64_t h = rr / seqlen_q, i = rr % seqlen_q;  // hk * group + g == rr / seqlen_q
        const scalar_t* q_row = static_cast<const scalar_t*>(a.q) + b * a.q_batch_stride + h * a.q_head_stride + i * a.q_row_stride;
        if (dp)
          std::memcpy(q_b.data() + rr * D, q_row, D * sizeof(uint16_t));
        else
          widen_row(q_row, D, q_f.data() + rr * D);
      }
      const int64_t cache_b = kp.cache_batch_idx ? kp.cache_batch_idx[b] : b;
      const int64_t first = kp.leftpad ? kp.leftpad[b] : 0;
      // Where key j of batch b lives; the keys of a block are row_stride apart (blocks never cross a page).
      auto key_offset = [&](int64_t j, int64_t batch_stride, int64_t row_stride) -> int64_t {
        if (kp.block_table) {
          const int64_t page = kp.block_table[b * kp.block_table_batch_stride + j / kp.page_block_size];
          return page * batch_stride + (j % kp.page_block_size) * row_stride;
        }
        return cache_b * batch_stride + (first + j) * row_stride;
      };
      const int64_t lo = band_key_begin(ps, 0), hi = band_key_end(ps, seqlen_q - 1);
      const int64_t blocks = lo < hi ? ceil_div(hi - lo, block_n) : 0;
      const int64_t per_split = ceil_div(blocks, num_splits);
      const int64_t begin = std::min(hi, lo + split * per_split * block_n);
      const int64_t end = std::min(hi, lo + (split + 1) * per_split * block_n);
      std::fill(row_max.begin(), row_max.end(), kNegInf);
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      std::fill(o.begin(), o.end(), 0.f);
      // The keys of the block from col0 on: up to block_n, never past the split's end or a page.
      auto block_cols = [&](int64_t col0) -> int64_t {
        const int64_t n = std::min(block_n, end - col0);
        return kp.block_table && n > 0 ? std::min(n, kp.page_block_size - col0 % kp.page_block_size) : n;
      };

      for (int64_t col0 = begin, cols; col0 < end; col0 += cols) {
        cols = block_cols(col0);
        const TileShape t{0, seqlen_q, col0, cols};
        const TileMasking tm = tile_masking(ps, heads[0], t);
        if (!tm.visible) continue;
        const scalar_t* k_block = k_base + key_offset(col0, a.k_batch_stride, a.k_row_stride);
        const scalar_t* v_block = v_base + key_offset(col0, a.v_batch_stride, a.v_row_stride);
        // The next block's keys and values: each kernel asks for its kv head's rows of it.
        const int64_t next0 = col0 + cols, next_cols = block_cols(next0);
        auto next_rows = [&](const scalar_t* base, int64_t batch_stride, int64_t head_stride, int64_t row_stride,
                             int64_t hk, int64_t len) {
          if (next_cols <= 0) return NextRows{};
          constexpr int64_t e = sizeof(scalar_t);
          return NextRows{reinterpret_cast<const char*>(base + key_offset(next0, batch_stride, row_stride) + hk * head_stride),
                          row_stride * e, next_cols, len * e};
        };
        for (int64_t hk = 0; hk < Hk; ++hk) {  // S = Q Kᵀ
          const NextRows next_k = next_rows(k_base, a.k_batch_stride, a.k_head_stride, a.k_row_stride, hk, D);
          const scalar_t* kh = k_block + hk * a.k_head_stride;
          float* s_h = s.data() + hk * R * block_n;
          if (packed) {
            pack_key_words(kh, a.k_row_stride / 2, cols, D / 2, k_t.data(), ldk, next_k);
            scores_bf16_dp_packed(q_b.data() + hk * R * D, R, k_t.data(), ldk, cols, D, s_h, block_n);
          } else if (dp) {
            scores_bf16_dp(q_b.data() + hk * R * D, R, reinterpret_cast<const uint16_t*>(kh), a.k_row_stride, cols, D,
                           s_h, block_n, next_k);
          } else if constexpr (kF32) {
            scores_f32(q_f.data() + hk * R * D, R, kh, a.k_row_stride, cols, D, s_h, block_n, next_k);
          } else {
            for (int64_t jj = 0; jj < cols; ++jj) {
              next_k.fetch(jj);
              widen_row(kh + jj * a.k_row_stride, D, k_f.data() + jj * D);
            }
            scores_f32(q_f.data() + hk * R * D, R, k_f.data(), D, cols, D, s_h, block_n);
          }
        }
        for (int64_t rr = 0; rr < all_rows; ++rr) {
          float* s_row = s.data() + rr * block_n;
          make_score_row(ps, heads[rr / seqlen_q], rr % seqlen_q, t, tm, s_row);
          online_softmax_row(s_row, cols, pending_scale<float>(ps, tm), row_max[rr], row_sum[rr], o.data() + rr * Dv, Dv);
        }
        if (dp) probabilities_to_bf16(s.data(), block_n, all_rows, cols, pb.data(), ldpb);
        for (int64_t hk = 0; hk < Hk; ++hk) {  // O += P V
          const NextRows next_v = next_rows(v_base, a.v_batch_stride, a.v_head_stride, a.v_row_stride, hk, Dv);
          const scalar_t* vh = v_block + hk * a.v_head_stride;
          float* o_h = o.data() + hk * R * Dv;
          if (dp) {
            pv_bf16_dp(pb.data() + hk * R * ldpb, ldpb, R, reinterpret_cast<const uint16_t*>(vh), a.v_row_stride, cols,
                       Dv, o_h, next_v);
          } else if constexpr (kF32) {
            pv_f32(s.data() + hk * R * block_n, block_n, R, vh, a.v_row_stride, cols, Dv, o_h, next_v);
          } else {
            for (int64_t jj = 0; jj < cols; ++jj) {
              next_v.fetch(jj);
              widen_row(vh + jj * a.v_row_stride, Dv, v_f.data() + jj * Dv);
            }
            pv_f32(s.data() + hk * R * block_n, block_n, R, v_f.data(), Dv, cols, Dv, o_h);
          }
        }
      }
      for (int64_t rr = 0; rr < all_rows; ++rr) {
        const int64_t h = rr / seqlen_q, i = rr % seqlen_q;
        const float* o_acc = o.data() + rr * Dv;
        const float sum = row_sum[rr];
        const float inv = sum > 0 ? 1.f / sum : 0.f;
        for (int64_t x = 0; x < Dv; ++x) o_out[dp ? (x / 32) * 32 + bf16_dp_column(x % 32) : x] = o_acc[x] * inv;
        const float lse = sum > 0 ? row_max[rr] + std::log(sum) : kNegInf;
        const int64_t row_index = (b * a.num_heads + h) * seqlen_q + i;
        if (num_splits == 1) {
          store_row(o_out.data(), Dv, static_cast<scalar_t*>(a.out) + b * a.o_batch_stride + h * a.o_head_stride + i * a.o_row_stride);
          a.lse[row_index] = lse;
        } else {
          const int64_t part = split * a.batch * a.num_heads * seqlen_q + row_index;
          std::copy(o_out.data(), o_out.data() + Dv, static_cast<float*>(kp.partial_out) + part * Dv);
          static_cast<float*>(kp.partial_lse)[part] = lse;
        }
      }
    }
  });
}

template <typename Policy>
void decode_impl(const KvCacheParams& kp) {
  using scalar_t = typename Policy::scalar_t;
  using op_t = typename Policy::op_t;
  using acc_t = typename Policy::acc_t;
  const AttentionParams& a = kp.attn;
  const int64_t group = a.num_heads / a.num_heads_k, seqlen_q = a.seqlen_q, rows = group * seqlen_q;
  const int64_t kv_tasks = a.batch * a.num_heads_k, num_splits = kp.num_splits;
  const int64_t block_n = decode_block_n(kp);
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  bool done = false;
  if constexpr (std::is_same_v<acc_t, float>) {
    if (runs_direct(a)) {
      decode_direct<scalar_t>(kp);
      done = true;
    }
  }
  if (!done) run_workers(kv_tasks * num_splits, [&](auto next) {
    DecodeWorkspace<Policy> ws(a, rows, group, block_n);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t split = task / kv_tasks, b = (task % kv_tasks) / a.num_heads_k, hk = task % a.num_heads_k;
      AttentionParams ps = a;
      ps.seqlen_k = kp.seqlens_k[b];
      for (int64_t g = 0; g < group; ++g) ws.heads[g] = head_context(ps, b, hk * group + g);

      // Q rows of the group, row r = g · seqlen_q + i.
      for (int64_t g = 0; g < group; ++g)
        for (int64_t i = 0; i < seqlen_q; ++i) {
          const scalar_t* src = static_cast<const scalar_t*>(a.q) + b * a.q_batch_stride +
                                (hk * group + g) * a.q_head_stride + i * a.q_row_stride;
          std::copy(src, src + a.headdim, ws.q_pack.data() + (g * seqlen_q + i) * a.headdim);
        }
      int64_t lda_q;
      const op_t* a_q = Policy::a_rows(ws.q_pack.data(), a.headdim, rows, a.headdim, ws.q.data(), &lda_q);

      // Where key j of batch b lives.
      const int64_t cache_b = kp.cache_batch_idx ? kp.cache_batch_idx[b] : b;
      const int64_t first = kp.leftpad ? kp.leftpad[b] : 0;
      auto row_offset = [&](int64_t j, int64_t batch_stride, int64_t head_stride, int64_t row_stride) -> int64_t {
        if (kp.block_table) {
          const int64_t page = kp.block_table[b * kp.block_table_batch_stride + j / kp.page_block_size];
          return page * batch_stride + hk * head_stride + (j % kp.page_block_size) * row_stride;
        }
        return cache_b * batch_stride + hk * head_stride + (first + j) * row_stride;
      };

      // This split's keys: the band's visible range cut into num_splits runs of whole tiles.
      const int64_t lo = band_key_begin(ps, 0), hi = band_key_end(ps, seqlen_q - 1);
      const int64_t blocks = lo < hi ? ceil_div(hi - lo, block_n) : 0;
      const int64_t per_split = ceil_div(blocks, num_splits);
      const int64_t begin = std::min(hi, lo + split * per_split * block_n);
      const int64_t end = std::min(hi, lo + (split + 1) * per_split * block_n);

      std::fill(ws.row_max.begin(), ws.row_max.end(), kNegInf);
      std::fill(ws.row_sum.begin(), ws.row_sum.end(), acc_t(0));
      std::fill(ws.o.begin(), ws.o.end(), acc_t(0));
      for (int64_t col0 = begin, cols; col0 < end; col0 += cols) {
        cols = std::min(block_n, end - col0);
        if (kp.block_table) cols = std::min(cols, kp.page_block_size - col0 % kp.page_block_size);
        const TileShape t{0, seqlen_q, col0, cols};
        const TileMasking tm = tile_masking(ps, ws.heads[0], t);
        if (!tm.visible) continue;

        // S = Q Kᵀ for all the group's rows at once.
        const scalar_t* k_tile =
            static_cast<const scalar_t*>(a.k) + row_offset(col0, a.k_batch_stride, a.k_head_stride, a.k_row_stride);
        Policy::b_transposed(k_tile, a.k_row_stride, cols, a.headdim, ws.k_t.data());
        Policy::gemm(rows, cols, a.headdim, a_q, lda_q, ws.k_t.data(), Policy::b_ld(cols), ws.s.data(), cols, false);

        for (int64_t r = 0; r < rows; ++r) {
          acc_t* s_row = ws.s.data() + r * cols;
          make_score_row(ps, ws.heads[r / seqlen_q], r % seqlen_q, t, tm, s_row);
          online_softmax_row(s_row, cols, pending_scale<acc_t>(ps, tm), ws.row_max[r], ws.row_sum[r],
                             ws.o.data() + r * a.headdim_v, a.headdim_v);
          if constexpr (!std::is_same_v<op_t, acc_t>) Policy::a_from_acc(s_row, cols, ws.p.data() + r * cols);
        }

        // O += P V
        const scalar_t* v_tile =
            static_cast<const scalar_t*>(a.v) + row_offset(col0, a.v_batch_stride, a.v_head_stride, a.v_row_stride);
        int64_t ldb_v;
        const op_t* b_v = Policy::b_rows(v_tile, a.v_row_stride, cols, a.headdim_v, ws.v.data(), &ldb_v);
        const op_t* a_p;
        if constexpr (std::is_same_v<op_t, acc_t>)
          a_p = ws.s.data();
        else
          a_p = ws.p.data();
        Policy::gemm(rows, a.headdim_v, cols, a_p, cols, b_v, ldb_v, ws.o.data(), a.headdim_v, true);
      }

      // O / row_sum and lse: the final result, or this split's partial one.
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t h = hk * group + r / seqlen_q, i = r % seqlen_q;
        acc_t* o_row = ws.o.data() + r * a.headdim_v;
        const acc_t sum = ws.row_sum[r];
        const acc_t inv = sum > 0 ? acc_t(1) / sum : acc_t(0);
        at::vec::map([inv](Vectorized<acc_t> x) { return x * Vectorized<acc_t>(inv); }, o_row, o_row, a.headdim_v);
        const acc_t lse = sum > 0 ? ws.row_max[r] + std::log(sum) : kNegInf;
        const int64_t row_index = (b * a.num_heads + h) * seqlen_q + i;
        if (num_splits == 1) {
          store_row(o_row, a.headdim_v,
                    static_cast<scalar_t*>(a.out) + b * a.o_batch_stride + h * a.o_head_stride + i * a.o_row_stride);
          lse_pointer<acc_t>(a)[row_index] = lse;
        } else {
          const int64_t part = split * a.batch * a.num_heads * seqlen_q + row_index;
          std::copy(o_row, o_row + a.headdim_v, static_cast<acc_t*>(kp.partial_out) + part * a.headdim_v);
          static_cast<acc_t*>(kp.partial_lse)[part] = lse;
        }
      }
    }
    gemm_release();
  });

  if (num_splits == 1) return;
  // Combine: lse = log Σ_s exp(lse_s), O = Σ_s exp(lse_s − lse) O_s, in split order.
  const int64_t total_rows = a.batch * a.num_heads * seqlen_q;
  const acc_t* part_o = static_cast<const acc_t*>(kp.partial_out);
  const acc_t* part_lse = static_cast<const acc_t*>(kp.partial_lse);
  at::parallel_for(0, total_rows, 16, [&](int64_t row_begin, int64_t row_end) {
    using Vec = Vectorized<acc_t>;
    std::vector<acc_t> acc(a.headdim_v);
    for (int64_t row = row_begin; row < row_end; ++row) {
      const int64_t i = row % seqlen_q, bh = row / seqlen_q, b = bh / a.num_heads, h = bh % a.num_heads;
      acc_t max_lse = kNegInf;
      for (int64_t s = 0; s < num_splits; ++s) max_lse = std::max(max_lse, part_lse[s * total_rows + row]);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t lse = kNegInf;
      if (max_lse != kNegInf) {
        acc_t sum = 0;
        for (int64_t s = 0; s < num_splits; ++s) sum += std::exp(part_lse[s * total_rows + row] - max_lse);
        lse = max_lse + std::log(sum);
        for (int64_t s = 0; s < num_splits; ++s) {
          const acc_t w = std::exp(part_lse[s * total_rows + row] - lse);
          if (w == 0) continue;
          at::vec::map2([w](Vec x, Vec y) { return x + y * Vec(w); }, acc.data(), acc.data(),
                        part_o + (s * total_rows + row) * a.headdim_v, a.headdim_v);
        }
      }
      store_row(acc.data(), a.headdim_v,
                static_cast<scalar_t*>(a.out) + b * a.o_batch_stride + h * a.o_head_stride + i * a.o_row_stride);
      lse_pointer<acc_t>(a)[row] = lse;
    }
  });
}

}  // namespace

int64_t decode_num_splits(const KvCacheParams& p, int64_t max_seqlen_k, int64_t requested, int threads) {
  const int64_t blocks = std::max<int64_t>(1, ceil_div(max_seqlen_k, decode_block_n(p)));
  if (requested > 0) return std::clamp<int64_t>(requested, 1, std::min<int64_t>(128, blocks));
  // Enough tasks for every thread, each split long enough to pay for its setup and its share of
  // the combine. The GEMM path: tasks per (batch, kv head), 4 per thread (balance uneven
  // lengths), splits of >= 2 blocks. The direct kernel: all heads per task, equal work per key
  // across heads, so 2 per thread, splits of >= 256 keys (measured: GQA B=1 S=512 runs 1.8x
  // faster in 2 splits than in 8 of 64 keys).
  const AttentionParams& a = p.attn;
  const bool direct = runs_direct(a);
  const int64_t tasks = std::max<int64_t>(1, direct ? a.batch : a.batch * a.num_heads_k);
  const int64_t want = ceil_div((direct ? 2 : 4) * threads, tasks);
  const int64_t longest = direct ? max_seqlen_k / 256 : blocks / 2;
  return std::clamp<int64_t>(want, 1, std::max<int64_t>(1, std::min<int64_t>(128, longest)));
}

void decode(const KvCacheParams& p) {
  if (p.attn.batch * p.attn.num_heads * p.attn.seqlen_q == 0) return;
  have_brgemm_f32();  // probe outside the parallel region
  have_brgemm_bf16_vnni();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, to_scalar_type(p.attn.dtype), "flashattn_cpu_decode", [&] {
    with_policy<scalar_t>([&](auto policy) { decode_impl<decltype(policy)>(p); });
  });
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
