// ldmatrix and mma.sync, written from the PTX ISA's text (not from the kernels' headers, so the
// emulator is an independent check of the kernels' fragment assumptions):
//
// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 {r0, r1, r2, r3}, [p]
//   four 8x8 matrices of 16-bit elements; threads 8m .. 8m + 7 give the addresses of rows
//   0 .. 7 of matrix m (16 bytes each, 16-byte aligned). Register r_m of lane l holds row l / 4,
//   elements 2 (l % 4) and 2 (l % 4) + 1 (lower index in the low half). With .trans the matrix
//   is delivered transposed: r_m of lane l holds the elements (2 (l % 4), l / 4) and
//   (2 (l % 4) + 1, l / 4) of the stored matrix.
//
// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c
//   "Matrix Fragments for mma.m16n8k16 with floating point type", groupID = laneid >> 2,
//   threadID_in_group = laneid % 4. Each .f16x2 / .bf16x2 register holds two consecutive
//   fragment elements, the lower-numbered one in the low half.
//   A (16 x 16, a0..a7 in 4 registers): row = groupID for a_i with i < 2 or 4 <= i < 6, else
//     groupID + 8; col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4.
//   B (16 x 8, b0..b3 in 2 registers): row = threadID_in_group * 2 + (i & 1), + 8 for i >= 2;
//     col = groupID.
//   C, D (16 x 8 fp32, c0..c3): row = groupID for i < 2, else groupID + 8;
//     col = threadID_in_group * 2 + (i & 1).
//   D = A B + C. Products of 16-bit inputs are exact in fp32; the emulator sums the 16 products
//   and C in double and rounds once (the GPU's internal rounding order is not specified, so
//   results may differ from a GPU in the last bit of fp32).
#include <cmath>
#include <cstring>

#include "internal.h"

namespace flashattn::emu {

namespace {

// fp16 and bf16 bit patterns -> float, exactly (fp16 through a table of all 65536 values).
struct HalfTable {
  float value[65536];
  HalfTable() {
    for (uint32_t h = 0; h < 65536; ++h) {
      const uint32_t sign = (h >> 15) & 1u, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
      float magnitude;
      if (exponent == 0) magnitude = std::ldexp(static_cast<float>(mantissa), -24);
      else if (exponent == 31) magnitude = mantissa ? NAN : INFINITY;
      else magnitude = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
      value[h] = sign ? -magnitude : magnitude;
    }
  }
};
const HalfTable g_half;

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline double element(uint32_t reg, int half, MmaType type) {
  const uint16_t bits = static_cast<uint16_t>(half ? reg >> 16 : reg & 0xffffu);
  return type == MmaType::kF16 ? g_half.value[bits] : bf16_to_float(bits);
}

}  // namespace

void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr, bool trans, Site site) {
  const int me = current().info.lane;
  warp_collective(
      trans ? Collective::kLdmatrixTrans : Collective::kLdmatrix, site,
      [&](Warp& w, int lane) { w.in[lane][0] = smem_addr; },
      [&](Warp& w) {
        if (w.size != 32) fail("ldmatrix needs a full warp");
        const char* what = trans ? "ldmatrix.x4.trans" : "ldmatrix.x4";
        for (int l = 0; l < 32; ++l) {
          const uint32_t a = w.in[l][0];
          if (a % 16 != 0) fail("%s (%s:%d): lane %d's row address %u is not 16-byte aligned", what, site.file, site.line, l, a);
          // The read is the warp's (the shadow attributes it to the running lane's warp).
          shared_check_read(a, 16, what);
        }
        const char* base = shared_base();
        auto at = [&](int matrix, int row, int col) {  // 16-bit element (row, col) of `matrix`
          uint16_t v;
          std::memcpy(&v, base + w.in[8 * matrix + row][0] + 2 * col, 2);
          return static_cast<uint32_t>(v);
        };
        for (int l = 0; l < 32; ++l)
          for (int m = 0; m < 4; ++m) {
            const int g = l / 4, t2 = 2 * (l % 4);
            w.out[l][m] = trans ? (at(m, t2, g) | at(m, t2 + 1, g) << 16) : (at(m, g, t2) | at(m, g, t2 + 1) << 16);
          }
      });
  const Warp& w = warp_of(current());
  for (int m = 0; m < 4; ++m) r[m] = w.out[me][m];
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, MmaType type, Site site) {
  const int me = current().info.lane;
  warp_collective(
      type == MmaType::kF16 ? Collective::kMmaF16 : Collective::kMmaBF16, site,
      [&](Warp& w, int lane) {
        for (int i = 0; i < 4; ++i) w.in[lane][i] = a[i];
        w.in[lane][4] = b0;
        w.in[lane][5] = b1;
        for (int i = 0; i < 4; ++i) std::memcpy(&w.in[lane][6 + i], &d[i], 4);
      },
      [&](Warp& w) {
        if (w.size != 32) fail("mma.sync needs a full warp");
        double A[16][16], Bt[8][16], C[16][8];
        for (int l = 0; l < 32; ++l) {
          const int group = l >> 2, tig = l % 4;
          for (int i = 0; i < 8; ++i) {  // a_i lives in register i / 2, half i % 2
            const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = element(w.in[l][i / 2], i % 2, type);
          }
          for (int i = 0; i < 4; ++i) {  // b_i lives in register i / 2, half i % 2
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            Bt[group][row] = element(w.in[l][4 + i / 2], i % 2, type);
          }
          for (int i = 0; i < 4; ++i) {
            float c;
            std::memcpy(&c, &w.in[l][6 + i], 4);
            C[i < 2 ? group : group + 8][tig * 2 + (i & 1)] = c;
          }
        }
        for (int l = 0; l < 32; ++l) {
          const int group = l >> 2, tig = l % 4;
          for (int i = 0; i < 4; ++i) {
            const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
            double sum = C[row][col];
            for (int k = 0; k < 16; ++k) sum += A[row][k] * Bt[col][k];
            const float out = static_cast<float>(sum);
            std::memcpy(&w.out[l][i], &out, 4);
          }
        }
      });
  const Warp& w = warp_of(current());
  for (int i = 0; i < 4; ++i) std::memcpy(&d[i], &w.out[me][i], 4);
}

}  // namespace flashattn::emu
