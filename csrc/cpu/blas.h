// Block GEMMs for the CPU kernels, all row-major: C[M×N] (+)= A[M×K] · B[K×N].
//
// fp32 (and fp16, whose tiles are widened to fp32) run on oneDNN's batch-reduce GEMM micro-kernel
// that torch exports (at::native::cpublas::brgemm); bf16 runs on its bf16 variant with fp32
// accumulation, B packed in VNNI pairs ([K/2][N][2]); fp64 runs on torch's BLAS through at::mm_out.
// Where the micro-kernels are missing (non-x86 builds, older oneDNN) the fp32 GEMM falls back to
// at::mm_out and bf16 tiles are widened to fp32: slower, same results.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace flashattn::cpu {

// Probed once: does brgemm run here and give right answers?
bool have_brgemm_f32();
bool have_brgemm_bf16_vnni();
// Does this CPU have AVX512-BF16 (vdpbf16ps)? For the decode kernel's bf16 path.
bool have_avx512_bf16();

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate);

// B is VNNI-packed: element (k, n) at B[((k / 2) * ldb + n) * 2 + k % 2], ldb >= N; odd K padded with 0.
void gemm_bf16_vnni(int64_t M, int64_t N, int64_t K, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* B,
                    int64_t ldb, float* C, int64_t ldc, bool accumulate);

void gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb, double* C,
              int64_t ldc, bool accumulate);

// Benchmarks: GFLOP/s of the GEMM the kernels use (bf16 VNNI or fp32) on one hot M×N×K tile,
// repeated `iters` times on every thread at once (each its own operands, resident in cache):
// the machine's compute roof as the CPU kernels see it.
double gemm_hot_tile_gflops(bool bf16, int64_t M, int64_t N, int64_t K, int64_t iters);

// Releases per-thread micro-kernel state (AMX tile configuration); call when a worker is done.
void gemm_release();

}  // namespace flashattn::cpu
