// A process-wide scratch buffer for CPU kernels that keep an intermediate between two passes
// over memory (AdamH keeps its direction u from pass 1 for pass 2: csrc/cpu/fused_adamh.cpp).
//
// Allocating it per call would cost more than it saves: a fresh buffer of hundreds of MB is
// page-faulted in, 4 KiB at a time, on every step. So one buffer is kept, grown to the largest
// request up to a limit, and reused. The limit is LVOPT_CPU_WORKSPACE_MB (read at the first
// use; default kDefaultWorkspaceMB) or the last set_workspace_limit_bytes; 0 turns it off. A
// kernel that cannot get the buffer (over the limit, or held by a step running on another
// thread) takes its no-workspace path, which computes the same bits.
#pragma once

#include <cstdint>
#include <mutex>

namespace lvopt {
namespace cpu {

constexpr int64_t kDefaultWorkspaceMB = 512;

// The buffer for one use: data == nullptr when it could not be had (then nothing is held).
// Holds the buffer, and its lock, until it goes out of scope.
class WorkspaceLease {
 public:
  WorkspaceLease() = default;
  WorkspaceLease(float* data, std::unique_lock<std::mutex> lock)
      : data_(data), lock_(std::move(lock)) {}
  float* data() const { return data_; }

 private:
  float* data_ = nullptr;
  std::unique_lock<std::mutex> lock_;
};

// At least `floats` floats, 64-byte aligned, contents undefined.
WorkspaceLease lease_workspace(int64_t floats);

// The limit in bytes; setting it frees the buffer when it is larger than the new limit, and
// returns the previous limit.
int64_t workspace_limit_bytes();
int64_t set_workspace_limit_bytes(int64_t bytes);
// Bytes held now (0 until the first use, and after the limit is lowered below the buffer).
int64_t workspace_held_bytes();

}  // namespace cpu
}  // namespace lvopt
