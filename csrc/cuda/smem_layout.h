// Shared-memory tiles of 16-bit elements, swizzled so that ldmatrix (8 rows x 16 bytes per phase)
// and the 16-byte cp.async writes of a warp hit 32 distinct banks, plus the global <-> shared
// tile copies that fill and drain them.
//
// A tile of kRows x kCols is stored as kCols / kPanelCols column panels, each [kRows][kPanelCols]
// row-major. A 16-byte chunk (8 elements) c of row r sits at chunk position c ^ swizzle(r):
//  - 64-column panels (128-byte rows): swizzle(r) = r & 7, so eight consecutive rows reading the
//    same logical chunk land in eight different 16-byte bank groups;
//  - 32-column panels (64-byte rows, two rows per 128-byte line; head dims 32 and 96):
//    swizzle(r) = (r >> 1) & 3, which together with the row parity again spreads eight
//    consecutive rows over the eight bank groups of a 128-byte line.
#pragma once

#include <cstdint>

#include "ptx.h"

namespace flashattn::cuda {

template <int kRows_, int kCols_>
struct SmemTile {
  static constexpr int kRows = kRows_, kCols = kCols_;
  static_assert(kCols % 32 == 0, "tile width must be a multiple of 32 elements");
  static constexpr int kPanelCols = (kCols % 64 == 0) ? 64 : 32;
  static constexpr int kPanelChunks = kPanelCols / 8;
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kElements = kRows * kCols;
  static constexpr int kBytes = kElements * 2;

  // Element offset of the first element of logical chunk `chunk` (columns 8*chunk .. 8*chunk+7) of `row`.
  static __device__ __forceinline__ int offset(int row, int chunk) {
    const int panel = chunk / kPanelChunks, c = chunk % kPanelChunks;
    const int swizzle = (kPanelChunks == 8) ? (row & 7) : ((row >> 1) & 3);
    return panel * (kRows * kPanelCols) + row * kPanelCols + ((c ^ swizzle) << 3);
  }
  // Element offset of (row, col).
  static __device__ __forceinline__ int element_offset(int row, int col) { return offset(row, col >> 3) + (col & 7); }
};

// Copies rows [0, kRows) x cols [0, kCols) of a row-major global matrix (`gmem` points at its
// first element, rows `row_stride` elements apart) into `smem`. Rows >= num_rows and columns
// >= num_cols arrive as zeros. `vectorized` (all pointers 16-byte aligned, row stride a multiple
// of 8) selects cp.async; otherwise elements are loaded one by one (same result, synchronous).
// Consecutive threads take consecutive chunks of a row: coalesced reads, conflict-free writes.
// A thread keeps one chunk column and steps down the rows, so it needs one source pointer and one
// shared address (the swizzle repeats every 8 rows) whatever the tile height.
template <class Tile, int kThreads, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem, const Element* gmem, int64_t row_stride, int num_rows,
                                                int num_cols, bool vectorized) {
  constexpr int kChunksPerRow = Tile::kChunksPerRow;
  constexpr bool kFixedColumn = kThreads % kChunksPerRow == 0 && (kThreads / kChunksPerRow) % 8 == 0;
  constexpr int kRowsPerPass = kFixedColumn ? kThreads / kChunksPerRow : 1;
  const int tid = threadIdx.x;
  auto copy_chunk = [&](Element* dst, const Element* src_row, int valid) {
    if (vectorized) {
      cp_async_16(dst, valid > 0 ? src_row : gmem, valid * 2);
    } else {
      const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src_row);
      uint16_t v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = e < valid ? s16[e] : uint16_t(0);
      uint4 packed;
      packed.x = v[0] | (uint32_t(v[1]) << 16);
      packed.y = v[2] | (uint32_t(v[3]) << 16);
      packed.z = v[4] | (uint32_t(v[5]) << 16);
      packed.w = v[6] | (uint32_t(v[7]) << 16);
      *reinterpret_cast<uint4*>(dst) = packed;
    }
  };
  if constexpr (kFixedColumn) {
    const int row0 = tid / kChunksPerRow, chunk = tid % kChunksPerRow;
    int col_valid = num_cols - chunk * 8;
    col_valid = col_valid < 0 ? 0 : (col_valid > 8 ? 8 : col_valid);
    Element* dst = smem + Tile::offset(row0, chunk);
    const Element* src = gmem + row0 * row_stride + chunk * 8;
    const int64_t src_step = kRowsPerPass * row_stride;
    constexpr int kPasses = (Tile::kRows + kRowsPerPass - 1) / kRowsPerPass;
    if (vectorized) {
#pragma unroll
      for (int pass = 0; pass < kPasses; ++pass) {
        const int row = row0 + pass * kRowsPerPass;
        if (Tile::kRows % kRowsPerPass != 0 && row >= Tile::kRows) break;
        const int bytes = row < num_rows ? 2 * col_valid : 0;
        cp_async_16(dst + pass * kRowsPerPass * Tile::kPanelCols, bytes > 0 ? src : gmem, bytes);
        src += src_step;
      }
    } else {
      for (int pass = 0; pass < kPasses; ++pass) {
        const int row = row0 + pass * kRowsPerPass;
        if (Tile::kRows % kRowsPerPass != 0 && row >= Tile::kRows) break;
        copy_chunk(dst + pass * kRowsPerPass * Tile::kPanelCols, src, row < num_rows ? col_valid : 0);
        src += src_step;
      }
    }
  } else {
    constexpr int kChunks = Tile::kRows * kChunksPerRow;
#pragma unroll
    for (int idx0 = 0; idx0 < kChunks; idx0 += kThreads) {
      const int idx = idx0 + tid;
      if (kChunks % kThreads != 0 && idx >= kChunks) break;
      const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
      int valid = num_cols - chunk * 8;
      valid = row < num_rows ? (valid < 0 ? 0 : (valid > 8 ? 8 : valid)) : 0;
      copy_chunk(smem + Tile::offset(row, chunk), gmem + row * row_stride + chunk * 8, valid);
    }
  }
}

// The reverse: rows < num_rows and columns < num_cols of the tile go to global memory, 16 bytes
// at a time where the whole chunk is valid and `vectorized`, element by element otherwise.
template <class Tile, int kThreads, typename Element>
__device__ __forceinline__ void store_tile(Element* gmem, int64_t row_stride, const Element* smem, int num_rows,
                                           int num_cols, bool vectorized) {
  constexpr int kChunks = Tile::kRows * Tile::kChunksPerRow;
#pragma unroll
  for (int idx0 = 0; idx0 < kChunks; idx0 += kThreads) {
    const int idx = idx0 + static_cast<int>(threadIdx.x);
    if (kChunks % kThreads != 0 && idx >= kChunks) break;
    const int row = idx / Tile::kChunksPerRow, chunk = idx % Tile::kChunksPerRow;
    int valid = num_cols - chunk * 8;
    if (row >= num_rows || valid <= 0) continue;
    const uint4 packed = *reinterpret_cast<const uint4*>(smem + Tile::offset(row, chunk));
    Element* dst = gmem + row * row_stride + chunk * 8;
    if (vectorized && valid >= 8) {
      *reinterpret_cast<uint4*>(dst) = packed;
    } else {
      const uint32_t w[4] = {packed.x, packed.y, packed.z, packed.w};
      uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
#pragma unroll
      for (int e = 0; e < 8; ++e)
        if (e < valid) d16[e] = static_cast<uint16_t>(w[e / 2] >> (16 * (e % 2)));
    }
  }
}

}  // namespace flashattn::cuda
