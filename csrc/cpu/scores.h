// From q·k products to softmax scores, one row of one tile at a time, and the dropout keep mask.
// Forward and backward call the same code, so the backward recomputes exactly the forward's P.
//
// score(i, j) = mod(q_i · k_j · scale) + alibi(i, j) + mask(i, j), where mod is the softcap
// (cap · tanh(x / cap)) when set; keys outside the band, a false bool mask or a −inf float mask
// give −inf. Natural-log units.
#pragma once

#include "cpu/isa.h"

#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "attention_params.h"
#include "philox.h"

namespace flashattn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512)
// 2^x for the softmax: x = n + f with |f| <= 1/2, 2^f from a degree-5 minimax polynomial (relative
// error < 3e-7 evaluated in fp32), times 2^n by vscalefps. -inf and very negative x give 0; NaN
// stays NaN (vmaxps returns its second operand when either is NaN).
inline Vectorized<float> exp2_fast(const Vectorized<float>& x) {
  const __m512 v = _mm512_max_ps(_mm512_set1_ps(-160.f), x);
  const __m512 n = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(v, n);
  __m512 p = _mm512_set1_ps(1.327647152e-03f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675541331e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550713275e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402211972e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469671e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000072e+00f));
  return _mm512_scalef_ps(p, n);
}
#endif

// exp(x * factor - shift), vectorized. fp32 on AVX-512 goes through exp2_fast (times log2(e));
// elsewhere Sleef's exp (1 ulp). NaN propagates in both. The product is rounded before the shift
// is subtracted (no fused multiply-add): the shift is a row maximum computed as round(x_max *
// factor), so the maximum's term is exactly exp(0) = 1 however large the scores (an FMA would leave
// the product's rounding error, up to ulp(|score|) / 2, in the exponent: 2^±64 at |score| ~ 1e10,
// and inf / inf = NaN). The kernels are compiled with -ffp-contract=off (setup.py) so that no copy
// fuses the generic x * factor - shift either.
template <typename T>
struct ScaledExp {
  Vectorized<T> factor, shift;
  ScaledExp(T f, T s) : factor(f), shift(s) {}
  Vectorized<T> operator()(const Vectorized<T>& x) const {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // An explicitly rounded multiply: the compiler may not contract it with the subtraction.
      constexpr float kLog2e = 1.4426950408889634f;
      const __m512 product = _mm512_mul_round_ps(x, factor, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      return exp2_fast(Vectorized<T>(_mm512_sub_ps(product, shift)) * Vectorized<T>(kLog2e));
    }
#endif
    return (x * factor - shift).exp();
  }
};

// What a (query rows × key columns) tile needs besides scaling.
struct TileShape {
  int64_t row0, rows, col0, cols;
};

// Which element masks a visible tile needs (decided once per tile).
struct TileMasking {
  bool visible = true;     // false: the tile contributes nothing and is skipped
  bool band_cuts = false;  // some element lies outside the band
  bool attn_mask = false;  // read attn_mask
  const uint8_t* elem = nullptr;  // element mask of a partial sparse block at (row0, col0), or null
  int64_t elem_ld = 0;
  // Scores are the products times a non-negative scale and nothing else: make_score_row leaves
  // the row alone and the softmax folds the scale into its exp (one pass less over the tile).
  bool scale_only = false;
};

// The factor the softmax still has to apply to a row make_score_row has processed.
template <typename acc_t>
inline acc_t pending_scale(const AttentionParams& p, const TileMasking& tm) {
  return tm.scale_only ? static_cast<acc_t>(p.softmax_scale) : acc_t(1);
}

// Largest element of a row (-inf for an empty row), four vector accumulators deep.
template <typename acc_t>
inline acc_t row_max_of(const acc_t* s, int64_t n) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  Vec m0(-std::numeric_limits<acc_t>::infinity()), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    m0 = at::vec::maximum(m0, Vec::loadu(s + j));
    m1 = at::vec::maximum(m1, Vec::loadu(s + j + W));
    m2 = at::vec::maximum(m2, Vec::loadu(s + j + 2 * W));
    m3 = at::vec::maximum(m3, Vec::loadu(s + j + 3 * W));
  }
  for (; j + W <= n; j += W) m0 = at::vec::maximum(m0, Vec::loadu(s + j));
  m0 = at::vec::maximum(at::vec::maximum(m0, m1), at::vec::maximum(m2, m3));
  acc_t m = at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, m0);
  for (; j < n; ++j) m = (s[j] > m || std::isnan(s[j])) ? s[j] : m;  // NaN propagates
  return m;
}

// s[j] = exp(s[j] * factor - shift) in place; returns the sum.
template <typename acc_t>
inline acc_t exp_row(acc_t* s, int64_t n, acc_t factor, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  const ScaledExp<acc_t> e(factor, shift);
  Vec sum0(acc_t(0)), sum1(acc_t(0));
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const Vec e0 = e(Vec::loadu(s + j)), e1 = e(Vec::loadu(s + j + W));
    e0.store(s + j);
    e1.store(s + j + W);
    sum0 = sum0 + e0;
    sum1 = sum1 + e1;
  }
  for (; j < n; j += W) {  // the tail through padded vectors: the same arithmetic as the body
    const int count = static_cast<int>(std::min<int64_t>(W, n - j));
    const Vec e0 = e(Vec::loadu(s + j, count));
    e0.store(s + j, count);
    sum1 = sum1 + Vec::set(Vec(acc_t(0)), e0, count);
  }
  return at::vec::vec_reduce_all<acc_t>([](Vec a, Vec b) { return a + b; }, sum0 + sum1);
}

// Per (batch, head) facts that every row of a task reuses.
struct HeadContext {
  int64_t b = 0, h = 0;
  double alibi_slope = 0.0;
  uint64_t bh = 0;  // b * num_heads + h, the dropout stream's head index
};

inline HeadContext head_context(const AttentionParams& p, int64_t b, int64_t h) {
  HeadContext c;
  c.b = b;
  c.h = h;
  c.bh = static_cast<uint64_t>(b * p.num_heads + h);
  if (p.alibi_slopes) c.alibi_slope = p.alibi_slopes[b * p.alibi_batch_stride + h];
  return c;
}

// Does any element of the tile need masking by the band?
inline bool band_cuts_tile(const AttentionParams& p, const TileShape& t) {
  const int64_t last_row = t.row0 + t.rows - 1;
  return band_key_begin(p, last_row) > t.col0 || band_key_end(p, t.row0) < t.col0 + t.cols;
}

// True when no element of the tile can be visible under the band alone.
inline bool band_excludes_tile(const AttentionParams& p, const TileShape& t) {
  const int64_t last_row = t.row0 + t.rows - 1;
  // Rows' visible ranges move right monotonically with the row index.
  return band_key_end(p, last_row) <= t.col0 || band_key_begin(p, t.row0) >= t.col0 + t.cols;
}

template <typename acc_t, typename mask_t>
inline void add_float_mask(acc_t* s, int64_t n, const mask_t* m, int64_t col_stride) {
  for (int64_t j = 0; j < n; ++j) s[j] += static_cast<acc_t>(m[j * col_stride]);
}

// Turns the raw products s[0 .. cols) of query row i into scores (see the file comment).
// With a softcap, softcap_grad (if given) receives d score / d (q·k·scale) = 1 - tanh².
template <typename acc_t>
inline void make_score_row(const AttentionParams& p, const HeadContext& hc, int64_t i, const TileShape& t,
                           const TileMasking& tm, acc_t* s, acc_t* softcap_grad = nullptr) {
  using Vec = Vectorized<acc_t>;
  if (tm.scale_only) return;  // the softmax applies the scale (pending_scale)
  const int64_t n = t.cols;
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  int64_t j = 0;
  if (p.softcap > 0) {
    const acc_t cap = static_cast<acc_t>(p.softcap);
    const Vec v_in(scale / cap), v_cap(cap), v_one(acc_t(1));
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec th = (Vec::loadu(s + j) * v_in).tanh();
      (v_cap * th).store(s + j);
      if (softcap_grad) (v_one - th * th).store(softcap_grad + j);
    }
    for (; j < n; ++j) {
      const acc_t th = std::tanh(s[j] * scale / cap);
      s[j] = cap * th;
      if (softcap_grad) softcap_grad[j] = acc_t(1) - th * th;
    }
  } else {
    const Vec v_scale(scale);
    for (; j + Vec::size() <= n; j += Vec::size()) (Vec::loadu(s + j) * v_scale).store(s + j);
    for (; j < n; ++j) s[j] *= scale;
  }
  if (p.alibi_slopes) {
    const acc_t slope = static_cast<acc_t>(hc.alibi_slope);
    const int64_t diag = i + p.seqlen_k - p.seqlen_q;
    for (int64_t jj = 0; jj < n; ++jj) {
      const int64_t d = diag - (t.col0 + jj);
      s[jj] -= slope * static_cast<acc_t>(d < 0 ? -d : d);
    }
  }
  if (tm.attn_mask) {
    const int64_t off = p.mask_view.row_offset(hc.b, hc.h, i) + t.col0 * p.mask_view.col_stride;
    const int64_t cs = p.mask_view.col_stride;
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    switch (p.mask_kind) {
      case MaskKind::kBool: {
        const bool* m = static_cast<const bool*>(p.mask) + off;
        for (int64_t jj = 0; jj < n; ++jj)
          if (!m[jj * cs]) s[jj] = kNegInf;
        break;
      }
      case MaskKind::kFloat32: add_float_mask(s, n, static_cast<const float*>(p.mask) + off, cs); break;
      case MaskKind::kFloat64: add_float_mask(s, n, static_cast<const double*>(p.mask) + off, cs); break;
      case MaskKind::kFloat16: add_float_mask(s, n, static_cast<const c10::Half*>(p.mask) + off, cs); break;
      case MaskKind::kBFloat16: add_float_mask(s, n, static_cast<const c10::BFloat16*>(p.mask) + off, cs); break;
      case MaskKind::kNone: break;
    }
  }
  if (tm.elem) {
    const uint8_t* e = tm.elem + (i - t.row0) * tm.elem_ld;
    for (int64_t jj = 0; jj < n; ++jj)
      if (!e[jj]) s[jj] = -std::numeric_limits<acc_t>::infinity();
  }
  if (tm.band_cuts) {
    constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
    const int64_t lo = band_key_begin(p, i) - t.col0, hi = band_key_end(p, i) - t.col0;
    for (int64_t jj = 0; jj < n; ++jj)
      if (jj < lo || jj >= hi) s[jj] = kNegInf;
  }
}

// Multiplies p[0 .. cols) of query row i by the dropout keep mask / (1 - dropout_p).
template <typename acc_t>
inline void apply_dropout_row(const AttentionParams& p, const HeadContext& hc, int64_t i, const TileShape& t,
                              uint32_t keep_threshold, acc_t keep_scale, acc_t* row) {
  const int64_t j_end = t.col0 + t.cols;
  for (int64_t j4 = t.col0 & ~int64_t(3); j4 < j_end; j4 += 4) {
    const uint32_t bits = dropout_keep_bits(p.philox_seed, p.philox_offset, hc.bh, i, j4, keep_threshold);
    for (int64_t u = 0; u < 4; ++u) {
      const int64_t j = j4 + u;
      if (j < t.col0 || j >= j_end) continue;
      row[j - t.col0] = ((bits >> u) & 1u) ? row[j - t.col0] * keep_scale : acc_t(0);
    }
  }
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
