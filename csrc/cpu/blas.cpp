#include "cpu/blas.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

// torch's BLAS (MKL on x86 builds), for the GEMMs that do not get a micro-kernel; weak, so a torch
// built without it still loads us (at::mm_out is used then).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                            int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace flashattn::cpu {
namespace {

// oneDNN's brgemm (behind at::native::cpublas::brgemm) generates one micro-kernel per distinct
// (M, N, K, lda, ldb, ldc, beta) and keeps it for the life of the thread: a server that sees a new
// sequence length at every step would grow without bound (~0.3 MB per new shape, fwd + bwd). So
// only a small, fixed set of configurations gets a micro-kernel: every dimension a multiple of 8
// up to 512 or at most 16 (full tiles and head dims; the tile sizes of csrc/cpu/tiling.h are such
// values for long sequences), and at most kMaxKernelsPerThread distinct ones per thread. Every
// other GEMM (edge tiles of odd lengths, odd head dims, past the budget) runs on torch's BLAS,
// which generates nothing per shape.
constexpr size_t kMaxKernelsPerThread = 256;

bool canonical_dim(int64_t x) { return x <= 16 || (x % 8 == 0 && x <= 512); }

struct KernelKey {
  int64_t m, n, k, lda, ldb, ldc;
  bool accumulate;
  bool operator==(const KernelKey& o) const {
    return m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldc == o.ldc &&
           accumulate == o.accumulate;
  }
};
struct KernelKeyHash {
  size_t operator()(const KernelKey& x) const {
    size_t h = static_cast<size_t>(x.accumulate);
    for (int64_t v : {x.m, x.n, x.k, x.lda, x.ldb, x.ldc}) h = h * 1000003u ^ static_cast<size_t>(v);
    return h;
  }
};

// Whether this GEMM uses a micro-kernel. Decided once per configuration for the whole process (and
// cached per thread), so every thread takes the same path for the same configuration and results
// do not depend on which thread ran a tile; at most kMaxKernelsPerThread configurations are
// admitted, so each thread's micro-kernel cache holds at most that many. `vnni` keys are separate
// kernels.
bool admit_micro_kernel(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool accumulate,
                        bool vnni) {
  if (!canonical_dim(M) || !canonical_dim(N) || !canonical_dim(K)) return false;
  using Decisions = std::unordered_map<KernelKey, bool, KernelKeyHash>;
  thread_local Decisions known[2];
  const KernelKey key{M, N, K, lda, ldb, ldc, accumulate};
  auto it = known[vnni].find(key);
  if (it != known[vnni].end()) return it->second;
  static std::mutex mutex;
  static Decisions decided[2];
  static size_t admitted[2] = {0, 0};
  bool admit;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto d = decided[vnni].find(key);
    if (d != decided[vnni].end()) {
      admit = d->second;
    } else {
      admit = admitted[vnni] < kMaxKernelsPerThread;
      admitted[vnni] += admit;
      // Refusals are remembered too (bounded: beyond a large table, new keys are refused unseen).
      if (admit || decided[vnni].size() < 65536) decided[vnni].emplace(key, admit);
    }
  }
  if (known[vnni].size() < 65536) known[vnni].emplace(key, admit);
  return admit;
}

bool fits_int(int64_t x) { return x <= std::numeric_limits<int>::max(); }

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

double gemm_hot_tile_gflops(bool bf16, int64_t M, int64_t N, int64_t K, int64_t iters) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> seconds(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::vector<float> a(M * K, 0.5f), b(K * N, 0.25f), c(M * N, 0.f);
      std::vector<c10::BFloat16> ab(M * K, 0.5f), bb(K * N + N, 0.25f);
      auto once = [&] {
        if (bf16)
          gemm_bf16_vnni(M, N, K, ab.data(), K, bb.data(), N, c.data(), N, true);
        else
          gemm_f32(M, N, K, a.data(), K, b.data(), N, c.data(), N, true);
      };
      for (int i = 0; i < 3; ++i) once();  // warm: micro-kernel generated, operands in cache
      const auto t0 = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < iters; ++i) once();
      seconds[t] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      gemm_release();
    }
  });
  double slowest = 0;
  for (double x : seconds) slowest = std::max(slowest, x);
  return 2.0 * M * N * K * iters * threads / slowest / 1e9;
}

bool have_avx512_bf16() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate)
      for (int64_t i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  if (have_brgemm_f32() && admit_micro_kernel(M, N, K, lda, ldb, ldc, accumulate, false)) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, false);
    return;
  }
  // Column-major view: Cᵀ (N×M) = Bᵀ (N×K) · Aᵀ (K×M), each operand read in place. A leading
  // dimension of a single row/column is never read: BLAS still wants it >= the rows.
  if (K == 1) ldb = N;
  if (M == 1) lda = K, ldc = N;
  if (sgemm_ && fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldb) && fits_int(ldc) &&
      ldb >= N && lda >= K && ldc >= N) {
    const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    const float one = 1.f, beta = accumulate ? 1.f : 0.f;
    sgemm_("N", "N", &m, &n, &k, &one, B, &la, A, &lb, &beta, C, &lc);
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
  if (admit_micro_kernel(M, N, K, lda, ldb, ldc, accumulate, true)) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, A, B, C, true);
    return;
  }
  // No micro-kernel for this configuration: unpack B's VNNI pairs into a K×N row-major buffer and
  // use torch's BLAS bf16 GEMM (fp32 accumulation), or widen to fp32 where it is missing.
  thread_local std::vector<c10::BFloat16> b_plain;
  b_plain.resize(static_cast<size_t>(K * N));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b_plain[k * N + n] = B[((k / 2) * ldb + n) * 2 + k % 2];
  if (M == 1) lda = K, ldc = N;
  if (cblas_gemm_bf16bf16f32 && fits_int(M) && fits_int(N) && fits_int(K) && fits_int(lda) && fits_int(ldc) &&
      lda >= K && ldc >= N) {
    constexpr int kRowMajor = 101, kNoTrans = 111;
    cblas_gemm_bf16bf16f32(kRowMajor, kNoTrans, kNoTrans, static_cast<int>(M), static_cast<int>(N),
                           static_cast<int>(K), 1.f, reinterpret_cast<const uint16_t*>(A), static_cast<int>(lda),
                           reinterpret_cast<const uint16_t*>(b_plain.data()), static_cast<int>(N),
                           accumulate ? 1.f : 0.f, C, static_cast<int>(ldc));
    return;
  }
  thread_local std::vector<float> a_wide, b_wide;
  a_wide.resize(static_cast<size_t>(M * K));
  b_wide.resize(static_cast<size_t>(K * N));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a_wide[i * K + k] = static_cast<float>(A[i * lda + k]);
  for (int64_t i = 0; i < K * N; ++i) b_wide[i] = static_cast<float>(b_plain[i]);
  gemm_f32(M, N, K, a_wide.data(), K, b_wide.data(), N, C, ldc, accumulate);
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
