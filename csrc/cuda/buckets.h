// The tensor-core kernels' instantiation table: head-dim buckets x element types, the one place
// they are listed. dispatch.cu walks it with for_each_built_bucket / for_each_built_dtype;
// tools/table.py parses the two lists below for setup.py, .ci/compile_cuda.sh, the emulator's
// build and the tests; tools/generate_instantiations.py writes one translation unit per entry
// (instantiations/{fwd,bwd}_hdim<D>_<dtype>.cu).
//
// A development build compiles part of the table: setup.py then writes a header
// flashattn_cuda_restriction.h defining FLASHATTN_CUDA_BUILT_HEADDIMS / FLASHATTN_CUDA_BUILT_DTYPES
// (same syntax, e.g. 64, 128 / bf16) into a directory it puts on the include path (a header, not
// -D flags: nvcc splits -D values at commas).
#pragma once

#if __has_include(<flashattn_cuda_restriction.h>)
#include <flashattn_cuda_restriction.h>
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <iterator>
#include <type_traits>
#include <utility>

#include "../attention_params.h"

#define FLASHATTN_CUDA_HEADDIMS 32, 64, 96, 128, 192, 256
#define FLASHATTN_CUDA_DTYPES fp16, bf16
// The buckets with a Hopper (sm_90a) forward as well (instantiations/fwd_sm90_hdim<D>_<dtype>.cu).
#define FLASHATTN_CUDA_SM90_HEADDIMS 64, 128, 256
// ... and a Hopper backward (instantiations/bwd_sm90_hdim<D>_<dtype>.cu).
#define FLASHATTN_CUDA_SM90_BWD_HEADDIMS 64, 128

namespace flashattn::cuda {

namespace table {
enum Dtype { fp16, bf16 };
inline constexpr int kHeadDims[] = {FLASHATTN_CUDA_HEADDIMS};
inline constexpr int kSm90HeadDims[] = {FLASHATTN_CUDA_SM90_HEADDIMS};
inline constexpr int kSm90BwdHeadDims[] = {FLASHATTN_CUDA_SM90_BWD_HEADDIMS};
constexpr bool is_sm90_bucket(int d) {
  for (int x : kSm90HeadDims)
    if (x == d) return true;
  return false;
}
constexpr bool is_sm90_bwd_bucket(int d) {
  for (int x : kSm90BwdHeadDims)
    if (x == d) return true;
  return false;
}
#ifdef FLASHATTN_CUDA_BUILT_HEADDIMS
inline constexpr int kBuiltHeadDims[] = {FLASHATTN_CUDA_BUILT_HEADDIMS};
#else
inline constexpr int kBuiltHeadDims[] = {FLASHATTN_CUDA_HEADDIMS};
#endif
#ifdef FLASHATTN_CUDA_BUILT_DTYPES
inline constexpr Dtype kBuiltDtypes[] = {FLASHATTN_CUDA_BUILT_DTYPES};
#else
inline constexpr Dtype kBuiltDtypes[] = {FLASHATTN_CUDA_DTYPES};
#endif
template <Dtype> struct Element;
template <> struct Element<fp16> { using type = __half; static constexpr DType kDType = DType::kFloat16; };
template <> struct Element<bf16> { using type = __nv_bfloat16; static constexpr DType kDType = DType::kBFloat16; };

template <class F, size_t... I>
void each_bucket(F&& f, std::index_sequence<I...>) {
  (f(std::integral_constant<int, kBuiltHeadDims[I]>{}), ...);
}
template <class T>
struct Type {
  using type = T;
};
template <class F, size_t... I>
void each_dtype(F&& f, std::index_sequence<I...>) {
  (f(Type<typename Element<kBuiltDtypes[I]>::type>{}), ...);
}
}  // namespace table

// f(std::integral_constant<int, D>) for every compiled head-dim bucket D, in increasing order.
template <class F>
void for_each_built_bucket(F&& f) {
  table::each_bucket(f, std::make_index_sequence<std::size(table::kBuiltHeadDims)>{});
}

// f(table::Type<Element>) for every compiled tensor-core element type (__half, __nv_bfloat16).
template <class F>
void for_each_built_dtype(F&& f) {
  table::each_dtype(f, std::make_index_sequence<std::size(table::kBuiltDtypes)>{});
}

// The DType of a tensor-core element type.
template <class Element>
constexpr DType dtype_of() {
  return std::is_same_v<Element, __half> ? DType::kFloat16 : DType::kBFloat16;
}

}  // namespace flashattn::cuda
