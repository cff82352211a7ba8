// The online softmax step shared by the CPU forward and decode kernels.
#pragma once

#include "cpu/isa.h"

#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/scores.h"

namespace flashattn::cpu::CPU_CAPABILITY {

// Online softmax for one row of one tile (scores = s * factor): folds the row into (row_max,
// row_sum), rescales the row of the output accumulator, and leaves P in `s`.
template <typename acc_t>
inline void online_softmax_row(acc_t* s, int64_t n, acc_t factor, acc_t& row_max, acc_t& row_sum, acc_t* o_row,
                               int64_t headdim_v) {
  using Vec = Vectorized<acc_t>;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t tile_max = row_max_of(s, n) * factor;  // factor >= 0
  const acc_t new_max = std::isnan(tile_max) ? tile_max : std::max(row_max, tile_max);  // NaN propagates
  if (new_max == kNegInf) {  // nothing visible in this row yet
    std::fill(s, s + n, acc_t(0));
    return;
  }
  if (new_max != row_max) {
    const acc_t alpha = std::exp(row_max - new_max);  // 0 when row_max was -inf
    row_sum *= alpha;
    at::vec::map([alpha](Vec x) { return x * Vec(alpha); }, o_row, o_row, headdim_v);
    row_max = new_max;
  }
  row_sum += exp_row(s, n, factor, new_max);
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
