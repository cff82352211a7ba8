// Copies of the kernels' global buffers placed against inaccessible pages, so that a read or
// write past the end of a buffer faults (and is reported) instead of reading a neighbour's bytes.
// Each copy keeps its original's address modulo 16 (the launchers choose cp.async or element-wise
// loads from pointer alignment), so it ends at most 15 bytes before the guard page; those bytes
// are poisoned (0xFF) and checked for writes when the copies are released. Read-only buffers are
// mapped read-only: a kernel writing its inputs faults too.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

namespace flashattn::emu {

class GuardedBuffers {
 public:
  GuardedBuffers();
  ~GuardedBuffers();  // unmaps everything (copy_back first to keep results)
  GuardedBuffers(const GuardedBuffers&) = delete;
  GuardedBuffers& operator=(const GuardedBuffers&) = delete;

  // A guarded copy of [src, src + bytes); nullptr for nullptr or an empty buffer.
  template <class T>
  T* guard(const char* name, T* src, size_t bytes, bool writable) {
    return static_cast<T*>(add(name, const_cast<void*>(static_cast<const void*>(src)), bytes, writable));
  }
  // Writes the writable copies back to their originals; returns an error report if a kernel
  // wrote into the poisoned bytes after a buffer's end, "" otherwise.
  std::string copy_back();
  // Whether [p, p + bytes) lies inside one buffer's data.
  bool contains(const void* p, size_t bytes) const;
  // For fault reports: which buffer's guard page `addr` is in, and where relative to its data.
  std::string describe(const void* addr, bool write) const;

 private:
  struct Buffer {
    std::string name;
    void* original;
    char* data;
    size_t bytes, tail;  // tail: poisoned bytes between the data and the guard page
    char* mapping;
    size_t mapping_bytes;
    bool writable;
  };
  void* add(const char* name, void* src, size_t bytes, bool writable);
  std::vector<Buffer> buffers_;
};

// The buffers of the call in progress (for the fault handler), or nullptr.
extern GuardedBuffers* g_guarded;

}  // namespace flashattn::emu
