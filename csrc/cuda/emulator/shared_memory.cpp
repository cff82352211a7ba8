// Shared memory of the running block: the buffer kernels see as `smem_raw`, NaN poison at every
// block start, a canary past the launch's dynamic size, cp.async (issue / commit / wait) and the
// race shadow fed by every shared-memory access of the kernels.
//
// Kernels are compiled with -fsanitize=thread, which makes g++ call __tsan_read<N> /
// __tsan_write<N> before every memory access; no ThreadSanitizer runtime is linked: the hooks
// below are ours. An access outside shared memory returns at once. One inside it is checked
// against a shadow of 4-byte granules, each remembering (in the current barrier epoch) which warp
// wrote it, which warps read it and how many cp.async copies into it are still in flight:
//  - reading or writing a granule with a copy in flight (cp.async not yet covered by a
//    cp.async.wait_group of the issuing thread) is an error;
//  - reading a granule another warp wrote in this epoch (since the last __syncthreads) is an
//    error (read-after-write across warps needs a barrier), as is writing one that another warp
//    read or wrote in this epoch.
// A landed copy counts as a write by the issuing thread's warp at its wait_group.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <string>

#include "internal.h"

// The kernels declare `extern __shared__ unsigned char smem_raw[]` inside namespace
// flashattn::cuda: under g++ that names this array.
namespace flashattn::cuda {
constexpr size_t kSmemCapacity = 240 * 1024;  // > 227 KB (sm90 opt-in) with room for the canary
alignas(4096) unsigned char smem_raw[kSmemCapacity];
}  // namespace flashattn::cuda

namespace flashattn::emu {

namespace {

using cuda::kSmemCapacity;
using cuda::smem_raw;
constexpr uint8_t kPoisonByte = 0xFF;  // NaN as fp16, bf16, fp32 and fp64
constexpr uint8_t kCanaryByte = 0xA5;
constexpr size_t kGranule = 4;
// The canary covers this much past the launch's size (every kernel access is bounds-checked by
// the hooks anyway; the canary catches what bypasses them).
constexpr size_t kCanaryBytes = 4096;

struct Granule {
  uint32_t write_epoch = 0, read_epoch = 0;
  uint32_t readers = 0;     // warps that read it in read_epoch, one bit each (warp >= 31 -> bit 31)
  uint16_t writer = 0;      // warp of the last write
  uint16_t writer_thread = 0;
  uint16_t inflight = 0;    // cp.async copies / TMA loads into it, issued and not yet landed
  // The async proxy (Hopper): the mbarrier (offset / 8 + 1, 0 = none) and the phase count whose
  // completion makes the TMA data visible, wgmma ops still reading it, and whether the last write
  // was an ordinary store not yet followed by fence.proxy.async in the writing thread.
  uint16_t tma_bar = 0;
  uint16_t async_readers = 0;
  uint32_t tma_phase = 0;
  uint8_t generic_unfenced = 0;
  uint8_t tma_swizzle = 0;  // the swizzle (bytes / 32) the TMA load wrote it with
  uint32_t writer_fences = 0;
};

// Per granule and warp: the arrive number (hopper_arrive_count + 1 at the read) that orders the
// warp's last read of it before a later TMA load into it (WAR through mbarriers); tagged by block.
constexpr int kStampWarps = 16;
struct ReadStamps {
  uint64_t block = 0;
  uint32_t stamp[kStampWarps];
};

Granule g_shadow[kSmemCapacity / kGranule];
ReadStamps g_stamps[kSmemCapacity / kGranule];
uint64_t g_block_serial = 0;
uint32_t g_epoch = 1;
size_t g_size = 0;  // dynamic shared memory of the running launch
const uintptr_t g_base = reinterpret_cast<uintptr_t>(smem_raw);

uint32_t warp_bit(int warp) { return 1u << (warp < 31 ? warp : 31); }

std::string range(size_t offset, size_t bytes) {
  char buf[96];
  snprintf(buf, sizeof(buf), "shared memory bytes [%zu, %zu)", offset, offset + bytes);
  return buf;
}

std::string pc_note(const void* pc) {
  if (pc == nullptr) return "";
  char buf[64];
  snprintf(buf, sizeof(buf), " (pc %p; addr2line -f -C -e libflashattn_emulator.so)", pc);
  return buf;
}

void check_granules(size_t offset, size_t bytes, bool write, const char* what, const void* pc) {
  const Lane& me = current();
  const int warp = me.info.warp;
  for (size_t g = offset / kGranule; g <= (offset + bytes - 1) / kGranule; ++g) {
    Granule& s = g_shadow[g];
    if (s.inflight)
      fail("%s of %s while a cp.async into it is still in flight (not yet covered by a cp.async.wait_group of "
           "the thread that issued it)%s",
           what, range(g * kGranule, kGranule).c_str(), pc_note(pc).c_str());
    if (s.write_epoch == g_epoch && s.writer != warp)
      fail("shared-memory race: %s by warp %d of %s that warp %d (thread %d) wrote since the last __syncthreads%s",
           what, warp, range(g * kGranule, kGranule).c_str(), s.writer, s.writer_thread, pc_note(pc).c_str());
    if (s.tma_bar && hopper_observed(me, (s.tma_bar - 1u) * 8u) < s.tma_phase)
      fail("%s of %s written by a TMA load before this thread waited for it: the mbarrier at shared byte %u must "
           "complete phase %u (try_wait.parity) first%s",
           what, range(g * kGranule, kGranule).c_str(), (s.tma_bar - 1u) * 8u, s.tma_phase - 1u, pc_note(pc).c_str());
    if (s.async_readers && write)
      fail("%s into %s that an in-flight wgmma is still reading (no wgmma.wait_group before it)%s", what,
           range(g * kGranule, kGranule).c_str(), pc_note(pc).c_str());
    if (write) {
      const uint32_t others = s.read_epoch == g_epoch ? (s.readers & ~warp_bit(warp)) : 0;
      if (others)
        fail("shared-memory race: %s by warp %d into %s that warp %d read since the last __syncthreads%s", what, warp,
             range(g * kGranule, kGranule).c_str(), __builtin_ctz(others), pc_note(pc).c_str());
      s.write_epoch = g_epoch;
      s.writer = static_cast<uint16_t>(warp);
      s.writer_thread = static_cast<uint16_t>(me.info.linear);
      s.tma_bar = 0;
      s.generic_unfenced = 1;
      s.writer_fences = me.hopper.proxy_fences;
    } else {
      if (s.read_epoch != g_epoch) s.read_epoch = g_epoch, s.readers = 0;
      s.readers |= warp_bit(warp);
      if (warp < kStampWarps && hopper_active()) {
        ReadStamps& r = g_stamps[g];
        if (r.block != g_block_serial) r.block = g_block_serial, std::memset(r.stamp, 0, sizeof(r.stamp));
        r.stamp[warp] = hopper_arrive_count(warp) + 1;
      }
    }
  }
}

void check_bounds(size_t offset, size_t bytes, const char* what, const void* pc) {
  if (offset + bytes > g_size)
    fail("%s of %s past the end of the launch's %zu bytes of dynamic shared memory%s", what,
         range(offset, bytes).c_str(), g_size, pc_note(pc).c_str());
}

// A kernel's own load or store (through the hooks).
inline void on_access(const void* addr, size_t bytes, bool write, const void* pc) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(addr) - g_base;
  if (offset >= kSmemCapacity || !in_kernel()) {
    if (g_wgmma_in_flight && in_kernel()) hopper_check_register_access(addr, bytes, write);
    return;
  }
  const char* what = write ? "store" : "load";
  check_bounds(offset, bytes, what, pc);
  check_granules(offset, bytes, write, what, pc);
  maybe_switch_at_memory_access();
}

void copy_chunk(const AsyncCopy& c) {
  unsigned char* dst = smem_raw + c.dst;
  if (c.src_bytes > 0) std::memcpy(dst, c.src, static_cast<size_t>(c.src_bytes));
  std::memset(dst + c.src_bytes, 0, static_cast<size_t>(16 - c.src_bytes));
}

}  // namespace

char* shared_base() { return reinterpret_cast<char*>(smem_raw); }
size_t shared_size() { return g_size; }

void shared_begin_block(size_t dynamic_bytes) {
  g_size = dynamic_bytes;
  std::memset(smem_raw, kPoisonByte, dynamic_bytes);
  std::memset(smem_raw + dynamic_bytes, kCanaryByte, std::min(kCanaryBytes, kSmemCapacity - dynamic_bytes));
  ++g_epoch;
  ++g_block_serial;
  for (size_t g = 0; g < (dynamic_bytes + kGranule - 1) / kGranule; ++g) {
    Granule& s = g_shadow[g];
    s.inflight = 0;
    s.tma_bar = 0;
    s.async_readers = 0;
    s.generic_unfenced = 0;
  }
}

void shared_end_block() {
  for (size_t i = g_size; i < std::min(g_size + kCanaryBytes, kSmemCapacity); ++i)
    if (smem_raw[i] != kCanaryByte)
      fail("the canary past the launch's %zu bytes of dynamic shared memory was overwritten at byte %zu (block end)",
           g_size, i);
}

void shared_barrier() {
  ++g_epoch;
  hopper_block_barrier();
}

void shared_tma_issue(uint32_t offset, uint32_t bytes, const Lane& issuer, const char* what) {
  check_bounds(offset, bytes, what, nullptr);
  for (size_t g = offset / kGranule; g <= (offset + bytes - 1) / kGranule; ++g) {
    Granule& s = g_shadow[g];
    if (s.inflight)
      fail("%s into %s while an earlier asynchronous copy into it is still in flight", what,
           range(g * kGranule, kGranule).c_str());
    if (s.async_readers)
      fail("%s into %s that an in-flight wgmma is still reading (its warpgroup has not passed wgmma.wait_group "
           "and released the buffer)",
           what, range(g * kGranule, kGranule).c_str());
    const ReadStamps& r = g_stamps[g];
    if (r.block == g_block_serial)
      for (int w = 0; w < kStampWarps; ++w)
        if (w != issuer.info.warp && r.stamp[w] > issuer.hopper.released[w])
          fail("%s into %s that warp %d read, with no mbarrier arrive of that warp after its read observed by this "
               "thread first (write-after-read: wait on the buffer's 'empty' barrier before reloading it)",
               what, range(g * kGranule, kGranule).c_str(), w);
    ++s.inflight;
  }
}

void shared_tma_land(uint32_t offset, const void* data, uint32_t bytes, uint32_t bar_offset, uint32_t phase,
                     int swizzle_bytes) {
  std::memcpy(smem_raw + offset, data, bytes);
  for (size_t g = offset / kGranule; g <= (offset + bytes - 1) / kGranule; ++g) {
    Granule& s = g_shadow[g];
    --s.inflight;
    s.write_epoch = 0;  // the async proxy's write: ordered by the mbarrier, not by warps and barriers
    s.tma_bar = static_cast<uint16_t>(bar_offset / 8 + 1);
    s.tma_phase = phase;
    s.tma_swizzle = static_cast<uint8_t>(swizzle_bytes / 32);
    s.generic_unfenced = 0;
    g_stamps[g].block = 0;
  }
}

void shared_async_read(uint32_t offset, uint32_t bytes, int first_warp, std::vector<uint32_t>& granules,
                       const char* what, int swizzle_bytes) {
  check_bounds(offset, bytes, what, nullptr);
  uint16_t cached_bar = 0;
  uint32_t cached_min = 0;
  int cached_thread = 0;
  for (size_t g = offset / kGranule; g <= (offset + bytes - 1) / kGranule; ++g) {
    Granule& s = g_shadow[g];
    auto at = [&] { return range(g * kGranule, kGranule); };
    if (s.inflight)
      fail("%s of %s while a TMA load / cp.async into it is still in flight (its mbarrier phase has not completed)",
           what, at().c_str());
    if (s.tma_bar) {
      if (s.tma_bar != cached_bar) {  // the least any thread of the warpgroup saw of this mbarrier
        cached_bar = s.tma_bar;
        cached_min = UINT32_MAX;
        for (int t = 32 * first_warp; t < 32 * (first_warp + 4); ++t) {
          const uint32_t seen = hopper_observed(lane_at(t), (s.tma_bar - 1u) * 8u);
          if (seen < cached_min) cached_min = seen, cached_thread = t;
        }
      }
      if (cached_min < s.tma_phase)
        fail("%s of %s written by a TMA load that thread %d has not waited for: the mbarrier at shared byte %u must "
             "complete phase %u first (try_wait.parity in every thread of the warpgroup)",
             what, at().c_str(), cached_thread, (s.tma_bar - 1u) * 8u, s.tma_phase - 1u);
    }
    if (s.tma_bar && s.tma_swizzle != swizzle_bytes / 32)
      fail("%s of %s: swizzle mismatch: the TMA load wrote it with %s, the wgmma descriptor reads it with %s", what,
           at().c_str(), s.tma_swizzle ? (std::to_string(32 * s.tma_swizzle) + "-byte swizzling").c_str() : "no swizzling",
           swizzle_bytes ? (std::to_string(swizzle_bytes) + "-byte swizzling").c_str() : "no swizzling");
    if (s.generic_unfenced && lane_at(s.writer_thread).hopper.proxy_fences == s.writer_fences)
      fail("%s of %s that thread %d wrote with ordinary stores and no fence.proxy.async after them (the async proxy "
           "may not see the data)",
           what, at().c_str(), s.writer_thread);
    if (s.generic_unfenced && s.write_epoch == g_epoch && (s.writer < first_warp || s.writer >= first_warp + 4))
      fail("shared-memory race: %s of %s that warp %d wrote since the last __syncthreads", what, at().c_str(),
           s.writer);
    ++s.async_readers;
    granules.push_back(static_cast<uint32_t>(g));
  }
}

void shared_async_read_done(const std::vector<uint32_t>& granules, int warp, bool last) {  // last: the op completed
  for (uint32_t g : granules) {
    if (last) --g_shadow[g].async_readers;
    if (warp < kStampWarps) {
      ReadStamps& r = g_stamps[g];
      if (r.block != g_block_serial) r.block = g_block_serial, std::memset(r.stamp, 0, sizeof(r.stamp));
      r.stamp[warp] = hopper_arrive_count(warp) + 1;
    }
  }
}

void shared_check_read(uint32_t offset, uint32_t bytes, const char* what) {
  check_bounds(offset, bytes, what, nullptr);
  check_granules(offset, bytes, false, what, nullptr);
}
void shared_check_write(uint32_t offset, uint32_t bytes, const char* what) {
  check_bounds(offset, bytes, what, nullptr);
  check_granules(offset, bytes, true, what, nullptr);
}

uint32_t shared_address(const void* generic, Site site) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(generic) - g_base;
  if (offset > g_size)
    fail("__cvta_generic_to_shared (%s:%d): %p is not in the block's %zu bytes of shared memory", site.file, site.line,
         generic, g_size);
  return static_cast<uint32_t>(offset);
}

void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes, Site site) {
  const uintptr_t offset = reinterpret_cast<uintptr_t>(smem_dst) - g_base;
  if (offset >= kSmemCapacity)
    fail("cp.async (%s:%d): destination %p is not shared memory", site.file, site.line, smem_dst);
  if (offset % 16 != 0 || reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
    fail("cp.async.cg 16 (%s:%d): addresses must be 16-byte aligned (shared offset %zu, global %p)", site.file,
         site.line, static_cast<size_t>(offset), gmem_src);
  if (src_bytes < 0 || src_bytes > 16)
    fail("cp.async.cg 16 (%s:%d): src-size %d outside [0, 16]", site.file, site.line, src_bytes);
  check_bounds(offset, 16, "cp.async", nullptr);
  check_granules(offset, 16, true, "cp.async", nullptr);
  for (size_t g = offset / kGranule; g < (offset + 16) / kGranule; ++g) ++g_shadow[g].inflight;
  const AsyncCopy copy{static_cast<uint32_t>(offset), gmem_src, src_bytes, site};
  if (config().landing == CopyLanding::kAtIssue) copy_chunk(copy);
  current().uncommitted.push_back(copy);
}

void cp_async_commit(Site /*site*/) {
  Lane& me = current();
  me.committed.push_back(std::move(me.uncommitted));
  me.uncommitted.clear();
}

void land_group(Lane& lane, std::vector<AsyncCopy>& group) {
  for (const AsyncCopy& c : group) {
    if (config().landing == CopyLanding::kAtWait) copy_chunk(c);
    for (size_t g = c.dst / kGranule; g < (c.dst + 16) / kGranule; ++g) {
      Granule& s = g_shadow[g];
      --s.inflight;
      s.write_epoch = g_epoch;
      s.writer = static_cast<uint16_t>(lane.info.warp);
      s.writer_thread = static_cast<uint16_t>(lane.info.linear);
    }
  }
  group.clear();
}

void cp_async_wait(int pending, Site /*site*/) {
  Lane& me = current();
  while (me.committed.size() > static_cast<size_t>(pending)) {
    land_group(me, me.committed.front());
    me.committed.pop_front();
  }
}

}  // namespace flashattn::emu

// ---- the ThreadSanitizer instrumentation hooks (no TSan runtime: these are the whole runtime) ----

#define FLASHATTN_EMU_HOOK __attribute__((visibility("hidden"))) void
#define FLASHATTN_EMU_PC __builtin_return_address(0)
extern "C" {
FLASHATTN_EMU_HOOK __tsan_init() {}
FLASHATTN_EMU_HOOK __tsan_func_entry(void*) {}
FLASHATTN_EMU_HOOK __tsan_func_exit() {}
FLASHATTN_EMU_HOOK __tsan_vptr_update(void*, void*) {}
FLASHATTN_EMU_HOOK __tsan_vptr_read(void*) {}
#define FLASHATTN_EMU_SIZED_HOOKS(n)                                                                       \
  FLASHATTN_EMU_HOOK __tsan_read##n(void* a) { flashattn::emu::on_access(a, n, false, FLASHATTN_EMU_PC); } \
  FLASHATTN_EMU_HOOK __tsan_write##n(void* a) { flashattn::emu::on_access(a, n, true, FLASHATTN_EMU_PC); } \
  FLASHATTN_EMU_HOOK __tsan_unaligned_read##n(void* a) { flashattn::emu::on_access(a, n, false, FLASHATTN_EMU_PC); } \
  FLASHATTN_EMU_HOOK __tsan_unaligned_write##n(void* a) { flashattn::emu::on_access(a, n, true, FLASHATTN_EMU_PC); } \
  FLASHATTN_EMU_HOOK __tsan_volatile_read##n(void* a) { flashattn::emu::on_access(a, n, false, FLASHATTN_EMU_PC); } \
  FLASHATTN_EMU_HOOK __tsan_volatile_write##n(void* a) { flashattn::emu::on_access(a, n, true, FLASHATTN_EMU_PC); }
FLASHATTN_EMU_SIZED_HOOKS(1)
FLASHATTN_EMU_SIZED_HOOKS(2)
FLASHATTN_EMU_SIZED_HOOKS(4)
FLASHATTN_EMU_SIZED_HOOKS(8)
FLASHATTN_EMU_SIZED_HOOKS(16)
// Atomics in instrumented code (the guards of function-local statics): one thread runs at a time.
__attribute__((visibility("hidden"))) unsigned char __tsan_atomic8_load(const volatile unsigned char* a, int) {
  return *a;
}
FLASHATTN_EMU_HOOK __tsan_atomic8_store(volatile unsigned char* a, unsigned char v, int) { *a = v; }
__attribute__((visibility("hidden"))) int __tsan_atomic32_load(const volatile int* a, int) { return *a; }
FLASHATTN_EMU_HOOK __tsan_atomic32_store(volatile int* a, int v, int) { *a = v; }
FLASHATTN_EMU_HOOK __tsan_read_range(void* a, unsigned long n) {
  if (n) flashattn::emu::on_access(a, n, false, FLASHATTN_EMU_PC);
}
FLASHATTN_EMU_HOOK __tsan_write_range(void* a, unsigned long n) {
  if (n) flashattn::emu::on_access(a, n, true, FLASHATTN_EMU_PC);
}
}
