// libflashattn_emulator.so's interface: sets the schedule and the emulated GPU, places every
// buffer the params reference against guard pages (extents computed from the params' own sizes
// and strides), runs the real launchers of csrc/cuda (dispatch.cu, compiled for the emulator) and
// copies the results back.
#include "api.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "../launch.h"
#include "guarded_buffers.h"
#include "internal.h"

namespace flashattn::emu {
void stats(FlashattnEmulatorStats* out);
}
namespace flashattn::cuda {
cudaError_t run_emulator_selftest(const char* name, float* in, int* out, int* flag);
}

namespace {

using flashattn::AttentionGradParams;
using flashattn::AttentionParams;
using flashattn::DType;
using flashattn::MaskKind;
namespace emu = flashattn::emu;

std::string g_report;

size_t element_bytes(DType t) {
  switch (t) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat32: return 4;
    case DType::kFloat64: return 8;
  }
  return 4;
}

size_t mask_element_bytes(MaskKind k) {
  switch (k) {
    case MaskKind::kBool: return 1;
    case MaskKind::kFloat32: return 4;
    case MaskKind::kFloat64: return 8;
    case MaskKind::kFloat16:
    case MaskKind::kBFloat16: return 2;
    case MaskKind::kNone: return 0;
  }
  return 0;
}

// Bytes spanned by a (batch, heads, rows, cols) view with a contiguous last dim.
size_t span4(int64_t batch, int64_t heads, int64_t rows, int64_t cols, int64_t sb, int64_t sh, int64_t sr,
             size_t elem) {
  if (batch <= 0 || heads <= 0 || rows <= 0 || cols <= 0) return 0;
  return static_cast<size_t>((batch - 1) * sb + (heads - 1) * sh + (rows - 1) * sr + cols) * elem;
}

// Bytes spanned by a broadcast (batch, heads, rows, cols) view whose batch index b splits into
// (b / inner, b % inner); zero strides broadcast.
size_t span_folded(int64_t batch, int64_t heads, int64_t rows, int64_t cols, int64_t inner, int64_t outer_stride,
                   int64_t batch_stride, int64_t head_stride, int64_t row_stride, int64_t col_stride, size_t elem) {
  if (batch <= 0 || heads <= 0 || rows <= 0 || cols <= 0) return 0;
  const int64_t last = (batch - 1) / inner * outer_stride + (std::min(batch, inner) - 1) * batch_stride +
                       (heads - 1) * head_stride + (rows - 1) * row_stride + (cols - 1) * col_stride;
  return static_cast<size_t>(last + 1) * elem;
}

size_t span_view(int64_t batch, int64_t heads, int64_t rows, int64_t cols, const flashattn::BroadcastView& v, size_t elem) {
  return span_folded(batch, heads, rows, cols, v.batch_inner, v.batch_outer_stride, v.batch_stride, v.head_stride,
                     v.row_stride, v.col_stride, elem);
}

// The (batch, rows) the q-row and k-row tensors span: dense (batch, seqlen_q / seqlen_k); varlen
// one batch of all packed rows (total_q, and total_k from cu_seqlens_k, host memory here); a
// paged cache (block_table) its pages up to the last one a sequence reads, and the table entries
// read (table_entries).
struct Extents {
  int64_t batch, rows_q, rows_k, table_entries = 0;
};
Extents extents(const AttentionParams& p) {
  if (p.cu_seqlens_q == nullptr) return {p.batch, p.seqlen_q, p.seqlen_k};
  if (p.block_table != nullptr) {
    Extents x{1, p.total_q, 0, 0};
    int64_t last_page = -1;
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t pages = (p.seqused_k[b] + p.page_block_size - 1) / p.page_block_size;
      for (int64_t j = 0; j < pages; ++j)
        last_page = std::max<int64_t>(last_page, p.block_table[b * p.block_table_batch_stride + j]);
      if (pages > 0) x.table_entries = std::max(x.table_entries, b * p.block_table_batch_stride + pages);
    }
    // Rows of (pages, page_block_size) with the page stride in k_batch_stride: span4 over one
    // "batch" of rows reaching the last page's last row.
    x.rows_k = last_page < 0 ? 0 : last_page * (p.k_batch_stride / p.k_row_stride) + p.page_block_size;
    return x;
  }
  if (p.seqused_k == nullptr) return {1, p.total_q, p.cu_seqlens_k[p.batch]};
  int64_t rows_k = 0;  // start rows + used lengths: up to the last row any sequence reads
  for (int64_t b = 0; b < p.batch; ++b) rows_k = std::max<int64_t>(rows_k, p.cu_seqlens_k[b] + p.seqused_k[b]);
  return {1, p.total_q, rows_k};
}

void guard_forward_inputs(AttentionParams& p, emu::GuardedBuffers& g) {
  const size_t e = element_bytes(p.dtype);
  const Extents x = extents(p);
  if (p.cu_seqlens_q != nullptr) {
    const size_t bytes = static_cast<size_t>(p.batch + 1) * sizeof(int32_t);
    p.cu_seqlens_q = g.guard("cu_seqlens_q", p.cu_seqlens_q, bytes, false);
    p.cu_seqlens_k = g.guard("cu_seqlens_k", p.cu_seqlens_k, bytes, false);
    if (p.seqused_k != nullptr) p.seqused_k = g.guard("seqused_k", p.seqused_k, bytes - sizeof(int32_t), false);
  }
  p.q = g.guard("q", p.q, span4(x.batch, p.num_heads, x.rows_q, p.headdim, p.q_batch_stride, p.q_head_stride,
                                 p.q_row_stride, e), false);
  if (p.block_table != nullptr)
    p.block_table = g.guard("block_table", p.block_table, static_cast<size_t>(x.table_entries) * 4, false);
  p.k = g.guard("k", p.k, span4(x.batch, p.num_heads_k, x.rows_k, p.headdim, p.k_batch_stride, p.k_head_stride,
                                 p.k_row_stride, e), false);
  p.v = g.guard("v", p.v, span4(x.batch, p.num_heads_k, x.rows_k, p.headdim_v, p.v_batch_stride,
                                 p.v_head_stride, p.v_row_stride, e), false);
  if (p.mask != nullptr)
    p.mask = g.guard("attn_mask", p.mask,
                     span_view(p.batch, p.num_heads, p.seqlen_q, p.seqlen_k, p.mask_view, mask_element_bytes(p.mask_kind)),
                     false);
  if (p.alibi_slopes != nullptr)
    p.alibi_slopes = g.guard("alibi_slopes", p.alibi_slopes,
                             static_cast<size_t>((p.batch - 1) * p.alibi_batch_stride + p.num_heads) * 4, false);
  if (p.block_mask != nullptr) {
    const int64_t rows = (p.seqlen_q + p.block_sparse_m - 1) / p.block_sparse_m;
    const int64_t cols = (p.seqlen_k + p.block_sparse_n - 1) / p.block_sparse_n;
    const size_t n = span_folded(p.batch, p.num_heads, rows, cols, p.batch, 0, p.block_mask_batch_stride,
                                 p.block_mask_head_stride, p.block_mask_row_stride, p.block_mask_col_stride, 1);
    if (p.block_elem_index != nullptr) {
      int32_t masks = 0;  // element masks needed: 1 + the largest index
      for (size_t i = 0; i < n; ++i) masks = std::max(masks, p.block_elem_index[i] + 1);
      p.block_elem_masks = g.guard("block_elem_masks", p.block_elem_masks,
                                   static_cast<size_t>(masks) * p.block_sparse_m * p.block_sparse_n, false);
      p.block_elem_index = g.guard("block_elem_index", p.block_elem_index, n * 4, false);
    }
    p.block_mask = g.guard("block_mask", p.block_mask, n, false);
  }
  p.philox_seed_ptr = g.guard("philox_seed", p.philox_seed_ptr, 8, false);
  p.philox_offset_ptr = g.guard("philox_offset", p.philox_offset_ptr, 8, false);
}

size_t rows_bytes(const AttentionParams& p, size_t element = 4) {
  return static_cast<size_t>(flashattn::row_array_rows(p)) * element;
}

emu::Schedule schedule_of(int s) {
  switch (s) {
    case 1: return emu::Schedule::kWarpAscending;
    case 2: return emu::Schedule::kWarpDescending;
    case 3: return emu::Schedule::kRandom;
    default: return emu::Schedule::kLockstep;
  }
}

void configure(const FlashattnEmulatorOptions* o) {
  emu::Config& c = emu::config();
  c.schedule = schedule_of(o->schedule);
  c.seed = o->seed;
  c.landing = o->copies_land_at_issue ? emu::CopyLanding::kAtIssue : emu::CopyLanding::kAtWait;
  c.sm_major = o->sm_major;
  c.sm_minor = o->sm_minor;
  c.hopper = o->hopper != 0;
  emu::clear_failure();
}

// Runs `body` (which calls the real launchers) and turns what the emulator found into the result.
template <class Body>
int run(emu::GuardedBuffers& g, const char** report, Body&& body) {
  cudaError_t err = cudaSuccess;
  try {
    err = body();
  } catch (const std::exception& e) {
    emu::fail_host("%s", e.what());
  }
  const std::string tail = g.copy_back();
  if (emu::failed()) {
    g_report = emu::report();
  } else if (!tail.empty()) {
    g_report = tail;
  } else if (err != cudaSuccess) {
    g_report = std::string("CUDA error from the launchers: ") + cudaGetErrorString(err);
  } else {
    return 0;
  }
  *report = g_report.c_str();
  return 1;
}

int run_fwd(const AttentionParams* params, const FlashattnEmulatorOptions* o, const char** report) {
  configure(o);
  AttentionParams p = *params;
  emu::GuardedBuffers g;
  const Extents x = extents(p);
  guard_forward_inputs(p, g);
  p.out = g.guard("out", p.out, span4(x.batch, p.num_heads, x.rows_q, p.headdim_v, p.o_batch_stride,
                                       p.o_head_stride, p.o_row_stride, element_bytes(p.dtype)), true);
  p.lse = g.guard("lse", p.lse, rows_bytes(p), true);
  p.lse64 = g.guard("lse", p.lse64, rows_bytes(p, 8), true);
  p.rng_state = g.guard("rng_state", p.rng_state, 16, true);
  if (p.num_splits > 1) {  // scratch: written by the split kernels, read by the combine
    const size_t rows = static_cast<size_t>(p.num_splits) * static_cast<size_t>(flashattn::row_array_rows(p));
    p.partial_lse = g.guard("partial_lse", p.partial_lse, rows * 4, true);
    p.partial_out = g.guard("partial_out", p.partial_out, rows * static_cast<size_t>(p.headdim_v) * 4, true);
  }
  return run(g, report, [&] { return flashattn::cuda::run_fwd(p, nullptr, o->sm_major, o->sm_minor); });
}

size_t bwd_workspace_bytes(const AttentionGradParams* p, const FlashattnEmulatorOptions* o) {
  configure(o);
  return flashattn::cuda::bwd_workspace_bytes(*p, o->sm_major, o->sm_minor);
}

int run_bwd(const AttentionGradParams* params, void* workspace, size_t workspace_bytes,
            const FlashattnEmulatorOptions* o, const char** report) {
  configure(o);
  AttentionGradParams p = *params;
  const size_t e = element_bytes(p.dtype);
  emu::GuardedBuffers g;
  const Extents x = extents(p);
  guard_forward_inputs(p, g);
  p.out = g.guard("out", p.out, span4(x.batch, p.num_heads, x.rows_q, p.headdim_v, p.o_batch_stride,
                                       p.o_head_stride, p.o_row_stride, e), false);
  p.lse = g.guard("lse", p.lse, rows_bytes(p), false);
  p.lse64 = g.guard("lse", p.lse64, rows_bytes(p, 8), false);
  p.dout = g.guard("grad_out", p.dout, span4(x.batch, p.num_heads, x.rows_q, p.headdim_v, p.do_batch_stride,
                                              p.do_head_stride, p.do_row_stride, e), false);
  p.dq = g.guard("dq", p.dq, span4(x.batch, p.num_heads, x.rows_q, p.headdim, p.dq_batch_stride,
                                    p.dq_head_stride, p.dq_row_stride, e), true);
  p.dk = g.guard("dk", p.dk, span4(x.batch, p.num_heads_k, x.rows_k, p.headdim, p.dk_batch_stride,
                                    p.dk_head_stride, p.dk_row_stride, e), true);
  p.dv = g.guard("dv", p.dv, span4(x.batch, p.num_heads_k, x.rows_k, p.headdim_v, p.dv_batch_stride,
                                    p.dv_head_stride, p.dv_row_stride, e), true);
  p.delta = g.guard("delta", p.delta, rows_bytes(p), true);
  p.delta64 = g.guard("delta", p.delta64, rows_bytes(p, 8), true);
  if (p.dmask != nullptr)
    p.dmask = g.guard("dmask", p.dmask,
                      span_view(p.batch, p.num_heads, p.seqlen_q, p.seqlen_k, p.dmask_view, 4),
                      true);
  if (p.dmask64 != nullptr)
    p.dmask64 = g.guard("dmask", p.dmask64,
                        span_view(p.batch, p.num_heads, p.seqlen_q, p.seqlen_k, p.dmask_view, 8),
                        true);
  void* ws = g.guard("workspace", workspace, workspace_bytes, true);
  return run(g, report, [&] { return flashattn::cuda::run_bwd(p, ws, nullptr, o->sm_major, o->sm_minor); });
}

int dropout_mask(const AttentionParams* params, uint8_t* keep, const FlashattnEmulatorOptions* o,
                 const char** report) {
  configure(o);
  AttentionParams p = *params;
  emu::GuardedBuffers g;
  p.philox_seed_ptr = g.guard("philox_seed", p.philox_seed_ptr, 8, false);
  p.philox_offset_ptr = g.guard("philox_offset", p.philox_offset_ptr, 8, false);
  uint8_t* k = g.guard("keep", keep, static_cast<size_t>(p.batch * p.num_heads * p.seqlen_q * p.seqlen_k), true);
  return run(g, report, [&] { return flashattn::cuda::run_dropout_mask(p, k, nullptr); });
}

void fwd_split_plan(const AttentionParams* p, int requested_splits, const FlashattnEmulatorOptions* o, int* num_splits,
                    int* page_multiple) {
  configure(o);
  const flashattn::cuda::FwdSplitPlan plan = flashattn::cuda::fwd_split_plan(*p, requested_splits, o->sm_major, o->sm_minor);
  *num_splits = plan.num_splits;
  *page_multiple = plan.page_multiple;
}

int selftest(const char* name, const FlashattnEmulatorOptions* o, const char** report) {
  configure(o);
  std::vector<float> in(8192);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i % 7) - 3.f;
  std::vector<int> out(384, 0);
  int flag = 0;
  emu::GuardedBuffers g;
  float* gin = g.guard("in", in.data(), in.size() * sizeof(float), false);
  int* gout = g.guard("out", out.data(), out.size() * sizeof(int), true);
  int* gflag = g.guard("flag", &flag, sizeof(int), false);
  return run(g, report, [&] { return flashattn::cuda::run_emulator_selftest(name, gin, gout, gflag); });
}

const FlashattnEmulatorApi kApi = {
    kFlashattnEmulatorAbi,
    sizeof(AttentionParams),
    sizeof(AttentionGradParams),
    &flashattn::cuda::compiled_headdims,
    &flashattn::cuda::compiled_dtypes,
    &run_fwd,
    &bwd_workspace_bytes,
    &run_bwd,
    &dropout_mask,
    &emu::stats,
    &fwd_split_plan,
    &selftest,
};

}  // namespace

extern "C" const FlashattnEmulatorApi* flashattn_emulator_api() { return &kApi; }
