// Warp-level matrix products on mma.sync m16n8k16, operands from swizzled shared memory
// (ldmatrix, .trans where the tile is stored k-major) or, for A, from registers.
//
// Fragment layout (lane = 4 g + t): an accumulator tile acc[4] of a 16x8 product holds
// (row g, cols 2t, 2t+1) in acc[0..1] and (row g + 8, cols 2t, 2t+1) in acc[2..3].
//
// Addressing. With the swizzle of smem_layout.h, the ldmatrix address of a lane is
//   row * panel_cols + panel offset + ((chunk ^ swizzle(row)) * 8)
// where row = (multiple of 8, known at compile time or per warp) + lane part, and chunk =
// (compile-time even constant) + lane bit. The lane part of the XOR is therefore one value per
// lane, and the compile-time part of the chunk selects one of panel_chunks / 2 precomputed base
// addresses; everything else is an immediate offset of the LDSM instruction. FragAddr holds those
// few bases, so a fully unrolled product needs 2..4 address registers per operand instead of one
// per (k-step, tile) (which made ptxas spill).
#pragma once

#include "ptx.h"
#include "smem_layout.h"

namespace flashattn::cuda {

// Which lane bits pick the row and which the chunk:
//   kRowsFromQuarterBit0: row = r + 8 * (q % 2), chunk bit = q / 2   (A row-major; B stored [k][n], .trans)
//   otherwise:            row = r + 8 * (q / 2), chunk bit = q % 2   (B stored [n][k]; A stored [k][m], .trans)
// with r = lane % 8, q = lane / 8 (lane i addresses row i % 8 of matrix i / 8).
template <class Tile, bool kRowsFromQuarterBit0>
struct FragAddr {
  static constexpr int kBases = Tile::kPanelChunks / 2;
  uint32_t base[kBases];

  // row0: a multiple of 8 added to every row. chunk_xor: an even per-warp chunk offset whose bits
  // are disjoint from the compile-time chunks used with at() (interleaved warp column groups).
  __device__ __forceinline__ FragAddr(const void* smem, int row0, int chunk_xor = 0) {
    const int lane = threadIdx.x % 32, r = lane % 8, q = lane / 8;
    const int lane_row = kRowsFromQuarterBit0 ? r + 8 * (q % 2) : r + 8 * (q / 2);
    const int lane_chunk = kRowsFromQuarterBit0 ? q / 2 : q % 2;
    const int swizzle = Tile::kPanelChunks == 8 ? (lane_row & 7) : ((lane_row >> 1) & 3);
    const int x = lane_chunk ^ swizzle ^ chunk_xor;
    const uint32_t start = smem_u32(smem) + static_cast<uint32_t>((row0 + lane_row) * Tile::kPanelCols) * 2u;
#pragma unroll
    for (int i = 0; i < kBases; ++i) base[i] = start + static_cast<uint32_t>(((2 * i) ^ x) << 4);
  }
  // Moves every base by `bytes` (a ring of identical tiles: next stage).
  __device__ __forceinline__ void advance(int bytes) {
#pragma unroll
    for (int i = 0; i < kBases; ++i) base[i] += bytes;
  }
  // Address for tile rows row.. (row a multiple of 8) and logical chunk `chunk` (even); both are
  // compile-time constants in the unrolled products.
  __device__ __forceinline__ uint32_t at(int row, int chunk) const {
    const int panel = chunk / Tile::kPanelChunks, c = chunk % Tile::kPanelChunks;
    return base[c / 2] + static_cast<uint32_t>((panel * Tile::kRows * Tile::kPanelCols + row * Tile::kPanelCols) * 2);
  }
};

// Where accumulator element e (0..3) of the 16 x 8 tile (mt, nt) of a warp product lies: row
// base + 16 mt + g + 8 (e / 2), column base + 8 nt + 2 t + e % 2 (lane = 4 g + t). The base
// (the warp's first row or column, maybe 64-bit) comes first, as the kernels always added it:
// ptxas's register allocation near 255 depends even on that order.
struct AccCoord {
  int g, t;
  __device__ __forceinline__ AccCoord() {
    const int lane = threadIdx.x % 32;
    g = lane / 4;
    t = lane % 4;
  }
  template <typename Index>
  __device__ __forceinline__ Index row(Index base, int mt, int e) const {
    return base + 16 * mt + g + 8 * (e / 2);
  }
  template <typename Index>
  __device__ __forceinline__ Index col(Index base, int nt, int e) const {
    return base + 8 * nt + 2 * t + (e % 2);
  }
};

// Operand roles -> address patterns.
template <class Tile> using FragA = FragAddr<Tile, true>;        // A stored [m][k]
template <class Tile> using FragATrans = FragAddr<Tile, false>;  // A stored [k][m]
template <class Tile> using FragB = FragAddr<Tile, false>;       // B stored [n][k]
template <class Tile> using FragBTrans = FragAddr<Tile, true>;   // B stored [k][n]

// A fragment (16 x 16): rows m.., k-step ks.
template <bool kATrans, class FA>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const FA& fa, int m, int ks) {
  if constexpr (kATrans) ldsm_x4_trans(a, fa.at(16 * ks, m / 8));  // stored [k][m]
  else ldsm_x4(a, fa.at(m, 2 * ks));                               // stored [m][k]
}
// B fragments of two adjacent 8-column tiles (16 columns starting at chunk 2 * pair), k-step ks:
// b[0], b[1] for the first tile, b[2], b[3] for the second.
template <bool kBTrans, class FB>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const FB& fb, int pair, int ks) {
  if constexpr (kBTrans) ldsm_x4_trans(b, fb.at(16 * ks, 2 * pair));  // stored [k][n]
  else ldsm_x4(b, fb.at(16 * pair, 2 * ks));                          // stored [n][k]
}

// acc[kMT][kNT] += A[16 kMT rows, 16 kKSteps] * B[16 kKSteps, 8 kNT columns].
// The warp's 16-column pairs are pair_stride apart (1: contiguous; 2: two warp column groups
// interleaved at 16-column granularity, the group's offset folded into the B addresses).
template <int kMT, int kNT, int kKSteps, bool kATrans, bool kBTrans, int kPairStride = 1, typename Element, class FA,
          class FB>
__device__ __forceinline__ void warp_gemm(float (&acc)[kMT][kNT][4], const FA& fa, const FB& fb, int pair_begin = 0) {
  static_assert(kNT % 2 == 0, "B fragments come in pairs of 8-column tiles");
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
    uint32_t a[kMT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) load_a<kATrans>(a[mt], fa, 16 * mt, ks);
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      load_b<kBTrans>(b, fb, pair_begin + kPairStride * np, ks);
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_m16n8k16<Element>(acc[mt][2 * np], a[mt], b[0], b[1]);
        mma_m16n8k16<Element>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
      }
    }
  }
}

// Same with A already in registers as fragments a[kMT][kKSteps][4] (P in the forward's P V);
// the reduction runs over B's k rows k_begin .. k_begin + 16 kKSteps (B stored [k][n], .trans).
template <int kMT, int kNT, int kKSteps, bool kBTrans, typename Element, class FB>
__device__ __forceinline__ void warp_gemm_ra(float (&acc)[kMT][kNT][4], const uint32_t (&a)[kMT][kKSteps][4],
                                             const FB& fb, int k_begin = 0) {
  static_assert(kBTrans, "P V reads V stored [key][d]");
#pragma unroll
  for (int ks = 0; ks < kKSteps; ++ks) {
#pragma unroll
    for (int np = 0; np < kNT / 2; ++np) {
      uint32_t b[4];
      ldsm_x4_trans(b, fb.at(k_begin + 16 * ks, 2 * np));
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        mma_m16n8k16<Element>(acc[mt][2 * np], a[mt][ks], b[0], b[1]);
        mma_m16n8k16<Element>(acc[mt][2 * np + 1], a[mt][ks], b[2], b[3]);
      }
    }
  }
}

// Accumulator tiles (fp32, 16 x 8 each) of a 16-row strip -> A fragments (16 x 16 each) of
// 16-bit elements: tiles 2 ks and 2 ks + 1 become k-step ks. This is what keeps P in registers.
template <typename Element, int kMT, int kNT>
__device__ __forceinline__ void acc_to_a_fragments(uint32_t (&a)[kMT][kNT / 2][4], const float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int ks = 0; ks < kNT / 2; ++ks) {
      a[mt][ks][0] = pack2<Element>(acc[mt][2 * ks][0], acc[mt][2 * ks][1]);
      a[mt][ks][1] = pack2<Element>(acc[mt][2 * ks][2], acc[mt][2 * ks][3]);
      a[mt][ks][2] = pack2<Element>(acc[mt][2 * ks + 1][0], acc[mt][2 * ks + 1][1]);
      a[mt][ks][3] = pack2<Element>(acc[mt][2 * ks + 1][2], acc[mt][2 * ks + 1][3]);
    }
}

template <int kMT, int kNT>
__device__ __forceinline__ void zero(float (&acc)[kMT][kNT][4]) {
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;
}

// Accumulators -> a shared tile of 16-bit elements: rows row0 + 16 mt.., 16-column pairs
// pair0 + kPairStride * np (as in warp_gemm). Conflict-free 4-byte stores (eight rows of a
// quarter-warp land on eight different 16-byte bank groups).
template <class Tile, int kPairStride = 1, typename Element, int kMT, int kNT>
__device__ __forceinline__ void store_acc_to_smem(Element* s, const float (&acc)[kMT][kNT][4], int row0, int pair0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = row0 + 16 * mt + g + 8 * half;
        const int col = 16 * (pair0 + kPairStride * (nt / 2)) + 8 * (nt % 2) + 2 * t;
        *reinterpret_cast<uint32_t*>(s + Tile::element_offset(row, col)) =
            pack2<Element>(acc[mt][nt][2 * half], acc[mt][nt][2 * half + 1]);
      }
}

}  // namespace flashattn::cuda
