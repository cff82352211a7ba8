// The bf16 dp inner loops of the direct decode kernel (cpu/decode_microkernels.h): AVX512-BF16,
// compiled into the AVX512 copy only, with the instruction set enabled per function and checked
// at run time (have_bf16_dp()); the other copies define stubs that are never called.
#include "cpu/decode_microkernels.h"

#if defined(CPU_CAPABILITY_AVX512)

namespace flashattn::cpu::CPU_CAPABILITY {
namespace {

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

template <int R>
FLASHATTN_BF16_DP void pv_bf16_tile(const uint16_t* pb, int64_t ldpb, const uint16_t* v, int64_t vs, int64_t n,
                                    int64_t dv, float* o, const NextRows& next) {
  for (int64_t c = 0; c < dv; c += 32) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm512_loadu_ps(o + r * dv + c);
      acc[r][1] = _mm512_loadu_ps(o + r * dv + c + 16);
    }
    for (int64_t j = 0; j < n; j += 2) {
      if (c == 0) {
        next.fetch(j);
        next.fetch(j + 1);
      }
      // Keys j and j + 1 interleaved per column: the pairs vdpbf16ps multiplies with (p_j, p_j+1).
      const __m512i a = _mm512_loadu_si512(v + j * vs + c);
      const __m512i b = j + 1 < n ? _mm512_loadu_si512(v + (j + 1) * vs + c) : _mm512_setzero_si512();
      const __m512bh lo = as_bh(_mm512_unpacklo_epi16(a, b)), hi = as_bh(_mm512_unpackhi_epi16(a, b));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, pb + r * ldpb + j, sizeof(pair));
        const __m512bh pr = as_bh(_mm512_set1_epi32(pair));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], lo, pr);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], hi, pr);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(o + r * dv + c, acc[r][0]);
      _mm512_storeu_ps(o + r * dv + c + 16, acc[r][1]);
    }
  }
}

// s[r * lds + c] = Σ_x dp(kp[x * ldk + c] (a pair), q_r's pair x) for r < R, c < n (all keys of
// the block, 32 per step: two words' vectors, masked at the end).
template <int R>
FLASHATTN_BF16_DP void scores_packed_tile(const uint16_t* q, int64_t d, const float* kp, int64_t ldk, int64_t n, float* s,
                                          int64_t lds) {
  const int64_t words = d / 2;
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t w0 = std::min<int64_t>(16, n - c), w1 = std::clamp<int64_t>(n - c - 16, 0, 16);
    const __mmask16 m0 = static_cast<__mmask16>((1u << w0) - 1), m1 = static_cast<__mmask16>((1u << w1) - 1);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t x = 0; x < words; ++x) {
      const float* row = kp + x * ldk + c;
      const __m512bh k0 = as_bh(_mm512_castps_si512(_mm512_maskz_loadu_ps(m0, row)));
      const __m512bh k1 = as_bh(_mm512_castps_si512(_mm512_maskz_loadu_ps(m1, row + 16)));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, q + r * d + 2 * x, sizeof(pair));
        const __m512bh qr = as_bh(_mm512_set1_epi32(pair));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], k0, qr);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], k1, qr);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_mask_storeu_ps(s + r * lds + c, m0, acc[r][0]);
      _mm512_mask_storeu_ps(s + r * lds + c + 16, m1, acc[r][1]);
    }
  }
}

}  // namespace

// The bf16 dot quad of for_score_quads (a functor: a lambda would not take the target attribute).
struct Bf16DotQuad {
  int64_t d;
  template <int M>
  FLASHATTN_BF16_DP void operator()(const uint16_t* const (&qr)[M], const uint16_t* const* kr,
                                    float (&dots)[M][4]) const {
    __m512 a[M][4];
    for (int i = 0; i < M; ++i)
      for (int t = 0; t < 4; ++t) a[i][t] = _mm512_setzero_ps();
    for (int64_t x = 0; x < d; x += 32) {
      __m512bh qv[M];
      for (int i = 0; i < M; ++i) qv[i] = as_bh(_mm512_loadu_si512(qr[i] + x));
      for (int t = 0; t < 4; ++t) {
        const __m512bh kv = as_bh(_mm512_loadu_si512(kr[t] + x));
        for (int i = 0; i < M; ++i) a[i][t] = _mm512_dpbf16_ps(a[i][t], qv[i], kv);
      }
    }
    for (int i = 0; i < M; ++i) {
      const Vectorized<float> v[4] = {a[i][0], a[i][1], a[i][2], a[i][3]};
      reduce4(v, dots[i]);
    }
  }
};

FLASHATTN_BF16_DP void scores_bf16_dp(const uint16_t* q, int64_t rows, const uint16_t* k, int64_t ks, int64_t n,
                                      int64_t d, float* s, int64_t lds, const NextRows& next) {
  for_score_quads(q, rows, k, ks, n, d, s, lds, next, Bf16DotQuad{d});
}

FLASHATTN_BF16_DP void scores_bf16_dp_packed(const uint16_t* q, int64_t rows, const float* kp, int64_t ldk, int64_t n,
                                             int64_t d, float* s, int64_t lds) {
  for_row_tiles(rows, [&](auto r_tile, int64_t r0) {
    scores_packed_tile<decltype(r_tile)::value>(q + r0 * d, d, kp, ldk, n, s + r0 * lds, lds);
  });
}

FLASHATTN_BF16_DP void probabilities_to_bf16(const float* p, int64_t ldp, int64_t rows, int64_t n, uint16_t* pb,
                                             int64_t ldpb) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, n - j)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, p + r * ldp + j));
      _mm256_mask_storeu_epi16(pb + r * ldpb + j, m, reinterpret_cast<const __m256i&>(h));
    }
    if (n % 2) pb[r * ldpb + n] = 0;  // the odd key's partner: weight 0
  }
}

FLASHATTN_BF16_DP void pv_bf16_dp(const uint16_t* pb, int64_t ldpb, int64_t rows, const uint16_t* v, int64_t vs,
                                  int64_t n, int64_t dv, float* o, const NextRows& next) {
  for_row_tiles(rows, [&](auto r_tile, int64_t r0) {
    pv_bf16_tile<decltype(r_tile)::value>(pb + r0 * ldpb, ldpb, v, vs, n, dv, o + r0 * dv, r0 == 0 ? next : NextRows{});
  });
}

}  // namespace flashattn::cpu::CPU_CAPABILITY

#else

#include <c10/util/Exception.h>

namespace flashattn::cpu::CPU_CAPABILITY {

void scores_bf16_dp(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, int64_t, const NextRows&) {
  TORCH_INTERNAL_ASSERT(false, "bf16 dp decode kernels are built for AVX512 only");
}
void scores_bf16_dp_packed(const uint16_t*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "bf16 dp decode kernels are built for AVX512 only");
}
void probabilities_to_bf16(const float*, int64_t, int64_t, int64_t, uint16_t*, int64_t) {
  TORCH_INTERNAL_ASSERT(false, "bf16 dp decode kernels are built for AVX512 only");
}
void pv_bf16_dp(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, int64_t, int64_t, float*, const NextRows&) {
  TORCH_INTERNAL_ASSERT(false, "bf16 dp decode kernels are built for AVX512 only");
}

}  // namespace flashattn::cpu::CPU_CAPABILITY

#endif
