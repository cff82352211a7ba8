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
  // (-ffinite-loops): the x86 instruction is asked for as volatile asm instead. Its operand is
  // the address in a register, not a memory operand: an asm that reads memory through a char
  // lvalue may read anything addressable, and g++ then stored every accumulator of the loop
  // around it to the stack on every key (pv_f32_tile<8>: 16 zmm stores per 16 FMAs).
  static void line(const char* p) {
#if defined(__x86_64__) && defined(__GNUC__)
    asm volatile("prefetcht1 (%0)" : : "r"(p));
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

// Query rows per scores tile: four with AVX512's 32 vector registers (16 accumulators), two
// elsewhere (16 registers). Four rows read each key row half as often as two: MQA's 32 rows per
// kv head had made the scores loop bound by the L2 reads of its block of keys.
#if defined(CPU_CAPABILITY_AVX512)
inline constexpr int kScoreRows = 4;
#else
inline constexpr int kScoreRows = 2;
#endif

// The scores loop of both flavours: s[r * lds + j] = q_r · k_j for r < rows, j < n; q row r at
// q + r * d (contiguous), key j at k + j * ks. Rows go in tiles of M (kScoreRows, or 2 for the
// last one or two rows) and keys in fours; quad(qr, kr, dots) writes dots[i][t] = qr[i] · kr[t]
// for the M rows qr and the keys kr[0..3]. Rows past `rows` and keys past n repeat the last one
// and are not stored. Forced inline, so that it takes the instruction set of its caller.
template <int M, typename T, typename Quad>
__attribute__((always_inline)) inline void score_tile(const T* q, int64_t m, const T* k, int64_t ks, int64_t n,
                                                      int64_t d, float* s, int64_t lds, const NextRows& next,
                                                      const Quad& quad) {
  const T* qr[M];
  for (int i = 0; i < M; ++i) qr[i] = q + std::min<int64_t>(i, m - 1) * d;
  for (int64_t j = 0; j < n; j += 4) {
    const T* kr[4];
    for (int t = 0; t < 4; ++t) kr[t] = k + std::min(j + t, n - 1) * ks;
    for (int t = 0; t < 4; ++t) next.fetch(j + t);
    float dots[M][4];
    quad(qr, kr, dots);
    const int64_t keys = std::min<int64_t>(4, n - j);
    for (int i = 0; i < M; ++i)
      if (i < m) store_dots(dots[i], keys, s + i * lds + j);
  }
}

template <typename T, typename Quad>
__attribute__((always_inline)) inline void for_score_quads(const T* q, int64_t rows, const T* k, int64_t ks, int64_t n,
                                                           int64_t d, float* s, int64_t lds, const NextRows& next,
                                                           const Quad& quad) {
  for (int64_t r = 0; r < rows;) {
    const int64_t m = std::min<int64_t>(kScoreRows, rows - r);
    const NextRows& fetch = r == 0 ? next : NextRows{};
    if (m > 2)
      score_tile<kScoreRows>(q + r * d, m, k, ks, n, d, s + r * lds, lds, fetch, quad);
    else
      score_tile<2>(q + r * d, m, k, ks, n, d, s + r * lds, lds, fetch, quad);
    r += m;
  }
}

// The fp32 dot quad: any d.
struct F32DotQuad {
  int64_t d;
  template <int M>
  __attribute__((always_inline)) void operator()(const float* const (&qr)[M], const float* const* kr,
                                                 float (&dots)[M][4]) const {
    using Vec = Vectorized<float>;
    constexpr int64_t W = Vec::size();
    const int64_t d_full = d - d % W, d_tail = d % W;
    Vec a[M][4];
    for (int i = 0; i < M; ++i)
      for (int t = 0; t < 4; ++t) a[i][t] = Vec(0.f);
    for (int64_t x = 0; x < d_full; x += W) {
      Vec qv[M];
      for (int i = 0; i < M; ++i) qv[i] = Vec::loadu(qr[i] + x);
      for (int t = 0; t < 4; ++t) {
        const Vec kv = Vec::loadu(kr[t] + x);
        for (int i = 0; i < M; ++i) a[i][t] = at::vec::fmadd(qv[i], kv, a[i][t]);
      }
    }
    if (d_tail) {  // loadu(ptr, count) fills the rest of the vector with zeros
      Vec qv[M];
      for (int i = 0; i < M; ++i) qv[i] = Vec::loadu(qr[i] + d_full, d_tail);
      for (int t = 0; t < 4; ++t) {
        const Vec kv = Vec::loadu(kr[t] + d_full, d_tail);
        for (int i = 0; i < M; ++i) a[i][t] = at::vec::fmadd(qv[i], kv, a[i][t]);
      }
    }
    for (int i = 0; i < M; ++i) reduce4(a[i], dots[i]);
  }
};

// scores for fp32 rows, any d.
inline void scores_f32(const float* q, int64_t rows, const float* k, int64_t ks, int64_t n, int64_t d, float* s,
                       int64_t lds, const NextRows& next = {}) {
  for_score_quads(q, rows, k, ks, n, d, s, lds, next, F32DotQuad{d});
}

// o[r * ldo + c] += Σ_j p[r * ldp + j] · v[j * vs + c] for r < R, j < n, c < w0 + w1: one chunk of
// up to two vectors of columns (w0, w1 of them; kFull: both whole). The accumulators are this
// function's own and every load and store of them is unconditional, so that they stay in
// registers: with a run-time choice between whole and partial vectors inside one loop g++ kept
// the array on the stack and stored all of it on every key (2x slower).
template <int R, bool kFull>
__attribute__((always_inline)) inline void pv_f32_chunk(const float* p, int64_t ldp, const float* v, int64_t vs,
                                                         int64_t n, int64_t w0, int64_t w1, float* o, int64_t ldo,
                                                         const NextRows& next) {
  using Vec = Vectorized<float>;
  constexpr int64_t W = Vec::size();
  auto load = [&](const float* x, int64_t w) { return kFull ? Vec::loadu(x) : Vec::loadu(x, w); };
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = load(o + r * ldo, w0);
    acc[r][1] = load(o + r * ldo + W, w1);
  }
  for (int64_t j = 0; j < n; ++j) {
    next.fetch(j);
    const Vec v0 = load(v + j * vs, w0), v1 = load(v + j * vs + W, w1);
    for (int r = 0; r < R; ++r) {
      const Vec pr(p[r * ldp + j]);
      acc[r][0] = at::vec::fmadd(pr, v0, acc[r][0]);
      acc[r][1] = at::vec::fmadd(pr, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    if constexpr (kFull) {
      acc[r][0].store(o + r * ldo);
      acc[r][1].store(o + r * ldo + W);
    } else {
      acc[r][0].store(o + r * ldo, w0);
      if (w1) acc[r][1].store(o + r * ldo + W, w1);
    }
  }
}

// o[r * dv + c] += Σ_j p[r * ldp + j] · v[j * vs + c] for r < R, j < n, c < dv; the next rows
// fetched during the first chunk.
template <int R>
inline void pv_f32_tile(const float* p, int64_t ldp, const float* v, int64_t vs, int64_t n, int64_t dv, float* o,
                        const NextRows& next) {
  constexpr int64_t W = Vectorized<float>::size();
  for (int64_t c = 0; c < dv; c += 2 * W) {
    const int64_t w0 = std::min(W, dv - c), w1 = std::clamp<int64_t>(dv - c - W, 0, W);
    const NextRows& fetch = c == 0 ? next : NextRows{};
    if (w1 == W)
      pv_f32_chunk<R, true>(p, ldp, v + c, vs, n, W, W, o + c, dv, fetch);
    else
      pv_f32_chunk<R, false>(p, ldp, v + c, vs, n, w0, w1, o + c, dv, fetch);
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

// ---- bf16 dp scores from a packed block of keys ---------------------------------------------
//
// With many query rows per kv head (MQA; GQA groups of 16 rows and more) the bf16 dot loop spends
// more of its time in the reductions that end every dot (reduce4: d = 128 is four vdpbf16ps per
// dot) than in the dots, and that cost is per dot, however many rows share the keys. Instead the
// block of keys is transposed once as 32-bit words, word x of key j being its element pair
// (2x, 2x + 1): the layout vdpbf16ps pairs with a broadcast pair of q. Scores are then a register
// tile product (8 rows × 32 keys, no reductions) and the transpose costs one pass over the block
// for all the rows. MQA B=1 S=32k D=128: 2.16 -> 1.85 ms. fp32 loses by it (its dots are twice as
// long, so the reductions weigh half as much, and the transpose is twice the words): 3.69 ->
// 3.93 ms, so fp32 keeps the dot loop.
//
// Used for rows >= kPackedScoreRows (bf16 dp is AVX512 only: 32 vector registers for the tile).
inline constexpr int64_t kPackedScoreRows = 16;

// kt[x * ldk + j] = word x of key j (key j at k + j * ks words), j < n, x < words; the next
// block's rows are fetched as it goes, 16 keys at a time.
inline void pack_key_words(const void* k, int64_t ks, int64_t n, int64_t words, float* kt, int64_t ldk,
                           const NextRows& next) {
  const auto* src = static_cast<const float*>(k);
  for (int64_t j = 0; j < n; j += 16) {
    const int64_t m = std::min<int64_t>(16, n - j);
    for (int64_t t = 0; t < m; ++t) next.fetch(j + t);
    at::vec::transpose_mxn<float>(src + j * ks, ks, kt + j, ldk, static_cast<int>(m), static_cast<int>(words));
  }
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
// s[r * lds + j] = q_r · k_j for bf16 rows, from kp = pack_key_words(k) (words = d / 2), d even.
FLASHATTN_BF16_DP void scores_bf16_dp_packed(const uint16_t* q, int64_t rows, const float* kp, int64_t ldk, int64_t n,
                                             int64_t d, float* s, int64_t lds);
// p (rows × n fp32 probabilities) as bf16 pairs: pb[r * ldpb + j], zero-padded to an even count.
FLASHATTN_BF16_DP void probabilities_to_bf16(const float* p, int64_t ldp, int64_t rows, int64_t n, uint16_t* pb,
                                             int64_t ldpb);
// o (interleaved columns, see above) += P V, P from probabilities_to_bf16, dv a multiple of 32.
FLASHATTN_BF16_DP void pv_bf16_dp(const uint16_t* pb, int64_t ldpb, int64_t rows, const uint16_t* v, int64_t vs,
                                  int64_t n, int64_t dv, float* o, const NextRows& next);
}  // namespace flashattn::cpu::CPU_CAPABILITY
