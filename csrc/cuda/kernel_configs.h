// Tile sizes per (direction, head-dim bucket), FlashAttention-2's choices for A100/H100 with the
// reasoning that drives them. Budget per thread: 255 registers; per CTA: 163 KB of shared memory
// on sm80 (227 KB on sm90). Predictions below were checked against `ptxas -v` (csrc/cuda/README.md).
#pragma once

#include <type_traits>

#include "buckets.h"
#include "kernel_traits.h"

namespace flashattn::cuda {

// Forward: block_m = 128 query rows per CTA; a warp owns 32 rows (4 warps) or 16 rows (8 warps).
// Registers per thread ~ O (rows/warp * d / 32) + S (rows/warp * block_n / 32) + fragments:
//   d=32:  4 warps, block_n 128: O 32 + S 128       smem (128 + 2*128) *  32 * 2 = 24 KB
//   d=64:  4 warps, block_n  64: O 64 + S 64        smem (128 + 2*64)  *  64 * 2 = 32 KB
//          (FA2 uses block_n 128 here; with our code ptxas spilled 20 bytes on sm80 at 128)
//   d=96:  4 warps, block_n  64: O 96 + S 64        smem (128 + 2*64)  *  96 * 2 = 48 KB
//   d=128: 4 warps, block_n  64: O 128 + S 64       smem (128 + 2*64)  * 128 * 2 = 64 KB (2 CTAs/SM)
//   d=192: 8 warps, block_n  64: O 96 + S 32        smem (128 + 2*64)  * 192 * 2 = 96 KB
//   d=256: 8 warps, block_n  64: O 128 + S 32       smem (128 + 2*64)  * 256 * 2 = 128 KB
//
// The extras kernel (masks, dropout, ALiBi, softcap, block mask) gives each warp 16 rows
// (block_m 64, 4 warps): half the accumulators, room for the per-element paths; block_n 64
// (d <= 128), 32 (d = 192), 16 (d = 256: O alone is 128 registers; at 32 ptxas spilled 140 B).
template <typename Element, int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockN = kHeadDim <= 32 ? 128 : 64;
  static constexpr int kWarps = kHeadDim <= 128 ? 4 : 8;
  using Traits = FwdTraits<Element, kHeadDim, 128, kBlockN, kWarps, false>;
  // Same tile with a two-stage K/V ring: d=128 96 KB, d=256 192 KB; chosen where the GPU keeps
  // the same CTAs per SM with it (sm90), see dispatch.cu. d = 128 scores each 64-key tile in two
  // 32-key steps there (registers; see FwdTraits). d = 96 keeps the interleave: its ring spilled
  // (20-56 bytes) in every variant tried.
  using TraitsPipelined = std::conditional_t<kHeadDim == 96, Traits,
                                             FwdTraits<Element, kHeadDim, 128, kBlockN, kWarps, false, 2,
                                                       kHeadDim == 128 ? 2 : 1>>;
  using TraitsExtras = FwdTraits<Element, kHeadDim, 64, kHeadDim <= 128 ? 64 : (kHeadDim <= 192 ? 32 : 16), 4, true>;
  // Varlen (fwd_kernel<..., true>): the sequence's lengths and pointers live in registers there
  // (constants in the dense kernels), so its extras tile halves the key block where 64 (d = 96,
  // 128) or 32 (d = 192) keys spilled 124-176 bytes on sm80; d = 256 cannot go below 16 keys and
  // spills (README.md). The plain tile is Traits but at d = 96, which spilled 4 bytes.
  using TraitsVarlenExtras =
      FwdTraits<Element, kHeadDim, 64, kHeadDim <= 64 ? 64 : (kHeadDim <= 128 ? 32 : 16), 4, true>;
  using TraitsVarlen = std::conditional_t<kHeadDim == 96, TraitsVarlenExtras, Traits>;
};

// Backward: a CTA owns block_n keys (8 warps), loops over query blocks of block_m = 64.
// Registers ~ dK + dV (2 * block_n * d / 256) + S^T and dP^T (2 * block_n * block_m / 256):
//   d <= 128: block_n 128, dK/dV warps 8 x 1 (16 keys x d each): d=128 -> 128 + 64
//   d  > 128: block_n  64, dK/dV warps 4 x 2 (16 keys x d/2 each): d=256 -> 128 + 32
// Shared memory: K, V (block_n x d), Q, dO (block_m x d, double-buffered when it fits in
// 163 KB), P^T and dS^T (block_n x block_m), lse and D: d=128 -> 161 KB, d=256 -> 144 KB.
template <typename Element, int kHeadDim>
struct BwdConfig {
  static constexpr bool kWide = kHeadDim > 128;
  // <Element, d, block_m, block_n, warps, warps along keys for S^T, warps along keys for dK/dV, extras>
  using Traits = BwdTraits<Element, kHeadDim, 64, kWide ? 64 : 128, 8, 4, kWide ? 4 : 8, false>;
  // The extras kernel: block_n 64 with 8 warps (d <= 128: S^T warps 4 x 2 of 16 x 32, dK/dV warps
  // 4 x 2 of 16 x d/2), half the dK/dV registers of the plain tile.
  using TraitsExtras = BwdTraits<Element, kHeadDim, 64, 64, 8, 4, 4, true>;
  // Varlen (bwd_kernel<..., true>): d <= 128 runs every call on the extras tile (the plain one
  // spilled 92 bytes at d = 128 with the per-sequence registers); d > 128 as the dense calls, the
  // extras tile spilling 88 (d = 192) / 196 (d = 256) bytes.
  using TraitsVarlen = std::conditional_t<kWide, Traits, TraitsExtras>;
  using TraitsVarlenExtras = TraitsExtras;
};

}  // namespace flashattn::cuda

namespace flashattn::cuda {

// The backward's query block, one for every bucket (the deterministic mode's turn counters and
// the dQ workspace are laid out by it before a bucket is chosen).
inline constexpr int kBwdBlockM = BwdConfig<__half, table::kHeadDims[0]>::Traits::kBlockM;
template <size_t... I>
constexpr bool bwd_block_m_is_uniform(std::index_sequence<I...>) {
  return ((BwdConfig<__half, table::kHeadDims[I]>::Traits::kBlockM == kBwdBlockM &&
           BwdConfig<__half, table::kHeadDims[I]>::TraitsExtras::kBlockM == kBwdBlockM) && ...);
}
static_assert(bwd_block_m_is_uniform(std::make_index_sequence<std::size(table::kHeadDims)>{}),
              "every backward tile must use the same block_m (dispatch.cu sizes the workspace by it)");

}  // namespace flashattn::cuda
