// The only thing a kernel knows about a call: plain pointers, element strides, sizes and flags.
// Torch-free on purpose: CPU and CUDA kernels include this and nothing from torch, so nvcc can
// compile every kernel without a CUDA build of torch and the kernels read on their own.
#pragma once

#include <cstdint>
#include <type_traits>

namespace flashattn {

// The largest head dim (E and Ev) the CUDA kernels take: the SIMT path's limit (tensor cores take
// up to 256). CPU takes any. Exported as build_info()["cuda_max_headdim"].
constexpr int64_t kCudaMaxHeadDim = 512;

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// attn_mask element type. A bool mask marks keys that take part; a float mask is added to the
// scaled scores. SDPA accepts bool, float32 or the query's dtype.
enum class MaskKind : int32_t { kNone = 0, kBool = 1, kFloat32 = 2, kFloat64 = 3, kFloat16 = 4, kBFloat16 = 5 };

// Cheap inline helpers shared by every backend.
#if defined(__CUDACC__)
#define FLASHATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FLASHATTN_HOST_DEVICE inline
#endif

// A (batch, heads, rows, cols) view of a tensor broadcast through zero strides (attn_mask and its
// gradient). The flattened batch index b splits into (b / batch_inner, b % batch_inner), so
// leading dims that cannot be merged stay views. Strides in elements.
struct BroadcastView {
  int64_t batch_inner = 1;
  int64_t batch_outer_stride = 0, batch_stride = 0, head_stride = 0;
  int64_t row_stride = 0, col_stride = 0;

  // Offset of element (b, h, i, 0), and of (b, h, i, j).
  FLASHATTN_HOST_DEVICE int64_t row_offset(int64_t b, int64_t h, int64_t i) const {
    return (b / batch_inner) * batch_outer_stride + (b % batch_inner) * batch_stride + h * head_stride +
           i * row_stride;
  }
  FLASHATTN_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return row_offset(b, h, i) + j * col_stride;
  }
};

// Tensors are (batch, heads, rows, cols) with the last dim contiguous; strides are in elements.
// Head h of Q reads K/V head h / (num_heads / num_heads_k) (GQA/MQA, never copied per query head).
struct AttentionParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (batch, num_heads, seqlen_q) contiguous, natural log, -inf for empty rows
  double* lse64 = nullptr;  // the same in double, used instead of lse by fp64 (CPU kernels, CUDA SIMT path)

  int64_t q_batch_stride = 0, q_head_stride = 0, q_row_stride = 0;
  int64_t k_batch_stride = 0, k_head_stride = 0, k_row_stride = 0;
  int64_t v_batch_stride = 0, v_head_stride = 0, v_row_stride = 0;
  int64_t o_batch_stride = 0, o_head_stride = 0, o_row_stride = 0;

  int64_t batch = 0, num_heads = 0, num_heads_k = 0;
  int64_t seqlen_q = 0, seqlen_k = 0;
  int64_t headdim = 0, headdim_v = 0;
  DType dtype = DType::kFloat32;

  // Doubles so fp64 inputs keep full precision; fp16/bf16/fp32 kernels convert once to float.
  double softmax_scale = 1.0;
  double softcap = 0.0;  // > 0: score = softcap * tanh(score / softcap), applied after the scale

  // Band of visible keys: query i sees key j iff
  //   i + diag - window_left <= j <= i + diag + window_right,  diag = bottom_right ? seqlen_k - seqlen_q : 0.
  // A negative side is unbounded. Causal is (-1, 0); SDPA aligns it top-left, flash-attn bottom-right.
  int64_t window_left = -1, window_right = -1;
  // Bitwise reproducible: the CPU kernels pick their tiles as for a fixed thread count (so no
  // reduction order depends on the intra-op threads); the CUDA backward orders its dQ adds.
  bool deterministic = false;
  bool bottom_right = false;

  // attn_mask, broadcast to the scores through zero strides.
  const void* mask = nullptr;
  MaskKind mask_kind = MaskKind::kNone;
  BroadcastView mask_view;

  // ALiBi: score(i, j) += -slope(b, h) * |i + seqlen_k - seqlen_q - j| (flash-attn convention).
  const float* alibi_slopes = nullptr;
  int64_t alibi_batch_stride = 0;

  // Dropout: keep probability 1 - dropout_p; the keep mask of element (b, h, i, j) is a pure
  // function of (seed, offset, b, h, i, j) (Philox4x32-10, see philox.h), so the backward
  // regenerates it. On CUDA under graph capture the seed and offset are read through the pointers.
  double dropout_p = 0.0;
  uint64_t philox_seed = 0, philox_offset = 0;
  const int64_t* philox_seed_ptr = nullptr;    // CUDA graph capture only
  const int64_t* philox_offset_ptr = nullptr;  // CUDA graph capture only
  uint64_t philox_offset_intragraph = 0;
  int64_t* rng_state = nullptr;  // kernels that resolve the pointers above write (seed, offset) here

  // Block-sparse attention: block (b, h, i / block_sparse_m, j / block_sparse_n) takes part only
  // if its byte is non-zero. Inside a kept block the attn_mask (if any) still applies.
  const uint8_t* block_mask = nullptr;
  int64_t block_sparse_m = 128, block_sparse_n = 128;
  int64_t block_mask_batch_stride = 0, block_mask_head_stride = 0;
  int64_t block_mask_row_stride = 0, block_mask_col_stride = 0;
  // Element masks of partially filled blocks, stored compactly: block (b, h, i, j) with
  // block_elem_index[...] = e >= 0 (same layout/strides as block_mask) lets query row r, key column
  // c of the block take part iff block_elem_masks[(e * block_sparse_m + r) * block_sparse_n + c] != 0.
  // A kept block with index -1 is "full": no element mask is read for it. (attn_mask, if given,
  // is independent of the block mask and applies everywhere.)
  const uint8_t* block_elem_masks = nullptr;
  const int32_t* block_elem_index = nullptr;

  // Varlen (sequences packed without padding; CUDA kernels): with cu_seqlens_q set, batch counts
  // the sequences; sequence b owns rows [cu_seqlens_q[b], cu_seqlens_q[b + 1]) of q and out (dout,
  // dq) and rows [cu_seqlens_k[b], cu_seqlens_k[b + 1]) of k and v (dk, dv); the batch strides are
  // 0 and seqlen_q / seqlen_k are the longest lengths (they size the grids). The per-row arrays
  // (lse, delta, the dQ accumulator) are (heads, total_q). Kernels see one sequence at a time
  // through select_sequence. No attn_mask or block mask.
  // With seqused_k set, sequence b's keys are rows [cu_seqlens_k[b], cu_seqlens_k[b] + seqused_k[b])
  // instead (start rows, not cumulative: the KV cache, where each sequence owns a cache row).
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;
  const int32_t* seqused_k = nullptr;
  int64_t total_q = 0;
  int64_t total_k = 0;   // rows of k and v (the Hopper forward's tensor maps span them)
  int64_t seq_row0 = 0;  // set by select_sequence: the sequence's first packed query row

  // Split-KV (flash-decoding; the CUDA varlen forward): with num_splits > 1 each (query block,
  // sequence, head) runs as num_splits blocks, split s taking its share of the key blocks, and
  // writes its O (fp32, normalised by its own sum) and lse to partial_out / partial_lse at row
  // split_row(p, s, r) (r a per-row-array index; partial_out rows are headdim_v floats). A combine
  // kernel merges them into out and lse with the weights exp(lse_s - lse).
  int32_t num_splits = 1;
  float* partial_out = nullptr;
  float* partial_lse = nullptr;

  // Paged K/V (the CUDA varlen forward over a KV cache): with block_table set, key row n of
  // sequence b lies in page block_table[b * block_table_batch_stride + n / page_block_size], row
  // n % page_block_size, and k_batch_stride / v_batch_stride are the page strides (the sequence's
  // cu_seqlens_k start row is 0). page_block_size is a multiple of the kernel's key block.
  const int32_t* block_table = nullptr;
  int64_t block_table_batch_stride = 0;
  int64_t page_block_size = 0;
};

struct AttentionGradParams : AttentionParams {
  const void* dout = nullptr;
  int64_t do_batch_stride = 0, do_head_stride = 0, do_row_stride = 0;

  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  int64_t dq_batch_stride = 0, dq_head_stride = 0, dq_row_stride = 0;
  int64_t dk_batch_stride = 0, dk_head_stride = 0, dk_row_stride = 0;
  int64_t dv_batch_stride = 0, dv_head_stride = 0, dv_row_stride = 0;

  // Workspace the op layer allocates. delta = rowsum(dO * O), (batch, num_heads, seqlen_q) fp32.
  float* delta = nullptr;
  double* delta64 = nullptr;  // the same in double, used instead of delta by the CUDA fp64 (SIMT) path
  // fp32 accumulator for dQ where a backend needs one (layout is the backend's, size given by it).
  float* dq_accum = nullptr;
  int32_t* dq_semaphore = nullptr;  // CUDA deterministic mode

  // Gradient of a float attn_mask, fp32, in the mask's own (unexpanded) shape and strides:
  // contributions of broadcast elements are summed into the one element they read.
  float* dmask = nullptr;
  // Float64 masks (CPU kernels, CUDA SIMT path): the gradient accumulated in float64 here instead (dmask stays null).
  double* dmask64 = nullptr;
  BroadcastView dmask_view;
};


// Rows of the per-row arrays (lse, delta, the CUDA dQ accumulator): (batch, heads, seqlen_q), or
// (heads, total_q) for varlen; and the index of row 0 of (b, h) in them (for a kernel that knows
// at compile time which it runs: kVarlen, after select_sequence).
FLASHATTN_HOST_DEVICE int64_t row_array_rows(const AttentionParams& p) {
  return p.cu_seqlens_q != nullptr ? p.num_heads * p.total_q : p.batch * p.num_heads * p.seqlen_q;
}
template <bool kVarlen>
FLASHATTN_HOST_DEVICE int64_t row_array_offset(const AttentionParams& p, int64_t b, int64_t h) {
  return kVarlen ? h * p.total_q + p.seq_row0 : (b * p.num_heads + h) * p.seqlen_q;
}
// Row r of the per-row arrays in split s's part of partial_lse / partial_out.
FLASHATTN_HOST_DEVICE int64_t split_row(const AttentionParams& p, int64_t split, int64_t r) {
  return split * row_array_rows(p) + r;
}

FLASHATTN_HOST_DEVICE int64_t dtype_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2);
}
template <typename Ptr>
FLASHATTN_HOST_DEVICE Ptr advance_rows(Ptr ptr, int64_t rows, int64_t row_stride, DType t) {
  using Byte = typename std::conditional<std::is_const<typename std::remove_pointer<Ptr>::type>::value, const char,
                                         char>::type;
  return static_cast<Ptr>(static_cast<Byte*>(ptr) + rows * row_stride * dtype_bytes(t));
}

// Varlen: turns sequence b of p into a batch of one, as the CPU path runs it: its lengths, its
// rows of q/k/v/out, its ALiBi slopes, its dropout stream (seed, offset + b); b becomes 0 and the
// per-row arrays are addressed through seq_row0. Dense params are left as they are.
FLASHATTN_HOST_DEVICE void select_sequence(AttentionParams& p, int64_t& b) {
  if (p.cu_seqlens_q == nullptr) return;
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  p.seqlen_q = p.cu_seqlens_q[b + 1] - q0;
  p.seqlen_k = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - k0;
  p.seq_row0 = q0;
  p.q = advance_rows(p.q, q0, p.q_row_stride, p.dtype);
  p.out = advance_rows(p.out, q0, p.o_row_stride, p.dtype);
  p.k = advance_rows(p.k, k0, p.k_row_stride, p.dtype);
  p.v = advance_rows(p.v, k0, p.v_row_stride, p.dtype);
  if (p.alibi_slopes != nullptr) p.alibi_slopes += b * p.alibi_batch_stride;
  p.philox_offset += static_cast<uint64_t>(b);
  p.philox_offset_intragraph += static_cast<uint64_t>(b);
  p.batch = 1;
  b = 0;
}
FLASHATTN_HOST_DEVICE void select_sequence(AttentionGradParams& p, int64_t& b) {
  if (p.cu_seqlens_q == nullptr) return;
  const int64_t q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
  p.dout = advance_rows(p.dout, q0, p.do_row_stride, p.dtype);
  p.dq = advance_rows(p.dq, q0, p.dq_row_stride, p.dtype);
  p.dk = advance_rows(p.dk, k0, p.dk_row_stride, p.dtype);
  p.dv = advance_rows(p.dv, k0, p.dv_row_stride, p.dtype);
  select_sequence(static_cast<AttentionParams&>(p), b);
}

// The params a kernel's block works on: for a varlen kernel (kVarlen) its sequence's, a copy in
// `storage` narrowed by select_sequence; for a dense one `params` itself, read where it lies (a
// by-value copy would put every field in registers).
template <bool kVarlen, class Params>
FLASHATTN_HOST_DEVICE const Params& block_params(const Params& params, Params& storage, int64_t& b) {
  if constexpr (kVarlen) {
    storage = params;
    select_sequence(storage, b);
    return storage;
  } else {
    return params;
  }
}

// One sequence's band: what band_key_begin / band_key_end read, for a kernel that keeps a
// sequence's lengths apart from its params (the persistent Hopper forward, one sequence per work tile).
// Its lengths are int: a sequence's rows are int32 (cu_seqlens, TMA coordinates), and the
// narrower fields keep the kernel's consumers (240 registers at d = 256) from spilling.
struct BandShape {
  int seqlen_q, seqlen_k;
  int64_t window_left, window_right;
  bool bottom_right;
};
FLASHATTN_HOST_DEVICE BandShape band_shape(const AttentionParams& p, int64_t seqlen_q, int64_t seqlen_k) {
  return {static_cast<int>(seqlen_q), static_cast<int>(seqlen_k), p.window_left, p.window_right, p.bottom_right};
}

// First and one-past-last visible key of query row i under the band (ignoring masks). P is
// AttentionParams (its sequence after select_sequence) or a BandShape.
template <class P>
FLASHATTN_HOST_DEVICE int64_t band_diag(const P& p) {
  return p.bottom_right ? p.seqlen_k - p.seqlen_q : 0;
}
template <class P>
FLASHATTN_HOST_DEVICE int64_t band_key_begin(const P& p, int64_t i) {
  if (p.window_left < 0) return 0;
  const int64_t b = i + band_diag(p) - p.window_left;
  return b < 0 ? 0 : (b > p.seqlen_k ? p.seqlen_k : b);
}
template <class P>
FLASHATTN_HOST_DEVICE int64_t band_key_end(const P& p, int64_t i) {
  if (p.window_right < 0) return p.seqlen_k;
  const int64_t e = i + band_diag(p) + p.window_right + 1;
  return e > p.seqlen_k ? p.seqlen_k : (e < 0 ? 0 : e);
}

// The query blocks (of block_m rows) whose rows meet keys [n0, n_last] under the band: [lo, hi),
// the blocks i with band_key_end(last row of i) > n0 and band_key_begin(first row of i) <= n_last
// (both monotone in i, so a range; the forward visits exactly these (i, key block) pairs). The
// backward kernels' loop (tools/check_schedules.py mirrors it).
struct BlockRange {
  int64_t lo, hi;
};
template <class P>
FLASHATTN_HOST_DEVICE BlockRange query_blocks_meeting(const P& p, int64_t block_m, int64_t n0, int64_t n_last) {
  const int64_t m_blocks = (p.seqlen_q + block_m - 1) / block_m;
  auto first = [&](bool begin_side) {  // the first block for which the side's condition holds
    int64_t lo = 0, hi = m_blocks;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      const int64_t last = (mid + 1) * block_m - 1 < p.seqlen_q ? (mid + 1) * block_m - 1 : p.seqlen_q - 1;
      if (begin_side ? band_key_begin(p, mid * block_m) > n_last : band_key_end(p, last) > n0) hi = mid;
      else lo = mid + 1;
    }
    return lo;
  };
  const int64_t lo = first(false), hi = first(true);
  return {lo, hi > lo ? hi : lo};
}

}  // namespace flashattn
