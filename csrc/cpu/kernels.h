// Entry points of the CPU FlashAttention kernels (the op layer calls these with checked params).
#pragma once

#include <cstdint>

#include "attention_params.h"

namespace flashattn::cpu {

// Writes out and lse.
void forward(const AttentionParams& p);

// Writes dq, dk, dv (and dmask when p.dmask is set); p.delta is not used (delta is kept in the
// accumulation type internally). The dQ partial sums live in a buffer of backward_dq_accum_elems(p) acc_t
// elements that the caller passes as p.dq_accum (nullptr when that count is 0).
void backward(const AttentionGradParams& p);
int64_t backward_dq_accum_elems(const AttentionGradParams& p);

// Test-only: the dropout keep mask, (batch, num_heads, seqlen_q, seqlen_k) bytes, from the same
// Philox stream the kernels use.
void dropout_mask(const AttentionParams& p, uint8_t* keep);

}  // namespace flashattn::cpu
