// The register-blocked inner loops of the direct decode kernel (decode.cpp): a few query rows of
// one kv head against one block of its keys, read from the cache where they lie.
//
//   scores: s[r][j] = q_r · k_j   two query rows × four keys per step (8 accumulators); each step
//           ends in one transposing reduction that yields the four keys' dots of a row at once,
//           instead of one horizontal sum per dot.
//   pv:     o_r += Σ_j p[r][j] v_j  a register tile of up to 8 rows × 32 columns, loaded once per
//           block of keys; each V row is loaded once per tile and used by every row.
//
// Two flavours:
//   fp32      Vectorized<float> FMAs (any ISA); fp16, and bf16 without AVX512-BF16, widen the
//             block to fp32 first.
//   bf16 dp   AVX512-BF16 (vdpbf16ps, checked at run time): Q·K from the bf16 rows directly; P
//             rounded to bf16 (as the bf16 GEMM path and tensor-core kernels do) and paired with
//             V rows two keys at a time. This o tile keeps its columns in vdpbf16ps's interleaved
//             order (bf16_dp_column); the caller restores it once, at the end. Inputs are read
//             with denormals as zero (the instruction's rule).
#pragma once

#include "cpu/isa.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu/blas.h"

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

namespace flashattn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// The rows of the next block of keys that a kernel asks for into L2 as it walks its own rows
// (row j of this block: row j of the next), so that the requests are spread over the work. One
// kv head's rows are strided pieces of the cache, each in its own page when heads are many: the
// hardware prefetchers do not follow them.
struct NextRows {
  const char* base = nullptr;
  int64_t stride = 0, rows = 0, bytes = 0;  // in bytes, but rows
  void fetch(int64_t j) const {
    if (j >= rows) return;
    for (int64_t off = 0; off < bytes; off += 64) line(base + j * stride + off);
  }
  // A loop of nothing but __builtin_prefetch has no side effects to g++, which deletes it
  // (-ffinite-loops): the x86 instruction is asked for as volatile asm instead.
  static void line(const char* p) {
#if defined(__x86_64__) && defined(__GNUC__)
    asm volatile("prefetcht1 %0" : : "m"(*p));
#else
    __builtin_prefetch(p, 0, 2);
#endif
  }
};

// out[t] = Σ lanes of a[t], t < 4.
inline void reduce4(const Vectorized<float> a[4], float* out) {
#if defined(CPU_CAPABILITY_AVX512)
  // Per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of (a, b) = (a[0], a[1]), likewise (a[2], a[3]);
  // then [A, B, C, D] per lane; then the four lanes added.
  const __m512 x0 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
  const __m512 x1 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
  const __m512d d0 = _mm512_castps_pd(x0), d1 = _mm512_castps_pd(x1);
  const __m512 y = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(d0, d1)), _mm512_castpd_ps(_mm512_unpackhi_pd(d0, d1)));
  const __m256 z = _mm256_add_ps(_mm512_castps512_ps256(y), _mm512_extractf32x8_ps(y, 1));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(z), _mm256_extractf128_ps(z, 1)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 x0 = _mm256_add_ps(_mm256_unpacklo_ps(a[0], a[1]), _mm256_unpackhi_ps(a[0], a[1]));
  const __m256 x1 = _mm256_add_ps(_mm256_unpacklo_ps(a[2], a[3]), _mm256_unpackhi_ps(a[2], a[3]));
  const __m256d d0 = _mm256_castps_pd(x0), d1 = _mm256_castps_pd(x1);
  const __m256 y = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(d0, d1)), _mm256_castpd_ps(_mm256_unpackhi_pd(d0, d1)));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(y), _mm256_extractf128_ps(y, 1)));
#else
  for (int t = 0; t < 4; ++t)
    out[t] = at::vec::vec_reduce_all<float>([](Vectorized<float> u, Vectorized<float> w) { return u + w; }, a[t]);
#endif
}

// s[0..keys) = dots[0..keys), keys <= 4 (a fixed-size copy when 4: no memmove call).
inline void store_dots(const float* dots, int64_t keys, float* s) {
  if (keys == 4) {
    std::memcpy(s, dots, 4 * sizeof(float));
  } else {
    for (int64_t t = 0; t < keys; ++t) s[t] = dots[t];
  }
}

// ---- fp32 ----------------------------------------------------------------------------------

// The scores loop of both flavours: s[r * lds + j] = q_r · k_j for r < rows, j < n; q row r at
// q + r * d (contiguous), key j at k + j * ks. Rows go in pairs and keys in fours; quad(q0, q1, kr,
// dots0, dots1) writes the four dots of rows q0 and q1 with keys kr[0..3] (past n: a repeat of the
// last key, not stored). Forced inline, so that it takes the instruction set of its caller.
template <typename T, typename Quad>
__attribute__((always_inline)) inline void for_score_quads(const T* q, int64_t rows, const T* k, int64_t ks, int64_t n,
                                                           int64_t d, float* s, int64_t lds, const NextRows& next,
                                                           const Quad& quad) {
  for (int64_t r = 0; r < rows; r += 2) {
    const bool two = r + 1 < rows;
    const T* q0 = q + r * d;
    const T* q1 = two ? q0 + d : q0;
    for (int64_t j = 0; j < n; j += 4) {
      const T* kr[4];
      for (int t = 0; t < 4; ++t) kr[t] = k + std::min(j + t, n - 1) * ks;
      if (r == 0)
        for (int t = 0; t < 4; ++t) next.fetch(j + t);
      float dots0[4], dots1[4];
      quad(q0, q1, kr, dots0, dots1);
      const int64_t keys = std::min<int64_t>(4, n - j);
      store_dots(dots0, keys, s + r * lds + j);
      if (two) store_dots(dots1, keys, s + (r + 1) * lds + j);
    }
  }
}

// scores for fp32 rows, any d.
inline void scores_f32(const float* q, int64_t rows, const float* k, int64_t ks, int64_t n, int64_t d, float* s,
                       int64_t lds, const NextRows& next = {}) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  const int64_t d_full = d - d % W, d_tail = d % W;
  for_score_quads(q, rows, k, ks, n, d, s, lds, next,
                  [&](const float* q0, const float* q1, const float* const* kr, float* dots0, float* dots1) {
                    Vec a0[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)}, a1[4] = {Vec(0.f), Vec(0.f), Vec(0.f), Vec(0.f)};
                    for (int64_t x = 0; x < d_full; x += W) {
                      const Vec qa = Vec::loadu(q0 + x), qb = Vec::loadu(q1 + x);
                      for (int t = 0; t < 4; ++t) {
                        const Vec kv = Vec::loadu(kr[t] + x);
                        a0[t] = at::vec::fmadd(qa, kv, a0[t]);
                        a1[t] = at::vec::fmadd(qb, kv, a1[t]);
                      }
                    }
                    if (d_tail) {  // loadu(ptr, count) fills the rest of the vector with zeros
                      const Vec qa = Vec::loadu(q0 + d_full, d_tail), qb = Vec::loadu(q1 + d_full, d_tail);
                      for (int t = 0; t < 4; ++t) {
                        const Vec kv = Vec::loadu(kr[t] + d_full, d_tail);
                        a0[t] = at::vec::fmadd(qa, kv, a0[t]);
                        a1[t] = at::vec::fmadd(qb, kv, a1[t]);
                      }
                    }
                    reduce4(a0, dots0);
                    reduce4(a1, dots1);
                  });
}

// o[r * dv + c] += Σ_j p[r * ldp + j] · v[j * vs + c] for r < R, j < n, c < dv.
template <int R>
inline void pv_f32_tile(const float* p, int64_t ldp, const float* v, int64_t vs, int64_t n, int64_t dv, float* o,
                        const NextRows& next) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  for (int64_t c = 0; c < dv; c += 2 * W) {
    const int64_t w0 = std::min(W, dv - c), w1 = std::clamp<int64_t>(dv - c - W, 0, W);
    const bool full = w1 == W;
    Vec acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = full ? Vec::loadu(o + r * dv + c) : Vec::loadu(o + r * dv + c, w0);
      acc[r][1] = full ? Vec::loadu(o + r * dv + c + W) : Vec::loadu(o + r * dv + c + W, w1);
    }
    for (int64_t j = 0; j < n; ++j) {
      if (c == 0) next.fetch(j);
      const float* vj = v + j * vs + c;
      const Vec v0 = full ? Vec::loadu(vj) : Vec::loadu(vj, w0);
      const Vec v1 = full ? Vec::loadu(vj + W) : Vec::loadu(vj + W, w1);
      for (int r = 0; r < R; ++r) {
        const Vec pr(p[r * ldp + j]);
        acc[r][0] = at::vec::fmadd(pr, v0, acc[r][0]);
        acc[r][1] = at::vec::fmadd(pr, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      if (full) {
        acc[r][0].store(o + r * dv + c);
        acc[r][1].store(o + r * dv + c + W);
      } else {
        acc[r][0].store(o + r * dv + c, w0);
        if (w1) acc[r][1].store(o + r * dv + c + W, w1);
      }
    }
  }
}

// Row tiles of up to 8 rows: pv_f32_tile<R> for any row count.
template <typename Tile>
inline void for_row_tiles(int64_t rows, Tile&& tile) {
  for (int64_t r0 = 0; r0 < rows; r0 += 8) {
    switch (std::min<int64_t>(8, rows - r0)) {
      case 1: tile(std::integral_constant<int, 1>{}, r0); break;
      case 2: tile(std::integral_constant<int, 2>{}, r0); break;
      case 3: tile(std::integral_constant<int, 3>{}, r0); break;
      case 4: tile(std::integral_constant<int, 4>{}, r0); break;
      case 5: tile(std::integral_constant<int, 5>{}, r0); break;
      case 6: tile(std::integral_constant<int, 6>{}, r0); break;
      case 7: tile(std::integral_constant<int, 7>{}, r0); break;
      default: tile(std::integral_constant<int, 8>{}, r0); break;
    }
  }
}

inline void pv_f32(const float* p, int64_t ldp, int64_t rows, const float* v, int64_t vs, int64_t n, int64_t dv, float* o,
                   const NextRows& next = {}) {
  for_row_tiles(rows, [&](auto r_tile, int64_t r0) {
    pv_f32_tile<decltype(r_tile)::value>(p + r0 * ldp, ldp, v, vs, n, dv, o + r0 * dv, r0 == 0 ? next : NextRows{});
  });
}

// ---- bf16 with AVX512-BF16 -----------------------------------------------------------------

// Whether this ISA's copy has the bf16 dp kernels and this CPU runs them.
inline bool have_bf16_dp() {
#if defined(CPU_CAPABILITY_AVX512)
  return have_avx512_bf16();
#else
  return false;
#endif
}

// The bf16 dp path's o row stores, for every 32-column chunk, the 16 even-pair lanes of
// vpunpcklwd then the 16 of vpunpckhwd: stored position i of a chunk holds column
// bf16_dp_column(i) of that chunk.
inline int64_t bf16_dp_column(int64_t i) {
  const int64_t hi = i / 16, lane = (i % 16) / 4, t = i % 4;
  return 8 * lane + 4 * hi + t;
}

// Declared in every ISA's copy, defined in the AVX512 one (elsewhere unreachable: have_bf16_dp()).
#if defined(CPU_CAPABILITY_AVX512)
#define FLASHATTN_BF16_DP __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#else
#define FLASHATTN_BF16_DP
#endif

// As scores_f32 on bf16 rows (raw bits), d a multiple of 32.
FLASHATTN_BF16_DP void scores_bf16_dp(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t ks, int64_t n,
                                      int64_t d, float* s, int64_t lds, const NextRows& next);
// p (rows × n fp32 probabilities) as bf16 pairs: pb[r * ldpb + j], zero-padded to an even count.
FLASHATTN_BF16_DP void probabilities_to_bf16(const float* p, int64_t ldp, int64_t rows, int64_t n, uint16_t* pb,
                                             int64_t ldpb);
// o (interleaved columns, see above) += P V, P from probabilities_to_bf16, dv a multiple of 32.
FLASHATTN_BF16_DP void pv_bf16_dp(const uint16_t* pb, int64_t ldpb, int64_t rows, const uint16_t* v, int64_t vs,
                                  int64_t n, int64_t dv, float* o, const NextRows& next);
}  // namespace flashattn::cpu::CPU_CAPABILITY
