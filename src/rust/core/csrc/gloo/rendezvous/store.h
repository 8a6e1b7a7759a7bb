// Declarations of the few Gloo types that libtorch's ProcessGroupGloo.hpp
// names. PyTorch's wheels ship that header but not Gloo's own (Gloo is linked
// into libtorch_cpu). The process group holds Gloo objects only through
// pointers, so its layout does not depend on them; the shim never touches a
// Gloo object itself. Only the members the header's inline code names are
// declared.
#pragma once
#include <chrono>
#include <string>
#include <vector>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport
namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& value) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous
}  // namespace gloo
