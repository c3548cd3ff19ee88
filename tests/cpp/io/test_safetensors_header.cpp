// Tests for mola/io/safetensors_header.h, the torch-free header parser the
// mmap reader and the fuzz target share: a table of malformed files (each
// error names the value, the rule and the fix) and hand-computed entries of
// valid ones. No torch, so these also run in the sanitizer subset
// (tests/fuzz/Makefile, sanitize-fast).
#include "mola/io/safetensors_header.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

using mola::io::parse_safetensors_header;
using mola::io::SafetensorsError;

// 8-byte little-endian length, the header text, then `data_bytes` zero bytes.
std::vector<uint8_t> file(const std::string& header, size_t data_bytes = 0, uint64_t length = UINT64_MAX) {
  const uint64_t n = length == UINT64_MAX ? header.size() : length;
  std::vector<uint8_t> out(8);
  std::memcpy(out.data(), &n, 8);
  out.insert(out.end(), header.begin(), header.end());
  out.resize(out.size() + data_bytes, 0);
  return out;
}

struct BadCase {
  const char* id;
  std::vector<uint8_t> bytes;
  std::vector<std::string> must;  // the value, the rule, the fix
};

TEST(SafetensorsHeader, EveryMalformedFileNamesTheValueTheRuleAndTheFix) {
  const std::vector<BadCase> cases = {
      {"short", {1, 2, 3}, {"file is 3 bytes", "shorter than the 8-byte header length", "truncated"}},
      {"length over limit", file("{}", 0, 1ull << 40),
       {"header length 1099511627776", "over the 100 MB limit", "not a safetensors file"}},
      {"length past the end", file("{}", 0, 64),
       {"header length 64", "larger than the file's remaining 2 bytes", "re-download"}},
      {"not json", file("{\"a\": [1,"), {"not valid JSON at byte", "file offset", "re-download or re-save"}},
      {"number overflow", file("{\"a\": 1e999}"), {"number out of range", "1e999", "re-download or re-save"}},
      {"not an object", file("[1, 2]"), {"header is array", "not a JSON object", "not a safetensors file"}},
      {"entry not an object", file("{\"w\": 3}"), {"tensor 'w'", "entry is number", "re-download or re-save"}},
      {"no dtype", file(R"({"w": {"shape": [1], "data_offsets": [0, 4]}})"),
       {"tensor 'w'", "entry has no 'dtype'", "re-download or re-save"}},
      {"unknown dtype", file(R"({"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}})", 1),
       {"unsupported dtype 'Q4'", "mola reads F64, F32", "convert the tensor"}},
      {"negative dim", file(R"({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}})"),
       {"'shape' [-1]", "negative or out-of-range dimension", "re-download or re-save"}},
      {"numel overflow",
       file(R"({"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})"),
       {"[4294967296,4294967296]", "more elements than fit in 64 bits", "re-download or re-save"}},
      {"offsets reversed", file(R"({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}})", 4),
       {"[4, 0]", "begin after end", "re-download or re-save"}},
      {"offsets past the end", file(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", 8),
       {"end 16", "past the end of the data buffer (8 bytes)", "truncated: re-download"}},
      {"size vs shape", file(R"({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", 8),
       {"holds 8 bytes", "needs 3 x 4 bytes", "re-download or re-save"}},
      {"overlap",
       file(R"({"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}})", 6),
       {"'a' [0, 4) and 'b' [2, 6)", "overlap in the data buffer", "re-download or re-save"}},
      {"metadata not strings", file(R"({"__metadata__": {"format": 1}})"),
       {"'__metadata__' key 'format' is 1", "metadata values must be strings", "re-save the file"}},
  };
  for (const auto& c : cases) {
    try {
      parse_safetensors_header("x.safetensors", c.bytes.data(), c.bytes.size());
      ADD_FAILURE() << c.id << ": no error";
    } catch (const SafetensorsError& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.rfind("safetensors: x.safetensors: ", 0), 0u) << c.id << ": " << what;
      for (const auto& part : c.must) EXPECT_NE(what.find(part), std::string::npos) << c.id << ": " << what;
    }
  }
}

TEST(SafetensorsHeader, ValidEntriesAsWritten) {
  const auto bytes = file(R"({"__metadata__": {"format": "pt"},
                              "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [8, 20]},
                              "a": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]},
                              "e": {"dtype": "BOOL", "shape": [0, 5], "data_offsets": [20, 20]}})",
                          24);
  const auto h = parse_safetensors_header("x.safetensors", bytes.data(), bytes.size());
  const uint64_t header_len = bytes.size() - 24 - 8;
  EXPECT_EQ(h.data_start, 8 + header_len);
  EXPECT_EQ(h.data_size, 24u);  // 4 trailing bytes after the last tensor are a tolerated gap
  ASSERT_EQ(h.entries.size(), 3u);
  EXPECT_EQ(h.metadata.at("format"), "pt");
  const auto& b = h.entries.at("b");
  EXPECT_EQ(b.dtype, "BF16");
  EXPECT_EQ(b.element_size, 2u);
  EXPECT_EQ(b.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(b.begin, 8u);
  EXPECT_EQ(b.end, 20u);
  EXPECT_EQ(h.entries.at("a").shape, std::vector<int64_t>{});
  EXPECT_EQ(h.entries.at("a").element_size, 8u);
  EXPECT_EQ(h.entries.at("e").begin, h.entries.at("e").end);
}

}  // namespace
