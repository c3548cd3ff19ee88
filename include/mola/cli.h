// mola/cli.h: the `mola` command line, one implementation for the C++
// program (src/cli/main.cpp) and `python -m mola` (through the bindings). The
// verbs are one table: each has its usage, options, an example and a
// handler, or belongs to the Python package (report, analyze, convert
// mola-authors); the table gives the usage text, each verb's --help,
// did-you-mean for a mistyped verb and the pointer to python -m mola.
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <string>
#include <vector>

namespace mola::cli {

// One verb of the `mola` command: the table behind the usage text, each
// verb's --help, did-you-mean and the pointer to python -m mola for the verbs
// that live in the Python package (handler nullptr, python_only).
struct Verb {
  const char* name;      // "train", or "convert mola-authors" for a verb of two words
  const char* synopsis;  // its arguments, after the name
  const char* summary;   // one line
  const char* options;   // the option lines of its --help ("" when none)
  const char* example;   // a command line that works from the repository root
  int (*handler)(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group);
  bool python_only;
};
const std::vector<Verb>& verbs();
// The verb `args` names (its first word, or two for "convert mola-authors");
// nullptr when none does.
const Verb* verb_of(const std::vector<std::string>& args);
// `mola --help`, and `mola VERB --help` (std::invalid_argument for no such verb).
std::string usage();
std::string help(const std::string& verb);

// The `mola` command line (without the program name). Prints to stdout and
// stderr; returns the exit status: 0, 1 (the run failed), 2 (a user error:
// bad arguments, recipe, file; one line, no backtrace). `group`: the process
// group `mola train` joins (python -m mola passes torch.distributed's WORLD
// under torchrun); the other commands run in one process and refuse a group
// of more than one rank. Without a group, `mola train` under a launcher that
// set WORLD_SIZE > 1 is a user error that names python -m mola: this program
// does not create a group itself (the LibTorch wheel ships no Gloo headers).
// `mola VERB --help` prints the verb's usage, options and an example;
// `mola --version` the version, the LibTorch it was built against and
// whether its CUDA kernels are built in.
int run_command(const std::vector<std::string>& args, const c10::intrusive_ptr<c10d::ProcessGroup>& group = {});

}  // namespace mola::cli
