// The safetensors header parser (mola/io/safetensors_header.h). All of the
// validation of a safetensors file lives here, on plain bytes: once a header
// has passed, every entry's bytes are known to lie inside the file, so the
// mmap reader (safetensors.cpp) needs no checks beyond the name. Torch-free so
// that tests/fuzz compiles it with libFuzzer's coverage instrumentation.
#include "mola/io/safetensors_header.h"

#include "detail/text.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <utility>

namespace mola::io {
namespace {

using nlohmann::json;

// Larger than any real header (a 70B model's is ~100 KB); a larger length
// means the first 8 bytes are not a safetensors length at all.
constexpr uint64_t kMaxHeaderBytes = 100ull * 1000 * 1000;

using mola::detail::quote;

template <class... Parts>
[[noreturn]] void fail(const std::string& path, const Parts&... parts) {
  mola::detail::raise<SafetensorsError>("safetensors: ", path, ": ", parts...);
}

std::string dtype_list() {
  std::string s;
  for (const auto& d : safetensors_dtype_names()) s += (s.empty() ? "" : ", ") + d.first;
  return s;
}

// One header entry checked against the data buffer of `data_size` bytes.
SafetensorsEntry parse_entry(const std::string& path, const std::string& name, const json& e, uint64_t data_size) {
  const std::string where = "tensor " + quote(name) + ": ";
  const char* fix = "; the header is corrupt: re-download or re-save the file";
  if (!e.is_object()) fail(path, where, "entry is ", e.type_name(), ", not an object with dtype, shape and data_offsets", fix);
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!e.contains(key)) fail(path, where, "entry has no '", key, "'", fix);

  SafetensorsEntry info;
  if (!e["dtype"].is_string()) fail(path, where, "'dtype' is ", e["dtype"].dump(), ", not a string", fix);
  info.dtype = e["dtype"].get<std::string>();
  const auto& dtypes = safetensors_dtype_names();
  const auto d = std::find_if(dtypes.begin(), dtypes.end(), [&](const auto& x) { return info.dtype == x.first; });
  if (d == dtypes.end())
    fail(path, where, "unsupported dtype '", info.dtype, "'; mola reads ", dtype_list(),
         ": convert the tensor to one of these (e.g. dequantize it) before loading");
  info.element_size = d->second;

  const json& shape = e["shape"];
  if (!shape.is_array()) fail(path, where, "'shape' is ", shape.dump(), ", not a list of integers", fix);
  uint64_t numel = 1;
  for (const json& s : shape) {
    if (!s.is_number_integer()) fail(path, where, "'shape' ", shape.dump(), " holds ", s.dump(), ", not an integer", fix);
    if (s.is_number_unsigned() ? s.get<uint64_t>() > uint64_t(INT64_MAX) : s.get<int64_t>() < 0)
      fail(path, where, "'shape' ", shape.dump(), " has a negative or out-of-range dimension", fix);
    const auto dim = s.get<int64_t>();
    if (__builtin_mul_overflow(numel, uint64_t(dim), &numel) || numel > uint64_t(INT64_MAX))
      fail(path, where, "'shape' ", shape.dump(), " has more elements than fit in 64 bits (overflow)", fix);
    info.shape.push_back(dim);
  }

  const json& off = e["data_offsets"];
  if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
    fail(path, where, "'data_offsets' is ", off.dump(), ", not [begin, end] with two non-negative integers", fix);
  info.begin = off[0].get<uint64_t>();
  info.end = off[1].get<uint64_t>();
  if (info.begin > info.end)
    fail(path, where, "'data_offsets' [", info.begin, ", ", info.end, "] has begin after end", fix);
  if (info.end > data_size)
    fail(path, where, "'data_offsets' end ", info.end, " is past the end of the data buffer (", data_size,
         " bytes); the file is truncated: re-download or re-save it");
  const uint64_t element = info.element_size;
  uint64_t expected = 0;
  if (__builtin_mul_overflow(numel, element, &expected) || info.end - info.begin != expected)
    fail(path, where, "holds ", info.end - info.begin, " bytes but shape ", shape.dump(), " of ", info.dtype, " needs ",
         numel, " x ", element, " bytes", fix);
  return info;
}

}  // namespace

const std::vector<std::pair<std::string, size_t>>& safetensors_dtype_names() {
  // The spec's names; F8 included because torch reads them natively.
  static const std::vector<std::pair<std::string, size_t>> d{
      {"F64", 8}, {"F32", 4}, {"F16", 2}, {"BF16", 2}, {"I64", 8},     {"I32", 4},
      {"I16", 2}, {"I8", 1},  {"U8", 1},  {"BOOL", 1}, {"F8_E4M3", 1}, {"F8_E5M2", 1},
  };
  return d;
}

SafetensorsHeader parse_safetensors_header(const std::string& path, const uint8_t* bytes, uint64_t size) {
  if (size < 8)
    fail(path, "file is ", size, " bytes, shorter than the 8-byte header length; it is truncated or not a safetensors file");
  uint64_t n = 0;
  std::memcpy(&n, bytes, 8);  // little-endian, asserted in safetensors.cpp
  if (n > kMaxHeaderBytes)
    fail(path, "header length ", n, " is over the 100 MB limit; the first 8 bytes are corrupt or this is not a safetensors file");
  if (n > size - 8)
    fail(path, "header length ", n, " is larger than the file's remaining ", size - 8,
         " bytes; the file is truncated (re-download it) or not a safetensors file");
  SafetensorsHeader h;
  h.data_start = 8 + n;
  h.data_size = size - h.data_start;

  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + n);
  } catch (const json::parse_error& e) {
    fail(path, "header is not valid JSON at byte ", e.byte, " of the header (file offset ", e.byte + 8, "): ", e.what(),
         "; the file is corrupt: re-download or re-save it");
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    fail(path, "header holds a number out of range (", e.what(), "); the file is corrupt: re-download or re-save it");
  }
  if (!header.is_object()) fail(path, "header is ", header.type_name(), ", not a JSON object of tensor entries; not a safetensors file");

  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) fail(path, "'__metadata__' is ", value.type_name(), ", not an object of strings; the header is corrupt: re-save the file");
      for (const auto& [k, v] : value.items()) {
        if (!v.is_string()) fail(path, "'__metadata__' key '", k, "' is ", v.dump(), ", not a string; metadata values must be strings: re-save the file with string values");
        h.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    h.entries.emplace(name, parse_entry(path, name, value, h.data_size));
  }

  // Two entries sharing bytes would alias; sorted by begin, each must end
  // before the next begins. Gaps are tolerated: they cannot cause a bad read.
  std::vector<std::pair<const std::string*, const SafetensorsEntry*>> by_begin;
  for (const auto& [name, info] : h.entries)
    if (info.end > info.begin) by_begin.emplace_back(&name, &info);
  std::sort(by_begin.begin(), by_begin.end(), [](const auto& a, const auto& b) { return a.second->begin < b.second->begin; });
  for (size_t i = 1; i < by_begin.size(); ++i)
    if (by_begin[i].second->begin < by_begin[i - 1].second->end)
      fail(path, "tensors ", quote(*by_begin[i - 1].first), " [", by_begin[i - 1].second->begin, ", ",
           by_begin[i - 1].second->end, ") and ", quote(*by_begin[i].first), " [", by_begin[i].second->begin, ", ",
           by_begin[i].second->end, ") overlap in the data buffer; the header is corrupt: re-download or re-save the file");
  return h;
}

}  // namespace mola::io
