// The CPU workspace (workspace.h).
#include "workspace.h"

#include <cstdlib>
#include <cstring>

namespace lvopt {
namespace cpu {
namespace {

constexpr int64_t kAlign = 64;

struct Workspace {
  std::mutex use;    // held by a kernel using the buffer
  std::mutex state;  // guards the fields below
  float* data = nullptr;
  int64_t bytes = 0;
  int64_t limit = -1;  // -1: not read from the environment yet
};

Workspace& workspace() {
  static Workspace* w = new Workspace();  // never destroyed: kernels may run at exit
  return *w;
}

int64_t limit_locked(Workspace& w) {
  if (w.limit < 0) {
    int64_t mb = kDefaultWorkspaceMB;
    if (const char* env = std::getenv("LVOPT_CPU_WORKSPACE_MB")) {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end != env && *end == '\0' && v >= 0) mb = v;
    }
    w.limit = mb << 20;
  }
  return w.limit;
}

void free_locked(Workspace& w) {
  std::free(w.data);
  w.data = nullptr;
  w.bytes = 0;
}

}  // namespace

WorkspaceLease lease_workspace(int64_t floats) {
  Workspace& w = workspace();
  const int64_t want =
      (floats * static_cast<int64_t>(sizeof(float)) + kAlign - 1) / kAlign * kAlign;
  std::unique_lock<std::mutex> use(w.use, std::try_to_lock);
  if (!use.owns_lock() || floats <= 0) return {};
  std::lock_guard<std::mutex> guard(w.state);
  if (want > limit_locked(w)) return {};
  if (w.bytes < want) {
    free_locked(w);
    void* p = std::aligned_alloc(kAlign, static_cast<size_t>(want));
    if (p == nullptr) return {};
    w.data = static_cast<float*>(p);
    w.bytes = want;
  }
  return WorkspaceLease(w.data, std::move(use));
}

int64_t workspace_limit_bytes() {
  Workspace& w = workspace();
  std::lock_guard<std::mutex> guard(w.state);
  return limit_locked(w);
}

int64_t set_workspace_limit_bytes(int64_t bytes) {
  Workspace& w = workspace();
  std::lock_guard<std::mutex> use(w.use);  // waits for a step that is using the buffer
  std::lock_guard<std::mutex> guard(w.state);
  const int64_t old = limit_locked(w);
  w.limit = bytes < 0 ? 0 : bytes;
  if (w.bytes > w.limit) free_locked(w);
  return old;
}

int64_t workspace_held_bytes() {
  Workspace& w = workspace();
  std::lock_guard<std::mutex> guard(w.state);
  return w.bytes;
}

}  // namespace cpu
}  // namespace lvopt
