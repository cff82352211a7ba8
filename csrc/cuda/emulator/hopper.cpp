// Hopper's (sm_90a) asynchronous instructions, written from the PTX ISA's text:
//
// mbarrier (init, expect_tx, arrive, try_wait.parity). A barrier counts pending arrivals (reset
//   to the init count) and a transaction count (bytes: + by expect-tx, - by complete-tx of the
//   async copies that name it). Its current phase completes when both reach zero; then the phase
//   count advances. try_wait.parity(P) is true once the phase with parity P has completed, i.e.
//   while the current phase's parity differs from P. A thread that sees a completion has observed
//   that phase: the data of its TMA loads and everything the arriving threads did before their
//   arrive are visible to it (the emulator tracks both: per thread, the phases of each barrier it
//   observed and, per warp, the arrive up to which that warp's accesses are ordered before it).
//
// cp.async.bulk.tensor (TMA) loads a box of a tensor described by a tensor map into shared memory
//   in the box's order (dimension 0 fastest), elements outside the tensor written as zero, with
//   the map's swizzle applied to the shared-memory address, and complete-tx's the box's bytes on
//   the mbarrier. The emulator delivers a load when a thread waits on that barrier (or at issue
//   with copies_land_at_issue), so a thread that reads without a completed wait reads in-flight
//   data and is reported.
//
// Swizzling (TMA and wgmma alike) is a function of the shared-memory address: the 16-byte chunk
//   bits [4, 4 + b) are XORed with bits [7, 7 + b), b = 3 (128B), 2 (64B), 1 (32B).
//
// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16} D, A, B-desc, scale-d, ..., tnsp-a, tnsp-b:
//   D (64 x N) = A (64 x 16) B (16 x N) + (scale-d ? D : 0), issued by the 128 threads of a
//   warpgroup (4 consecutive warps, the first a multiple of 4). Warp w of the group holds rows
//   16 w .. 16 w + 15 of D: for each 8-column block j, registers 4 j .. 4 j + 3 of lane l hold
//   (row g, cols 8 j + 2 t, + 1) and (row g + 8, same cols), g = l / 4, t = l % 4. A from
//   registers: 4 per lane, the mma.m16n8k16 A layout of the warp's 16 rows. From shared memory,
//   a matrix descriptor (start >> 4 in bits 0-13, leading byte offset >> 4 in 16-29, stride byte
//   offset >> 4 in 32-45, base offset in 49-51, swizzle in 62-63: 0 none, 1 128B, 2 64B, 3 32B)
//   gives the canonical layouts, T = 8 16-bit elements = 16 bytes, W the swizzle width:
//     K-major, swizzled:  (mn, k) at start + (mn % 8) W + (mn / 8) SBO + 2 k   (k < 16)
//     K-major, none:      (mn, k) at start + (mn % 8) 16 + (mn / 8) SBO + (k / 8) LBO + 2 (k % 8)
//     MN-major, swizzled: (mn, k) at start + 2 (mn % (W / 2)) + (mn / (W / 2)) LBO + (k % 8) W + (k / 8) SBO
//     MN-major, none:     (mn, k) at start + 2 (mn % 8) + (mn / 8) SBO + (k % 8) 16 + (k / 8) LBO
//   then swizzled. The product runs at issue on the operands as they are then; the results reach
//   the registers only at the wgmma.wait_group that covers the op (until then the accumulators
//   hold NaN, so reading them early poisons the output). A wgmma on accumulators of an op still in
//   flight chains on that op's result, as the hardware orders them. Each thread must execute
//   wgmma.fence before the first wgmma of each commit group: stricter than the ISA (which asks for
//   it where other instructions touched the registers since, which the emulator cannot see), and
//   what CUTLASS and FA3 do.
//
// setmaxnreg.{inc,dec}.sync.aligned.u32 N: per warpgroup, 24 <= N <= 256, N % 8 == 0; an increase
//   waits until the warpgroups' registers fit the SM's 64K (a warpgroup that never decreases leaves
//   the others waiting: a deadlock). The emulator starts each warpgroup at 65536 / threads rounded
//   down to 8, at most 248 (the real count is ptxas's allocation, at most that).
// bar.sync / bar.arrive id, n: named barriers 0..15 of n threads (a multiple of 32).
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <vector>

#include "internal.h"

namespace flashattn::emu {

namespace {

constexpr uint32_t kTensorMapMagic = 0x7e45a9b1u;

struct PendingLoad {
  uint32_t dst;
  int swizzle;
  std::vector<unsigned char> data;  // the box, already swizzled, in shared-memory order
  std::vector<std::pair<uint32_t, uint32_t>> runs;  // (offset, bytes) contiguous pieces of it
};

struct Mbarrier {
  int count = 0, pending = 0;
  int64_t tx = 0;
  uint32_t phases = 0;  // completed phases
  int init_thread = -1;
  uint32_t init_epoch = 0;
  std::vector<uint32_t> release = std::vector<uint32_t>(kMaxWarps, 0);  // cumulative, from arrivals
  std::map<uint32_t, std::vector<uint32_t>> release_at;  // phase -> release when it completed
  std::deque<PendingLoad> loads;
};

struct WgmmaOp {
  int first_warp = 0, n = 0, waited = 0;
  bool done = false;
  std::vector<float*> dst;  // per thread of the warpgroup
  std::vector<float> result;  // per thread, n / 2 values
  std::vector<uint32_t> granules;  // shared memory it reads
  bool warp_stamped[4] = {};
  bool lane_waited[128] = {};
};

struct WarpGroupCollective {
  int arrived = 0;
  Site site{};
  const char* what = "";
  std::vector<uint32_t> a;  // per thread: 4 A registers
  std::vector<float*> d;
  uint64_t desc_a = 0, desc_b = 0;
  int n = 0, scale_d = 0, trans_a = 0, trans_b = 0, regs = 0, last_op = 0;
  bool a_regs = false, increase = false;
  MmaType type{};
};

struct NamedBarrier {
  int arrived = 0, threads = 0;
  std::vector<int> waiting;
};

struct State {
  bool active = false;
  std::map<uint32_t, Mbarrier> bars;
  std::vector<uint32_t> arrives;  // per warp
  std::map<int, std::unique_ptr<WgmmaOp>> ops;
  int next_op = 1;
  std::vector<WarpGroupCollective> groups;
  std::vector<int> regs;  // per warpgroup
  NamedBarrier named[16];
  uint32_t epoch = 0;  // completed __syncthreads in this block
};
State g;

uint32_t offset_of(const void* p, const char* what, Site site, uint32_t align) {
  const uintptr_t off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(shared_base());
  if (off >= shared_size())
    fail("%s (%s:%d): %p is not in the block's %zu bytes of dynamic shared memory", what, site.file, site.line, p,
         shared_size());
  if (off % align != 0)
    fail("%s (%s:%d): shared address %zu is not %u-byte aligned", what, site.file, site.line, static_cast<size_t>(off),
         align);
  return static_cast<uint32_t>(off);
}

uint32_t swizzle(uint32_t addr, int width) {
  const uint32_t bits = width == 128 ? 7 : width == 64 ? 3 : width == 32 ? 1 : 0;
  return addr ^ (((addr >> 7) & bits) << 4);
}

Mbarrier& bar_at(uint64_t* p, const char* what, Site site, uint32_t* offset = nullptr) {
  const uint32_t off = offset_of(p, what, site, 8);
  auto it = g.bars.find(off);
  if (it == g.bars.end())
    fail("%s (%s:%d): the mbarrier at shared byte %u was never initialized (mbarrier.init)", what, site.file,
         site.line, off);
  Mbarrier& b = it->second;
  const Lane& me = current();
  if (me.info.linear != b.init_thread && g.epoch == b.init_epoch)
    fail("%s (%s:%d): the mbarrier at shared byte %u is used by thread %d before a __syncthreads made thread %d's "
         "mbarrier.init visible",
         what, site.file, site.line, off, me.info.linear, b.init_thread);
  if (offset) *offset = off;
  return b;
}

void observe(Lane& lane, uint32_t off, Mbarrier& b, uint32_t phases) {
  for (auto& [o, seen] : lane.hopper.observed)
    if (o == off) {
      if (seen >= phases) return;
      seen = phases;
      goto merged;
    }
  lane.hopper.observed.emplace_back(off, phases);
merged:
  if (auto it = b.release_at.find(phases - 1); it != b.release_at.end())
    for (int w = 0; w < kMaxWarps; ++w) lane.hopper.released[w] = std::max(lane.hopper.released[w], it->second[w]);
}

void maybe_complete(Mbarrier& b, uint32_t off) {
  if (b.pending == 0 && b.tx < 0)
    fail("mbarrier at shared byte %u: %lld more bytes completed than expected (expect_tx too small)", off,
         static_cast<long long>(-b.tx));
  if (b.pending != 0 || b.tx != 0) return;
  b.release_at[b.phases] = b.release;
  if (b.release_at.size() > 8) b.release_at.erase(b.release_at.begin());
  ++b.phases;
  b.pending = b.count;
  note_progress();
}

void deliver(Mbarrier& b, uint32_t off) {
  while (!b.loads.empty()) {
    PendingLoad& l = b.loads.front();
    for (const auto& [o, n] : l.runs) shared_tma_land(o, l.data.data() + (o - l.dst), n, off, b.phases + 1, l.swizzle);
    b.tx -= static_cast<int64_t>(l.data.size());
    b.loads.pop_front();
    maybe_complete(b, off);
  }
}

WarpGroupCollective& group_arrive(const char* what, Site site) {
  Lane& me = current();
  const int wg = me.info.warp / 4;
  if (block_threads() % 128 != 0)
    fail("%s (%s:%d): the block has %d threads, not whole warpgroups of 128", what, site.file, site.line,
         block_threads());
  WarpGroupCollective& c = g.groups[wg];
  if (c.arrived == 0) {
    c.site = site;
    c.what = what;
  } else if (c.what != what || c.site.line != site.line || std::strcmp(c.site.file, site.file) != 0) {
    fail("threads of warpgroup %d meet different warpgroup instructions: this thread is at %s (%s:%d), others at %s "
         "(%s:%d)",
         wg, what, site.file, site.line, c.what, c.site.file, c.site.line);
  }
  ++c.arrived;
  return c;
}

// Blocks until the warpgroup's last thread arrives, which runs `complete` and wakes the others.
template <class Complete>
void group_finish(WarpGroupCollective& c, const char* what, Site site, Complete&& complete) {
  Lane& me = current();
  const int wg = me.info.warp / 4;
  if (c.arrived == 128) {
    complete();
    c.arrived = 0;
    for (int t = 128 * wg; t < 128 * (wg + 1); ++t)
      if (&lane_at(t) != &me) wake(lane_at(t));
    note_progress();
  } else {
    block_until_woken(me, what, site);
  }
}

float element(uint16_t bits, MmaType type) {
  if (type == MmaType::kBF16) {
    const uint32_t b = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &b, 4);
    return f;
  }
  const uint32_t sign = (bits >> 15) & 1u, exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  float m;
  if (exponent == 0) m = std::ldexp(static_cast<float>(mantissa), -24);
  else if (exponent == 31) m = mantissa ? NAN : INFINITY;
  else m = std::ldexp(static_cast<float>(mantissa | 0x400u), static_cast<int>(exponent) - 25);
  return sign ? -m : m;
}

// Shared-memory byte offset of element (mn, k) of a descriptor's operand.
struct Descriptor {
  uint32_t start, lbo, sbo;
  int width;  // swizzle bytes, 0 = none
  uint32_t address(int mn, int k, bool mn_major) const {
    uint32_t a;
    if (!mn_major) {
      a = width ? start + (mn % 8) * width + (mn / 8) * sbo + 2 * k
                : start + (mn % 8) * 16 + (mn / 8) * sbo + (k / 8) * lbo + 2 * (k % 8);
    } else {
      const int per_row = width ? width / 2 : 8;
      a = width ? start + 2 * (mn % per_row) + (mn / per_row) * lbo + (k % 8) * width + (k / 8) * sbo
                : start + 2 * (mn % 8) + (mn / 8) * sbo + (k % 8) * 16 + (k / 8) * lbo;
    }
    return width ? swizzle(a, width) : a;
  }
};

Descriptor decode(uint64_t desc, const char* operand, Site site) {
  Descriptor d;
  d.start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  d.lbo = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  d.sbo = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const int base_offset = static_cast<int>((desc >> 49) & 7);
  const int mode = static_cast<int>(desc >> 62);
  d.width = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0;
  if (base_offset != 0)
    fail("wgmma (%s:%d): %s descriptor has matrix base offset %d; the emulator supports 0 (pattern-aligned "
         "buffers) only",
         site.file, site.line, operand, base_offset);
  if ((desc >> 14) & 3 || (desc >> 30) & 3 || (desc >> 46) & 7 || (desc >> 52) & 0x3ff)
    fail("wgmma (%s:%d): %s descriptor 0x%016llx has reserved bits set", site.file, site.line, operand,
         static_cast<unsigned long long>(desc));
  return d;
}

// Reads a (rows x 16) operand through its descriptor into out[row][k] (and the shadow).
void read_operand(const Descriptor& d, int rows, bool mn_major, MmaType type, int first_warp, WgmmaOp& op,
                  std::vector<float>& out, const char* what) {
  out.assign(static_cast<size_t>(rows) * 16, 0.f);
  const char* base = shared_base();
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      const uint32_t a = d.address(r, k, mn_major);
      if (a + 2 > shared_size())
        fail("%s: element (%d, %d) at shared byte %u is past the launch's %zu bytes", what, r, k, a, shared_size());
      uint16_t bits;
      std::memcpy(&bits, base + a, 2);
      out[static_cast<size_t>(r) * 16 + k] = element(bits, type);
    }
  // The shadow, per 16-byte row piece (the layouts keep 8 consecutive k or mn in 16 bytes).
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; k += mn_major ? 1 : 8)
      if (!mn_major || r % 8 == 0)
        shared_async_read(d.address(r, k, mn_major) & ~15u, 16, first_warp, op.granules, what, d.width);
}

}  // namespace

int g_wgmma_in_flight = 0;
uint64_t g_wgmma_ops = 0;
uint64_t hopper_wgmma_ops() { return g_wgmma_ops; }

void hopper_check_register_access(const void* addr, size_t bytes, bool write) {
  const Lane& me = current();
  const int th = me.info.linear % 128;
  const uintptr_t a = reinterpret_cast<uintptr_t>(addr);
  auto check = [&](int id) {
    auto it = g.ops.find(id);
    if (it == g.ops.end() || it->second->lane_waited[th]) return;
    const WgmmaOp& op = *it->second;
    const uintptr_t lo = reinterpret_cast<uintptr_t>(op.dst[th]), hi = lo + sizeof(float) * (op.n / 2);
    if (a < hi && a + bytes > lo)
      fail("%s of a wgmma accumulator register (element %zu of %d) before the wgmma.wait_group that covers its op: "
           "the results are not there yet",
           write ? "write" : "read", static_cast<size_t>((a - lo) / sizeof(float)), op.n / 2);
  };
  for (int id : me.hopper.wgmma_uncommitted) check(id);
  for (const auto& group : me.hopper.wgmma_groups)
    for (int id : group) check(id);
}

// ---- block lifetime ---------------------------------------------------------------------------

void hopper_begin_block() {
  g.active = false;
  g.bars.clear();
  g.arrives.assign(kMaxWarps, 0);
  g.ops.clear();
  g_wgmma_in_flight = 0;
  const int groups = (block_threads() + 127) / 128;
  g.groups.assign(groups, WarpGroupCollective{});
  const int threads = block_threads();
  int initial = 65536 / threads / 8 * 8;  // the launch's registers per thread are ptxas's: at most this
  if (initial > 248) initial = 248;
  g.regs.assign(groups, initial);
  for (NamedBarrier& n : g.named) n = NamedBarrier{};
  g.epoch = 0;
}

void hopper_end_block() {
  for (auto& [off, b] : g.bars)
    if (!b.loads.empty()) {
      fail_host("the block exited with %zu TMA load(s) into shared memory still in flight on the mbarrier at shared "
                "byte %u (issued, never waited for)",
                b.loads.size(), off);
      return;
    }
}

void hopper_lane_exit(Lane& lane) {
  if (!lane.hopper.wgmma_uncommitted.empty() || !lane.hopper.wgmma_groups.empty())
    fail("thread %d exited with wgmma ops in flight (not covered by wgmma.wait_group)", lane.info.linear);
}

void hopper_block_barrier() {
  ++g.epoch;
  if (!g.active) return;
  // Everything before the barrier is ordered before everything after it.
  for (uint32_t& a : g.arrives) ++a;
  std::vector<std::pair<uint32_t, uint32_t>> seen;
  for (int t = 0; t < block_threads(); ++t)
    for (const auto& [o, n] : lane_at(t).hopper.observed) {
      bool found = false;
      for (auto& [so, sn] : seen)
        if (so == o) sn = std::max(sn, n), found = true;
      if (!found) seen.emplace_back(o, n);
    }
  for (int t = 0; t < block_threads(); ++t) {
    Lane& l = lane_at(t);
    l.hopper.observed = seen;
    for (int w = 0; w < kMaxWarps; ++w) l.hopper.released[w] = g.arrives[w];
  }
}

bool hopper_active() { return g.active; }

uint32_t hopper_observed(const Lane& lane, uint32_t off) {
  for (const auto& [o, n] : lane.hopper.observed)
    if (o == off) return n;
  return 0;
}

uint32_t hopper_arrive_count(int warp) { return warp < kMaxWarps ? g.arrives[warp] : 0; }

// ---- mbarrier ---------------------------------------------------------------------------------

void mbarrier_init(uint64_t* bar, int count, Site site) {
  const uint32_t off = offset_of(bar, "mbarrier.init", site, 8);
  if (count < 1 || count > (1 << 20) - 1)
    fail("mbarrier.init (%s:%d): count %d outside [1, 2^20 - 1]", site.file, site.line, count);
  Mbarrier& b = g.bars[off];
  if (!b.loads.empty()) fail("mbarrier.init (%s:%d): re-initialized with TMA loads in flight", site.file, site.line);
  b = Mbarrier{};
  b.count = b.pending = count;
  b.init_thread = current().info.linear;
  b.init_epoch = g.epoch;
  g.active = true;
  shared_check_write(off, 8, "mbarrier.init");
}

void mbarrier_fence_init(Site) {}

void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes, Site site) {
  Mbarrier& b = bar_at(bar, "mbarrier.expect_tx", site);
  if (bytes >= (1u << 20)) fail("mbarrier.expect_tx (%s:%d): %u bytes exceed the tx-count range", site.file, site.line, bytes);
  b.tx += bytes;
}

void mbarrier_arrive(uint64_t* bar, Site site) {
  uint32_t off;
  Mbarrier& b = bar_at(bar, "mbarrier.arrive", site, &off);
  Lane& me = current();
  const int w = me.info.warp;
  for (int x = 0; x < kMaxWarps; ++x) b.release[x] = std::max(b.release[x], me.hopper.released[x]);
  b.release[w] = std::max(b.release[w], g.arrives[w] + 1);
  ++g.arrives[w];
  --b.pending;
  maybe_complete(b, off);
  note_progress();
}

bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity, Site site) {
  uint32_t off;
  Mbarrier& b = bar_at(bar, "mbarrier.try_wait.parity", site, &off);
  deliver(b, off);
  if ((b.phases & 1u) != (parity & 1u)) {
    // The phase with this parity that completed last is phases - 1 (none yet when waiting for
    // parity 1 before phase 0 completes: the "fresh barrier" idiom of producers).
    if (b.phases >= 1) observe(current(), off, b, b.phases);
    return true;
  }
  spin_yield("mbarrier.try_wait.parity", site);
  return false;
}

void fence_proxy_async(Site) { ++current().hopper.proxy_fences; }

// ---- TMA ----

const char* encode_tensor_map(TensorMapData* out, const void* global, int rank, int element_bytes,
                              const uint64_t* dims, const uint64_t* strides_bytes, const uint32_t* box,
                              int swizzle_bytes) {
  // The driver's (cuTensorMapEncodeTiled) requirements.
  if (rank < 1 || rank > 5) return "tensor map rank must be 1..5";
  if (reinterpret_cast<uintptr_t>(global) % 16 != 0) return "tensor map global address must be 16-byte aligned";
  if (swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128)
    return "tensor map swizzle must be none, 32, 64 or 128 bytes";
  for (int i = 0; i < rank; ++i) {
    if (dims[i] == 0 || dims[i] > (uint64_t(1) << 32)) return "tensor map dimension outside [1, 2^32]";
    if (box[i] == 0 || box[i] > 256) return "tensor map box dimension outside [1, 256]";
    if (i > 0 && (strides_bytes[i - 1] % 16 != 0 || strides_bytes[i - 1] >= (uint64_t(1) << 40)))
      return "tensor map strides must be multiples of 16 bytes below 2^40";
  }
  if (box[0] * element_bytes % 16 != 0) return "tensor map box inner dimension must span a multiple of 16 bytes";
  if (swizzle_bytes && box[0] * element_bytes > static_cast<uint32_t>(swizzle_bytes))
    return "tensor map box inner dimension exceeds the swizzle span";
  *out = TensorMapData{};
  out->global = global;
  out->rank = rank;
  out->element_bytes = element_bytes;
  out->swizzle_bytes = swizzle_bytes;
  for (int i = 0; i < rank; ++i) {
    out->dims[i] = dims[i];
    out->strides_bytes[i] = i == 0 ? static_cast<uint64_t>(element_bytes) : strides_bytes[i - 1];
    out->box[i] = box[i];
  }
  out->magic = kTensorMapMagic;
  return nullptr;
}

void tma_load(void* smem_dst, const TensorMapData* map, uint64_t* bar, const int* coords, Site site) {
  if (map == nullptr || map->magic != kTensorMapMagic)
    fail("cp.async.bulk.tensor (%s:%d): the tensor map was not encoded (or not by the emulator's encoder)", site.file,
         site.line);
  const uint32_t dst = offset_of(smem_dst, "cp.async.bulk.tensor", site, 128);
  uint32_t bar_off;
  Mbarrier& b = bar_at(bar, "cp.async.bulk.tensor", site, &bar_off);
  const int rank = map->rank, e = map->element_bytes;
  uint64_t box_elems = 1;
  for (int i = 0; i < rank; ++i) box_elems *= map->box[i];
  const uint32_t bytes = static_cast<uint32_t>(box_elems) * e;
  const uint32_t row_bytes = map->box[0] * e;
  if (map->swizzle_bytes && row_bytes != static_cast<uint32_t>(map->swizzle_bytes))
    fail("cp.async.bulk.tensor (%s:%d): box rows of %u bytes with a %d-byte swizzle (the emulator needs them equal)",
         site.file, site.line, row_bytes, map->swizzle_bytes);
  PendingLoad load;
  load.dst = dst;
  load.swizzle = map->swizzle_bytes;
  load.data.assign(bytes, 0);
  // The box in order, then each row piece to its swizzled place.
  std::vector<unsigned char> linear(bytes, 0);
  std::vector<uint32_t> idx(rank, 0);
  for (uint64_t n = 0; n < box_elems; ++n) {
    uint64_t rem = n;
    bool inside = true;
    const char* src = static_cast<const char*>(map->global);
    for (int i = 0; i < rank; ++i) {
      idx[i] = static_cast<uint32_t>(rem % map->box[i]);
      rem /= map->box[i];
      const int64_t c = static_cast<int64_t>(coords[i]) + idx[i];
      if (c < 0 || c >= static_cast<int64_t>(map->dims[i])) inside = false;
      else src += c * static_cast<int64_t>(map->strides_bytes[i]);
    }
    if (inside) std::memcpy(linear.data() + n * e, src, e);
  }
  for (uint32_t o = 0; o < bytes; o += 16) {
    const uint32_t to = map->swizzle_bytes ? swizzle(dst + o, map->swizzle_bytes) : dst + o;
    std::memcpy(load.data.data() + (to - dst), linear.data() + o, 16);
  }
  load.runs.emplace_back(dst, bytes);
  shared_tma_issue(dst, bytes, current(), "cp.async.bulk.tensor");
  b.loads.push_back(std::move(load));
  if (config().landing == CopyLanding::kAtIssue) deliver(b, bar_off);
}

// ---- wgmma ------------------------------------------------------------------------------------

void wgmma_fence(Site) { current().hopper.wgmma_fenced = true; }

void wgmma_mma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d, int trans_a,
               int trans_b, MmaType type, Site site) {
  Lane& me = current();
  const char* what = a_regs ? "wgmma.mma_async (A in registers)" : "wgmma.mma_async";
  if (n < 8 || n > 256 || n % 8 != 0) fail("%s (%s:%d): N = %d is not a multiple of 8 in [8, 256]", what, site.file, site.line, n);
  if (!me.hopper.wgmma_fenced)
    fail("%s (%s:%d): no wgmma.fence in this thread since its last wgmma.commit_group (the accumulator and A "
         "registers must be fenced before the group's first wgmma)",
         what, site.file, site.line);
  WarpGroupCollective& c = group_arrive(what, site);
  const int t = me.info.linear % 128;
  if (c.arrived == 1) {
    c.a.assign(128 * 4, 0);
    c.d.assign(128, nullptr);
    c.desc_a = desc_a, c.desc_b = desc_b, c.n = n, c.scale_d = scale_d, c.trans_a = trans_a, c.trans_b = trans_b;
    c.a_regs = a_regs != nullptr, c.type = type;
  } else if (c.desc_a != desc_a || c.desc_b != desc_b || c.n != n || c.scale_d != scale_d || c.type != type ||
             c.a_regs != (a_regs != nullptr)) {
    fail("%s (%s:%d): threads of one warpgroup pass different descriptors or shapes", what, site.file, site.line);
  }
  if (a_regs) std::memcpy(&c.a[4 * t], a_regs, 16);
  c.d[t] = d;
  group_finish(c, what, site, [&] {
    auto op = std::make_unique<WgmmaOp>();
    op->first_warp = me.info.warp / 4 * 4;
    op->n = n;
    op->dst = c.d;
    const int first_warp = op->first_warp;
    // Operands.
    std::vector<float> A(64 * 16), Bt;
    if (c.a_regs) {
      if (c.trans_a) fail("%s (%s:%d): transposed A needs A in shared memory", what, site.file, site.line);
      for (int th = 0; th < 128; ++th) {
        const int w = th / 32, l = th % 32, gq = l / 4, tq = l % 4;
        for (int i = 0; i < 8; ++i) {
          const int row = 16 * w + ((i < 2 || (i >= 4 && i < 6)) ? gq : gq + 8);
          const int col = tq * 2 + (i & 1) + (i >= 4 ? 8 : 0);
          const uint32_t reg = c.a[4 * th + i / 2];
          A[row * 16 + col] = element(static_cast<uint16_t>(i % 2 ? reg >> 16 : reg & 0xffff), c.type);
        }
      }
    } else {
      read_operand(decode(c.desc_a, "A", site), 64, c.trans_a != 0, c.type, first_warp, *op, A, "wgmma A operand");
    }
    read_operand(decode(c.desc_b, "B", site), n, c.trans_b != 0, c.type, first_warp, *op, Bt, "wgmma B operand");
    // Accumulator inputs: a pending op on the same registers chains, else the registers.
    op->result.assign(static_cast<size_t>(128) * (n / 2), 0.f);
    for (int th = 0; th < 128; ++th) {
      const float* in = c.d[th];
      for (auto it = g.ops.rbegin(); it != g.ops.rend(); ++it)
        if (!it->second->done && it->second->dst[th] == c.d[th] && it->second->n == n) {
          in = &it->second->result[static_cast<size_t>(th) * (n / 2)];
          break;
        }
      const int w = th / 32, l = th % 32, gq = l / 4, tq = l % 4;
      for (int j = 0; j < n / 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * w + gq + 8 * (e / 2), col = 8 * j + 2 * tq + (e & 1);
          double sum = c.scale_d ? in[4 * j + e] : 0.0;
          for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[row * 16 + k]) * Bt[col * 16 + k];
          op->result[static_cast<size_t>(th) * (n / 2) + 4 * j + e] = static_cast<float>(sum);
        }
    }
    // Until the wait, the registers hold NaN.
    for (int th = 0; th < 128; ++th)
      for (int i = 0; i < n / 2; ++i) c.d[th][i] = NAN;
    c.last_op = g.next_op;
    g.ops[g.next_op++] = std::move(op);
    ++g_wgmma_in_flight;
    ++g_wgmma_ops;
  });
  // Read after the warpgroup's last thread made the op; the next op cannot complete without us.
  me.hopper.wgmma_uncommitted.push_back(c.last_op);
}

void wgmma_commit(Site) {
  Lane& me = current();
  me.hopper.wgmma_groups.push_back(std::move(me.hopper.wgmma_uncommitted));
  me.hopper.wgmma_uncommitted.clear();
  me.hopper.wgmma_fenced = false;
}

void wgmma_wait(int pending, Site site) {
  Lane& me = current();
  if (pending < 0 || pending > 7) fail("wgmma.wait_group (%s:%d): N = %d outside [0, 7]", site.file, site.line, pending);
  while (me.hopper.wgmma_groups.size() > static_cast<size_t>(pending)) {
    for (int id : me.hopper.wgmma_groups.front()) {
      auto it = g.ops.find(id);
      if (it == g.ops.end()) continue;
      WgmmaOp& op = *it->second;
      const int th = me.info.linear % 128, w = me.info.warp - op.first_warp;
      std::memcpy(op.dst[th], &op.result[static_cast<size_t>(th) * (op.n / 2)], sizeof(float) * (op.n / 2));
      const bool first = !op.done;
      op.done = true;
      op.lane_waited[th] = true;
      if (first || !op.warp_stamped[w]) {
        shared_async_read_done(op.granules, me.info.warp, first);
        op.warp_stamped[w] = true;
      }
      if (++op.waited == 128) {
        g.ops.erase(it);
        --g_wgmma_in_flight;
      }
    }
    me.hopper.wgmma_groups.pop_front();
  }
}

// ---- registers and named barriers --------------------------------------------------------------

void setmaxnreg(int regs, bool increase, Site site) {
  const char* what = increase ? "setmaxnreg.inc" : "setmaxnreg.dec";
  if (regs < 24 || regs > 256 || regs % 8 != 0)
    fail("%s (%s:%d): %d registers: must be a multiple of 8 in [24, 256]", what, site.file, site.line, regs);
  WarpGroupCollective& c = group_arrive(what, site);
  if (c.arrived == 1) c.regs = regs, c.increase = increase;
  else if (c.regs != regs || c.increase != increase)
    fail("%s (%s:%d): threads of one warpgroup ask for different counts", what, site.file, site.line);
  const int wg = current().info.warp / 4;
  group_finish(c, what, site, [&] {
    if (!increase) g.regs[wg] = regs;
  });
  // An increase waits until the SM's 64K registers have room (another warpgroup's decrease).
  while (increase && g.regs[wg] != regs) {
    int total = 0;
    for (size_t w = 0; w < g.regs.size(); ++w) total += 128 * (static_cast<int>(w) == wg ? regs : g.regs[w]);
    if (total <= 65536) {
      g.regs[wg] = regs;
      note_progress();
      break;
    }
    spin_yield("setmaxnreg.inc (waiting for registers: the warpgroups would hold more than the SM's 65536)", site);
  }
}

void named_barrier(int id, int threads, bool wait, Site site) {
  if (id < 0 || id > 15) fail("bar (%s:%d): barrier id %d outside [0, 15]", site.file, site.line, id);
  if (threads <= 0 || threads % 32 != 0 || threads > block_threads())
    fail("bar (%s:%d): %d threads (a multiple of 32, at most the block's %d)", site.file, site.line, threads,
         block_threads());
  NamedBarrier& b = g.named[id];
  if (b.arrived == 0) b.threads = threads;
  else if (b.threads != threads)
    fail("bar (%s:%d): barrier %d used with %d and %d threads", site.file, site.line, id, b.threads, threads);
  Lane& me = current();
  if (++b.arrived == threads) {
    b.arrived = 0;
    for (int t : b.waiting) wake(lane_at(t));
    b.waiting.clear();
    note_progress();
    return;
  }
  if (wait) {
    b.waiting.push_back(me.info.linear);
    block_until_woken(me, wait ? "bar.sync" : "bar.arrive", site);
  }
}

}  // namespace flashattn::emu
