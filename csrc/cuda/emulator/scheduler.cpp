// Launches, blocks, threads as fibers, the schedules, block barriers, warp shuffles and the
// deadlock check. One block runs at a time, in block-index order (x fastest): the deterministic
// dQ protocol of the backward relies on index-order dispatch, as on the GPU.
#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <cstring>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "api.h"
#include "internal.h"

namespace flashattn::emu {

LaneInfo* g_lane = nullptr;
uint3 g_block_idx{};
dim3 g_block_dim{}, g_grid_dim{};

namespace {

constexpr size_t kFiberStackBytes = 256 * 1024;
constexpr uint64_t kSpinLimit = 1u << 16;  // spin steps with no other progress = a deadlock

struct BlockBarrier {
  int arrived = 0;
  bool is_or = false;
  int or_value = 0, result = 0;
  Site site{};
};

struct State {
  Config config;
  // The launch in progress.
  const LaunchConfig* launch = nullptr;
  const std::function<void()>* body = nullptr;
  std::vector<Lane> lanes;
  std::vector<Warp> warps;
  BlockBarrier barrier;
  int live = 0;  // threads of the block not yet exited
  Lane* running = nullptr;
  FiberContext scheduler;
  std::vector<std::unique_ptr<Fiber>> fibers;
  // Schedules.
  int cursor = 0, warp_cursor = 0;
  std::vector<int> lane_cursor;
  std::mt19937_64 rng;
  uint64_t spins_since_progress = 0;
  uint64_t launches = 0, blocks = 0, threads = 0;
  // Errors.
  bool failed = false;
  std::string report;
  cudaError_t last_error = cudaSuccess;
  std::unordered_map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
};

State g_state;  // one launch at a time (api.cpp serializes calls)
inline State& state() { return g_state; }

const char* name_of(Schedule s) {
  switch (s) {
    case Schedule::kLockstep: return "lockstep";
    case Schedule::kWarpAscending: return "warp-ascending";
    case Schedule::kWarpDescending: return "warp-descending";
    case Schedule::kRandom: return "random";
  }
  return "?";
}

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof(buf), fmt, ap);
  return buf;
}

void progress() { state().spins_since_progress = 0; }

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

Lane* pick();

// Lets the schedule pick the next thread and switches to it directly (fiber to fiber); returns
// when the schedule picks this one again. The scheduler's own context only sees the block's
// start, its end, a failure and a deadlock.
void yield() {
  State& s = state();
  Lane* me = s.running;
  Lane* next = s.failed ? nullptr : pick();
  if (next == me) return;
  if (next == nullptr) {
    switch_context(me->fiber->context(), &s.scheduler);
    return;
  }
  s.running = next;
  g_lane = &next->info;
  switch_context(me->fiber->context(), next->fiber->context());
}

void set_runnable(Lane& l) { l.state = LaneState::kRunnable; }

Lane* pick() {
  State& s = state();
  const int n = static_cast<int>(s.lanes.size());
  switch (s.config.schedule) {
    case Schedule::kLockstep:
      for (int i = 1; i <= n; ++i) {
        const int c = (s.cursor + i) % n;
        if (s.lanes[c].state == LaneState::kRunnable) {
          s.cursor = c;
          return &s.lanes[c];
        }
      }
      return nullptr;
    case Schedule::kWarpAscending:
    case Schedule::kWarpDescending: {
      const int nw = static_cast<int>(s.warps.size());
      const bool asc = s.config.schedule == Schedule::kWarpAscending;
      for (int k = 0; k < nw; ++k) {
        const int wi = asc ? (s.warp_cursor + k) % nw : ((s.warp_cursor - k) % nw + nw) % nw;
        const Warp& w = s.warps[wi];
        for (int i = 1; i <= w.size; ++i) {
          const int c = (s.lane_cursor[wi] + i) % w.size;
          if (s.lanes[w.first + c].state == LaneState::kRunnable) {
            s.warp_cursor = wi;
            s.lane_cursor[wi] = c;
            return &s.lanes[w.first + c];
          }
        }
      }
      return nullptr;
    }
    case Schedule::kRandom: {
      int runnable = 0;
      for (const Lane& l : s.lanes) runnable += l.state == LaneState::kRunnable;
      if (runnable == 0) return nullptr;
      int k = static_cast<int>(s.rng() % static_cast<uint64_t>(runnable));
      for (Lane& l : s.lanes)
        if (l.state == LaneState::kRunnable && k-- == 0) return &l;
      return nullptr;
    }
  }
  return nullptr;
}

std::string thread_states() {
  State& s = state();
  std::string out;
  for (const Warp& w : s.warps) {
    out += "  warp " + std::to_string(w.index) + ":";
    std::string last;
    int run = 0;
    auto flush = [&] {
      if (run) out += " " + std::to_string(run) + " x " + last + ";";
    };
    for (int i = 0; i < w.size; ++i) {
      const Lane& l = s.lanes[w.first + i];
      std::string d;
      switch (l.state) {
        case LaneState::kDone: d = "exited"; break;
        case LaneState::kRunnable:
          d = l.spinning_on ? std::string("spinning in ") + l.spinning_on + " (" + l.spinning_at.file + ":" +
                                  std::to_string(l.spinning_at.line) + ")"
                            : "spinning";
          break;
        case LaneState::kAtBarrier:
        case LaneState::kAtWarpCollective:
          d = std::string("at ") + l.blocked_on + " (" + l.blocked_at.file + ":" + std::to_string(l.blocked_at.line) + ")";
          break;
      }
      if (d != last) flush(), last = d, run = 0;
      ++run;
    }
    flush();
    out += "\n";
  }
  return out;
}

void lane_exit(Lane& me) {
  State& s = state();
  hopper_lane_exit(me);
  Warp& w = s.warps[me.info.warp];
  me.state = LaneState::kDone;
  ++w.exited;
  --s.live;
  progress();
  if (w.arrived > 0)
    abort_kernel(std::string("a lane exited while the rest of its warp waits at ") + collective_name(w.kind) + " (" +
                 w.site.file + ":" + std::to_string(w.site.line) + "): every lane must execute it");
  // A barrier the remaining threads have all reached completes now (exited threads do not count).
  if (s.barrier.arrived > 0 && s.barrier.arrived == s.live) {
    s.barrier.result = s.barrier.or_value;
    s.barrier.arrived = 0;
    for (Lane& l : s.lanes)
      if (l.state == LaneState::kAtBarrier) set_runnable(l);
    shared_barrier();
  }
}

void lane_entry(void* arg) {
  Lane* me = static_cast<Lane*>(arg);
  (*state().body)();
  lane_exit(*me);
  yield();            // to the next thread, or to the scheduler if none can run
  __builtin_trap();   // never resumed
}

void run_block() {
  State& s = state();
  const int n = static_cast<int>(s.lanes.size());
  shared_begin_block(s.launch->smem_bytes);
  hopper_begin_block();
  for (int i = 0; i < n; ++i) {
    Lane& l = s.lanes[i];
    l.state = LaneState::kRunnable;
    l.uncommitted.clear();
    l.committed.clear();
    l.hopper = LaneHopper{};
    l.spinning_on = nullptr;
    l.fiber = s.fibers[i].get();
    l.fiber->reset(&lane_entry, &l);
  }
  for (Warp& w : s.warps) w.arrived = 0, w.exited = 0;
  s.barrier = BlockBarrier{};
  s.live = n;
  s.cursor = n - 1;
  s.warp_cursor = s.config.schedule == Schedule::kWarpDescending ? static_cast<int>(s.warps.size()) - 1 : 0;
  for (int& c : s.lane_cursor) c = -1;
  s.spins_since_progress = 0;
  while (!s.failed) {
    Lane* next = pick();
    if (next == nullptr) {
      if (s.live == 0) break;
      s.failed = true;
      s.report = "deadlock: no thread can make progress in " + where() + "\n" + thread_states();
      break;
    }
    s.running = next;
    g_lane = &next->info;
    switch_context(&s.scheduler, next->fiber->context());
  }
  s.running = nullptr;
  if (!s.failed) hopper_end_block();
  if (!s.failed) shared_end_block();
}

}  // namespace

// ---- shared with the other emulator files -----------------------------------------------------

Config& config() { return state().config; }
bool hopper_kernels_enabled() { return state().config.hopper; }
Lane& current() { return *state().running; }
Warp& warp_of(const Lane& lane) { return state().warps[lane.info.warp]; }
int block_threads() { return static_cast<int>(state().lanes.size()); }
const LaunchConfig& current_launch() { return *state().launch; }
bool failed() { return state().failed; }
const std::string& report() { return state().report; }
bool in_kernel() { return state().running != nullptr; }
void clear_failure() {
  state().failed = false;
  state().report.clear();
  state().last_error = cudaSuccess;
}

DeviceProps device_props() {
  const Config& c = config();
  // Opt-in shared memory per block / per SM as the CUDA programming guide lists them.
  if (c.sm_major == 8 && c.sm_minor == 0) return {163 * 1024, 48 * 1024, 164 * 1024, 1024, 108};
  if (c.sm_major == 8) return {99 * 1024, 48 * 1024, 100 * 1024, 1024, 84};
  if (c.sm_major == 9) return {227 * 1024, 48 * 1024, 228 * 1024, 1024, 132};
  return {99 * 1024, 48 * 1024, 100 * 1024, 1024, 84};
}

std::string where() {
  State& s = state();
  if (s.launch == nullptr) return "(no launch)";
  std::string w = s.launch->kernel_name;
  if (const char* with = std::strstr(s.launch->launcher, "[with ")) w += std::string(" ") + with;
  char buf[256];
  snprintf(buf, sizeof(buf), ", block (%u, %u, %u) of (%u, %u, %u)", g_block_idx.x, g_block_idx.y, g_block_idx.z,
           g_grid_dim.x, g_grid_dim.y, g_grid_dim.z);
  w += buf;
  if (s.running) {
    const LaneInfo& l = s.running->info;
    snprintf(buf, sizeof(buf), ", thread (%u, %u, %u) = warp %d lane %d", l.thread_idx.x, l.thread_idx.y,
             l.thread_idx.z, l.warp, l.lane);
    w += buf;
  }
  w += std::string(", schedule ") + name_of(s.config.schedule);
  return w;
}

void abort_kernel(std::string message) {
  State& s = state();
  if (!s.failed) {
    s.failed = true;
    s.report = std::move(message) + "\n  in " + where();
  }
  if (s.running != nullptr) {
    Lane* me = s.running;
    switch_context(me->fiber->context(), &s.scheduler);  // never resumed
  }
  // Outside a kernel (host code of the emulator): the caller sees failed() and returns an error.
  throw std::runtime_error(s.report);
}

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string message = vformat(fmt, ap);
  va_end(ap);
  abort_kernel(std::move(message));
}

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kSyncwarp: return "__syncwarp";
    case Collective::kShflIdx: return "__shfl_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kLdmatrix: return "ldmatrix.x4";
    case Collective::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case Collective::kMmaF16: return "mma.m16n8k16.f16";
    case Collective::kMmaBF16: return "mma.m16n8k16.bf16";
  }
  return "?";
}

void collective_arrive(Warp& w, Lane& me, Collective kind, Site site) {
  if (w.exited > 0)
    fail("%s (%s:%d): %d lane(s) of this warp have exited; the instruction needs every lane", collective_name(kind),
         site.file, site.line, w.exited);
  if (w.arrived == 0) {
    w.kind = kind;
    w.site = site;
  } else if (w.kind != kind || !same_site(w.site, site)) {
    fail("lanes of one warp meet different collectives: this lane is at %s (%s:%d), others at %s (%s:%d)",
         collective_name(kind), site.file, site.line, collective_name(w.kind), w.site.file, w.site.line);
  }
  ++w.arrived;
  me.blocked_at = site;
  me.blocked_on = collective_name(kind);
}

bool collective_all_arrived(const Warp& w) { return w.arrived == w.size; }

void collective_release(Warp& w) {
  State& s = state();
  w.arrived = 0;
  for (int i = 0; i < w.size; ++i) {
    Lane& l = s.lanes[w.first + i];
    if (l.state == LaneState::kAtWarpCollective) set_runnable(l);
  }
  progress();
}

void collective_wait(Lane& me, Warp& /*w*/) {
  me.state = LaneState::kAtWarpCollective;
  yield();
}

void maybe_switch_at_memory_access() {
  State& s = state();
  if (s.config.schedule != Schedule::kRandom || s.running == nullptr) return;
  if ((s.rng() & 15) == 0) yield();
}

Lane& lane_at(int linear) { return state().lanes[linear]; }
void block_until_woken(Lane& me, const char* what, Site site) {
  me.state = LaneState::kAtWarpCollective;
  me.blocked_on = what;
  me.blocked_at = site;
  yield();
}
void wake(Lane& lane) {
  if (lane.state == LaneState::kAtWarpCollective) set_runnable(lane);
  progress();
}
void note_progress() { progress(); }

// ---- the built-ins ----------------------------------------------------------------------------

namespace {
int barrier_arrive(bool is_or, int predicate, Site site) {
  State& s = state();
  Lane& me = current();
  BlockBarrier& b = s.barrier;
  const char* name = is_or ? "__syncthreads_or" : "__syncthreads";
  if (b.arrived == 0) {
    b.is_or = is_or;
    b.site = site;
    b.or_value = 0;
  } else if (b.is_or != is_or || !same_site(b.site, site)) {
    fail("threads of one block meet different barriers: this thread is at %s (%s:%d), others at %s (%s:%d)", name,
         site.file, site.line, b.is_or ? "__syncthreads_or" : "__syncthreads", b.site.file, b.site.line);
  }
  b.or_value |= predicate != 0;
  ++b.arrived;
  if (b.arrived == s.live) {
    b.result = b.or_value;
    b.arrived = 0;
    for (Lane& l : s.lanes)
      if (l.state == LaneState::kAtBarrier) set_runnable(l);
    shared_barrier();
    progress();
    if (s.config.schedule == Schedule::kWarpAscending) s.warp_cursor = 0;
    if (s.config.schedule == Schedule::kWarpDescending) s.warp_cursor = static_cast<int>(s.warps.size()) - 1;
    // The last thread to arrive also yields, so the schedule decides who runs first after it.
    yield();
  } else {
    me.state = LaneState::kAtBarrier;
    me.blocked_at = site;
    me.blocked_on = name;
    yield();
  }
  return b.result;
}

void check_full_mask(unsigned mask, const Warp& w, const char* what, Site site) {
  const unsigned full = w.size == 32 ? 0xffffffffu : ((1u << w.size) - 1);
  if (mask != full)
    fail("%s (%s:%d) with member mask 0x%08x: the emulator supports whole-warp masks (0x%08x) only", what, site.file,
         site.line, mask, full);
}
}  // namespace

void syncthreads(Site site) { barrier_arrive(false, 0, site); }
int syncthreads_or(int predicate, Site site) { return barrier_arrive(true, predicate, site); }

void syncwarp(unsigned mask, Site site) {
  check_full_mask(mask, warp_of(current()), "__syncwarp", site);
  warp_collective(Collective::kSyncwarp, site, [](Warp&, int) {}, [](Warp&) {});
}

uint64_t shfl(ShflMode mode, unsigned mask, uint64_t value, int lane_arg, int width, Site site) {
  Warp& w = warp_of(current());
  check_full_mask(mask, w, mode == ShflMode::kXor ? "__shfl_xor_sync" : "__shfl_sync", site);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("shuffle width %d is not a power of 2 <= 32", width);
  const int me = current().info.lane;
  warp_collective(
      mode == ShflMode::kXor ? Collective::kShflXor : Collective::kShflIdx, site,
      [&](Warp& warp, int lane) {
        warp.in64[lane] = value;
        warp.arg[lane] = lane_arg;
      },
      [&](Warp& warp) {
        for (int l = 0; l < warp.size; ++l) {
          const int segment = l & ~(width - 1);
          int src;
          if (mode == ShflMode::kXor) {
            src = l ^ warp.arg[l];
            if (src >= segment + width) src = l;  // a later segment: own value (CUDA semantics)
          } else {
            src = segment + (warp.arg[l] & (width - 1));
          }
          warp.out64[l] = src < warp.size ? warp.in64[src] : warp.in64[l];
        }
      });
  return w.out64[me];
}

void spin_yield(const char* what, Site site) {
  State& s = state();
  Lane& me = current();
  me.spinning_on = what;
  me.spinning_at = site;
  if (++s.spins_since_progress > kSpinLimit) {
    me.blocked_on = what;
    me.blocked_at = site;
    fail("deadlock: %s spins at %s:%d with no other thread making progress (%llu steps)\n%s", what, site.file,
         site.line, static_cast<unsigned long long>(s.spins_since_progress), thread_states().c_str());
  }
  // A warp schedule runs one warp until it blocks; a spinning warp never blocks, so the schedule
  // moves on to the next warp (the one it waits for, an mbarrier's producer, may be there).
  const int nw = static_cast<int>(s.warps.size());
  if (s.config.schedule == Schedule::kWarpAscending) s.warp_cursor = (me.info.warp + 1) % nw;
  if (s.config.schedule == Schedule::kWarpDescending) s.warp_cursor = (me.info.warp - 1 + nw) % nw;
  yield();
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  if (bytes < 0 || bytes > device_props().smem_per_block_optin) return cudaErrorInvalidValue;
  state().max_dynamic_smem[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t& last_error() { return state().last_error; }

void fail_host(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string message = vformat(fmt, ap);
  va_end(ap);
  State& s = state();
  if (!s.failed) {
    s.failed = true;
    s.report = std::move(message);
  }
}

void stats(FlashattnEmulatorStats* out) {
  out->launches = state().launches;
  out->blocks = state().blocks;
  out->threads = state().threads;
  out->wgmma = hopper_wgmma_ops();
}

bool address_in_fiber_guard(const void* addr) {
  for (const auto& f : state().fibers)
    if (f->in_guard_page(addr)) return true;
  return false;
}

cudaError_t launch(const LaunchConfig& lc, const std::function<void()>& body) {
  State& s = state();
  auto error = [&](cudaError_t e, const std::string& why) {
    if (!s.failed) {
      s.failed = true;
      s.report = "launch of " + std::string(lc.kernel_name) + " refused: " + why;
    }
    s.last_error = e;
    return e;
  };
  if (s.failed) return s.last_error = cudaErrorLaunchFailure;  // an earlier launch failed
  const DeviceProps props = device_props();
  const uint64_t threads = uint64_t(lc.block.x) * lc.block.y * lc.block.z;
  if (threads == 0 || threads > uint64_t(props.max_threads_per_block) || lc.block.z > 64)
    return error(cudaErrorInvalidConfiguration, "block of " + std::to_string(threads) + " threads");
  if (lc.grid.x == 0 || lc.grid.y == 0 || lc.grid.z == 0 || lc.grid.y > 65535 || lc.grid.z > 65535 ||
      lc.grid.x > 0x7fffffffu)
    return error(cudaErrorInvalidConfiguration, "grid (" + std::to_string(lc.grid.x) + ", " + std::to_string(lc.grid.y) +
                                                    ", " + std::to_string(lc.grid.z) + ")");
  int allowed = props.smem_per_block_default;
  if (auto it = s.max_dynamic_smem.find(lc.kernel); it != s.max_dynamic_smem.end() && it->second > allowed)
    allowed = it->second;
  if (lc.smem_bytes > size_t(allowed))
    return error(cudaErrorInvalidValue, std::to_string(lc.smem_bytes) + " bytes of dynamic shared memory, " +
                                            std::to_string(allowed) +
                                            " allowed (cudaFuncSetAttribute MaxDynamicSharedMemorySize)");
  s.launch = &lc;
  s.body = &body;
  g_block_dim = lc.block;
  g_grid_dim = lc.grid;
  const int n = static_cast<int>(threads);
  s.lanes.assign(n, Lane{});
  for (int i = 0; i < n; ++i) {
    LaneInfo& info = s.lanes[i].info;
    info.thread_idx = uint3{i % lc.block.x, (i / lc.block.x) % lc.block.y, i / (lc.block.x * lc.block.y)};
    info.linear = i;
    info.warp = i / 32;
    info.lane = i % 32;
  }
  s.warps.assign((n + 31) / 32, Warp{});
  s.lane_cursor.assign(s.warps.size(), -1);
  for (size_t wi = 0; wi < s.warps.size(); ++wi) {
    s.warps[wi].index = static_cast<int>(wi);
    s.warps[wi].first = static_cast<int>(wi) * 32;
    s.warps[wi].size = std::min(32, n - static_cast<int>(wi) * 32);
  }
  while (s.fibers.size() < size_t(n)) s.fibers.push_back(std::make_unique<Fiber>(kFiberStackBytes));
  s.rng.seed(s.config.seed * 0x9E3779B97F4A7C15ull + (++s.launches));
  install_fault_handler();
  for (unsigned z = 0; z < lc.grid.z && !s.failed; ++z)
    for (unsigned y = 0; y < lc.grid.y && !s.failed; ++y)
      for (unsigned x = 0; x < lc.grid.x && !s.failed; ++x) {
        g_block_idx = uint3{x, y, z};
        ++s.blocks;
        s.threads += threads;
        run_block();
      }
  remove_fault_handler();
  s.launch = nullptr;
  s.body = nullptr;
  g_lane = nullptr;
  if (s.failed) return s.last_error = cudaErrorLaunchFailure;
  return cudaSuccess;
}

}  // namespace flashattn::emu
