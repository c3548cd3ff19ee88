// mola/io/safetensors_header.h: the torch-free half of the safetensors reader:
// the 8-byte length and the JSON header parsed and validated into entries
// with dtype names, shapes and byte offsets. SafetensorsFile::open
// (safetensors.h) maps the file and hands its bytes to parse_safetensors_header;
// the split exists so the parser can be fuzzed with libFuzzer (tests/fuzz)
// without compiling or linking torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace mola::io {

// Every problem with a safetensors file or index: unreadable, truncated,
// malformed, a dtype we do not read, a tensor that is not there. The message
// always starts with the file's path. Derived from std::runtime_error (not
// invalid_argument) because the file, not the caller's argument, is at fault.
class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One validated header entry: the bytes [begin, end) of the data buffer (which
// starts right after the header) hold numel(shape) elements of `dtype`.
struct SafetensorsEntry {
  std::string dtype;          // as written in the file: "F32", "BF16", ...
  size_t element_size = 0;    // bytes per element of dtype
  std::vector<int64_t> shape;  // [] for a 0-d tensor
  uint64_t begin = 0;         // byte offsets relative to the data buffer
  uint64_t end = 0;
};

// A parsed header. data_start = 8 + the header length: where the data buffer
// begins in the file; data_size: its length (the rest of the file).
struct SafetensorsHeader {
  std::map<std::string, SafetensorsEntry> entries;
  std::map<std::string, std::string> metadata;  // "__metadata__", empty when absent
  uint64_t data_start = 0;
  uint64_t data_size = 0;
};

// The header of the file whose bytes are [bytes, bytes + size). Checks the
// length (at most 100 MB, inside the file), the JSON, every entry (a dtype of
// safetensors_dtype_names(), non-negative shape without overflow, offsets
// inside the data buffer whose length equals numel x element size) and that
// no two entries overlap. Throws SafetensorsError starting with `path`; on
// success every entry's bytes lie inside the file.
SafetensorsHeader parse_safetensors_header(const std::string& path, const uint8_t* bytes, uint64_t size);

// The dtype names mola reads and writes, with their element sizes:
// F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2.
const std::vector<std::pair<std::string, size_t>>& safetensors_dtype_names();

}  // namespace mola::io
