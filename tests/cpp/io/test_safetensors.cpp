// Tests for mola/io/safetensors.h: round trips through the writer, a file built
// byte by byte (which pins the on-disk format independently of our writer),
// every malformed header the reader must reject with a message naming the file
// and the fault, truncation and corruption sweeps that must never crash, and
// sharded checkpoints. Files live in a fresh mkdtemp directory per test.
#include "mola/io/safetensors.h"

#include <gtest/gtest.h>

#include <dirent.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <random>

namespace {

using mola::io::SafetensorsError;
using mola::io::SafetensorsFile;
using nlohmann::json;

// A fresh directory, removed with everything in it (flat) at the end.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mola_safetensors_XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    if (d == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = d;
  }
  ~TempDir() {
    for (const auto& f : files()) ::unlink((path_ + "/" + f).c_str());
    ::rmdir(path_.c_str());
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> files() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(path_.c_str())) {
      while (const dirent* e = ::readdir(d))
        if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.emplace_back(e->d_name);
      ::closedir(d);
    }
    return out;
  }

 private:
  std::string path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::string le64(uint64_t n) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return s;
}

// A file from a header text and a data buffer, written by hand.
std::string file_bytes(const std::string& header, const std::string& data = "") {
  return le64(header.size()) + header + data;
}

// Runs f, expects a SafetensorsError whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected a SafetensorsError containing \"" << *parts.begin() << "\"";
  } catch (const SafetensorsError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

// Writes `bytes` to a file and expects open() to fail naming the file and `parts`.
void expect_open_error(const std::string& bytes, std::initializer_list<std::string> parts) {
  TempDir dir;
  const std::string path = dir / "bad.safetensors";
  write_bytes(path, bytes);
  expect_error([&] { SafetensorsFile::open(path); }, {path});
  expect_error([&] { SafetensorsFile::open(path); }, parts);
}

void expect_same(const at::Tensor& a, const at::Tensor& b, const std::string& name) {
  EXPECT_EQ(a.scalar_type(), b.scalar_type()) << name;
  EXPECT_EQ(a.sizes(), b.sizes()) << name;
  EXPECT_TRUE(at::equal(a, b)) << name;
}

std::map<std::string, at::Tensor> sample_tensors() {
  at::manual_seed(0);
  return {
      {"a.f32", at::randn({3, 4})},
      {"b.f16", at::randn({5}).to(at::kHalf)},
      {"c.bf16", at::randn({2, 3, 2}).to(at::kBFloat16)},
      {"d.i64", at::arange(-6, 6, at::kLong).reshape({3, 4})},
      {"e.bool", at::rand({7}) > 0.5},
      {"f.scalar", at::scalar_tensor(3.5, at::kFloat)},
      {"g.empty", at::empty({0, 4}, at::kFloat)},
      {"h.f64", at::randn({2, 2}, at::kDouble)},
      {"i.i32", at::arange(5, at::kInt)},
      {"j.u8", at::arange(250, 255, at::kLong).to(at::kByte)},
      {"k.strided", at::randn({4, 6}).t()},  // non-contiguous: the writer must make it contiguous
  };
}

TEST(SafetensorsRoundTrip, EveryDtypeExactly) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  const auto tensors = sample_tensors();
  mola::io::save_safetensors(path, tensors);
  const auto loaded = mola::io::load_safetensors(path);
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, t] : tensors) expect_same(loaded.at(name), t, name);

  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names().front(), "a.f32");
  EXPECT_TRUE(f.contains("c.bf16"));
  EXPECT_FALSE(f.contains("c"));
  EXPECT_EQ(f.info("c.bf16").dtype, "BF16");
  EXPECT_EQ(f.info("c.bf16").shape, (std::vector<int64_t>{2, 3, 2}));
  EXPECT_EQ(f.info("f.scalar").shape, std::vector<int64_t>{});
  EXPECT_TRUE(f.metadata().empty());
  // The writer pads so the data buffer starts 8-byte aligned.
  const std::string bytes = read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
}

TEST(SafetensorsRoundTrip, TensorsOutliveTheFile) {
  TempDir dir;
  const std::string path = dir / "x.safetensors";
  mola::io::save_safetensors(path, {{"w", at::arange(12, at::kFloat)}});
  at::Tensor w;
  {
    auto f = SafetensorsFile::open(path);
    auto moved = std::move(f);  // movable; the moved-from file unmaps nothing
    w = moved.get("w");
  }
  EXPECT_TRUE(at::equal(w, at::arange(12, at::kFloat)));
}

// load() views the mapped bytes when they already are what was asked for: two
// loads share their data; the view outlives the file object; writing to it
// copies the page (copy-on-write) and never changes the file.
TEST(SafetensorsLoad, ViewsTheMapWhenDtypeAndDeviceMatch) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  const at::Tensor w = at::randn({64, 32}).to(at::kBFloat16);
  mola::io::save_safetensors(path, {{"w", w}});
  std::string before;
  {
    std::ifstream in(path, std::ios::binary);
    before.assign(std::istreambuf_iterator<char>(in), {});
  }
  at::Tensor a, b, converted;
  {
    const auto f = SafetensorsFile::open(path);
    a = f.load("w", at::kBFloat16);
    b = f.load("w", at::kBFloat16);
    converted = f.load("w", at::kFloat);
  }
  EXPECT_EQ(a.data_ptr(), b.data_ptr());                // one view of the map, no copy
  EXPECT_NE(converted.data_ptr(), a.data_ptr());        // another dtype: a copy
  expect_same(a, w, "w");                                // the map outlived the file object
  expect_same(converted, w.to(at::kFloat), "w");
  a.add_(1.0);                                           // copy-on-write
  expect_same(b, w + 1.0, "w");                          // both views see the process's page
  std::ifstream in(path, std::ios::binary);
  const std::string after{std::istreambuf_iterator<char>(in), {}};
  EXPECT_EQ(after, before);                              // the file is untouched
  expect_same(SafetensorsFile::open(path).get("w"), w, "w");
}

TEST(SafetensorsRoundTrip, CastAtLoad) {
  TempDir dir;
  const std::string path = dir / "bf16.safetensors";
  const at::Tensor x = at::randn({4, 3}).to(at::kBFloat16);
  mola::io::save_safetensors(path, {{"x", x}});
  const auto f32 = mola::io::load_safetensors(path, at::kFloat);
  expect_same(f32.at("x"), x.to(at::kFloat), "x");
  expect_same(SafetensorsFile::open(path).get("x", at::kHalf), x.to(at::kHalf), "x");
}

TEST(SafetensorsRoundTrip, Metadata) {
  TempDir dir;
  const std::string path = dir / "meta.safetensors";
  const std::map<std::string, std::string> meta = {{"format", "pt"}, {"mola.version", "0.1"}, {"note", "h\u00e9llo \"q\""}};
  mola::io::save_safetensors(path, {{"x", at::ones({2})}}, meta);
  EXPECT_EQ(SafetensorsFile::open(path).metadata(), meta);
}

TEST(SafetensorsRoundTrip, AtomicWriteLeavesNoTempFile) {
  TempDir dir;
  const std::string path = dir / "model.safetensors";
  mola::io::save_safetensors(path, {{"x", at::ones({2})}});
  mola::io::save_safetensors(path, {{"x", at::zeros({3})}});  // overwrite in place
  EXPECT_EQ(dir.files(), std::vector<std::string>{"model.safetensors"});
  EXPECT_TRUE(at::equal(mola::io::load_safetensors(path).at("x"), at::zeros({3})));
}

TEST(SafetensorsWriter, Errors) {
  TempDir dir;
  const std::string path = dir / "w.safetensors";
  expect_error([&] { mola::io::save_safetensors(path, {{"c", at::ones({2}, at::kComplexFloat)}}); }, {path, "'c'", "dtype"});
  expect_error([&] { mola::io::save_safetensors(path, {{"__metadata__", at::ones({2})}}); }, {path, "reserved"});
  expect_error([&] { mola::io::save_safetensors(path, {{"u", at::Tensor()}}); }, {path, "'u'", "undefined"});
  expect_error([&] { mola::io::save_safetensors(dir / "no/such/dir.safetensors", {{"x", at::ones({1})}}); },
               {"no/such/dir.safetensors", "cannot create"});
  EXPECT_TRUE(dir.files().empty());
}

// Two F32 tensors and a BF16 one, written by hand: little-endian IEEE floats,
// offsets relative to the data buffer, unpadded header (so the data start is
// not aligned, which the reader must also handle).
TEST(SafetensorsFormat, HandBuiltFile) {
  TempDir dir;
  const std::string path = dir / "hand.safetensors";
  const float a[4] = {1.0f, -2.5f, 3.25f, 0.0f};
  const float b[1] = {42.0f};
  const uint16_t c[2] = {0x3f80, 0xc000};  // bf16 1.0 and -2.0
  std::string data(reinterpret_cast<const char*>(a), 16);
  data += std::string(reinterpret_cast<const char*>(b), 4);
  data += std::string(reinterpret_cast<const char*>(c), 4);
  const std::string header =
      R"({"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[16,20]},)"
      R"("c":{"dtype":"BF16","shape":[2],"data_offsets":[20,24]},"__metadata__":{"format":"pt"}})";
  ASSERT_NE(header.size() % 8, 0u);
  write_bytes(path, file_bytes(header, data));

  const auto f = SafetensorsFile::open(path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_TRUE(at::equal(f.get("a"), at::tensor({1.0f, -2.5f, 3.25f, 0.0f}).reshape({2, 2})));
  EXPECT_EQ(f.get("b").dim(), 0);
  EXPECT_EQ(f.get("b").item<float>(), 42.0f);
  EXPECT_TRUE(at::equal(f.get("c", at::kFloat), at::tensor({1.0f, -2.0f})));
  EXPECT_EQ(f.info("c").begin, 20u);
  EXPECT_EQ(f.info("c").end, 24u);
}

std::string entry(const std::string& name, const std::string& body) { return "{\"" + name + "\":" + body + "}"; }

TEST(SafetensorsMalformed, FileLevel) {
  expect_open_error("", {"0 bytes", "shorter than the 8-byte"});
  expect_open_error("abc", {"3 bytes", "shorter than the 8-byte"});
  expect_open_error(le64(100) + "{}", {"header length 100", "larger than the file", "truncated"});
  expect_open_error(le64(200ull * 1000 * 1000) + "{}", {"100 MB"});
  expect_open_error(le64(~0ull) + "{}", {"100 MB"});
  expect_open_error(file_bytes(R"({"a": {"dtype": )"), {"not valid JSON", "at byte"});
  expect_open_error(file_bytes("[1, 2]"), {"header is array", "not a JSON object"});
  expect_open_error(file_bytes(R"({"__metadata__": [1]})"), {"'__metadata__'", "not an object"});
  expect_open_error(file_bytes(R"({"__metadata__": {"k": 1}})"), {"'__metadata__' key 'k'", "not a string"});
  TempDir dir;
  expect_error([&] { SafetensorsFile::open(dir / "missing.safetensors"); }, {dir / "missing.safetensors", "cannot open"});
  expect_error([&] { SafetensorsFile::open(dir / ""); }, {"not a regular file"});
}

TEST(SafetensorsMalformed, Entries) {
  const std::string ok4 = std::string(4, '\0');
  expect_open_error(file_bytes(entry("w", "3")), {"tensor 'w'", "not an object"});
  expect_open_error(file_bytes(entry("w", R"({"shape":[1],"data_offsets":[0,4]})"), ok4), {"tensor 'w'", "no 'dtype'"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","data_offsets":[0,4]})"), ok4), {"tensor 'w'", "no 'shape'"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[1]})"), ok4), {"tensor 'w'", "no 'data_offsets'"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})"), ok4), {"tensor 'w'", "'dtype' is 7"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"Q4","shape":[1],"data_offsets":[0,4]})"), ok4),
                    {"tensor 'w'", "unsupported dtype 'Q4'", "BF16"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":"1","data_offsets":[0,4]})"), ok4), {"tensor 'w'", "'shape'", "not a list"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,4]})"), ok4), {"tensor 'w'", "not an integer"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})"), ok4), {"tensor 'w'", "negative"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,4]})"), ok4),
                    {"tensor 'w'", "overflow"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[18446744073709551615],"data_offsets":[0,4]})"), ok4),
                    {"tensor 'w'", "out-of-range"});
  // numel fits in 64 bits, numel * 4 bytes does not
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,4]})"), ok4),
                    {"tensor 'w'", "needs"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[1],"data_offsets":[0]})"), ok4), {"tensor 'w'", "not [begin, end]"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,8]})"), ok4), {"tensor 'w'", "not [begin, end]"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})"), ok4), {"tensor 'w'", "not [begin, end]"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[0],"data_offsets":[4,0]})"), ok4), {"tensor 'w'", "begin after end"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})"), ok4),
                    {"tensor 'w'", "past the end of the data buffer (4 bytes)", "truncated"});
  expect_open_error(file_bytes(entry("w", R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})"), ok4),
                    {"tensor 'w'", "holds 4 bytes", "needs 2 x 4 bytes"});
  expect_open_error(file_bytes(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                               std::string(12, '\0')),
                    {"'x' [0, 8)", "'y' [4, 12)", "overlap"});
}

TEST(SafetensorsMalformed, MissingNameAndBadBool) {
  TempDir dir;
  const std::string path = dir / "m.safetensors";
  std::map<std::string, at::Tensor> t;
  for (int i = 0; i < 8; ++i) t["model.layers." + std::to_string(i) + ".mlp.up_proj.weight"] = at::ones({1});
  mola::io::save_safetensors(path, t);
  const auto f = SafetensorsFile::open(path);
  try {
    f.get("model.layers.3.mlp.up_proj.weigth");
    ADD_FAILURE() << "expected an error";
  } catch (const SafetensorsError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    EXPECT_NE(msg.find("no tensor named 'model.layers.3.mlp.up_proj.weigth'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("nearest names: 'model.layers.3.mlp.up_proj.weight'"), std::string::npos) << msg;
    // at most 5 suggestions
    size_t count = 0;
    for (size_t p = msg.find("model.layers."); p != std::string::npos; p = msg.find("model.layers.", p + 1)) ++count;
    EXPECT_EQ(count, 1u + 5u) << msg;
  }

  const std::string bad = dir / "bool.safetensors";
  write_bytes(bad, file_bytes(entry("flags", R"({"dtype":"BOOL","shape":[3],"data_offsets":[0,3]})"), std::string("\x01\x00\x02", 3)));
  const auto fb = SafetensorsFile::open(bad);
  expect_error([&] { fb.get("flags"); }, {bad, "tensor 'flags'", "BOOL byte 2 is 2"});
}

// Every proper prefix of a valid file must be rejected, and random byte flips
// must either load or raise SafetensorsError: never crash, never read past the
// end (the sanitizer build turns such a read into a failure).
TEST(SafetensorsMalformed, TruncationAndCorruptionNeverCrash) {
  TempDir dir;
  const std::string good = dir / "good.safetensors";
  mola::io::save_safetensors(good, {{"a", at::randn({3, 2})}, {"b", at::arange(4, at::kLong)}, {"c", at::ones({2}, at::kBool)}},
                             {{"k", "v"}});
  const std::string bytes = read_bytes(good);
  const std::string path = dir / "cut.safetensors";
  for (size_t len = 0; len < bytes.size(); ++len) {
    write_bytes(path, bytes.substr(0, len));
    EXPECT_THROW(SafetensorsFile::open(path), SafetensorsError) << "prefix of " << len << " bytes";
  }
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 300; ++trial) {
    std::string b = bytes;
    for (int k = 0; k < 3; ++k) b[rng() % b.size()] = static_cast<char>(rng() & 0xff);
    write_bytes(path, b);
    try {
      const auto f = SafetensorsFile::open(path);
      for (const auto& name : f.names()) f.get(name);
    } catch (const SafetensorsError&) {
    }
  }
}

TEST(SafetensorsSharded, IndexWithTwoShards) {
  TempDir dir;
  const at::Tensor w1 = at::randn({4, 4}).to(at::kBFloat16), w2 = at::randn({2}).to(at::kBFloat16), w3 = at::arange(3, at::kFloat);
  mola::io::save_safetensors(dir / "model-00001-of-00002.safetensors", {{"layers.0.w", w1}, {"layers.0.b", w2}});
  mola::io::save_safetensors(dir / "model-00002-of-00002.safetensors", {{"layers.1.w", w3}});
  const json index = {{"metadata", {{"total_size", 44}}},
                      {"weight_map",
                       {{"layers.0.w", "model-00001-of-00002.safetensors"},
                        {"layers.0.b", "model-00001-of-00002.safetensors"},
                        {"layers.1.w", "model-00002-of-00002.safetensors"}}}};
  write_bytes(dir / "model.safetensors.index.json", index.dump());

  for (const std::string& where : {dir / "", dir / "model.safetensors.index.json"}) {
    const auto all = mola::io::load_sharded(where, at::kFloat);
    ASSERT_EQ(all.size(), 3u) << where;
    expect_same(all.at("layers.0.w"), w1.to(at::kFloat), "layers.0.w");
    expect_same(all.at("layers.0.b"), w2.to(at::kFloat), "layers.0.b");
    expect_same(all.at("layers.1.w"), w3, "layers.1.w");
  }
  // Keeping the file's dtypes without a cast.
  EXPECT_EQ(mola::io::load_sharded(dir / "").at("layers.0.w").scalar_type(), at::kBFloat16);

  // An index that names a tensor its shard does not hold.
  const std::string wrong = dir / "wrong.index.json";
  write_bytes(wrong, json{{"weight_map", {{"layers.1.v", "model-00002-of-00002.safetensors"}}}}.dump());
  expect_error([&] { mola::io::load_sharded(wrong); },
               {"model-00002-of-00002.safetensors", "'layers.1.v'", "missing from this shard", "'layers.1.w'"});
  write_bytes(wrong, R"({"weights": {}})");
  expect_error([&] { mola::io::load_sharded(wrong); }, {wrong, "no 'weight_map'"});
  write_bytes(wrong, R"({"weight_map": )");
  expect_error([&] { mola::io::load_sharded(wrong); }, {wrong, "not valid JSON"});
}

TEST(SafetensorsSharded, SingleFileDirectoryAndErrors) {
  TempDir dir;
  expect_error([&] { mola::io::load_sharded(dir / ""); }, {"neither model.safetensors.index.json nor model.safetensors"});
  expect_error([&] { mola::io::load_sharded(dir / "nope"); }, {dir / "nope", "cannot open"});
  mola::io::save_safetensors(dir / "model.safetensors", {{"x", at::ones({2, 2}, at::kHalf)}});
  const auto all = mola::io::load_sharded(dir / "");
  expect_same(all.at("x"), at::ones({2, 2}, at::kHalf), "x");
  expect_same(mola::io::load_sharded(dir / "model.safetensors", at::kFloat).at("x"), at::ones({2, 2}), "x");
}

}  // namespace
