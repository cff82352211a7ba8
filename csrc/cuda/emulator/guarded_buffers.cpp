#include "guarded_buffers.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <stdexcept>

namespace flashattn::emu {

GuardedBuffers* g_guarded = nullptr;

namespace {
constexpr unsigned char kTailPoison = 0xFF;
size_t page_bytes() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}
}  // namespace

GuardedBuffers::GuardedBuffers() { g_guarded = this; }

GuardedBuffers::~GuardedBuffers() {
  for (Buffer& b : buffers_) munmap(b.mapping, b.mapping_bytes);
  if (g_guarded == this) g_guarded = nullptr;
}

void* GuardedBuffers::add(const char* name, void* src, size_t bytes, bool writable) {
  if (src == nullptr) return nullptr;  // an empty buffer gets a pointer into the guard page
  const size_t page = page_bytes();
  // [guard page][... data (address = src mod 16) | tail < 16][guard page]
  const size_t align = reinterpret_cast<uintptr_t>(src) % 16;
  const size_t span = (align + bytes + 15) / 16 * 16;  // 16-byte units from an aligned start
  const size_t data_pages = (span + page - 1) / page;
  const size_t mapping_bytes = (data_pages + 2) * page;
  void* m = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw std::runtime_error("flashattn emulator: mmap of a guarded buffer failed");
  char* mapping = static_cast<char*>(m);
  char* end_page = mapping + (data_pages + 1) * page;  // the trailing guard page
  char* aligned_start = end_page - span;
  char* data = aligned_start + align;
  const size_t tail = static_cast<size_t>(end_page - (data + bytes));
  std::memcpy(data, src, bytes);
  std::memset(data + bytes, kTailPoison, tail);
  mprotect(mapping, page, PROT_NONE);
  mprotect(end_page, page, PROT_NONE);
  if (!writable) mprotect(mapping + page, data_pages * page, PROT_READ);
  buffers_.push_back({name, src, data, bytes, tail, mapping, mapping_bytes, writable});
  return data;
}

std::string GuardedBuffers::copy_back() {
  std::string errors;
  for (Buffer& b : buffers_) {
    for (size_t i = 0; i < b.tail; ++i)
      if (static_cast<unsigned char>(b.data[b.bytes + i]) != kTailPoison) {
        char buf[256];
        snprintf(buf, sizeof(buf), "out-of-bounds global store: byte %zu past the end of '%s' (%zu bytes) was written\n",
                 i, b.name.c_str(), b.bytes);
        errors += buf;
        break;
      }
    if (b.writable) std::memcpy(b.original, b.data, b.bytes);
  }
  return errors;
}

bool GuardedBuffers::contains(const void* p, size_t bytes) const {
  const char* a = static_cast<const char*>(p);
  for (const Buffer& b : buffers_)
    if (a >= b.data && a + bytes <= b.data + b.bytes) return true;
  return false;
}

std::string GuardedBuffers::describe(const void* addr, bool write) const {
  const char* a = static_cast<const char*>(addr);
  const size_t page = page_bytes();
  char buf[512];
  for (const Buffer& b : buffers_) {
    const char* end = b.data + b.bytes;
    if (a >= b.mapping && a < b.mapping + b.mapping_bytes) {
      if (a >= end)
        snprintf(buf, sizeof(buf), "out-of-bounds global %s at %p: %zu bytes past the end of '%s' (%zu bytes)",
                 write ? "store" : "load", addr, static_cast<size_t>(a - end), b.name.c_str(), b.bytes);
      else if (a < b.data)
        snprintf(buf, sizeof(buf), "out-of-bounds global %s at %p: %zu bytes before the start of '%s' (%zu bytes)",
                 write ? "store" : "load", addr, static_cast<size_t>(b.data - a), b.name.c_str(), b.bytes);
      else
        snprintf(buf, sizeof(buf), "global store at %p into '%s' (%zu bytes), a read-only input (offset %zu)", addr,
                 b.name.c_str(), b.bytes, static_cast<size_t>(a - b.data));
      return buf;
    }
  }
  (void)page;
  return "";
}

}  // namespace flashattn::emu
