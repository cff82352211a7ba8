// The attention ops' options: the arguments flashattn_ext::fwd and flashattn_ext::bwd take after
// their tensors, one row each, in schema order. Everything that lists them is generated from these
// rows: the schema strings, the C++ signatures the dispatcher calls (ops.cpp, autograd.cpp, and
// whatever registers another kernel for the ops), AttentionOptions, and what the autograd function
// saves. Adding an option = one row here + reading it where the kernels need it.
//
//   TENSOR(name, schema)                   an optional tensor (saved with save_for_backward)
//   VALUE(C++ type, name, default, schema) anything else (saved in one AttentionValues unit)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#define FLASHATTN_OPTIONS(TENSOR, VALUE)                                                      \
  TENSOR(attn_mask, "Tensor? attn_mask=None")                                                 \
  TENSOR(alibi_slopes, "Tensor? alibi_slopes=None")                                           \
  /* bool/uint8 (kept blocks) or int32 (-1 empty, -2 full, e >= 0 partial with element mask e) */ \
  TENSOR(block_mask, "Tensor? block_mask=None")                                               \
  /* (P, block_m, block_n) bool: the element masks of partial blocks */                      \
  TENSOR(block_elem_masks, "Tensor? block_elem_masks=None")                                   \
  VALUE(double, dropout_p, 0.0, "float dropout_p=0.0")                                        \
  VALUE(std::optional<double>, scale, std::nullopt, "float? scale=None")                      \
  VALUE(int64_t, window_left, -1, "int window_left=-1")                                       \
  VALUE(int64_t, window_right, -1, "int window_right=-1")                                     \
  VALUE(bool, bottom_right, false, "bool bottom_right=False")                                 \
  VALUE(double, softcap, 0.0, "float softcap=0.0")                                            \
  VALUE(int64_t, sparse_block_m, 128, "int sparse_block_m=128")                               \
  VALUE(int64_t, sparse_block_n, 128, "int sparse_block_n=128")                               \
  /* the backward's reduction order; the forward ignores it */                               \
  VALUE(bool, deterministic, false, "bool deterministic=False")

// ---- expansions (each starts with a comma: they follow the ops' leading tensors) ----
#define FLASHATTN_IGNORE_(...)
#define FLASHATTN_T_SCHEMA_(name, schema) ", " schema
#define FLASHATTN_V_SCHEMA_(type, name, init, schema) ", " schema
#define FLASHATTN_T_PARAM_(name, schema) , const std::optional<at::Tensor>& name
#define FLASHATTN_V_PARAM_(type, name, init, schema) , type name
#define FLASHATTN_T_TYPE_(name, schema) , const std::optional<at::Tensor>&
#define FLASHATTN_V_TYPE_(type, name, init, schema) , type
#define FLASHATTN_T_ARG_(name, schema) , name
#define FLASHATTN_T_FIELD_(name, schema) , options.name
#define FLASHATTN_T_ASSIGN_(name, schema) options_.name = name;
#define FLASHATTN_V_ASSIGN_(type, name, init, schema) options_.name = name;
#define FLASHATTN_V_FIELD_(type, name, init, schema) , options.name

// ", Tensor? attn_mask=None, ..., bool deterministic=False" for the schema strings.
#define FLASHATTN_OPTIONS_SCHEMA FLASHATTN_OPTIONS(FLASHATTN_T_SCHEMA_, FLASHATTN_V_SCHEMA_)
// ", const std::optional<at::Tensor>& attn_mask, ..., bool deterministic": parameters of a kernel.
#define FLASHATTN_OPTIONS_PARAMS FLASHATTN_OPTIONS(FLASHATTN_T_PARAM_, FLASHATTN_V_PARAM_)
// The same types without names: for the dispatcher's typed<> signatures.
#define FLASHATTN_OPTIONS_TYPES FLASHATTN_OPTIONS(FLASHATTN_T_TYPE_, FLASHATTN_V_TYPE_)
// ", options.attn_mask, ...": an AttentionOptions named `options` spread into a call.
#define FLASHATTN_OPTIONS_FIELDS FLASHATTN_OPTIONS(FLASHATTN_T_FIELD_, FLASHATTN_V_FIELD_)
// Inside a kernel with FLASHATTN_OPTIONS_PARAMS: an AttentionOptions made of them.
#define FLASHATTN_OPTIONS_FROM_PARAMS()                                     \
  ([&] {                                                                   \
    ::flashattn::AttentionOptions options_;                                \
    FLASHATTN_OPTIONS(FLASHATTN_T_ASSIGN_, FLASHATTN_V_ASSIGN_) return options_; \
  }())
// Only the tensor options, as parameters / arguments.
#define FLASHATTN_TENSOR_OPTIONS_PARAMS FLASHATTN_OPTIONS(FLASHATTN_T_PARAM_, FLASHATTN_IGNORE_)
#define FLASHATTN_TENSOR_OPTIONS_ARGS FLASHATTN_OPTIONS(FLASHATTN_T_ARG_, FLASHATTN_IGNORE_)
// ", (attn_mask ? &*attn_mask : nullptr), ...": the tensor options' addresses (nullptr when absent).
#define FLASHATTN_T_ADDR_(name, schema) , (name ? &*name : nullptr)
#define FLASHATTN_TENSOR_OPTIONS_ADDRS FLASHATTN_OPTIONS(FLASHATTN_T_ADDR_, FLASHATTN_IGNORE_)

namespace flashattn {

// The non-tensor options: one unit the autograd function saves for the backward.
struct AttentionValues {
#define FLASHATTN_V_MEMBER_(type, name, init, schema) type name = init;
  FLASHATTN_OPTIONS(FLASHATTN_IGNORE_, FLASHATTN_V_MEMBER_)
#undef FLASHATTN_V_MEMBER_
};

struct AttentionOptions : AttentionValues {
#define FLASHATTN_T_MEMBER_(name, schema) std::optional<at::Tensor> name;
  FLASHATTN_OPTIONS(FLASHATTN_T_MEMBER_, FLASHATTN_IGNORE_)
#undef FLASHATTN_T_MEMBER_

  // The tensor options, in row order (what save_for_backward keeps).
  std::vector<at::Tensor> tensors() const {
    std::vector<at::Tensor> ts;
#define FLASHATTN_T_PUSH_(name, schema) ts.push_back(name.value_or(at::Tensor()));
    FLASHATTN_OPTIONS(FLASHATTN_T_PUSH_, FLASHATTN_IGNORE_)
#undef FLASHATTN_T_PUSH_
    return ts;
  }
  // The inverse of tensors(), reading `ts` from `first` on; undefined tensors become nullopt.
  void set_tensors(const std::vector<at::Tensor>& ts, size_t first) {
    size_t i = first;
#define FLASHATTN_T_SET_(name, schema) \
  name = ts.at(i).defined() ? std::optional<at::Tensor>(ts.at(i)) : std::nullopt, ++i;
    FLASHATTN_OPTIONS(FLASHATTN_T_SET_, FLASHATTN_IGNORE_)
#undef FLASHATTN_T_SET_
  }

#define FLASHATTN_COUNT_(...) +1
  static constexpr size_t kTensorCount = 0 FLASHATTN_OPTIONS(FLASHATTN_COUNT_, FLASHATTN_IGNORE_);
#undef FLASHATTN_COUNT_
};

}  // namespace flashattn
