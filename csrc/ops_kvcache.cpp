// flashattn_ext::fwd_kvcache: flash-attn's flash_attn_with_kvcache (forward only).
//
// 1. The new keys/values k, v (batch, seqlen_new, heads_k, dim), rotated when rotary_cos/sin are
//    given, are written into k_cache / v_cache in place at positions cache_seqlens[b] ..
//    cache_seqlens[b] + seqlen_new − 1 of batch b's cache (row cache_batch_idx[b], or the pages of
//    block_table[b] for a paged cache (num_blocks, page_block_size, heads_k, dim)).
// 2. q (batch, seqlen_q, heads, dim), rotated at positions cache_seqlens[b] + i (causal / local) or
//    cache_seqlens[b] (otherwise), as flash-attn, attends to keys cache_leftpad[b] ..
//    cache_seqlens[b] + seqlen_new − 1; causal / window aligned bottom-right.
// Validation once, here, naming the argument; the kernels (cpu/decode.cpp; on CUDA the varlen
// forward over the cache rows, cuda_kvcache_attention) assume valid input.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/kernels.h"
#include "kvcache_params.h"
#include "ops.h"

namespace flashattn {
namespace {

at::Tensor int_vector(const std::optional<at::Tensor>& t, const char* name, int64_t batch, const at::Tensor& q,
                      bool allow_int64 = false) {
  if (!t || !t->defined()) return at::Tensor();
  TORCH_CHECK_TYPE(t->scalar_type() == at::kInt || (allow_int64 && t->scalar_type() == at::kLong), "flashattn_ext: ",
                   name, " must be int32", allow_int64 ? " or int64" : "", ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == q.device(), "flashattn_ext: ", name, " must be on q's device (", q.device(),
                    "), got ", t->device());
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == batch, "flashattn_ext: ", name, " must have shape (batch,) = (",
                    batch, ",), got ", t->sizes());
  return t->to(at::kLong).cpu().contiguous();
}

}  // namespace

at::Tensor checked_block_table(const at::Tensor& block_table, int64_t batch, int64_t num_blocks, const char* cache,
                               const at::Tensor& q) {
  TORCH_CHECK_TYPE(block_table.scalar_type() == at::kInt, "flashattn_ext: block_table must be int32, got ",
                   block_table.scalar_type());
  TORCH_CHECK_VALUE(block_table.device() == q.device(), "flashattn_ext: block_table must be on the device of q and ",
                    cache, " (", q.device(), "), got ", block_table.device());
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == batch && block_table.size(1) >= 1,
                    "flashattn_ext: block_table must have shape (batch, max_blocks_per_seq) with batch = ", batch,
                    ", got ", block_table.sizes());
  at::Tensor table = block_table.cpu().contiguous();
  if (table.numel() > 0) {
    const auto [lo, hi] = at::aminmax(table);
    TORCH_CHECK_VALUE(lo.item<int>() >= 0 && hi.item<int>() < num_blocks, "flashattn_ext: block_table entries must index ",
                      cache, "'s ", num_blocks, " blocks, got values in [", lo.item<int>(), ", ", hi.item<int>(), "]");
  }
  return table;
}

namespace {

// x (batch, seq, heads, dim) rotated by rotary_cos/sin (seqlen_ro, rotary_dim / 2) at positions
// start[b] + t (per_row) or start[b]; the dims past rotary_dim unchanged. In the accumulation type.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& start,
                  bool per_row, bool interleaved) {
  const auto acc = lse_dtype(x);
  const int64_t B = x.size(0), S = x.size(1), half = cos.size(1), rd = 2 * half;
  at::Tensor pos = start.view({B, 1}) + (per_row ? at::arange(S, start.options()).view({1, S})
                                                 : at::zeros({1, S}, start.options()));
  at::Tensor c = cos.to(acc).index_select(0, pos.flatten()).view({B, S, 1, half});
  at::Tensor s = sin.to(acc).index_select(0, pos.flatten()).view({B, S, 1, half});
  at::Tensor xf = x.to(acc);
  at::Tensor xr = xf.narrow(-1, 0, rd), rest = xf.narrow(-1, rd, xf.size(-1) - rd);
  at::Tensor rotated;
  if (interleaved) {
    at::Tensor pairs = xr.unflatten(-1, {half, 2});
    at::Tensor x1 = pairs.select(-1, 0), x2 = pairs.select(-1, 1);
    rotated = at::stack({x1 * c - x2 * s, x1 * s + x2 * c}, -1).flatten(-2);
  } else {
    at::Tensor x1 = xr.narrow(-1, 0, half), x2 = xr.narrow(-1, half, half);
    rotated = at::cat({x1 * c - x2 * s, x1 * s + x2 * c}, -1);
  }
  return at::cat({rotated, rest}, -1).to(x.scalar_type());
}

// The CUDA kernels (a GPU, or the host emulator): the varlen forward over the cache in one launch,
// query rows (batch * seqlen_q) against key rows [start[b], start[b] + seqlens_k[b]) of the cache
// seen as (rows, heads_k, dim), split-KV as the kernels' plan says (cuda/launch.h fwd_split_plan).
// A paged cache is read in place where its page size is a multiple of the kernels' key block
// (block_table followed per key block); otherwise (and on the SIMT path) its pages are gathered
// into rows per sequence first.
void cuda_cache_forward(const at::Tensor& q, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& table,
                        const at::Tensor& seqlens_k, const at::Tensor& batch_idx, const at::Tensor& leftpad,
                        const AttentionOptions& o, int64_t num_splits, at::Tensor& out, at::Tensor& lse) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), Hk = k_cache.size(2);
  const at::Tensor q_rows = q.flatten(0, 1);
  at::Tensor cu_q = at::arange(B + 1, at::kInt) * static_cast<int32_t>(Sq);
  const int32_t* used = seqlens_k.data_ptr<int32_t>();
  const int64_t longest_k = B > 0 ? *std::max_element(used, used + B) : 0;
  PackedSequences s;
  s.cu_q = cu_q, s.used_k = seqlens_k, s.longest_q = Sq, s.longest_k = longest_k;
  PackedCache cache;
  cache.num_splits = num_splits;
  at::Tensor out_rows = out.view({B * Sq, Hq, out.size(3)});
  at::Tensor lse_rows = at::empty({Hq, B * Sq}, lse.options());
  at::Tensor rng_state = at::zeros({2}, q.options().dtype(at::kLong));
  // (rows, heads_k, dim) views starting at the cache's first element; `rows` of them.
  const auto row_view = [](const at::Tensor& c, int64_t rows, int64_t row_stride) {
    return c.as_strided({rows, c.size(2), c.size(3)}, {row_stride, c.stride(2), c.stride(3)}, c.storage_offset());
  };
  // Pages seen as rows: a page stride that is a whole number of row strides, alike in k and v.
  const auto page_ratio = [](const at::Tensor& c) {
    return c.stride(1) <= 0 || c.stride(0) % c.stride(1) != 0 ? -1 : c.stride(0) / c.stride(1);
  };
  if (table.defined()) {
    const int64_t page = k_cache.size(1);
    s.cu_k = at::zeros({B + 1}, at::kInt);
    if (page_ratio(k_cache) < 0 || page_ratio(v_cache) < 0) k_cache = k_cache.contiguous(), v_cache = v_cache.contiguous();
    const at::Tensor k_pages = row_view(k_cache, page, k_cache.stride(1)), v_pages = row_view(v_cache, page, v_cache.stride(1));
    const SplitPlan plan = cuda_packed_plan(q_rows, k_pages, v_pages, s, o, num_splits);
    if (plan.page_multiple > 0 && page % plan.page_multiple == 0) {
      cache.block_table = table, cache.page_block_size = page;
      cache.k_page_stride = k_cache.stride(0), cache.v_page_stride = v_cache.stride(0);
      cuda_packed_forward(q_rows, k_pages, v_pages, s, o, out_rows, lse_rows, rng_state, &cache);
      lse.copy_(lse_rows.view({Hq, B, Sq}).transpose(0, 1));
      return;
    }
    // Gathered: batch b's pages become rows [b * rows_per_seq, (b + 1) * rows_per_seq).
    const at::Tensor pages = table.flatten().to(q.device(), at::kLong);
    const int64_t rows_per_seq = table.size(1) * page;
    k_cache = k_cache.index_select(0, pages).view({B, rows_per_seq, Hk, k_cache.size(3)});
    v_cache = v_cache.index_select(0, pages).view({B, rows_per_seq, Hk, v_cache.size(3)});
  }
  // Rows of (rows, heads_k, dim) must step through both caches alike.
  if (page_ratio(k_cache) < 0 || page_ratio(k_cache) != page_ratio(v_cache))
    k_cache = k_cache.contiguous(), v_cache = v_cache.contiguous();
  const int64_t rows_per_seq = page_ratio(k_cache), total_rows = (k_cache.size(0) - 1) * rows_per_seq + k_cache.size(1);
  TORCH_CHECK_VALUE(total_rows <= std::numeric_limits<int32_t>::max(),
                    "flashattn_ext: the CUDA kvcache path addresses cache rows with int32; this cache has more rows");
  s.cu_k = at::zeros({B + 1}, at::kInt);  // start rows (the last entry is not read)
  for (int64_t b = 0; b < B; ++b) {
    const int64_t row = batch_idx.defined() ? batch_idx.data_ptr<int64_t>()[b] : b;
    s.cu_k.data_ptr<int32_t>()[b] =
        static_cast<int32_t>(row * rows_per_seq + (leftpad.defined() ? leftpad.data_ptr<int64_t>()[b] : 0));
  }
  cuda_packed_forward(q_rows, row_view(k_cache, total_rows, k_cache.stride(1)),
                      row_view(v_cache, total_rows, v_cache.stride(1)), s, o, out_rows, lse_rows, rng_state, &cache);
  lse.copy_(lse_rows.view({Hq, B, Sq}).transpose(0, 1));
}

// GQA packing (flash-decoding's, as flash-attn does it): where no query row's mask depends on
// its position or head (no ALiBi; no window, or one query token, whose bottom-right band holds
// every key), the g = heads / heads_k query heads of a kv head are its rows: q (B, Sq, Hq, D)
// becomes (B, Sq * g, Hk, D), so one tile reads each K/V element once for the whole group.
void cuda_kvcache_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& table, const at::Tensor& seqlens_k, const at::Tensor& batch_idx,
                            const at::Tensor& leftpad, const AttentionOptions& o, int64_t num_splits, at::Tensor& out,
                            at::Tensor& lse) {
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k_cache.size(2), g = Hq / Hk;
  const bool alibi = o.alibi_slopes && o.alibi_slopes->defined();
  const bool banded = o.window_left >= 0 || (Sq > 1 && o.window_right >= 0);
  if (g == 1 || alibi || banded)
    return cuda_cache_forward(q, k_cache, v_cache, table, seqlens_k, batch_idx, leftpad, o, num_splits, out, lse);
  AttentionOptions packed = o;
  packed.window_left = packed.window_right = -1;
  const int64_t Dv = out.size(3);
  at::Tensor q_packed = q.view({B, Sq, Hk, g, D}).permute({0, 1, 3, 2, 4}).reshape({B, Sq * g, Hk, D}).contiguous();
  at::Tensor out_packed = at::empty({B, Sq * g, Hk, Dv}, out.options());
  at::Tensor lse_packed = at::empty({B, Hk, Sq * g}, lse.options());
  cuda_cache_forward(q_packed, k_cache, v_cache, table, seqlens_k, batch_idx, leftpad, packed, num_splits, out_packed,
                     lse_packed);
  out.copy_(out_packed.view({B, Sq, g, Hk, Dv}).permute({0, 1, 3, 2, 4}).reshape({B, Sq, Hq, Dv}));
  lse.copy_(lse_packed.view({B, Hk, Sq, g}).permute({0, 1, 3, 2}).reshape({B, Hq, Sq}));
}

std::tuple<at::Tensor, at::Tensor> fwd_kvcache_op(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const std::optional<at::Tensor>& rotary_cos,
    const std::optional<at::Tensor>& rotary_sin, const std::optional<at::Tensor>& cache_seqlens,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& cache_leftpad,
    const std::optional<at::Tensor>& block_table, std::optional<double> softmax_scale, bool causal,
    int64_t window_left, int64_t window_right, double softcap, bool rotary_interleaved,
    const std::optional<at::Tensor>& alibi_slopes, int64_t num_splits) {
  // ---- checks
  TORCH_CHECK_VALUE(q.dim() == 4, "flashattn_ext: q must be (batch, seqlen_q, heads, headdim), got ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && v_cache.dim() == 4,
                    "flashattn_ext: k_cache and v_cache must be 4-D ((batch_cache, seqlen_cache, heads_k, headdim) "
                    "or paged (num_blocks, page_block_size, heads_k, headdim)), got ", k_cache.sizes(), " and ",
                    v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(0) == v_cache.size(0) && k_cache.size(1) == v_cache.size(1),
                    "flashattn_ext: k_cache and v_cache must have the same leading dims, got ", k_cache.sizes(),
                    " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.stride(-1) == 1 && v_cache.stride(-1) == 1,
                    "flashattn_ext: k_cache and v_cache must have a contiguous last dim (they are written in place)");
  AttentionOptions o;
  o.scale = softmax_scale;
  o.softcap = softcap;
  o.window_left = window_left;
  o.window_right = causal ? (window_right < 0 ? 0 : std::min<int64_t>(window_right, 0)) : window_right;
  o.bottom_right = true;
  // The dense rules (dtypes, devices, heads, head dims, window, softcap, scale) on op-layout views.
  // (The cache's leading dim is rows or pages, not q's batch: one of them stands in for the batch.)
  TORCH_CHECK_VALUE(k_cache.size(0) > 0, "flashattn_ext: k_cache and v_cache are empty");
  const auto as_batch = [&](const at::Tensor& c) {
    return c.narrow(0, 0, 1).expand({q.size(0), c.size(1), c.size(2), c.size(3)}).transpose(1, 2);
  };
  check_attention_inputs(q.transpose(1, 2), as_batch(k_cache), as_batch(v_cache), o);
  TORCH_CHECK_VALUE(num_splits >= 0, "flashattn_ext: num_splits must be >= 0 (0 = chosen), got ", num_splits);
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3), Hk = k_cache.size(2),
                Dv = v_cache.size(3);
  const bool paged = block_table && block_table->defined();
  const bool has_new = k_new && k_new->defined();
  TORCH_CHECK_VALUE(has_new == (v_new && v_new->defined()), "flashattn_ext: k and v must be given together");
  int64_t Sn = 0;
  if (has_new) {
    const at::Tensor &kn = *k_new, &vn = *v_new;
    TORCH_CHECK_VALUE(kn.dim() == 4 && vn.dim() == 4 && kn.size(0) == B && vn.size(0) == B && kn.size(1) == vn.size(1) &&
                          kn.size(2) == Hk && vn.size(2) == Hk && kn.size(3) == D && vn.size(3) == Dv,
                      "flashattn_ext: k and v must be (batch, seqlen_new, heads_k, headdim) = (", B, ", seqlen_new, ",
                      Hk, ", ", D, ") and (", B, ", seqlen_new, ", Hk, ", ", Dv, "), got ", kn.sizes(), " and ",
                      vn.sizes());
    TORCH_CHECK_TYPE(kn.scalar_type() == q.scalar_type() && vn.scalar_type() == q.scalar_type(),
                     "flashattn_ext: k and v must have q's dtype ", q.scalar_type());
    TORCH_CHECK_VALUE(kn.device() == q.device() && vn.device() == q.device(), "flashattn_ext: k and v must be on q's device");
    TORCH_CHECK_VALUE(cache_seqlens && cache_seqlens->defined(),
                      "flashattn_ext: cache_seqlens is needed to append k and v (where each batch's cache ends)");
    Sn = kn.size(1);
  }
  at::Tensor seqlens = int_vector(cache_seqlens, "cache_seqlens", B, q);
  at::Tensor batch_idx = int_vector(cache_batch_idx, "cache_batch_idx", B, q, true);
  at::Tensor leftpad = int_vector(cache_leftpad, "cache_leftpad", B, q);
  at::Tensor table;
  int64_t page = 0, capacity = k_cache.size(1);
  if (paged) {
    TORCH_CHECK_VALUE(!batch_idx.defined() && !leftpad.defined(),
                      "flashattn_ext: cache_batch_idx and cache_leftpad are not supported with a paged cache (block_table)");
    table = checked_block_table(*block_table, B, k_cache.size(0), "k_cache", q);
    page = k_cache.size(1);
    capacity = page * table.size(1);
  } else if (batch_idx.defined()) {
    const auto [lo, hi] = at::aminmax(batch_idx);
    TORCH_CHECK_VALUE(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < k_cache.size(0),
                      "flashattn_ext: cache_batch_idx entries must index k_cache's ", k_cache.size(0),
                      " batch rows, got values in [", lo.item<int64_t>(), ", ", hi.item<int64_t>(), "]");
  } else {
    TORCH_CHECK_VALUE(k_cache.size(0) >= B, "flashattn_ext: k_cache has ", k_cache.size(0),
                      " batch rows, fewer than q's batch ", B, " (pass cache_batch_idx to pick rows)");
  }
  if (!seqlens.defined()) seqlens = at::full({B}, capacity, at::kLong);
  const int64_t* sl = seqlens.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(sl[b] >= 0 && sl[b] + Sn <= capacity, "flashattn_ext: cache_seqlens[", b, "] = ", sl[b],
                      (Sn ? " plus the " : ""), (Sn ? std::to_string(Sn) : std::string()),
                      (Sn ? " new tokens" : ""), " does not fit the cache of ", capacity, " positions",
                      (Sn ? " (cache too short for the append)" : ""));
    if (leftpad.defined())
      TORCH_CHECK_VALUE(leftpad.data_ptr<int64_t>()[b] >= 0 && leftpad.data_ptr<int64_t>()[b] <= sl[b],
                        "flashattn_ext: cache_leftpad[", b, "] = ", leftpad.data_ptr<int64_t>()[b],
                        " must be in [0, cache_seqlens[", b, "] = ", sl[b], "]");
  }
  const bool rotary = rotary_cos && rotary_cos->defined();
  TORCH_CHECK_VALUE(rotary == (rotary_sin && rotary_sin->defined()),
                    "flashattn_ext: rotary_cos and rotary_sin must be given together");
  if (rotary) {
    TORCH_CHECK_VALUE(has_new, "flashattn_ext: rotary_cos/rotary_sin need the new k and v to append");
    const at::Tensor &c = *rotary_cos, &s = *rotary_sin;
    TORCH_CHECK_TYPE(c.is_floating_point() && s.is_floating_point(), "flashattn_ext: rotary_cos/sin must be floating point");
    TORCH_CHECK_VALUE(c.dim() == 2 && c.sizes() == s.sizes() && 2 * c.size(1) <= D && c.size(1) >= 1,
                      "flashattn_ext: rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2) with rotary_dim "
                      "<= headdim (", D, "), got ", c.sizes(), " and ", s.sizes());
    const int64_t need = *std::max_element(sl, sl + B) + std::max<int64_t>(Sn, Sq);
    TORCH_CHECK_VALUE(c.size(0) >= need, "flashattn_ext: rotary_cos/sin have ", c.size(0),
                      " positions, fewer than the ", need, " needed (cache_seqlens + new tokens)");
  }
  if (alibi_slopes && alibi_slopes->defined()) {
    const at::Tensor& a = *alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "flashattn_ext: alibi_slopes must be float32, got ", a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == q.device() && ((a.dim() == 1 && a.size(0) == Hq) ||
                                                   (a.dim() == 2 && a.size(0) == B && a.size(1) == Hq)),
                      "flashattn_ext: alibi_slopes must have shape (num_heads,) = (", Hq,
                      ",) or (batch, num_heads) = (", B, ", ", Hq, "), got ", a.sizes());
  }

  // ---- rotary and the in-place append
  const bool local = o.window_left >= 0 || o.window_right >= 0;
  at::Tensor q_used = q;
  if (rotary) q_used = rotate(q, *rotary_cos, *rotary_sin, seqlens, causal || local, rotary_interleaved);
  if (q_used.stride(-1) != 1) q_used = q_used.contiguous();
  if (has_new) {
    const at::Tensor k_app = rotary ? rotate(*k_new, *rotary_cos, *rotary_sin, seqlens, true, rotary_interleaved) : *k_new;
    for (int64_t b = 0; b < B; ++b) {
      if (Sn == 0) break;
      if (paged) {
        for (int64_t t = 0; t < Sn; ++t) {
          const int64_t pos = sl[b] + t, blk = table[b][pos / page].item<int64_t>();
          k_cache[blk][pos % page].copy_(k_app[b][t]);
          v_cache[blk][pos % page].copy_((*v_new)[b][t]);
        }
      } else {
        const int64_t row = batch_idx.defined() ? batch_idx.data_ptr<int64_t>()[b] : b;
        k_cache[row].narrow(0, sl[b], Sn).copy_(k_app[b]);
        v_cache[row].narrow(0, sl[b], Sn).copy_((*v_new)[b]);
      }
    }
  }

  // ---- attention
  at::Tensor out = at::empty({B, Sq, Hq, Dv}, q.options());
  const auto acc = lse_dtype(q);
  at::Tensor lse = at::empty({B, Hq, Sq}, q.options().dtype(acc));
  poison({out, lse});
  at::Tensor seqlens_k = (seqlens + Sn - (leftpad.defined() ? leftpad : at::zeros_like(seqlens))).to(at::kInt);
  at::Tensor alibi = alibi_slopes && alibi_slopes->defined() ? alibi_slopes->contiguous() : at::Tensor();

  if (runs_cuda_kernels(q)) {
    AttentionOptions co = o;
    if (alibi.defined()) co.alibi_slopes = alibi;
    cuda_kvcache_attention(q_used, k_cache, v_cache, table, seqlens_k.cpu(), batch_idx, leftpad, co, num_splits, out,
                           lse);
    return {out, lse};
  }
  KvCacheParams p;
  AttentionParams& a = p.attn;
  a.q = q_used.data_ptr(), a.k = k_cache.data_ptr(), a.v = v_cache.data_ptr(), a.out = out.data_ptr();
  a.q_batch_stride = q_used.stride(0), a.q_row_stride = q_used.stride(1), a.q_head_stride = q_used.stride(2);
  a.k_batch_stride = k_cache.stride(0), a.k_row_stride = k_cache.stride(1), a.k_head_stride = k_cache.stride(2);
  a.v_batch_stride = v_cache.stride(0), a.v_row_stride = v_cache.stride(1), a.v_head_stride = v_cache.stride(2);
  a.o_batch_stride = out.stride(0), a.o_row_stride = out.stride(1), a.o_head_stride = out.stride(2);
  a.batch = B, a.num_heads = Hq, a.num_heads_k = Hk, a.seqlen_q = Sq, a.headdim = D, a.headdim_v = Dv;
  a.dtype = kernel_dtype(q.scalar_type());
  a.softmax_scale = softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(D));
  a.softcap = softcap;
  a.window_left = o.window_left, a.window_right = o.window_right, a.bottom_right = true;
  if (alibi.defined()) a.alibi_slopes = alibi.data_ptr<float>(), a.alibi_batch_stride = alibi.dim() == 2 ? alibi.stride(0) : 0;
  set_lse(a, lse);
  p.seqlens_k = seqlens_k.data_ptr<int32_t>();
  if (batch_idx.defined()) p.cache_batch_idx = batch_idx.data_ptr<int64_t>();
  at::Tensor leftpad32 = leftpad.defined() ? leftpad.to(at::kInt) : at::Tensor();
  if (leftpad32.defined()) p.leftpad = leftpad32.data_ptr<int32_t>();
  if (paged) {
    p.block_table = table.data_ptr<int32_t>();
    p.block_table_batch_stride = table.stride(0);
    p.page_block_size = page;
  }
  const int64_t max_k = seqlens_k.numel() ? seqlens_k.max().item<int64_t>() : 0;
  p.num_splits = cpu::decode_num_splits(p, max_k, num_splits, at::get_num_threads());
  at::Tensor partial_out, partial_lse;
  if (p.num_splits > 1) {
    partial_out = at::empty({p.num_splits, B, Hq, Sq, Dv}, q.options().dtype(acc));
    partial_lse = at::empty({p.num_splits, B, Hq, Sq}, q.options().dtype(acc));
    p.partial_out = partial_out.data_ptr(), p.partial_lse = partial_lse.data_ptr();
  }
  cpu::decode(p);
  return {out, lse};
}

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_FRAGMENT(flashattn_ext, m) {
  m.def("fwd_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k=None, Tensor? v=None, "
        "Tensor? rotary_cos=None, Tensor? rotary_sin=None, Tensor? cache_seqlens=None, Tensor? cache_batch_idx=None, "
        "Tensor? cache_leftpad=None, Tensor? block_table=None, float? softmax_scale=None, bool causal=False, "
        "int window_left=-1, int window_right=-1, float softcap=0.0, bool rotary_interleaved=True, "
        "Tensor? alibi_slopes=None, int num_splits=0) -> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CPU, m) { m.impl("fwd_kvcache", &flashattn::fwd_kvcache_op); }

#ifdef FLASHATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) { m.impl("fwd_kvcache", &flashattn::fwd_kvcache_op); }
#endif

// Forward only: no gradient flows through the cache op.
TORCH_LIBRARY_IMPL(flashattn_ext, Autograd, m) { m.impl("fwd_kvcache", torch::CppFunction::makeFallthrough()); }
