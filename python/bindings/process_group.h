// A torch.distributed ProcessGroup from Python, for the bindings that join one
// (Trainer, run_command, train_recipe; docs/distributed.md). torch registers
// c10d::ProcessGroup with pybind11 under the c10::intrusive_ptr holder that
// torch/csrc/utils/pybind.h declares, and _C is built with torch's pybind11,
// so torch.distributed.group.WORLD (or any group init_process_group or
// new_group made) casts directly.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/utils/pybind.h>

#include <string>

namespace mola_bindings {

// None -> no group (one process); a ProcessGroup -> it; anything else: TypeError naming it.
inline c10::intrusive_ptr<c10d::ProcessGroup> to_process_group(const pybind11::object& obj) {
  if (obj.is_none()) return {};
  try {
    return obj.cast<c10::intrusive_ptr<c10d::ProcessGroup>>();
  } catch (const pybind11::cast_error&) {
    throw pybind11::type_error("process_group must be a torch.distributed ProcessGroup (e.g. "
                               "torch.distributed.group.WORLD after torch.distributed.init_process_group) or None; "
                               "got " + pybind11::repr(obj).cast<std::string>());
  }
}

}  // namespace mola_bindings
