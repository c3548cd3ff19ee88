// src/detail/parameters.h: how the modules mola builds (the decoder's layers,
// MoLA adapters, MoLEx gates) allocate their parameters (private: not part of
// the installed API).
//
// Normally a parameter is made fp32 on the CPU and its module initialises it
// at random. Inside a ParameterScope it is made with the scope's dtype and
// device and left uninitialised (at::empty, no draw from any generator), for
// a caller that fills every parameter next: from_pretrained from a
// checkpoint, a copy from its original. On the "meta" device nothing is
// allocated at all until the checkpoint's tensor replaces it.
#pragma once

#include <ATen/ATen.h>

namespace mola::detail {

class ParameterScope {
 public:
  explicit ParameterScope(const at::TensorOptions& options);
  ~ParameterScope();
  ParameterScope(const ParameterScope&) = delete;
  ParameterScope& operator=(const ParameterScope&) = delete;

  // The innermost scope of this thread, or nullptr.
  static const ParameterScope* current();
  const at::TensorOptions& options() const { return options_; }

 private:
  at::TensorOptions options_;
  const ParameterScope* outer_;
};

// A new parameter tensor of `sizes`: at::empty in the current scope's options,
// else fp32 on the CPU (`fallback` overrides that default: an adapter made
// like its base weight).
at::Tensor new_parameter(at::IntArrayRef sizes, const at::TensorOptions& fallback = at::TensorOptions());

// Whether a module should initialise the parameters it just made (false inside a ParameterScope).
inline bool initialise_parameters() { return ParameterScope::current() == nullptr; }

}  // namespace mola::detail
