// The compile-time shape of each kernel: tile sizes, warps, pipeline depth, shared-memory layout.
// A leaf header: the kernels include it, and so does everything that only needs the shapes
// (dispatch.cu, the tile-configuration report, the fragment model's configuration dump).
#pragma once

#include "smem_layout.h"

namespace flashattn::cuda {

// kExtras: the kernel also handles attn_mask, dropout, ALiBi, softcap and the block mask (runtime
// values, per-tile uniform branches). It is the one compile-time flag besides dtype and head dim:
// with those paths compiled in, the register budget of the 128 x 64 hdim-128 tile overflows
// (ptxas spills ~400 bytes), so the plain kernel (band, GQA, any lengths: what SDPA's FLASH and
// flash_attn_func users run) is built without them and the extras kernel uses a smaller tile.
//
// kSubTiles: the ring kernel may score a K/V tile in sub-tiles of block_n / kSubTiles keys, each
// with its own online-softmax step and P V product: S and P then need half the registers (the
// hd128 ring kernel spilled ~50 bytes without it), for one more O rescale per tile.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNumWarps_, bool kExtras_,
          int kStages_ = 1, int kSubTiles_ = 1>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNumWarps = kNumWarps_;
  static constexpr bool kExtras = kExtras_;
  static constexpr int kStages = kStages_;  // K/V pipeline depth (see above)
  static constexpr int kSubTiles = kSubTiles_;
  static constexpr int kSubN = kBlockN / kSubTiles;  // keys scored per online-softmax step
  static_assert(kStages == 1 || kStages == 2, "K/V pipeline: 1 (interleaved) or 2 (ring)");
  static_assert(kSubTiles == 1 || kStages == 2, "sub-tiles need the ring (the interleave waits for V mid-tile)");
  static_assert(kSubN % 16 == 0, "sub-tile shape");
  static constexpr int kThreads = 32 * kNumWarps;
  static constexpr int kWarpRows = kBlockM / kNumWarps;
  static constexpr int kMT = kWarpRows / 16;       // 16-row strips per warp
  static constexpr int kScoreNT = kBlockN / kSubTiles / 8;  // 8-key tiles of S per strip and step
  static constexpr int kOutNT = kHeadDim / 8;      // 8-column tiles of O per strip
  static_assert(kWarpRows % 16 == 0 && kBlockN % 16 == 0 && kHeadDim % 32 == 0, "tile shape");
  using TileQ = SmemTile<kBlockM, kHeadDim>;
  using TileK = SmemTile<kBlockN, kHeadDim>;
  using TileV = SmemTile<kBlockN, kHeadDim>;
  static constexpr int kSmemBytes = TileQ::kBytes + kStages * (TileK::kBytes + TileV::kBytes);
};

// kExtras as in the forward: masks, dropout, ALiBi, softcap, block mask, dmask.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNumWarps_, int kWarpsKeysS_,
          int kWarpsKeysKV_, bool kExtras_>
struct BwdTraits {
  using Element = Element_;
  static constexpr bool kExtras = kExtras_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNumWarps = kNumWarps_;
  static constexpr int kThreads = 32 * kNumWarps;
  // S^T and dP^T (block_n x block_m): warps in a kWarpsKeysS x kWarpsQueriesS grid.
  static constexpr int kWarpsKeysS = kWarpsKeysS_, kWarpsQueriesS = kNumWarps / kWarpsKeysS;
  static constexpr int kSMT = kBlockN / kWarpsKeysS / 16, kSNT = kBlockM / kWarpsQueriesS / 8;
  // dK and dV (block_n x d): kWarpsKeysKV x kWarpsColsKV.
  static constexpr int kWarpsKeysKV = kWarpsKeysKV_, kWarpsColsKV = kNumWarps / kWarpsKeysKV;
  static constexpr int kKVMT = kBlockN / kWarpsKeysKV / 16, kKVCols = kHeadDim / kWarpsColsKV, kKVNT = kKVCols / 8;
  // dQ (block_m x d): one 16-row strip per warp row, columns in chunks of 32 (16 where 32 does not divide).
  static constexpr int kWarpsRowsDq = kBlockM / 16, kWarpsColsDq = kNumWarps / kWarpsRowsDq;
  static constexpr int kDqCols = kHeadDim / kWarpsColsDq, kDqChunk = kDqCols % 32 == 0 ? 32 : 16;
  // Warp column groups (dK/dV, dQ) interleave at 16-column granularity: group c owns column pairs
  // c, c + groups, c + 2 groups, ... so the group offset folds into the swizzle (warp_gemm.h).
  static_assert(kWarpsColsKV <= 2 && kWarpsColsDq <= 2, "interleaving needs the group bit below the panel size");
  static_assert(kSMT >= 1 && kSNT % 2 == 0 && kKVMT >= 1 && kKVNT % 2 == 0 && kDqCols % kDqChunk == 0, "warp tiling");
  static_assert(kWarpsRowsDq * kWarpsColsDq == kNumWarps, "dQ warp tiling");

  using TileK = SmemTile<kBlockN, kHeadDim>;  // K and V
  using TileQ = SmemTile<kBlockM, kHeadDim>;  // Q and dO
  using TileP = SmemTile<kBlockN, kBlockM>;   // P^T and dS^T
  static constexpr int kFixedBytes = 2 * TileK::kBytes + 2 * TileP::kBytes;
  static constexpr int kStageBytes = 2 * TileQ::kBytes + 2 * kBlockM * 4;
  static constexpr int kSmemLimit = 163 * 1024;  // sm80's opt-in maximum; sm90 has 227 KB
  static constexpr int kStages = kFixedBytes + 2 * kStageBytes <= kSmemLimit ? 2 : 1;
  static constexpr int kSmemBytes = kFixedBytes + kStages * kStageBytes;
};

}  // namespace flashattn::cuda
