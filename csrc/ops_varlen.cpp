// flashattn_ext::varlen_fwd / varlen_bwd: attention over sequences packed without padding,
// flash-attn's (total_tokens, heads, headdim) layout addressed by int32 cumulative lengths.
//
// Sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and out and rows
// [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v. The dense kernels run on each sequence's rows
// in place, so nothing is padded or copied: on CPU on a (1, heads, len, dim) strided view of the
// packed tensor per sequence; on CUDA in one launch whose CTAs each find their sequence through
// cu_seqlens. The band (causal / window) and ALiBi are aligned per sequence with its own lengths.
// lse is (heads, total_q) as flash-attn's; dropout uses the forward's (seed, offset + b) for
// sequence b (see varlen_sequence_rng).
//
// Options are the rows of op_options.h (one list); attn_mask and block_mask are rejected here.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <mutex>
#include <numeric>
#include <vector>

#include "cpu/kernels.h"
#include "cpu/parallel.h"
#include "ops.h"

namespace flashattn {
namespace {

// Sequence lengths read once from cu_seqlens (checked), or, while a CUDA graph is being captured
// (no host reads then), trusted as flash-attn does: only their count known, max_seqlen_* the
// longest lengths.
struct SeqOffsets {
  std::vector<int64_t> q, k;  // batch + 1 cumulative offsets each (empty when trusted)
  int64_t sequences = 0;
  int64_t longest_q = 0, longest_k = 0;
  int64_t batch() const { return sequences; }
};

bool capturing_cuda_graph(const at::Tensor& q) {
#ifdef FLASHATTN_WITH_CUDA
  return q.is_cuda() && cuda_stream_capturing(q);
#else
  (void)q;
  return false;
#endif
}

// (total < 0: the rows are not known yet, nothing to match.)
std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen,
                                     const char* max_name, const char* total_name) {
  TORCH_CHECK_VALUE(cu.defined(), "flashattn_ext: ", name, " must be a tensor");
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "flashattn_ext: ", name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "flashattn_ext: ", name,
                    " must be a 1-D tensor of batch + 1 cumulative lengths, got shape ", cu.sizes());
  const at::Tensor c = cu.cpu().contiguous();
  const int32_t* d = c.data_ptr<int32_t>();
  std::vector<int64_t> offs(d, d + c.numel());
  TORCH_CHECK_VALUE(offs[0] == 0, "flashattn_ext: ", name, " must start at 0, got ", offs[0]);
  for (size_t b = 1; b < offs.size(); ++b) {
    TORCH_CHECK_VALUE(offs[b] >= offs[b - 1], "flashattn_ext: ", name, " must be non-decreasing, got ", offs[b - 1],
                      " then ", offs[b], " at index ", b);
    TORCH_CHECK_VALUE(offs[b] - offs[b - 1] <= max_seqlen, "flashattn_ext: ", max_name, " (", max_seqlen,
                      ") is smaller than sequence ", b - 1, " of ", name, " (length ", offs[b] - offs[b - 1], ")");
  }
  TORCH_CHECK_VALUE(total < 0 || offs.back() == total, "flashattn_ext: the last entry of ", name, " (", offs.back(),
                    ") must equal the number of rows of ", total_name, " (", total, ")");
  return offs;
}

void check_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                  const at::Tensor& cu_k, int64_t max_q, int64_t max_k, const AttentionOptions& o, SeqOffsets& seqs) {
  TORCH_CHECK_VALUE(q.defined() && k.defined() && v.defined(), "flashattn_ext: q, k and v must be tensors");
  TORCH_CHECK_VALUE(q.dim() == 3 && k.dim() == 3 && v.dim() == 3,
                    "flashattn_ext: varlen q, k and v must be (total_tokens, heads, headdim), got q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(!(o.attn_mask && o.attn_mask->defined()), "flashattn_ext: varlen takes no attn_mask");
  TORCH_CHECK_VALUE(!(o.block_mask && o.block_mask->defined()) && !(o.block_elem_masks && o.block_elem_masks->defined()),
                    "flashattn_ext: varlen takes no block_mask");
  TORCH_CHECK_VALUE(max_q >= 0 && max_k >= 0, "flashattn_ext: max_seqlen_q and max_seqlen_k must be >= 0, got ", max_q,
                    " and ", max_k);
  // Every rule of the dense op on the (heads, tokens, dim) views; ALiBi's batch is checked below.
  AttentionOptions dense = o;
  dense.alibi_slopes.reset();
  check_attention_inputs(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), dense);
  TORCH_CHECK_VALUE(cu_q.defined() && cu_k.defined() && cu_q.device() == q.device() && cu_k.device() == q.device(),
                    "flashattn_ext: cu_seqlens_q and cu_seqlens_k must be on q's device (", q.device(), ")");
  if (capturing_cuda_graph(q)) {  // what can be checked without reading them
    for (const auto& [cu, name] : {std::pair{cu_q, "cu_seqlens_q"}, std::pair{cu_k, "cu_seqlens_k"}}) {
      TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "flashattn_ext: ", name, " must be int32, got ", cu.scalar_type());
      TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1, "flashattn_ext: ", name,
                        " must be a 1-D tensor of batch + 1 cumulative lengths, got shape ", cu.sizes());
    }
    TORCH_CHECK_VALUE(cu_q.numel() == cu_k.numel(), "flashattn_ext: cu_seqlens_q and cu_seqlens_k must have the same "
                      "length (batch + 1), got ", cu_q.numel(), " and ", cu_k.numel());
    seqs.sequences = cu_q.numel() - 1, seqs.longest_q = max_q, seqs.longest_k = max_k;
  } else {
    seqs.q = read_cu_seqlens(cu_q, "cu_seqlens_q", q.size(0), max_q, "max_seqlen_q", "q");
    seqs.k = read_cu_seqlens(cu_k, "cu_seqlens_k", k.size(0), max_k, "max_seqlen_k", "k and v");
    TORCH_CHECK_VALUE(seqs.q.size() == seqs.k.size(), "flashattn_ext: cu_seqlens_q and cu_seqlens_k must have the "
                      "same length (batch + 1), got ", seqs.q.size(), " and ", seqs.k.size());
    seqs.sequences = static_cast<int64_t>(seqs.q.size()) - 1;
    for (int64_t b = 0; b < seqs.sequences; ++b) {
      seqs.longest_q = std::max(seqs.longest_q, seqs.q[b + 1] - seqs.q[b]);
      seqs.longest_k = std::max(seqs.longest_k, seqs.k[b + 1] - seqs.k[b]);
    }
  }
  if (o.alibi_slopes && o.alibi_slopes->defined()) {
    const at::Tensor& a = *o.alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "flashattn_ext: alibi_slopes must be float32, got ", a.scalar_type());
    const int64_t heads = q.size(1), batch = seqs.batch();
    TORCH_CHECK_VALUE(a.device() == q.device() && ((a.dim() == 1 && a.size(0) == heads) ||
                                                   (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads)),
                      "flashattn_ext: alibi_slopes must have shape (num_heads,) = (", heads,
                      ",) or (batch, num_heads) = (", batch, ", ", heads, ") on q's device, got ", a.sizes());
  }
}

// (1, heads, len, dim) view of rows [start, start + len) of a packed (total, heads, dim) tensor.
at::Tensor rows_view(const at::Tensor& x, int64_t start, int64_t len) {
  return x.narrow(0, start, len).transpose(0, 1).unsqueeze(0);
}

void set_strides(const at::Tensor& x4, int64_t& batch_stride, int64_t& head_stride, int64_t& row_stride) {
  batch_stride = x4.stride(0), head_stride = x4.stride(1), row_stride = x4.stride(2);
}

// Everything but the per-sequence pointers and lengths.
AttentionParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o) {
  AttentionParams p;
  p.batch = 1, p.num_heads = q.size(1), p.num_heads_k = k.size(1);
  p.headdim = q.size(2), p.headdim_v = v.size(2);
  p.dtype = kernel_dtype(q.scalar_type());
  p.softmax_scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(p.headdim));
  p.softcap = o.softcap;
  p.window_left = o.window_left, p.window_right = o.window_right;
  p.bottom_right = o.bottom_right;
  p.dropout_p = o.dropout_p;
  return p;
}

// Sequence b's slopes and dropout stream on top of the base.
void set_sequence(AttentionParams& p, const at::Tensor& alibi, int64_t b, uint64_t seed, uint64_t offset) {
  if (alibi.defined()) {
    p.alibi_slopes = alibi.data_ptr<float>() + (alibi.dim() == 2 ? b * alibi.stride(0) : 0);
    p.alibi_batch_stride = 0;
  }
  p.philox_seed = seed;
  p.philox_offset = offset + static_cast<uint64_t>(b);
}

// Runs fn(b) for every sequence: in order, each using every thread; or, with many similar sequences (where
// per-sequence parallel regions would cost more than they share), one sequence per worker, longest
// first, its kernels then running on that worker alone (a kernel inside a parallel region runs inline).
template <typename Fn>
void for_each_sequence(const SeqOffsets& seqs, Fn&& fn) {
  const int64_t batch = seqs.batch();
  const int threads = at::get_num_threads();
  const auto work = [&](int64_t b) { return (seqs.q[b + 1] - seqs.q[b]) * (seqs.k[b + 1] - seqs.k[b]); };
  int64_t total = 0, largest = 0;
  for (int64_t b = 0; b < batch; ++b) total += work(b), largest = std::max(largest, work(b));
  // One per worker only when that balances: many sequences, none above half a worker's share.
  if (threads <= 1 || batch < 4 * threads || largest * 2 * threads > total) {
    for (int64_t b = 0; b < batch; ++b) fn(b);
    return;
  }
  std::vector<int64_t> order(batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return work(x) > work(y); });
  cpu::run_workers(batch, [&](auto next) {
    for (int64_t i; (i = next()) >= 0;) fn(order[i]);
  });
}

at::Tensor alibi_of(const AttentionOptions& o) {
  return o.alibi_slopes && o.alibi_slopes->defined() ? o.alibi_slopes->contiguous() : at::Tensor();
}

// ---- The CUDA kernels (a GPU, or the host emulator): one launch over every sequence; each CTA
// reads its sequence's rows from cu_seqlens (select_sequence in attention_params.h).

at::Tensor last_dim_contiguous(const at::Tensor& x) { return x.size(-1) > 1 && x.stride(-1) != 1 ? x.contiguous() : x; }

// Packed (total, heads, dim) strides: no batch stride (sequences are rows).
void set_packed_strides(const at::Tensor& x, int64_t& batch_stride, int64_t& head_stride, int64_t& row_stride) {
  batch_stride = 0, head_stride = x.stride(1), row_stride = x.stride(0);
}

// What both directions share: lengths, cu_seqlens, q/k/v, ALiBi; `keep` holds what the pointers point into.
void set_cuda_packed(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const PackedSequences& s, const at::Tensor& alibi, std::vector<at::Tensor>& keep) {
  p.batch = s.cu_q.numel() - 1, p.seqlen_q = s.longest_q, p.seqlen_k = s.longest_k, p.total_q = q.size(0);
  p.total_k = k.size(0);
  const auto on_device = [&](const at::Tensor& t) {  // the kernels read them (host tensors are copied over)
    keep.push_back(t.to(q.device(), at::kInt).contiguous());
    return keep.back().data_ptr<int32_t>();
  };
  p.cu_seqlens_q = on_device(s.cu_q);
  p.cu_seqlens_k = on_device(s.cu_k);
  if (s.used_k.defined()) p.seqused_k = on_device(s.used_k);
  p.q = q.data_ptr(), p.k = k.data_ptr(), p.v = v.data_ptr();
  set_packed_strides(q, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
  set_packed_strides(k, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
  set_packed_strides(v, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
  if (alibi.defined()) {
    p.alibi_slopes = alibi.data_ptr<float>();
    p.alibi_batch_stride = alibi.dim() == 2 ? alibi.stride(0) : 0;
  }
}

PackedSequences packed_sequences(const at::Tensor& cu_q, const at::Tensor& cu_k, const SeqOffsets& seqs) {
  PackedSequences s;
  s.cu_q = cu_q, s.cu_k = cu_k, s.longest_q = seqs.longest_q, s.longest_k = seqs.longest_k;
  return s;
}

void cuda_varlen_bwd(const at::Tensor& go, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                     const at::Tensor& out, const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_q,
                     const at::Tensor& cu_k, const SeqOffsets& seqs, const AttentionOptions& o, at::Tensor& dq,
                     at::Tensor& dk, at::Tensor& dv) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  std::vector<at::Tensor> keep;
  AttentionGradParams p;
  static_cast<AttentionParams&>(p) = base_params(q, k, v, o);
  set_cuda_packed(p, q, k, v, packed_sequences(cu_q, cu_k, seqs), alibi_of(o), keep);
  p.deterministic = o.deterministic;
  p.out = out.data_ptr(), p.dout = go.data_ptr();
  set_packed_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  set_packed_strides(go, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
  p.dq = dq.data_ptr(), p.dk = dk.data_ptr(), p.dv = dv.data_ptr();
  set_packed_strides(dq, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
  set_packed_strides(dk, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
  set_packed_strides(dv, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
  const at::Tensor lse_c = lse.contiguous();
  set_lse(p, lse_c);
  if (p.total_q == 0 || p.num_heads == 0 || k.size(0) == 0) {  // nothing attends: the gradients are 0
    dq.zero_(), dk.zero_(), dv.zero_();
    return;
  }
  cuda_kernels_backward(p, q, lse_c, rng_state);
}

}  // namespace

namespace {
// The forward's params of a packed call (pointers into q/k/v, out and lse still unset).
AttentionParams packed_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const PackedSequences& s, const AttentionOptions& o,
                                      std::vector<at::Tensor>& keep) {
  AttentionParams p = base_params(q, k, v, o);
  set_cuda_packed(p, q, k, v, s, alibi_of(o), keep);
  return p;
}
}  // namespace

SplitPlan cuda_packed_plan(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const PackedSequences& s,
                           const AttentionOptions& o, int64_t requested_splits) {
  std::vector<at::Tensor> keep;
  return cuda_kernels_split_plan(packed_forward_params(q, k, v, s, o, keep), q, requested_splits);
}

void cuda_packed_forward(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                         const PackedSequences& s, const AttentionOptions& o, at::Tensor& out, at::Tensor& lse,
                         at::Tensor& rng_state, const PackedCache* cache) {
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  std::vector<at::Tensor> keep;
  AttentionParams p = packed_forward_params(q, k, v, s, o, keep);
  p.out = out.data_ptr();
  set_packed_strides(out, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
  set_lse(p, lse);
  if (p.total_q == 0 || p.num_heads == 0 || p.batch == 0) return;
  at::Tensor partial_out, partial_lse;
  if (cache != nullptr) {
    if (cache->block_table.defined()) {
      keep.push_back(cache->block_table.to(q.device(), at::kInt).contiguous());
      p.block_table = keep.back().data_ptr<int32_t>();
      p.block_table_batch_stride = keep.back().stride(0);
      p.page_block_size = cache->page_block_size;
      p.k_batch_stride = cache->k_page_stride, p.v_batch_stride = cache->v_page_stride;
    }
    const SplitPlan plan = cuda_kernels_split_plan(p, q, cache->num_splits);
    TORCH_CHECK(!cache->block_table.defined() || (plan.page_multiple > 0 && cache->page_block_size % plan.page_multiple == 0),
                "flashattn_ext: internal: a paged cache the CUDA kernels cannot read in place");
    if (plan.num_splits > 1) {
      const int64_t rows = plan.num_splits * row_array_rows(p);
      partial_lse = at::empty({rows}, q.options().dtype(at::kFloat));
      partial_out = at::empty({rows, p.headdim_v}, q.options().dtype(at::kFloat));
      p.num_splits = plan.num_splits;
      p.partial_lse = partial_lse.data_ptr<float>(), p.partial_out = partial_out.data_ptr<float>();
      poison({partial_lse, partial_out});  // scratch: every element is written before the combine reads it
    }
  }
  cuda_kernels_forward(p, q, lse, rng_state);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                          const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                          int64_t max_k, const AttentionOptions& o) {
  SeqOffsets seqs;
  check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, o, seqs);
  const int64_t heads = q.size(1), total_q = q.size(0);
  at::Tensor out = at::empty({total_q, heads, v.size(2)}, q.options());
  at::Tensor lse = at::empty({heads, total_q}, q.options().dtype(lse_dtype(q)));
  at::Tensor rng_state = at::zeros({2}, q.options().dtype(at::kLong));
  poison({out, lse});
  if (runs_cuda_kernels(q)) {
    cuda_packed_forward(q, k, v, packed_sequences(cu_q, cu_k, seqs), o, out, lse, rng_state);
    return {out, lse, rng_state};
  }
  if (o.dropout_p > 0) {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    rng_state[0] = static_cast<int64_t>(gen->random64());
    rng_state[1] = static_cast<int64_t>(gen->random64());
  }
  const uint64_t seed = static_cast<uint64_t>(rng_state[0].item<int64_t>()),
                 offset = static_cast<uint64_t>(rng_state[1].item<int64_t>());
  const at::Tensor alibi = alibi_of(o);
  const AttentionParams base = base_params(q, k, v, o);
  // The kernels write lse (1, heads, len) contiguous per sequence: sequence b's block starts at heads * start.
  at::Tensor lse_blocks = at::empty({heads * total_q}, lse.options());
  for_each_sequence(seqs, [&](int64_t b) {
    const int64_t sq = seqs.q[b], lq = seqs.q[b + 1] - sq, sk = seqs.k[b], lk = seqs.k[b + 1] - sk;
    if (lq == 0) return;
    if (lk == 0) {  // no key: out = 0, lse = -inf
      out.narrow(0, sq, lq).zero_();
      lse.narrow(1, sq, lq).fill_(-std::numeric_limits<double>::infinity());
      return;
    }
    AttentionParams p = base;
    set_sequence(p, alibi, b, seed, offset);
    const at::Tensor q4 = rows_view(q, sq, lq), k4 = rows_view(k, sk, lk), v4 = rows_view(v, sk, lk),
                     o4 = rows_view(out, sq, lq);
    p.q = q4.data_ptr(), p.k = k4.data_ptr(), p.v = v4.data_ptr(), p.out = o4.data_ptr();
    set_strides(q4, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
    set_strides(k4, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
    set_strides(v4, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
    set_strides(o4, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
    p.seqlen_q = lq, p.seqlen_k = lk;
    at::Tensor block = lse_blocks.narrow(0, heads * sq, heads * lq);
    set_lse(p, block);
    cpu::forward(p);
    lse.narrow(1, sq, lq).copy_(block.view({heads, lq}));
  });
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                          const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                                          const at::Tensor& lse, const at::Tensor& rng_state,
                                                          const at::Tensor& cu_q, const at::Tensor& cu_k, int64_t max_q,
                                                          int64_t max_k, const AttentionOptions& o) {
  SeqOffsets seqs;
  check_varlen(q, k, v, cu_q, cu_k, max_q, max_k, o, seqs);
  const int64_t heads = q.size(1), total_q = q.size(0);
  const std::vector<int64_t> out_shape = {total_q, heads, v.size(2)};
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == at::IntArrayRef(out_shape),
                    "flashattn_ext: grad_out and out must have shape ", at::IntArrayRef(out_shape), ", got grad_out ",
                    grad_out.sizes(), " and out ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "flashattn_ext: grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(q) && lse.dim() == 2 && lse.size(0) == heads && lse.size(1) == total_q,
                    "flashattn_ext: lse must be ", lse_dtype(q), " of shape (heads, total_q) = (", heads, ", ", total_q,
                    "), got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong,
                    "flashattn_ext: rng_state must be the int64 (seed, offset) pair the forward returned");
  const at::Tensor go = last_dim_contiguous(grad_out), oc = last_dim_contiguous(out);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(k.sizes(), k.options()),
             dv = at::empty(v.sizes(), v.options());
  poison({dq, dk, dv});
  if (runs_cuda_kernels(q)) {
    cuda_varlen_bwd(go, q, k, v, oc, lse, rng_state, cu_q, cu_k, seqs, o, dq, dk, dv);
    return {dq, dk, dv};
  }
  const at::Tensor rng = rng_state.cpu();
  const uint64_t seed = static_cast<uint64_t>(rng[0].item<int64_t>()),
                 offset = static_cast<uint64_t>(rng[1].item<int64_t>());
  const at::Tensor alibi = alibi_of(o);
  AttentionGradParams base;
  static_cast<AttentionParams&>(base) = base_params(q, k, v, o);
  base.deterministic = o.deterministic;
  for_each_sequence(seqs, [&](int64_t b) {
    const int64_t sq = seqs.q[b], lq = seqs.q[b + 1] - sq, sk = seqs.k[b], lk = seqs.k[b + 1] - sk;
    if (lq == 0 || lk == 0) {  // nothing attends: the gradients of these rows are 0
      dq.narrow(0, sq, lq).zero_();
      dk.narrow(0, sk, lk).zero_();
      dv.narrow(0, sk, lk).zero_();
      return;
    }
    AttentionGradParams p = base;
    set_sequence(p, alibi, b, seed, offset);
    const at::Tensor q4 = rows_view(q, sq, lq), k4 = rows_view(k, sk, lk), v4 = rows_view(v, sk, lk),
                     o4 = rows_view(oc, sq, lq), do4 = rows_view(go, sq, lq), dq4 = rows_view(dq, sq, lq),
                     dk4 = rows_view(dk, sk, lk), dv4 = rows_view(dv, sk, lk);
    p.q = q4.data_ptr(), p.k = k4.data_ptr(), p.v = v4.data_ptr(), p.out = o4.data_ptr(), p.dout = do4.data_ptr();
    p.dq = dq4.data_ptr(), p.dk = dk4.data_ptr(), p.dv = dv4.data_ptr();
    set_strides(q4, p.q_batch_stride, p.q_head_stride, p.q_row_stride);
    set_strides(k4, p.k_batch_stride, p.k_head_stride, p.k_row_stride);
    set_strides(v4, p.v_batch_stride, p.v_head_stride, p.v_row_stride);
    set_strides(o4, p.o_batch_stride, p.o_head_stride, p.o_row_stride);
    set_strides(do4, p.do_batch_stride, p.do_head_stride, p.do_row_stride);
    set_strides(dq4, p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride);
    set_strides(dk4, p.dk_batch_stride, p.dk_head_stride, p.dk_row_stride);
    set_strides(dv4, p.dv_batch_stride, p.dv_head_stride, p.dv_row_stride);
    p.seqlen_q = lq, p.seqlen_k = lk;
    const at::Tensor lse_seq = lse.narrow(1, sq, lq).contiguous();
    set_lse(p, lse_seq);
    run_cpu_backward(p, q.options());
  });
  return {dq, dk, dv};
}

namespace {

using VarlenFwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k FLASHATTN_OPTIONS_TYPES);
using VarlenBwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k FLASHATTN_OPTIONS_TYPES);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k FLASHATTN_OPTIONS_PARAMS) {
  return varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, FLASHATTN_OPTIONS_FROM_PARAMS());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k FLASHATTN_OPTIONS_PARAMS) {
  return varlen_bwd(grad_out, q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    FLASHATTN_OPTIONS_FROM_PARAMS());
}

static_assert(std::is_same_v<decltype(varlen_fwd_op), VarlenFwdSignature>);
static_assert(std::is_same_v<decltype(varlen_bwd_op), VarlenBwdSignature>);

// ---- autograd: forward saves (q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k), the
// tensor options and, as one unit, the other options with the two max_seqlens.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct VarlenSaved : torch::CustomClassHolder {
  VarlenSaved(const AttentionValues& v, int64_t mq, int64_t mk) : values(v), max_q(mq), max_k(mk) {}
  AttentionValues values;
  int64_t max_q, max_k;
};
constexpr size_t kVarlenSaved = 8;
constexpr size_t kVarlenInputs = 5 + AttentionOptions::kTensorCount + 1;  // q, k, v, cu_q, cu_k, options..., unit

class VarlenFunction : public torch::autograd::Function<VarlenFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_q, const at::Tensor& cu_k FLASHATTN_TENSOR_OPTIONS_PARAMS,
                               const AttentionOptions& options, int64_t max_q, int64_t max_k) {
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("flashattn_ext::varlen_fwd", "").typed<VarlenFwdSignature>();
    auto [out, lse, rng_state] = op.call(q, k, v, cu_q, cu_k, max_q, max_k FLASHATTN_OPTIONS_FIELDS);
    std::vector<at::Tensor> saved = {q, k, v, out, lse, rng_state, cu_q, cu_k};
    for (const at::Tensor& t : options.tensors()) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->saved_data["values"] = c10::IValue::make_capsule(
        c10::make_intrusive<VarlenSaved>(static_cast<const AttentionValues&>(options), max_q, max_k));
    ctx->mark_non_differentiable({lse, rng_state});
    return {out, lse, rng_state};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto* unit = static_cast<const VarlenSaved*>(ctx->saved_data["values"].toCapsule().get());
    AttentionOptions options;
    static_cast<AttentionValues&>(options) = unit->values;
    options.set_tensors(saved, kVarlenSaved);
    options.deterministic = options.deterministic || at::globalContext().deterministicAlgorithms();
    at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(saved[3]);
    static auto op =
        c10::Dispatcher::singleton().findSchemaOrThrow("flashattn_ext::varlen_bwd", "").typed<VarlenBwdSignature>();
    auto [dq, dk, dv] = op.call(grad_out, saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6],
                                saved[7], unit->max_q, unit->max_k FLASHATTN_OPTIONS_FIELDS);
    variable_list grad_inputs(kVarlenInputs + 2);
    grad_inputs[0] = dq, grad_inputs[1] = dk, grad_inputs[2] = dv;
    return grad_inputs;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_fwd_autograd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k FLASHATTN_OPTIONS_PARAMS) {
  auto outs = VarlenFunction::apply(q, k, v, cu_seqlens_q, cu_seqlens_k FLASHATTN_TENSOR_OPTIONS_ARGS,
                                    FLASHATTN_OPTIONS_FROM_PARAMS(), max_seqlen_q, max_seqlen_k);
  return {outs[0], outs[1], outs[2]};
}
static_assert(std::is_same_v<decltype(varlen_fwd_autograd), VarlenFwdSignature>);

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_bwd_autograd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k FLASHATTN_OPTIONS_PARAMS) {
  // First-order only: the gradients it returns are not differentiable again.
  at::AutoDispatchBelowADInplaceOrView guard;
  return varlen_bwd(grad_out, q, k, v, out, lse, rng_state, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    FLASHATTN_OPTIONS_FROM_PARAMS());
}

// flash_attn_varlen_func's block_table: the key rows of a paged K or V cache (num_blocks,
// page_block_size, heads_k, dim) in packed order, (total_k, heads_k, dim): sequence b's rows
// [cu_seqlens_k[b], cu_seqlens_k[b + 1]) are its positions 0 .. len - 1, position t in page
// block_table[b][t / page_block_size], row t % page_block_size. A gather (index_select: autograd
// reaches the pages); the varlen op then runs on the packed rows. `name` is the argument (k / v).
at::Tensor varlen_paged_rows(const at::Tensor& cache, const at::Tensor& block_table, const at::Tensor& cu_k,
                             c10::string_view name) {
  const std::string arg(name);
  TORCH_CHECK_VALUE(cache.dim() == 4, "flashattn_ext: with block_table, ", arg,
                    " must be a paged cache (num_blocks, page_block_size, heads_k, headdim), got ", cache.sizes());
  TORCH_CHECK_VALUE(cu_k.defined() && cu_k.device() == cache.device(), "flashattn_ext: cu_seqlens_k must be on ", arg,
                    "'s device (", cache.device(), ")");
  const std::vector<int64_t> offs = read_cu_seqlens(cu_k, "cu_seqlens_k", -1, std::numeric_limits<int64_t>::max(),
                                                    "max_seqlen_k", arg.c_str());
  const int64_t batch = static_cast<int64_t>(offs.size()) - 1, page = cache.size(1);
  const at::Tensor table = checked_block_table(block_table, batch, cache.size(0), arg.c_str(), cache);
  TORCH_CHECK_VALUE(page >= 1, "flashattn_ext: ", arg, " has pages of 0 rows");
  const int32_t* t = table.data_ptr<int32_t>();
  at::Tensor rows = at::empty({offs.back()}, at::kLong);
  int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t len = offs[b + 1] - offs[b];
    TORCH_CHECK_VALUE(len <= table.size(1) * page, "flashattn_ext: sequence ", b, " of cu_seqlens_k has ", len,
                      " keys, more than block_table's ", table.size(1), " pages of ", page, " rows hold");
    for (int64_t pos = 0; pos < len; ++pos) r[offs[b] + pos] = t[b * table.size(1) + pos / page] * page + pos % page;
  }
  return cache.flatten(0, 1).index_select(0, rows.to(cache.device()));
}

}  // namespace
}  // namespace flashattn

TORCH_LIBRARY_FRAGMENT(flashattn_ext, m) {
  m.def("varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k" FLASHATTN_OPTIONS_SCHEMA ") -> (Tensor out, Tensor lse, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  m.def("varlen_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor rng_state, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k" FLASHATTN_OPTIONS_SCHEMA
        ") -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("varlen_paged_rows(Tensor cache, Tensor block_table, Tensor cu_seqlens_k, str name) -> Tensor");
}

// Composite (at:: ops only): autograd and every backend come with it.
TORCH_LIBRARY_IMPL(flashattn_ext, CompositeImplicitAutograd, m) {
  m.impl("varlen_paged_rows", &flashattn::varlen_paged_rows);
}

TORCH_LIBRARY_IMPL(flashattn_ext, CPU, m) {
  m.impl("varlen_fwd", &flashattn::varlen_fwd_op);
  m.impl("varlen_bwd", &flashattn::varlen_bwd_op);
}

#ifdef FLASHATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) {
  m.impl("varlen_fwd", &flashattn::varlen_fwd_op);
  m.impl("varlen_bwd", &flashattn::varlen_bwd_op);
}
#endif

TORCH_LIBRARY_IMPL(flashattn_ext, Autograd, m) {
  m.impl("varlen_fwd", &flashattn::varlen_fwd_autograd);
  m.impl("varlen_bwd", &flashattn::varlen_bwd_autograd);
}
