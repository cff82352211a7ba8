// Counter-based random numbers for dropout, identical on CPU and CUDA.
// The keep decision of score (b, h, i, j) depends only on (seed, offset, b, h, i, j): Philox4x32-10
// (Salmon et al., SC'11) with key = seed and counter = (j / 4, i, b * num_heads + h, offset), whose
// four 32-bit outputs decide keys 4 * (j / 4) .. 4 * (j / 4) + 3. No state, so any tiling, thread
// count or the backward pass regenerates exactly the forward's mask.
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace flashattn {

struct Philox4 {
  uint32_t x[4];
};

FLASHATTN_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

FLASHATTN_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kM1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Keys j0 .. j0 + 3 (j0 a multiple of 4) of row i: bit t of the result is 1 if key j0 + t is kept.
FLASHATTN_HOST_DEVICE uint32_t dropout_keep_bits(uint64_t seed, uint64_t offset, int64_t bh, int64_t i, int64_t j0,
                                                 uint32_t keep_threshold) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(j0 >> 2), static_cast<uint32_t>(i), static_cast<uint32_t>(bh),
                                  static_cast<uint32_t>(offset), static_cast<uint32_t>(seed),
                                  static_cast<uint32_t>(seed >> 32) ^ static_cast<uint32_t>(offset >> 32));
  return (r.x[0] < keep_threshold ? 1u : 0u) | (r.x[1] < keep_threshold ? 2u : 0u) |
         (r.x[2] < keep_threshold ? 4u : 0u) | (r.x[3] < keep_threshold ? 8u : 0u);
}

// What a kept probability is multiplied by: 1 / (1 - dropout_p); 0 when dropout_p = 1 (everything
// is dropped: outputs and gradients 0, not 0 * inf = NaN); 1 without dropout. Every kernel (CPU,
// CUDA tensor-core and SIMT) uses this one rule.
template <typename T>
FLASHATTN_HOST_DEVICE T dropout_keep_scale(double dropout_p) {
  if (!(dropout_p > 0.0)) return T(1);
  return dropout_p < 1.0 ? static_cast<T>(1.0 / (1.0 - dropout_p)) : T(0);
}

// P(keep) = keep_threshold / 2^32 = 1 - dropout_p (to 2^-32).
FLASHATTN_HOST_DEVICE uint32_t dropout_keep_threshold(double dropout_p) {
  const double keep = (1.0 - dropout_p) * 4294967296.0;
  return keep >= 4294967295.0 ? 0xFFFFFFFFu : (keep <= 0.0 ? 0u : static_cast<uint32_t>(keep));
}

}  // namespace flashattn
