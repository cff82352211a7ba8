// Entry points of the CPU FlashAttention kernels (the op layer calls these with checked params).
//
// flashattn::cpu::forward etc. dispatch to the copy compiled for the instruction set of the CPU
// found at run time (csrc/cpu_dispatch.cpp); flashattn::cpu::<ISA>::forward is that copy
// (csrc/cpu/isa.h).
#pragma once

#include <cstdint>
#include <string>

#include "attention_params.h"
#include "kvcache_params.h"

// X(return type, name, parameters, arguments): every per-ISA kernel entry point, once.
#define FLASHATTN_CPU_KERNELS(X)                                                                 \
  /* Writes out and lse. */                                                                      \
  X(void, forward, (const AttentionParams& p), (p))                                              \
  /* Writes dq, dk, dv (and dmask when p.dmask is set); p.delta is not used (delta is kept in  \
     the accumulation type internally). The dQ partial sums live in a buffer of                 \
     backward_dq_accum_elems(p) acc_t elements that the caller passes as p.dq_accum (nullptr   \
     when that count is 0). */                                                                   \
  X(void, backward, (const AttentionGradParams& p), (p))                                         \
  X(int64_t, backward_dq_accum_elems, (const AttentionGradParams& p), (p))                       \
  /* Test-only: the dropout keep mask, (batch, num_heads, seqlen_q, seqlen_k) bytes, from the   \
     same Philox stream the kernels use. */                                                      \
  X(void, dropout_mask, (const AttentionParams& p, uint8_t* keep), (p, keep))                    \
  /* flash_attn_with_kvcache (decode.cpp); num_splits = 0: chosen from the thread count and   \
     the cache lengths. */                                                                       \
  X(int64_t, decode_num_splits, (const KvCacheParams& p, int64_t max_seqlen_k, int64_t requested, int threads), \
    (p, max_seqlen_k, requested, threads))                                                       \
  X(void, decode, (const KvCacheParams& p), (p))

namespace flashattn::cpu {

#define FLASHATTN_CPU_DECLARE(ret, name, params, args) ret name params;
FLASHATTN_CPU_KERNELS(FLASHATTN_CPU_DECLARE)
namespace DEFAULT { FLASHATTN_CPU_KERNELS(FLASHATTN_CPU_DECLARE) }
namespace AVX2 { FLASHATTN_CPU_KERNELS(FLASHATTN_CPU_DECLARE) }
namespace AVX512 { FLASHATTN_CPU_KERNELS(FLASHATTN_CPU_DECLARE) }
#undef FLASHATTN_CPU_DECLARE

// The instruction set the kernels run with ("DEFAULT", "AVX2", "AVX512"): the best one built
// that torch's capability (ATEN_CPU_CAPABILITY included) allows; decided once per process.
const char* isa();
// The instruction sets this build contains, baseline first.
std::string isas_built();

}  // namespace flashattn::cpu
