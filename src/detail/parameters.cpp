// ParameterScope (src/detail/parameters.h): a thread-local stack of scopes.
#include "detail/parameters.h"

namespace mola::detail {
namespace {
thread_local const ParameterScope* innermost = nullptr;
}  // namespace

ParameterScope::ParameterScope(const at::TensorOptions& options) : options_(options), outer_(innermost) {
  innermost = this;
}

ParameterScope::~ParameterScope() { innermost = outer_; }

const ParameterScope* ParameterScope::current() { return innermost; }

at::Tensor new_parameter(at::IntArrayRef sizes, const at::TensorOptions& fallback) {
  const ParameterScope* scope = ParameterScope::current();
  return at::empty(sizes, scope != nullptr ? scope->options() : fallback);
}

}  // namespace mola::detail
