// State shared by the emulator's own translation units (not seen by kernels).
#pragma once

#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "emulator.h"
#include "fiber.h"

namespace flashattn::emu {

// ---- configuration (api.cpp sets it before each emulated call) --------------------------------

enum class Schedule {
  kLockstep,        // round-robin over all threads, one step (to the next collective) each
  kWarpAscending,   // one warp at a time to its next block barrier, warps 0, 1, 2, ...
  kWarpDescending,  // the same, last warp first
  kRandom,          // a random runnable thread at every step (seeded), plus random switches at
                    // shared-memory accesses
};
enum class CopyLanding { kAtWait, kAtIssue };  // when a cp.async writes shared memory

struct Config {
  Schedule schedule = Schedule::kLockstep;
  uint64_t seed = 1;
  CopyLanding landing = CopyLanding::kAtWait;
  int sm_major = 9, sm_minor = 0;  // the emulated GPU (its shared-memory limits)
  bool hopper = false;             // dispatch takes the sm_90a kernels where they apply
};
Config& config();

struct DeviceProps {
  int smem_per_block_optin, smem_per_block_default, smem_per_sm, max_threads_per_block, multiprocessors;
};
DeviceProps device_props();  // of config().sm_major / sm_minor

// ---- threads, warps, blocks ------------------------------------------------------------------

enum class LaneState : uint8_t { kRunnable, kAtBarrier, kAtWarpCollective, kDone };

struct AsyncCopy {
  uint32_t dst;  // shared-memory offset
  const void* src;
  int src_bytes;
  Site site;
};

// Per-thread state of the Hopper instructions (hopper.cpp).
constexpr int kMaxWarps = 32;
struct LaneHopper {
  std::vector<std::pair<uint32_t, uint32_t>> observed;  // (mbarrier offset, phases whose completion it saw)
  uint32_t released[kMaxWarps] = {};  // per warp: the arrive number up to which that warp's accesses are ordered before this thread
  uint32_t proxy_fences = 0;          // fence.proxy.async executed
  bool wgmma_fenced = false;          // a wgmma.fence since the last commit_group
  std::vector<int> wgmma_uncommitted;        // wgmma ops issued since the last commit_group
  std::deque<std::vector<int>> wgmma_groups;  // committed, not yet waited for, oldest first
};

struct Lane {
  LaneInfo info{};
  LaneState state = LaneState::kRunnable;
  Fiber* fiber = nullptr;
  Site blocked_at{};
  const char* blocked_on = "";
  const char* spinning_on = nullptr;  // the spin loop (spin_yield) it was last seen in, for reports
  Site spinning_at{};
  std::vector<AsyncCopy> uncommitted;             // issued since the last commit_group
  std::deque<std::vector<AsyncCopy>> committed;   // groups not yet waited for, oldest first
  LaneHopper hopper;
};

enum class Collective : uint8_t { kSyncwarp, kShflIdx, kShflXor, kLdmatrix, kLdmatrixTrans, kMmaF16, kMmaBF16 };
const char* collective_name(Collective c);

struct Warp {
  int index = 0, first = 0, size = 0;  // lanes first .. first + size - 1 of the block
  int arrived = 0, exited = 0;
  Collective kind = Collective::kSyncwarp;
  Site site{};
  uint32_t in[32][10];  // operands per lane (mma: a0..a3, b0, b1, c0..c3)
  uint32_t out[32][4];  // results per lane
  uint64_t in64[32], out64[32];
  int arg[32];
};

Lane& current();
Warp& warp_of(const Lane& lane);
int block_threads();
const LaunchConfig& current_launch();

// A warp collective: checks that every lane meets the same one, lets each lane store its
// operands, runs `complete` once on the last lane to arrive, and returns when it has run.
void collective_arrive(Warp& w, Lane& me, Collective kind, Site site);
bool collective_all_arrived(const Warp& w);
void collective_release(Warp& w);
void collective_wait(Lane& me, Warp& w);
template <class Store, class Complete>
void warp_collective(Collective kind, Site site, Store&& store, Complete&& complete) {
  Lane& me = current();
  Warp& w = warp_of(me);
  collective_arrive(w, me, kind, site);
  store(w, me.info.lane);
  if (collective_all_arrived(w)) {
    complete(w);
    collective_release(w);
  } else {
    collective_wait(me, w);
  }
}

// For collectives other than a warp's (hopper.cpp): the lanes of the block, blocking the running
// lane until wake() (state kAtWarpCollective), and telling the deadlock check that something moved.
Lane& lane_at(int linear);
void block_until_woken(Lane& me, const char* what, Site site);
void wake(Lane& lane);
void note_progress();

// Hopper state of the running block (hopper.cpp): reset at block start, checked at its end and at
// a lane's exit; a completed __syncthreads orders everything before it (releases and observed phases).
void hopper_begin_block();
void hopper_end_block();
void hopper_lane_exit(Lane& lane);
void hopper_block_barrier();
uint64_t hopper_wgmma_ops();  // warpgroup wgmma ops made so far in this process
bool hopper_active();  // an mbarrier was initialized in this block
uint32_t hopper_observed(const Lane& lane, uint32_t bar_offset);  // completed phases of that mbarrier it saw
uint32_t hopper_arrive_count(int warp);  // mbarrier arrives by that warp so far (+ block barriers)
// wgmma ops in flight in the block, and the check that a kernel access (not shared memory) does
// not touch the accumulator registers of one of the running thread's ops in flight.
extern int g_wgmma_in_flight;
void hopper_check_register_access(const void* addr, size_t bytes, bool write);

// Gives the schedule a chance to run another thread (random schedule, shared-memory accesses).
void maybe_switch_at_memory_access();

// Where in the kernel we are, for reports: "fwd_kernel<...> block (x, y, z) thread (x, y, z) (warp w lane l)".
std::string where();

// ---- shared memory (shared_memory.cpp) ---------------------------------------------------------

void shared_begin_block(size_t dynamic_bytes);  // poison, canary, new shadow epoch
void shared_end_block();                        // canary check
void shared_barrier();                          // a block barrier completed: new epoch
void shared_check_read(uint32_t offset, uint32_t bytes, const char* what);
void shared_check_write(uint32_t offset, uint32_t bytes, const char* what);
char* shared_base();
size_t shared_size();  // the launch's dynamic shared memory
void land_group(Lane& lane, std::vector<AsyncCopy>& group);
// The async proxy (TMA, wgmma) on the shadow: a TMA load issued into [offset, offset + bytes)
// (checks that nothing still reads or waits for it), landed (data written, visible after phase
// `phase` of the mbarrier at bar_offset completes), and a wgmma's read of it by warps
// [first_warp, first_warp + 4) (which must all have seen the data).
void shared_tma_issue(uint32_t offset, uint32_t bytes, const Lane& issuer, const char* what);
void shared_tma_land(uint32_t offset, const void* data, uint32_t bytes, uint32_t bar_offset, uint32_t phase,
                     int swizzle_bytes);
void shared_async_read(uint32_t offset, uint32_t bytes, int first_warp, std::vector<uint32_t>& granules, const char* what,
                       int swizzle_bytes);
void shared_async_read_done(const std::vector<uint32_t>& granules, int warp, bool last);

// ---- global memory (global_memory.cpp) ---------------------------------------------------------

// While a launch runs, SIGSEGV on a guard page becomes a report instead of a crash.
void install_fault_handler();
void remove_fault_handler();
// A report for a faulting address (guarded buffer, fiber stack or unknown).
std::string describe_fault(const void* addr, bool write);
// The guard-page fiber stacks, for fault reports.
bool address_in_fiber_guard(const void* addr);

// ---- failure -----------------------------------------------------------------------------------

bool failed();
const std::string& report();
void clear_failure();
cudaError_t& last_error();  // what cudaGetLastError returns next
// Records a failure found by host code of the emulator (outside a kernel).
void fail_host(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Called on a fiber by fail() or the fault handler: record and leave the kernel for good.
[[noreturn]] void abort_kernel(std::string message);
bool in_kernel();

}  // namespace flashattn::emu
