// The `mola` command (design.md 6.3): a thin main over mola::train::run_command,
// which `python -m mola` also calls through the bindings.
#include <mola/train/run.h>

#include <string>
#include <vector>

int main(int argc, char** argv) {
  return mola::train::run_command(std::vector<std::string>(argv + 1, argv + argc));
}
