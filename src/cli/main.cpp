// The `mola` command (docs/recipes.md): a thin main over mola::cli::run_command,
// which `python -m mola` also calls through the bindings.
#include <mola/cli.h>

#include <string>
#include <vector>

int main(int argc, char** argv) {
  return mola::cli::run_command(std::vector<std::string>(argv + 1, argv + argc));
}
