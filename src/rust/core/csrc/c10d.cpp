// The core's only C++: a process group of libtorch's distributed backend
// (c10d: a TCPStore rendezvous and a Gloo process group) behind a C interface
// for src/dist.rs. Tensors arrive as tch's handles (at::Tensor*). Every entry
// point catches C++ exceptions and returns their message: nothing unwinds
// into Rust.
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
};

void put_error(char* buf, size_t len, const char* msg) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    put_error(err, err_len, e.what());
  } catch (...) {
    put_error(err, err_len, "unknown C++ exception");
  }
  return 1;
}

c10d::ReduceOp reduce_op(int op) {
  switch (op) {
    case 1:
      return c10d::ReduceOp::MIN;
    case 2:
      return c10d::ReduceOp::MAX;
    default:
      return c10d::ReduceOp::SUM;
  }
}

}  // namespace

extern "C" {

// Rendezvous at addr:port (rank 0 serves the store) and connect the group.
// Returns nullptr and a message in err on failure or timeout.
void* scd_group_new(const char* addr, int port, int rank, int world, int64_t timeout_ms, char* err,
                    size_t err_len) {
  Group* out = nullptr;
  guarded(err, err_len, [&] {
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = timeout;
    auto store = c10::make_intrusive<c10d::TCPStore>(std::string(addr), so);
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    out = new Group{store, pg};
  });
  return out;
}

void scd_group_free(void* g) { delete static_cast<Group*>(g); }

// In place over every rank: op 0 sum, 1 min, 2 max. With pieces > 1 the
// (1-D) tensor is cut into that many consecutive parts reduced concurrently
// (the group's worker threads run them side by side).
int scd_all_reduce(void* g, void* tensor, int op, int pieces, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::Tensor& t = *static_cast<at::Tensor*>(tensor);
    if (pieces <= 1) pieces = 1;
    const int64_t n = pieces == 1 ? 0 : t.numel();
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> parts;
    parts.reserve(pieces);
    for (int i = 0; i < pieces; ++i) {
      if (pieces == 1) {
        parts.push_back({t});
      } else {
        const int64_t lo = n * i / pieces, hi = n * (i + 1) / pieces;
        if (hi <= lo) continue;
        parts.push_back({t.narrow(0, lo, hi - lo)});
      }
      c10d::AllreduceOptions o;
      o.reduceOp = reduce_op(op);
      works.push_back(static_cast<Group*>(g)->pg->allreduce(parts.back(), o));
    }
    for (auto& w : works) w->wait();
  });
}

// In place: every rank gets root's values.
int scd_broadcast(void* g, void* tensor, int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ts{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Group*>(g)->pg->broadcast(ts, o)->wait();
  });
}

}  // extern "C"
