#include "cpu/blas.h"

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <vector>

namespace flashattn::cpu {
namespace {

at::Tensor wrap(const void* data, int64_t rows, int64_t cols, int64_t ld, at::ScalarType type) {
  return at::from_blob(const_cast<void*>(data), {rows, cols}, {ld, 1}, at::TensorOptions().dtype(type));
}

// A 3×5 · 5×7 product against a scalar loop: brgemm may be compiled out or refuse the shape.
template <typename in_t>
bool probe(bool vnni) {
  constexpr int64_t M = 3, K = 5, N = 7;
  std::vector<in_t> a(M * K), b(K * N), b_packed(((K + 1) / 2) * N * 2, in_t(0));
  std::vector<float> c(M * N, -1.f);
  for (int64_t i = 0; i < M * K; ++i) a[i] = in_t(static_cast<float>((i % 7) - 3));
  for (int64_t i = 0; i < K * N; ++i) b[i] = in_t(static_cast<float>((i % 5) - 2));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b_packed[vnni ? ((k / 2) * N + n) * 2 + k % 2 : k * N + n] = b[k * N + n];
  try {
    at::native::cpublas::brgemm(M, N, K, K, N, N, false, a.data(), b_packed.data(), c.data(), vnni);
    at::native::cpublas::brgemm_release(vnni);
  } catch (const std::exception&) {
    return false;
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      float ref = 0.f;
      for (int64_t k = 0; k < K; ++k) ref += static_cast<float>(a[i * K + k]) * static_cast<float>(b[k * N + j]);
      if (std::abs(ref - c[i * N + j]) > 1e-4f) return false;
    }
  return true;
}

}  // namespace

bool have_brgemm_f32() {
  static const bool ok = probe<float>(false);
  return ok;
}

bool have_brgemm_bf16_vnni() {
  static const bool ok = probe<c10::BFloat16>(true);
  return ok;
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (have_brgemm_f32()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
    return;
  }
  at::Tensor c = wrap(C, M, N, ldc, at::kFloat);
  if (accumulate)
    at::addmm_out(c, c, wrap(A, M, K, lda, at::kFloat), wrap(B, K, N, ldb, at::kFloat));
  else
    at::mm_out(c, wrap(A, M, K, lda, at::kFloat), wrap(B, K, N, ldb, at::kFloat));
}

void gemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, true);
}

void gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
              int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  at::Tensor c = wrap(C, M, N, ldc, at::kDouble);
  if (K == 0) {
    if (!accumulate) c.zero_();
    return;
  }
  if (accumulate)
    at::addmm_out(c, c, wrap(A, M, K, lda, at::kDouble), wrap(B, K, N, ldb, at::kDouble));
  else
    at::mm_out(c, wrap(A, M, K, lda, at::kDouble), wrap(B, K, N, ldb, at::kDouble));
}

void gemm_release() {
  if (have_brgemm_f32()) at::native::cpublas::brgemm_release(false);
  if (have_brgemm_bf16_vnni()) at::native::cpublas::brgemm_release(true);
}

}  // namespace flashattn::cpu
