// Dispatcher ops: schemas, input checks (once, with messages that name the argument), and the
// translation of tensors into AttentionParams for the CPU and CUDA kernels.

#include "ops.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <sstream>
#include <vector>

#include "cpu/kernels.h"

namespace flashattn {

bool runs_cuda_kernels(const at::Tensor& q) { return q.is_cuda() || emulating_cuda(); }

void set_lse(AttentionParams& p, const at::Tensor& lse) {
  if (lse.scalar_type() == at::kDouble)
    p.lse64 = lse.data_ptr<double>();
  else
    p.lse = lse.data_ptr<float>();
}

namespace {

std::atomic<bool> g_poison{false};

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << (s.size() == 1 ? ",)" : ")");
  return os.str();
}

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: return DType::kFloat32;
  }
}

MaskKind mask_kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBool: return MaskKind::kBool;
    case at::kFloat: return MaskKind::kFloat32;
    case at::kDouble: return MaskKind::kFloat64;
    case at::kHalf: return MaskKind::kFloat16;
    case at::kBFloat16: return MaskKind::kBFloat16;
    default: return MaskKind::kNone;
  }
}

// The attention shape (..., Hq, L, S) that masks broadcast to.
std::vector<int64_t> score_shape(const at::Tensor& q, const at::Tensor& k) {
  std::vector<int64_t> s(q.sizes().begin(), q.sizes().end());
  s.back() = k.size(-2);
  return s;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o) {
  TORCH_CHECK_VALUE(q.defined() && k.defined() && v.defined(), "flashattn_ext: query, key and value must be tensors");
  const auto t = q.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "flashattn_ext: query must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK_TYPE(k.scalar_type() == t && v.scalar_type() == t,
                   "flashattn_ext: query, key and value must have the same dtype, got query ", t, ", key ",
                   k.scalar_type(), ", value ", v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(),
                    "flashattn_ext: query, key and value must be on the same device, got query on ", q.device(),
                    ", key on ", k.device(), ", value on ", v.device());
  TORCH_CHECK_VALUE(q.device().is_cpu() || q.device().is_cuda(),
                    "flashattn_ext: tensors must be on CPU or CUDA, got ", q.device());
  TORCH_CHECK_VALUE(q.dim() >= 2 && k.dim() >= 2 && v.dim() >= 2,
                    "flashattn_ext: query, key and value must have at least 2 dims (..., seq_len, head_dim), got "
                    "query ", shape_str(q.sizes()), ", key ", shape_str(k.sizes()), ", value ", shape_str(v.sizes()));
  TORCH_CHECK_VALUE(q.dim() == k.dim() && q.dim() == v.dim(),
                    "flashattn_ext: query, key and value must have the same number of dims, got query ",
                    shape_str(q.sizes()), ", key ", shape_str(k.sizes()), ", value ", shape_str(v.sizes()));
  const int64_t r = q.dim();
  for (int64_t d = 0; d + 3 < r; ++d) {
    TORCH_CHECK_VALUE(k.size(d) == q.size(d) && v.size(d) == q.size(d),
                      "flashattn_ext: query, key and value must have the same batch dims, got query ",
                      shape_str(q.sizes()), ", key ", shape_str(k.sizes()), ", value ", shape_str(v.sizes()),
                      " (dim ", d, ")");
  }
  if (r >= 3) {
    TORCH_CHECK_VALUE(k.size(-3) == v.size(-3), "flashattn_ext: key and value must have the same number of heads, got key ",
                      k.size(-3), " and value ", v.size(-3));
    TORCH_CHECK_VALUE(k.size(-3) > 0 ? q.size(-3) % k.size(-3) == 0 : q.size(-3) == 0,
                      "flashattn_ext: the number of query heads (", q.size(-3),
                      ") must be a multiple of the number of key/value heads (", k.size(-3), ")");
  }
  TORCH_CHECK_VALUE(k.size(-2) == v.size(-2), "flashattn_ext: key and value must have the same sequence length, got key ",
                    k.size(-2), " and value ", v.size(-2));
  TORCH_CHECK_VALUE(q.size(-1) == k.size(-1), "flashattn_ext: query and key must have the same head dim, got query ",
                    q.size(-1), " and key ", k.size(-1));
  TORCH_CHECK_VALUE(!runs_cuda_kernels(q) || (q.size(-1) <= kCudaMaxHeadDim && v.size(-1) <= kCudaMaxHeadDim),
                    "flashattn_ext: head dims above ", kCudaMaxHeadDim, " are not supported on CUDA, got query ",
                    q.size(-1), " and value ", v.size(-1), " (CPU takes any head dim)");
  TORCH_CHECK_VALUE(o.dropout_p >= 0.0 && o.dropout_p <= 1.0,
                    "flashattn_ext: dropout_p must be between 0 and 1, got ", o.dropout_p);
  TORCH_CHECK_VALUE(o.softcap >= 0.0 && std::isfinite(o.softcap),
                    "flashattn_ext: softcap must be a finite number >= 0 (0 turns it off), got ", o.softcap);
  TORCH_CHECK_VALUE(o.window_left >= -1 && o.window_right >= -1,
                    "flashattn_ext: window sizes must be >= -1 (-1 = unbounded), got (", o.window_left, ", ",
                    o.window_right, ")");
  if (o.scale) {
    TORCH_CHECK_VALUE(std::isfinite(*o.scale), "flashattn_ext: scale must be finite, got ", *o.scale);
  }

  const auto scores = score_shape(q, k);
  if (o.attn_mask && o.attn_mask->defined()) {
    const at::Tensor& m = *o.attn_mask;
    const auto mt = m.scalar_type();
    TORCH_CHECK_TYPE(mt == at::kBool || mt == at::kFloat || mt == t,
                     "flashattn_ext: attn_mask must be bool, float32 or the query's dtype (", t, "), got ", mt);
    TORCH_CHECK_VALUE(m.device() == q.device(), "flashattn_ext: attn_mask must be on the query's device (",
                      q.device(), "), got ", m.device());
    bool ok = m.dim() <= static_cast<int64_t>(scores.size());
    for (int64_t d = 1; ok && d <= m.dim(); ++d) {
      const int64_t ms = m.size(-d), ts = scores[scores.size() - d];
      ok = ms == ts || ms == 1;
    }
    TORCH_CHECK_VALUE(ok, "flashattn_ext: attn_mask of shape ", shape_str(m.sizes()),
                      " does not broadcast to the attention scores' shape ", shape_str(scores),
                      " (batch..., heads, query_len, key_len)");
  }
  if (o.alibi_slopes && o.alibi_slopes->defined()) {
    const at::Tensor& a = *o.alibi_slopes;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "flashattn_ext: alibi_slopes must be float32, got ",
                     a.scalar_type());
    TORCH_CHECK_VALUE(a.device() == q.device(), "flashattn_ext: alibi_slopes must be on the query's device (",
                      q.device(), "), got ", a.device());
    const int64_t heads = r >= 3 ? q.size(-3) : 1;
    int64_t batch = 1;
    for (int64_t d = 0; d + 3 < r; ++d) batch *= q.size(d);
    const bool ok = (a.dim() == 1 && a.size(0) == heads) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == heads);
    TORCH_CHECK_VALUE(ok, "flashattn_ext: alibi_slopes must have shape (num_heads,) = (", heads,
                      ",) or (batch, num_heads) = (", batch, ", ", heads, "), got ", shape_str(a.sizes()));
  }
  if (o.block_mask && o.block_mask->defined()) {
    const at::Tensor& bm = *o.block_mask;
    const auto bt = bm.scalar_type();
    TORCH_CHECK_TYPE(bt == at::kBool || bt == at::kByte || bt == at::kInt,
                     "flashattn_ext: block_mask must be bool (kept blocks) or int32 (-1 empty, -2 full, e >= 0 "
                     "partial with element mask e), got ", bt);
    TORCH_CHECK_VALUE(bm.device() == q.device(), "flashattn_ext: block_mask must be on the query's device (",
                      q.device(), "), got ", bm.device());
    TORCH_CHECK_VALUE(o.sparse_block_m > 0 && o.sparse_block_n > 0,
                      "flashattn_ext: block sizes must be positive, got (", o.sparse_block_m, ", ", o.sparse_block_n,
                      ")");
    std::vector<int64_t> blocks(scores);
    blocks[blocks.size() - 2] = (q.size(-2) + o.sparse_block_m - 1) / o.sparse_block_m;
    blocks.back() = (k.size(-2) + o.sparse_block_n - 1) / o.sparse_block_n;
    bool ok = bm.dim() <= static_cast<int64_t>(blocks.size()) && bm.dim() >= 2;
    for (int64_t d = 1; ok && d <= bm.dim(); ++d) {
      const int64_t s = bm.size(-d), want = blocks[blocks.size() - d];
      ok = s == want || (d > 2 && s == 1);
    }
    TORCH_CHECK_VALUE(ok, "flashattn_ext: block_mask of shape ", shape_str(bm.sizes()),
                      " must broadcast to (batch..., heads, ceil(L / block_m), ceil(S / block_n)) = ",
                      shape_str(blocks), " with block sizes (", o.sparse_block_m, ", ", o.sparse_block_n, ")");
    const bool has_elem = o.block_elem_masks && o.block_elem_masks->defined();
    TORCH_CHECK_VALUE(!has_elem || bt == at::kInt,
                      "flashattn_ext: block_elem_masks needs an int32 block_mask that indexes it");
    if (has_elem) {
      const at::Tensor& em = *o.block_elem_masks;
      TORCH_CHECK_TYPE(em.scalar_type() == at::kBool || em.scalar_type() == at::kByte,
                       "flashattn_ext: block_elem_masks must be bool, got ", em.scalar_type());
      TORCH_CHECK_VALUE(em.device() == q.device() && em.dim() == 3 && em.size(1) == o.sparse_block_m &&
                            em.size(2) == o.sparse_block_n,
                        "flashattn_ext: block_elem_masks must be a (num_masks, ", o.sparse_block_m, ", ",
                        o.sparse_block_n, ") tensor on the query's device, got ", shape_str(em.sizes()), " on ",
                        em.device());
    }
    if (bt == at::kInt && bm.numel() > 0) {
      const int64_t num_masks = has_elem ? o.block_elem_masks->size(0) : 0;
      const auto [lo, hi] = block_mask_range(bm);
      TORCH_CHECK_VALUE(lo >= -2 && hi < num_masks,
                        "flashattn_ext: int32 block_mask entries must be -1 (empty), -2 (full) or an index into "
                        "block_elem_masks (", num_masks, " masks), got values in [", lo, ", ", hi, "]");
    }
  }
}

// (batch, heads, rows, cols) view of a (..., heads, rows, cols) tensor with a contiguous last dim.
at::Tensor as_4d(const at::Tensor& x) {
  at::Tensor y = x;
  while (y.dim() < 4) y = y.unsqueeze(0);
  if (y.dim() > 4) y = y.flatten(0, y.dim() - 4);
  if (y.size(-1) > 1 && y.stride(-1) != 1) y = y.contiguous();
  return y;
}

// A broadcast view's leading (batch) dims folded into at most two (outer, inner) levels, so the
// kernels read it through strides without a copy. nullopt if the strides do not allow it.
struct BatchStrides {
  int64_t inner = 1, inner_stride = 0, outer_stride = 0;
};

std::optional<BatchStrides> fold_batch(const at::Tensor& expanded) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), merged where strides allow
  for (int64_t d = 0; d + 3 < expanded.dim(); ++d) {
    const int64_t size = expanded.size(d), stride = expanded.stride(d);
    if (size == 1) continue;
    if (!dims.empty() && dims.back().second == stride * size)
      dims.back() = {dims.back().first * size, stride};
    else
      dims.emplace_back(size, stride);
  }
  if (dims.size() > 2) return std::nullopt;
  BatchStrides b;
  if (!dims.empty()) b.inner = dims.back().first, b.inner_stride = dims.back().second;
  if (dims.size() == 2) b.outer_stride = dims[0].second;
  return b;
}

// The shape of `expanded` with its trailing (heads, rows, cols) broadcasts undone: materializing
// this copies only the batch broadcast.
std::vector<int64_t> batch_materialized_shape(const at::Tensor& expanded) {
  std::vector<int64_t> shape(expanded.sizes().begin(), expanded.sizes().end());
  for (int64_t d = expanded.dim() - 3; d < expanded.dim(); ++d)
    if (expanded.stride(d) == 0) shape[d] = 1;
  return shape;
}

// (..., H, L, S) view of a mask (rank >= 3) with its batch folded: a copy of the batch dims only
// when the strides cannot be folded.
at::Tensor folded_view(at::Tensor expanded) {
  if (fold_batch(expanded)) return expanded;
  const auto full = expanded.sizes().vec();
  at::Tensor compact = at::empty(batch_materialized_shape(expanded), expanded.options());
  compact.copy_(expanded.as_strided(compact.sizes(), expanded.strides()));
  return compact.expand(full);
}

at::Tensor scores_view(const at::Tensor& mask, const at::Tensor& q, const at::Tensor& k) {
  at::Tensor m = mask.expand(score_shape(q, k));
  while (m.dim() < 3) m = m.unsqueeze(0);
  return m;
}

// The kernels' view of a (..., H, L, S) tensor whose batch dims fold.
BroadcastView broadcast_view(const at::Tensor& m) {
  const BatchStrides b = *fold_batch(m);
  BroadcastView view;
  view.batch_inner = b.inner;
  view.batch_stride = b.inner_stride;
  view.batch_outer_stride = b.outer_stride;
  view.head_stride = m.stride(-3);
  view.row_stride = m.stride(-2);
  view.col_stride = m.stride(-1);
  return view;
}

void fill_mask(AttentionParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& mask,
               at::Tensor& keep_alive) {
  const at::Tensor m = folded_view(scores_view(mask, q, k));
  keep_alive = m;
  p.mask = m.data_ptr();
  p.mask_kind = mask_kind_of(m.scalar_type());
  p.mask_view = broadcast_view(m);
}

// Everything but the pointers to outputs; keep_alive holds tensors the params point into.
AttentionParams make_params(const at::Tensor& q4, const at::Tensor& k4, const at::Tensor& v4, const at::Tensor& q,
                            const at::Tensor& k, const AttentionOptions& o, std::vector<at::Tensor>& keep_alive) {
  AttentionParams p;
  p.q = q4.data_ptr();
  p.k = k4.data_ptr();
  p.v = v4.data_ptr();
  p.q_batch_stride = q4.stride(0), p.q_head_stride = q4.stride(1), p.q_row_stride = q4.stride(2);
  p.k_batch_stride = k4.stride(0), p.k_head_stride = k4.stride(1), p.k_row_stride = k4.stride(2);
  p.v_batch_stride = v4.stride(0), p.v_head_stride = v4.stride(1), p.v_row_stride = v4.stride(2);
  p.batch = q4.size(0), p.num_heads = q4.size(1), p.num_heads_k = k4.size(1);
  p.seqlen_q = q4.size(2), p.seqlen_k = k4.size(2);
  p.headdim = q4.size(3), p.headdim_v = v4.size(3);
  p.dtype = dtype_of(q.scalar_type());
  p.softmax_scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(p.headdim));
  p.softcap = o.softcap;
  // A window reaching past every key is unbounded: clamping it keeps i + diag ± window (band
  // arithmetic in the kernels) far from int64 overflow for windows like sys.maxsize.
  const int64_t unbounded_from = p.seqlen_q + p.seqlen_k;
  p.window_left = o.window_left >= unbounded_from ? -1 : o.window_left;
  p.window_right = o.window_right >= unbounded_from ? -1 : o.window_right;
  p.bottom_right = o.bottom_right;
  p.deterministic = o.deterministic;
  p.dropout_p = o.dropout_p;
  if (o.attn_mask && o.attn_mask->defined()) {
    keep_alive.emplace_back();
    fill_mask(p, q, k, *o.attn_mask, keep_alive.back());
  }
  if (o.alibi_slopes && o.alibi_slopes->defined()) {
    at::Tensor a = o.alibi_slopes->contiguous();
    keep_alive.push_back(a);
    p.alibi_slopes = a.data_ptr<float>();
    p.alibi_batch_stride = a.dim() == 2 ? a.stride(0) : 0;
  }
  if (o.block_mask && o.block_mask->defined()) {
    std::vector<int64_t> blocks = {p.batch, p.num_heads, (p.seqlen_q + o.sparse_block_m - 1) / o.sparse_block_m,
                                   (p.seqlen_k + o.sparse_block_n - 1) / o.sparse_block_n};
    // The block mask is tiny: fold its batch dims with a reshape (a copy at worst).
    std::vector<int64_t> full(q.sizes().begin(), q.sizes().end());
    full[full.size() - 2] = blocks[2];
    full.back() = blocks[3];
    at::Tensor bm = o.block_mask->expand(full);
    while (bm.dim() < 4) bm = bm.unsqueeze(0);
    bm = bm.reshape({-1, bm.size(-3), bm.size(-2), bm.size(-1)}).expand(blocks);
    if (bm.scalar_type() == at::kInt) {
      // int32 form: -1 empty, -2 full, e >= 0 partial with element mask e.
      at::Tensor index = bm.contiguous();
      keep_alive.push_back(index);
      p.block_elem_index = index.data_ptr<int32_t>();
      bm = index.ne(-1).view(at::kByte);
      if (o.block_elem_masks && o.block_elem_masks->defined()) {
        at::Tensor em = o.block_elem_masks->contiguous();
        if (em.scalar_type() == at::kBool) em = em.view(at::kByte);
        keep_alive.push_back(em);
        p.block_elem_masks = em.data_ptr<uint8_t>();
      } else {
        p.block_elem_index = nullptr;  // no element masks: every kept block is full
      }
    } else if (bm.scalar_type() == at::kBool) {
      bm = bm.view(at::kByte);
    }
    keep_alive.push_back(bm);
    p.block_mask = bm.data_ptr<uint8_t>();
    p.block_sparse_m = o.sparse_block_m;
    p.block_sparse_n = o.sparse_block_n;
    p.block_mask_batch_stride = bm.stride(0);
    p.block_mask_head_stride = bm.stride(1);
    p.block_mask_row_stride = bm.stride(2);
    p.block_mask_col_stride = bm.stride(3);
  }
  return p;
}

// Output O: follows q's memory layout when q is a (B, S, H, D) tensor seen as (B, H, S, D), so
// flash-attn-layout callers get a contiguous (B, S, H, Dv) result without a copy.
at::Tensor allocate_out(const at::Tensor& q, int64_t headdim_v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = headdim_v;
  if (q.dim() == 4 && q.size(1) > 1 && q.size(2) > 1 && q.stride(1) < q.stride(2))
    return at::empty({shape[0], shape[2], shape[1], shape[3]}, q.options()).transpose(1, 2);
  return at::empty(shape, q.options());
}

// A gradient laid out like its input when that keeps the last dim contiguous.
at::Tensor allocate_grad(const at::Tensor& x) {
  at::Tensor g = at::empty_like(x);
  if (g.size(-1) > 1 && g.stride(-1) != 1) g = at::empty(x.sizes(), x.options());
  return g;
}



void draw_cpu_philox(AttentionParams& p, at::Tensor& rng_state) {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(std::nullopt, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  p.philox_seed = gen->random64();
  p.philox_offset = gen->random64();
  rng_state[0] = static_cast<int64_t>(p.philox_seed);
  rng_state[1] = static_cast<int64_t>(p.philox_offset);
}

void read_philox(AttentionParams& p, const at::Tensor& rng_state) {
  const at::Tensor s = rng_state.cpu();
  p.philox_seed = static_cast<uint64_t>(s[0].item<int64_t>());
  p.philox_offset = static_cast<uint64_t>(s[1].item<int64_t>());
}

}  // namespace

void check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionOptions& o) {
  check_inputs(q, k, v, o);
}
DType kernel_dtype(at::ScalarType t) { return dtype_of(t); }

void run_cpu_backward(AttentionGradParams& p, const at::TensorOptions& q_options) {
  const int64_t accum = cpu::backward_dq_accum_elems(p);
  at::Tensor dq_accum;  // the dQ partial sums of the key chunks, in the accumulation type
  if (accum > 0) {
    dq_accum = at::empty({accum}, q_options.dtype(p.dtype == DType::kFloat64 ? at::kDouble : at::kFloat));
    p.dq_accum = static_cast<float*>(dq_accum.data_ptr());
  }
  cpu::backward(p);
}

namespace {

// The values of an int32 block_mask read once per tensor version: reading them is a device sync on
// CUDA (and illegal under graph capture), so BlockSparseMask reads its blocks when it is made
// (flashattn_ext._C.block_mask_range) and every later call with that tensor, unmodified, finds the
// range here. Weak references: a freed tensor's entry can never match a new one; bounded.
struct KnownRange {
  c10::weak_intrusive_ptr<c10::TensorImpl> impl;
  uint32_t version;
  std::pair<int64_t, int64_t> range;
};
constexpr size_t kKnownRanges = 64;
std::mutex g_known_mutex;
std::vector<KnownRange> g_known;

}  // namespace

std::pair<int64_t, int64_t> block_mask_range(const at::Tensor& bm) {
  const bool tracked = !bm.is_inference();  // inference tensors have no version counter
  if (tracked) {
    const uint32_t version = bm.unsafeGetTensorImpl()->version_counter().current_version();
    std::lock_guard<std::mutex> lock(g_known_mutex);
    for (const KnownRange& e : g_known) {
      auto impl = e.impl.lock();
      if (impl.get() == bm.unsafeGetTensorImpl() && e.version == version) return e.range;
    }
  }
  const auto [lo_t, hi_t] = at::aminmax(bm);
  const std::pair<int64_t, int64_t> range{lo_t.item<int64_t>(), hi_t.item<int64_t>()};
  if (tracked) {
    std::lock_guard<std::mutex> lock(g_known_mutex);
    g_known.erase(std::remove_if(g_known.begin(), g_known.end(), [](const KnownRange& e) { return e.impl.expired(); }),
                  g_known.end());
    if (g_known.size() >= kKnownRanges) g_known.erase(g_known.begin());
    g_known.push_back({c10::weak_intrusive_ptr<c10::TensorImpl>(bm.getIntrusivePtr()),
                       bm.unsafeGetTensorImpl()->version_counter().current_version(), range});
  }
  return range;
}

// The log-sum-exp (and the accumulation type) is float32, or float64 for float64 inputs (so fp64 gradients keep fp64 precision).
at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

void poison(std::initializer_list<at::Tensor> ts) {
  if (!g_poison.load()) return;
  for (const at::Tensor& t : ts)
    if (t.defined() && t.numel() > 0 && t.is_floating_point()) t.fill_(std::numeric_limits<double>::quiet_NaN());
}

void set_poison_outputs(bool on) { g_poison.store(on); }
bool poison_outputs() { return g_poison.load(); }

// Head dim 0, as SDPA: with E == 0 every score is 0 (+ mask/bias), so the output is a softmax-weighted
// mean of V; with Ev == 0 the output is empty (the lse still holds). Both run the kernels on a
// zero-filled head dim of 1, which gives exactly that, and drop it from the results.
at::Tensor zero_width_one(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = 1;
  return at::zeros(shape, x.options());
}

AttentionOptions zero_headdim_options(const at::Tensor& q, const AttentionOptions& o) {
  AttentionOptions o1 = o;
  if (q.size(-1) == 0 && !o.scale) o1.scale = 1.0;  // 1/sqrt(0): any finite scale of a zero score is 0
  return o1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const AttentionOptions& o) {
  check_inputs(q, k, v, o);
  if ((q.size(-1) == 0 || v.size(-1) == 0) && q.numel() + k.numel() + v.numel() > 0) {
    const bool e0 = q.size(-1) == 0, ev0 = v.size(-1) == 0;
    auto [out, lse, rng_state] = attention_fwd(e0 ? zero_width_one(q) : q, e0 ? zero_width_one(k) : k,
                                               ev0 ? zero_width_one(v) : v, zero_headdim_options(q, o));
    if (ev0) out = allocate_out(q, 0);
    return {out, lse, rng_state};
  }
  const at::Tensor q4 = as_4d(q), k4 = as_4d(k), v4 = as_4d(v);
  at::Tensor out = allocate_out(q, v.size(-1));
  at::Tensor lse = at::empty(q.sizes().slice(0, q.dim() - 1), q.options().dtype(lse_dtype(q)));
  at::Tensor rng_state = at::zeros({2}, q.options().dtype(at::kLong));
  poison({out, lse});

  std::vector<at::Tensor> keep_alive;
  AttentionParams p = make_params(q4, k4, v4, q, k, o, keep_alive);
  const at::Tensor out4 = as_4d(out);
  TORCH_INTERNAL_ASSERT(out4.data_ptr() == out.data_ptr() || out.numel() == 0);
  p.out = out4.data_ptr();
  p.o_batch_stride = out4.stride(0), p.o_head_stride = out4.stride(1), p.o_row_stride = out4.stride(2);
  set_lse(p, lse);

  if (p.batch * p.num_heads * p.seqlen_q == 0) return {out, lse, rng_state};
  if (p.seqlen_k == 0) {  // no key at all: SDPA gives zeros
    out.zero_();
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse, rng_state};
  }
  if (!runs_cuda_kernels(q)) {
    if (p.dropout_p > 0) draw_cpu_philox(p, rng_state);
    cpu::forward(p);
    return {out, lse, rng_state};
  }
  cuda_kernels_forward(p, q, lse, rng_state);
  return {out, lse, rng_state};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const AttentionOptions& o, bool mask_grad) {
  check_inputs(q, k, v, o);
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = v.size(-1);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape) && out.sizes() == at::IntArrayRef(out_shape),
                    "flashattn_ext: grad_out and out must have shape ", shape_str(out_shape), ", got grad_out ",
                    shape_str(grad_out.sizes()), " and out ", shape_str(out.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "flashattn_ext: grad_out and out must have the query's dtype ", q.scalar_type(), ", got ",
                   grad_out.scalar_type(), " and ", out.scalar_type());
  TORCH_CHECK_VALUE(lse.scalar_type() == lse_dtype(q) && lse.sizes() == q.sizes().slice(0, q.dim() - 1),
                    "flashattn_ext: lse must be ", lse_dtype(q), " of shape ",
                    shape_str(q.sizes().slice(0, q.dim() - 1)), ", got ", lse.scalar_type(), " ",
                    shape_str(lse.sizes()));
  TORCH_CHECK_VALUE(rng_state.numel() == 2 && rng_state.scalar_type() == at::kLong,
                    "flashattn_ext: rng_state must be the int64 (seed, offset) pair the forward returned");
  const bool has_mask = o.attn_mask && o.attn_mask->defined();
  TORCH_CHECK_VALUE(!mask_grad || (has_mask && o.attn_mask->is_floating_point()),
                    "flashattn_ext: mask_grad needs a floating-point attn_mask");

  if (q.size(-1) == 0 && v.size(-1) > 0 && q.size(-2) > 0 && k.size(-2) > 0 && out.numel() > 0) {
    // See attention_fwd: the same zero-filled head dim of 1; dq and dk are empty.
    auto [dq1, dk1, dv, dmask] = attention_bwd(grad_out, zero_width_one(q), zero_width_one(k), v, out, lse,
                                               rng_state, zero_headdim_options(q, o), mask_grad);
    return {allocate_grad(q), allocate_grad(k), dv, dmask};
  }
  at::Tensor dq = allocate_grad(q), dk = allocate_grad(k), dv = allocate_grad(v);
  const bool cuda_kernels = runs_cuda_kernels(q);
  // dmask accumulates in float32, or in float64 for a float64 mask (whose query is float64 too:
  // the CPU kernels, or the CUDA kernels' SIMT path).
  const bool dmask_f64 = mask_grad && o.attn_mask->scalar_type() == at::kDouble;
  at::Tensor dmask = at::empty(mask_grad ? o.attn_mask->sizes() : at::IntArrayRef{0},
                               q.options().dtype(dmask_f64 ? at::kDouble : at::kFloat));
  poison({dq, dk, dv});
  if (q.numel() == 0 || k.numel() == 0 || v.numel() == 0 || out.numel() == 0) {
    dq.zero_(), dk.zero_(), dv.zero_();
    if (mask_grad) dmask = dmask.zero_().to(o.attn_mask->scalar_type());
    return {dq, dk, dv, dmask};
  }

  const at::Tensor q4 = as_4d(q), k4 = as_4d(k), v4 = as_4d(v);
  std::vector<at::Tensor> keep_alive;
  AttentionGradParams p;
  static_cast<AttentionParams&>(p) = make_params(q4, k4, v4, q, k, o, keep_alive);
  const at::Tensor out4 = as_4d(out), do4 = as_4d(grad_out);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dq4 = as_4d(dq), dk4 = as_4d(dk), dv4 = as_4d(dv);
  TORCH_INTERNAL_ASSERT(dq4.data_ptr() == dq.data_ptr() && dk4.data_ptr() == dk.data_ptr() &&
                        dv4.data_ptr() == dv.data_ptr());
  p.out = out4.data_ptr();
  p.o_batch_stride = out4.stride(0), p.o_head_stride = out4.stride(1), p.o_row_stride = out4.stride(2);
  set_lse(p, lse_c);
  p.dout = do4.data_ptr();
  p.do_batch_stride = do4.stride(0), p.do_head_stride = do4.stride(1), p.do_row_stride = do4.stride(2);
  p.dq = dq4.data_ptr(), p.dk = dk4.data_ptr(), p.dv = dv4.data_ptr();
  p.dq_batch_stride = dq4.stride(0), p.dq_head_stride = dq4.stride(1), p.dq_row_stride = dq4.stride(2);
  p.dk_batch_stride = dk4.stride(0), p.dk_head_stride = dk4.stride(1), p.dk_row_stride = dk4.stride(2);
  p.dv_batch_stride = dv4.stride(0), p.dv_head_stride = dv4.stride(1), p.dv_row_stride = dv4.stride(2);
  p.deterministic = o.deterministic;
  if (p.dropout_p > 0 && !cuda_kernels) read_philox(p, rng_state);

  // dmask accumulates (in dmask's dtype) through the broadcast view of the mask's own shape (or, when its
  // batch dims cannot be folded, of a batch-materialized buffer summed down afterwards).
  at::Tensor dmask_acc;
  if (mask_grad) {
    at::Tensor view = scores_view(dmask, q, k);
    if (!fold_batch(view)) {
      dmask_acc = at::zeros(batch_materialized_shape(view), view.options());
      view = dmask_acc.expand(view.sizes());
    }
    keep_alive.push_back(view);
    if (dmask_f64)
      p.dmask64 = view.data_ptr<double>();
    else
      p.dmask = view.data_ptr<float>();
    p.dmask_view = broadcast_view(view);
  }

  if (!cuda_kernels) {
    if (mask_grad && !dmask_acc.defined()) dmask.zero_();  // the CPU kernels accumulate into it
    run_cpu_backward(p, q.options());
  } else {
    cuda_kernels_backward(p, q, lse_c, rng_state);
  }
  if (mask_grad) {
    if (dmask_acc.defined()) dmask.copy_(at::sum_to(dmask_acc, dmask.sizes()));
    dmask = dmask.to(o.attn_mask->scalar_type());
  }
  return {dq, dk, dv, dmask};
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v FLASHATTN_OPTIONS_PARAMS) {
  return attention_fwd(q, k, v, FLASHATTN_OPTIONS_FROM_PARAMS());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state FLASHATTN_OPTIONS_PARAMS, bool mask_grad) {
  return attention_bwd(grad_out, q, k, v, out, lse, rng_state, FLASHATTN_OPTIONS_FROM_PARAMS(), mask_grad);
}

static_assert(std::is_same_v<decltype(fwd_op), FwdSignature>);
static_assert(std::is_same_v<decltype(bwd_op), BwdSignature>);

// Test-only: the keep mask (batch..., heads, L, S) as bool for a forward's rng_state.
at::Tensor dropout_mask_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& rng_state,
                               double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p <= 1.0, "flashattn_ext: dropout_p must be between 0 and 1, got ",
                    dropout_p);
  TORCH_CHECK_VALUE(q.dim() >= 2 && k.dim() == q.dim(), "flashattn_ext: dropout_mask needs query and key of equal rank");
  const at::Tensor q4 = as_4d(q), k4 = as_4d(k);
  AttentionParams p;
  p.batch = q4.size(0), p.num_heads = q4.size(1), p.num_heads_k = k4.size(1);
  p.seqlen_q = q4.size(2), p.seqlen_k = k4.size(2);
  p.dropout_p = dropout_p;
  at::Tensor keep = at::empty(score_shape(q, k), q.options().dtype(at::kBool));
  if (keep.numel() == 0) return keep;
  if (!runs_cuda_kernels(q)) {
    read_philox(p, rng_state);
    cpu::dropout_mask(p, reinterpret_cast<uint8_t*>(keep.data_ptr<bool>()));
    return keep;
  }
  return cuda_kernels_dropout_mask(p, q, rng_state).view(keep.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_fwd_op(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, const AttentionOptions& options) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flashattn_ext::fwd", "").typed<FwdSignature>();
  return op.call(q, k, v FLASHATTN_OPTIONS_FIELDS);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_bwd_op(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& rng_state, const AttentionOptions& options, bool mask_grad) {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("flashattn_ext::bwd", "").typed<BwdSignature>();
  return op.call(grad_out, q, k, v, out, lse, rng_state FLASHATTN_OPTIONS_FIELDS, mask_grad);
}

}  // namespace flashattn

TORCH_LIBRARY(flashattn_ext, m) {
  m.def("fwd(Tensor q, Tensor k, Tensor v" FLASHATTN_OPTIONS_SCHEMA ") -> (Tensor out, Tensor lse, Tensor rng_state)",
        {at::Tag::nondeterministic_seeded});
  m.def("bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor rng_state"
        FLASHATTN_OPTIONS_SCHEMA ", bool mask_grad=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dmask)");
  m.def("dropout_mask(Tensor q, Tensor k, Tensor rng_state, float dropout_p) -> Tensor");
}

TORCH_LIBRARY_IMPL(flashattn_ext, CPU, m) {
  m.impl("fwd", &flashattn::fwd_op);
  m.impl("bwd", &flashattn::bwd_op);
  m.impl("dropout_mask", &flashattn::dropout_mask_op);
}

#ifdef FLASHATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(flashattn_ext, CUDA, m) {
  m.impl("fwd", &flashattn::fwd_op);
  m.impl("bwd", &flashattn::bwd_op);
  m.impl("dropout_mask", &flashattn::dropout_mask_op);
}
#endif
