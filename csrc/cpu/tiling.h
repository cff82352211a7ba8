// Tile sizes and tile ranges of the CPU kernels.
#pragma once

#include "cpu/isa.h"

#include <ATen/Parallel.h>
#include <c10/core/ScalarType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "attention_params.h"
#include "cpu/matmul_policy.h"
#include "cpu/scores.h"

namespace flashattn::cpu::CPU_CAPABILITY {

struct Tiling {
  int64_t block_m = 0, block_n = 0;
  int64_t num_m_blocks = 0, num_n_blocks = 0;
  int64_t num_chunks = 1;  // backward: key blocks split into this many chunks per (batch, kv head)
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The thread count the tiles are chosen for: in deterministic mode a fixed one, so tile sizes,
// key chunks (and with them every reduction order) are the same whatever at::get_num_threads().
constexpr int kDeterministicTilingThreads = 8;
inline int tiling_threads(const AttentionParams& p) {
  return p.deterministic ? kDeterministicTilingThreads : at::get_num_threads();
}

inline c10::ScalarType to_scalar_type(DType d) {
  switch (d) {
    case DType::kFloat64: return c10::kDouble;
    case DType::kFloat16: return c10::kHalf;
    case DType::kBFloat16: return c10::kBFloat16;
    case DType::kFloat32: break;
  }
  return c10::kFloat;
}

// Per-worker tiles stay near the L2 cache: about 64K elements per row panel.
inline int64_t cap_for_headdim(const AttentionParams& p, int64_t preferred) {
  const int64_t widest = std::max<int64_t>({p.headdim, p.headdim_v, 1});
  return std::max<int64_t>(16, std::min<int64_t>(preferred, 65536 / widest));
}

// Block-sparse attention: tiles nest inside the sparsity blocks (a block, or an even split of a
// large one), so each tile reads one block's flags.
inline bool tiles_follow_block_mask(const AttentionParams& p) { return p.block_mask != nullptr; }
inline int64_t tile_inside_block(int64_t block) {
  while (block > 256 && block % 2 == 0) block /= 2;
  return block;
}

// Forward: query blocks as large as keep >= 4 tasks per thread (fewer, larger tiles amortize the
// packing of each K/V tile over more query rows).
inline Tiling forward_tiling(const AttentionParams& p, int threads) {
  Tiling t;
  if (tiles_follow_block_mask(p)) {
    t.block_m = tile_inside_block(p.block_sparse_m);
    t.block_n = tile_inside_block(p.block_sparse_n);
  } else {
    t.block_n = std::min<int64_t>(cap_for_headdim(p, 256), std::max<int64_t>(p.seqlen_k, 1));
    const int64_t heads = p.batch * p.num_heads;
    t.block_m = 16;
    for (int64_t bm : {256, 128, 64, 32}) {
      if (bm > cap_for_headdim(p, 256)) continue;
      if (heads * ceil_div(p.seqlen_q, bm) >= 4 * threads) {
        t.block_m = bm;
        break;
      }
    }
    t.block_m = std::min<int64_t>(t.block_m, std::max<int64_t>(p.seqlen_q, 1));
  }
  t.num_m_blocks = ceil_div(p.seqlen_q, t.block_m);
  t.num_n_blocks = ceil_div(p.seqlen_k, t.block_n);
  return t;
}

// Backward: tasks are (batch, kv head, chunk of key blocks); chunks only as many as the threads
// need, since each extra chunk costs a dQ-sized fp32 partial sum.
inline Tiling backward_tiling(const AttentionParams& p, int threads) {
  Tiling t;
  if (tiles_follow_block_mask(p)) {
    t.block_m = tile_inside_block(p.block_sparse_m);
    t.block_n = tile_inside_block(p.block_sparse_n);
  } else {
    t.block_m = std::min<int64_t>(cap_for_headdim(p, 128), std::max<int64_t>(p.seqlen_q, 1));
    t.block_n = std::min<int64_t>(cap_for_headdim(p, 128), std::max<int64_t>(p.seqlen_k, 1));
  }
  t.num_m_blocks = ceil_div(p.seqlen_q, t.block_m);
  t.num_n_blocks = ceil_div(p.seqlen_k, t.block_n);
  const int64_t kv_heads = p.batch * p.num_heads_k;
  t.num_chunks = std::clamp<int64_t>(ceil_div(4 * threads, std::max<int64_t>(kv_heads, 1)), 1,
                                     std::max<int64_t>(t.num_n_blocks, 1));
  return t;
}

// Key tiles (aligned to block_n) that the band lets rows [row0, row0 + rows) see: [begin, end).
inline std::pair<int64_t, int64_t> visible_key_range(const AttentionParams& p, int64_t row0, int64_t rows,
                                                     int64_t block_n) {
  const int64_t lo = band_key_begin(p, row0), hi = band_key_end(p, row0 + rows - 1);
  if (lo >= hi) return {0, 0};
  return {lo / block_n * block_n, hi};
}

// Query rows [begin, end) that the band lets see some key in [col0, col0 + cols).
inline std::pair<int64_t, int64_t> visible_query_range(const AttentionParams& p, int64_t col0, int64_t cols) {
  const int64_t diag = band_diag(p);
  // Visible iff  i + diag - wl <= j <= i + diag + wr,  i.e.  j - diag - wr <= i <= j - diag + wl.
  int64_t begin = p.window_right < 0 ? 0 : col0 - diag - p.window_right;
  int64_t end = p.window_left < 0 ? p.seqlen_q : col0 + cols - 1 - diag + p.window_left + 1;
  begin = std::clamp<int64_t>(begin, 0, p.seqlen_q);
  end = std::clamp<int64_t>(end, 0, p.seqlen_q);
  return {begin, std::max(begin, end)};
}

// How a tile is masked: skipped when it provably contributes nothing (outside the band, or an
// empty sparse block); a partial sparse block also reads its element mask.
inline TileMasking tile_masking(const AttentionParams& p, const HeadContext& hc, const TileShape& t) {
  TileMasking m;
  if (band_excludes_tile(p, t)) {
    m.visible = false;
    return m;
  }
  m.band_cuts = band_cuts_tile(p, t);
  m.attn_mask = p.mask != nullptr;
  if (p.block_mask) {
    const int64_t off = hc.b * p.block_mask_batch_stride + hc.h * p.block_mask_head_stride +
                        (t.row0 / p.block_sparse_m) * p.block_mask_row_stride +
                        (t.col0 / p.block_sparse_n) * p.block_mask_col_stride;
    if (!p.block_mask[off]) {
      m.visible = false;
      return m;
    }
    if (p.block_elem_index && p.block_elem_index[off] >= 0) {
      m.elem_ld = p.block_sparse_n;
      m.elem = p.block_elem_masks + (static_cast<int64_t>(p.block_elem_index[off]) * p.block_sparse_m +
                                     t.row0 % p.block_sparse_m) * p.block_sparse_n + t.col0 % p.block_sparse_n;
    }
  }
  m.scale_only = !m.band_cuts && !m.attn_mask && !m.elem && p.softcap <= 0 && !p.alibi_slopes &&
                 p.softmax_scale >= 0;
  return m;
}

// lse in the accumulation type: double for fp64 inputs, float otherwise.
template <typename acc_t>
inline acc_t* lse_pointer(const AttentionParams& p) {
  if constexpr (std::is_same_v<acc_t, double>)
    return p.lse64;
  else
    return p.lse;
}

template <typename acc_t, typename scalar_t>
inline void store_row(const acc_t* src, int64_t n, scalar_t* dst) {
  if constexpr (std::is_same_v<acc_t, scalar_t>)
    std::memcpy(dst, src, n * sizeof(acc_t));
  else
    narrow_row(src, n, dst);
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
