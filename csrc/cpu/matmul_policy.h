// How each input dtype feeds the block GEMMs of the CPU kernels.
//
// A kernel multiplies tiles taken straight from the user's strided tensors (rows of Q, K, V, dO)
// and tiles it computed itself (P, dS, in fp32). A policy says, per dtype, how a tile becomes a
// GEMM operand: used in place when the GEMM reads it as is, otherwise converted / transposed /
// VNNI-packed into a per-thread buffer. Accumulation is fp32 (fp64 for fp64).
//
//   fp32   operands in place where possible; B = Xᵀ transposed into a buffer.
//   bf16   bf16 micro-kernel: A in place, B VNNI-packed ([K/2][N][2]); P and dS rounded to bf16
//          before their GEMMs, as tensor-core kernels do.
//   fp16   (and bf16 without the bf16 micro-kernel) tiles widened to fp32.
//   fp64   operands in place; B = Xᵀ transposed; GEMM through torch's BLAS.
#pragma once

#include "cpu/isa.h"

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/blas.h"

namespace flashattn::cpu::CPU_CAPABILITY {

using at::vec::Vectorized;

// dst[i] = float(src[i]) for n elements.
template <typename T>
inline void widen_row(const T* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using VecT = Vectorized<T>;
    using VecF = Vectorized<float>;
    int64_t j = 0;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      auto [lo, hi] = at::vec::convert_to_float<T>(VecT::loadu(src + j));
      lo.store(dst + j);
      hi.store(dst + j + VecF::size());
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst[i] = T(src[i]) (round to nearest even) for n elements.
template <typename T>
inline void narrow_row(const float* src, int64_t n, T* dst) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    using VecT = Vectorized<T>;
    using VecF = Vectorized<float>;
    int64_t j = 0;
    for (; j + VecT::size() <= n; j += VecT::size()) {
      at::vec::convert_from_float<T>(VecF::loadu(src + j), VecF::loadu(src + j + VecF::size())).store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<T>(src[j]);
  }
}

// dst (cols × rows, ld_dst) = srcᵀ for a rows × cols block of 4-byte words (ld_src). Bit-exact.
inline void transpose_words(const void* src, int64_t ld_src, void* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  at::vec::transpose_mxn<float>(static_cast<const float*>(src), ld_src, static_cast<float*>(dst), ld_dst,
                                static_cast<int>(rows), static_cast<int>(cols));
}

template <typename T>
inline void transpose_plain(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t rows, int64_t cols) {
  if constexpr (sizeof(T) == 4) {
    transpose_words(src, ld_src, dst, ld_dst, rows, cols);
  } else {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) dst[j * ld_dst + i] = src[i * ld_src + j];
  }
}

// ---------------------------------------------------------------------------------------------
// fp32 and fp64: operands in place, Xᵀ transposed.
template <typename T>
struct NativePolicy {
  using scalar_t = T;
  using op_t = T;   // GEMM operand type
  using acc_t = T;  // accumulation and softmax type
  static constexpr bool kInPlaceA = true;
  static constexpr bool kInPlaceB = true;

  // A operand = X (rows × cols of a strided tensor).
  static const op_t* a_rows(const T* x, int64_t ld, int64_t, int64_t, op_t*, int64_t* lda) {
    *lda = ld;
    return x;
  }
  // B operand = X (k × n rows of a strided tensor).
  static const op_t* b_rows(const T* x, int64_t ld, int64_t, int64_t, op_t*, int64_t* ldb) {
    *ldb = ld;
    return x;
  }
  // B operand = Xᵀ where X is n × k (rows of a strided tensor); packed with ldb = n.
  static void b_transposed(const T* x, int64_t ld, int64_t n, int64_t k, op_t* buf) {
    transpose_plain(x, ld, buf, n, n, k);
  }
  // A operand from an acc_t row (P, dS): stored as op_t.
  static void a_from_acc(const acc_t* x, int64_t n, op_t* dst) { std::memcpy(dst, x, n * sizeof(T)); }
  static int64_t b_ld(int64_t n) { return n; }
  static int64_t b_elems(int64_t k, int64_t n) { return k * n; }

  static void gemm(int64_t M, int64_t N, int64_t K, const op_t* A, int64_t lda, const op_t* B, int64_t ldb, acc_t* C,
                   int64_t ldc, bool accumulate) {
    if constexpr (std::is_same_v<T, float>)
      gemm_f32(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
    else
      gemm_f64(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
};

// ---------------------------------------------------------------------------------------------
// fp16, or bf16 without the bf16 micro-kernel: every operand widened to fp32.
template <typename T>
struct WidenPolicy {
  using scalar_t = T;
  using op_t = float;
  using acc_t = float;
  static constexpr bool kInPlaceA = false;
  static constexpr bool kInPlaceB = false;

  static const op_t* a_rows(const T* x, int64_t ld, int64_t rows, int64_t cols, op_t* buf, int64_t* lda) {
    for (int64_t i = 0; i < rows; ++i) widen_row(x + i * ld, cols, buf + i * cols);
    *lda = cols;
    return buf;
  }
  static const op_t* b_rows(const T* x, int64_t ld, int64_t k, int64_t n, op_t* buf, int64_t* ldb) {
    return a_rows(x, ld, k, n, buf, ldb);
  }
  static void b_transposed(const T* x, int64_t ld, int64_t n, int64_t k, op_t* buf) {
    // Widen 16 rows at a time into a small fp32 slab, then transpose the slab into place.
    constexpr int64_t kSlab = 16;
    float slab[kSlab * 512];
    for (int64_t c0 = 0; c0 < k; c0 += 512) {
      const int64_t cols = std::min<int64_t>(512, k - c0);
      for (int64_t r0 = 0; r0 < n; r0 += kSlab) {
        const int64_t rows = std::min<int64_t>(kSlab, n - r0);
        for (int64_t r = 0; r < rows; ++r) widen_row(x + (r0 + r) * ld + c0, cols, slab + r * cols);
        transpose_words(slab, cols, buf + c0 * n + r0, n, rows, cols);
      }
    }
  }
  static void a_from_acc(const float* x, int64_t n, op_t* dst) { std::memcpy(dst, x, n * sizeof(float)); }
  static int64_t b_ld(int64_t n) { return n; }
  static int64_t b_elems(int64_t k, int64_t n) { return k * n; }

  static void gemm(int64_t M, int64_t N, int64_t K, const op_t* A, int64_t lda, const op_t* B, int64_t ldb, acc_t* C,
                   int64_t ldc, bool accumulate) {
    gemm_f32(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }
};

// ---------------------------------------------------------------------------------------------
// bf16 on the bf16 micro-kernel: A in place, B VNNI-packed.
struct Bf16VnniPolicy {
  using scalar_t = c10::BFloat16;
  using op_t = c10::BFloat16;
  using acc_t = float;
  static constexpr bool kInPlaceA = true;
  static constexpr bool kInPlaceB = false;

  static const op_t* a_rows(const op_t* x, int64_t ld, int64_t, int64_t, op_t*, int64_t* lda) {
    *lda = ld;
    return x;
  }
  // B = X (k × n rows): pairs of rows interleaved.
  static const op_t* b_rows(const op_t* x, int64_t ld, int64_t k, int64_t n, op_t* buf, int64_t* ldb) {
    pack_row_pairs(x, ld, k, n, buf);
    *ldb = n;
    return buf;
  }
  // B = Xᵀ (X n × k rows): word (kp, col) of the packed B is the bf16 pair X[col][2kp .. 2kp+1],
  // so packing is a transpose of 32-bit words.
  static void b_transposed(const op_t* x, int64_t ld, int64_t n, int64_t k, op_t* buf) {
    const bool word_aligned = (ld % 2 == 0) && (reinterpret_cast<uintptr_t>(x) % 4 == 0);
    const int64_t kp_full = k / 2;
    if (word_aligned && kp_full > 0) {
      transpose_words(x, ld / 2, buf, n, n, kp_full);
    } else {
      for (int64_t c = 0; c < n; ++c)
        for (int64_t kp = 0; kp < kp_full; ++kp) {
          buf[(kp * n + c) * 2] = x[c * ld + 2 * kp];
          buf[(kp * n + c) * 2 + 1] = x[c * ld + 2 * kp + 1];
        }
    }
    if (k % 2) {
      for (int64_t c = 0; c < n; ++c) {
        buf[(kp_full * n + c) * 2] = x[c * ld + k - 1];
        buf[(kp_full * n + c) * 2 + 1] = op_t(0.f);
      }
    }
  }
  static void a_from_acc(const float* x, int64_t n, op_t* dst) { narrow_row(x, n, dst); }
  static int64_t b_ld(int64_t n) { return n; }
  static int64_t b_elems(int64_t k, int64_t n) { return ((k + 1) / 2) * n * 2; }

  static void gemm(int64_t M, int64_t N, int64_t K, const op_t* A, int64_t lda, const op_t* B, int64_t ldb, acc_t* C,
                   int64_t ldc, bool accumulate) {
    gemm_bf16_vnni(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  }

 private:
  static void pack_row_pairs(const op_t* x, int64_t ld, int64_t k, int64_t n, op_t* buf) {
#if defined(CPU_CAPABILITY_AVX512)
    at::vec::pack_vnni2(x, buf, ld, k, n);
#else
    for (int64_t r = 0; r < k; ++r)
      for (int64_t c = 0; c < n; ++c) buf[((r / 2) * n + c) * 2 + r % 2] = x[r * ld + c];
    if (k % 2)
      for (int64_t c = 0; c < n; ++c) buf[((k / 2) * n + c) * 2 + 1] = op_t(0.f);
#endif
  }
};

// Calls fn(Policy{}) with the policy for this dtype on this machine.
template <typename scalar_t, typename Fn>
void with_policy(Fn&& fn) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    fn(NativePolicy<scalar_t>{});
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
#if defined(CPU_CAPABILITY_AVX512)
    if (have_brgemm_bf16_vnni()) {
      fn(Bf16VnniPolicy{});
      return;
    }
#endif
    fn(WidenPolicy<scalar_t>{});
  } else {
    fn(WidenPolicy<scalar_t>{});
  }
}

}  // namespace flashattn::cpu::CPU_CAPABILITY
