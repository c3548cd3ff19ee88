// libFuzzer target: the safetensors header parser (mola/io/safetensors_header.h)
// on arbitrary file bytes. Invariants checked beyond "does not crash":
//   - the only exception is SafetensorsError, and its message starts with the path;
//   - a successful parse puts every entry's bytes inside the file, gives each
//     entry numel x element-size bytes of a known dtype, and no two entries overlap.
#include "mola/io/safetensors_header.h"

#include <algorithm>
#include "fuzz_check.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

using mola::fuzz::check;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace mola::io;
  SafetensorsHeader h;
  try {
    h = parse_safetensors_header("fuzz.safetensors", data, size);
  } catch (const SafetensorsError& e) {
    check(std::string(e.what()).rfind("safetensors: fuzz.safetensors: ", 0) == 0, "message starts with the path");
    return 0;
  }
  check(h.data_start >= 8 && h.data_start <= size, "data_start inside the file");
  check(h.data_start + h.data_size == size, "data buffer is the rest of the file");
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  for (const auto& kv : h.entries) {
    const std::string& name = kv.first;
    const SafetensorsEntry& e = kv.second;
    check(name != "__metadata__", "__metadata__ is not a tensor");
    check(e.begin <= e.end && e.end <= h.data_size, "offsets inside the data buffer");
    const auto& dtypes = safetensors_dtype_names();
    const auto d = std::find_if(dtypes.begin(), dtypes.end(), [&](const auto& x) { return x.first == e.dtype; });
    check(d != dtypes.end() && d->second == e.element_size, "known dtype with its element size");
    uint64_t numel = 1;
    for (const int64_t s : e.shape) {
      check(s >= 0, "non-negative dimension");
      numel *= static_cast<uint64_t>(s);  // cannot overflow: the parser checked
    }
    check(numel * e.element_size == e.end - e.begin, "byte length equals numel x element size");
    if (e.end > e.begin) ranges.emplace_back(e.begin, e.end);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) check(ranges[i].first >= ranges[i - 1].second, "no overlapping entries");
  return 0;
}
