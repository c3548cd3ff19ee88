// Tests for mola/io/llama2c.h: every malformed checkpoint or tokenizer is an
// error naming the file and the fault (and writes nothing); a synthetic
// checkpoint whose every float is its own index pins where each weight lands,
// including the per-head rotary permutation of q_proj/k_proj and the unshared
// classifier; and every configs/models/*.json parses through ModelConfig.
// The numerics (logits and greedy text against llama2.c's forward) are in
// tests/python/io/test_convert_llama2c.py.
#include "mola/io/llama2c.h"

#include <gtest/gtest.h>

#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "mola/io/safetensors.h"
#include "mola/models/config.h"

namespace {

using mola::io::Llama2cError;
using mola::io::Llama2cFileNotFoundError;

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

// The repository root, for the bundled tokenizer and configs: $MOLA_SOURCE_DIR,
// else this file's path when the compiler saw it absolute, else the nearest
// ancestor of the test binary or of the working directory that holds this
// header (Ninja compiles with paths relative to the build directory).
std::string repo_root() {
  const std::string marker = "/include/mola/io/llama2c.h";
  std::vector<std::string> starts;
  if (const char* env = std::getenv("MOLA_SOURCE_DIR")) starts.emplace_back(env);
  const std::string file = __FILE__;
  if (!file.empty() && file[0] == '/') starts.push_back(file.substr(0, file.rfind("/tests/cpp/")));
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n > 0) starts.emplace_back(buf, static_cast<size_t>(n));
  if (::getcwd(buf, sizeof(buf)) != nullptr) starts.emplace_back(buf);
  for (std::string dir : starts) {
    while (!dir.empty()) {
      if (exists(dir + marker)) return dir;
      const auto slash = dir.rfind('/');
      if (slash == std::string::npos) break;
      dir.resize(slash);
    }
  }
  return ".";
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mola_llama2c_XXXXXX";
    if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    ::nftw(
        path_.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
        FTW_DEPTH | FTW_PHYS);
  }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void write_file(const std::string& path, const std::vector<int32_t>& header, const std::vector<float>& floats,
                int64_t extra_bytes = 0) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(header.data()), static_cast<std::streamsize>(header.size() * 4));
  out.write(reinterpret_cast<const char*>(floats.data()), static_cast<std::streamsize>(floats.size() * 4));
  for (int64_t i = 0; i < extra_bytes; ++i) out.put('\0');
}

// Float count by run.c's memory_map_weights, written out independently.
int64_t floats_for(const std::vector<int32_t>& h) {
  const int64_t dim = h[0], hidden = h[1], L = h[2], heads = h[3], kv = h[4], vocab = std::abs(h[5]), seq = h[6];
  const int64_t hs = dim / heads;
  int64_t n = vocab * dim;                          // token_embedding_table
  n += L * dim;                                     // rms_att_weight
  n += L * dim * dim + 2 * L * dim * kv * hs;       // wq, wk, wv
  n += L * dim * dim + L * dim;                     // wo, rms_ffn_weight
  n += 3 * L * dim * hidden;                        // w1, w2, w3
  n += dim + seq * hs;                              // rms_final_weight, freq_cis_real + imag
  if (h[5] < 0) n += vocab * dim;                   // wcls
  return n;
}

// Runs fn, expects an E whose message contains every one of `parts`.
template <class E>
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    FAIL() << "no exception; expected one containing \"" << parts.front() << "\"";
  } catch (const E& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "\"" << p << "\" not in: " << msg;
  }
}

const std::vector<int32_t> kStories = {64, 172, 5, 8, 4, 512, 512};

TEST(Llama2cHeaderTest, FileBytesOfStories260K) {
  mola::io::Llama2cHeader h;
  h.dim = 64, h.hidden_dim = 172, h.n_layers = 5, h.n_heads = 8, h.n_kv_heads = 4, h.vocab_size = 512,
  h.seq_len = 512;
  EXPECT_EQ(h.file_bytes(), 1056540);  // the size of llama2.c's published stories260K.bin
  EXPECT_EQ(h.num_floats(), floats_for(kStories));
  h.shared_classifier = false;
  EXPECT_EQ(h.num_floats(), floats_for({64, 172, 5, 8, 4, -512, 512}));
}

TEST(Llama2cErrorTest, MissingCheckpoint) {
  TempDir d;
  expect_error<Llama2cFileNotFoundError>([&] { mola::io::read_llama2c_header(d / "none.bin"); },
                                         {d / "none.bin", "no such file"});
}

TEST(Llama2cErrorTest, ShorterThanHeader) {
  TempDir d;
  write_file(d / "s.bin", {64, 172, 5}, {});
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "s.bin"); },
                             {d / "s.bin", "12 bytes, shorter than the 28-byte llama2.c header"});
}

TEST(Llama2cErrorTest, NonPositiveSizes) {
  TempDir d;
  const std::vector<std::pair<std::vector<int32_t>, std::string>> cases = {
      {{0, 172, 5, 8, 4, 512, 512}, "header field dim is 0"},
      {{64, -1, 5, 8, 4, 512, 512}, "header field hidden_dim is -1"},
      {{64, 172, 5, 8, 0, 512, 512}, "header field n_kv_heads is 0"},
      {{64, 172, 5, 8, 4, 0, 512}, "header field vocab_size is 0"},
      {{64, 172, 5, 8, 4, 512, -7}, "header field seq_len is -7"},
  };
  for (const auto& [header, message] : cases) {
    write_file(d / "b.bin", header, std::vector<float>(64));
    expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "b.bin"); }, {d / "b.bin", message});
  }
}

TEST(Llama2cErrorTest, HeadsThatDoNotFit) {
  TempDir d;
  write_file(d / "a.bin", {64, 172, 5, 6, 6, 512, 512}, {});
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "a.bin"); },
                             {d / "a.bin", "n_heads (6) must divide dim (64)"});
  write_file(d / "b.bin", {64, 172, 5, 8, 3, 512, 512}, {});
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "b.bin"); },
                             {"n_kv_heads (3) must divide n_heads (8)"});
  write_file(d / "c.bin", {12, 16, 1, 4, 4, 512, 8}, {});
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "c.bin"); },
                             {"head size dim/n_heads (3) must be even"});
}

TEST(Llama2cErrorTest, VersionedExport) {
  TempDir d;
  write_file(d / "v.bin", {0x616b3432, 2, 64, 172, 5, 8, 4}, std::vector<float>(16));
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "v.bin"); },
                             {"magic \"ak42\"", "version 2", "--version 0"});
}

TEST(Llama2cErrorTest, SizeNotWhatTheHeaderImplies) {
  TempDir d;
  const int64_t n = floats_for(kStories);
  write_file(d / "t.bin", kStories, std::vector<float>(static_cast<size_t>(n - 1)));
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "t.bin"); },
                             {d / "t.bin", "has 1056536 bytes", "implies 1056540 bytes"});
  write_file(d / "p.bin", kStories, std::vector<float>(static_cast<size_t>(n)), /*extra_bytes=*/3);
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "p.bin"); },
                             {"has 1056543 bytes", "implies 1056540 bytes"});
  // Sizes whose product overflows 64 bits are reported, not wrapped around.
  write_file(d / "h.bin", {1 << 30, 1 << 30, 1 << 30, 2, 2, 1 << 30, 1 << 30}, {});
  expect_error<Llama2cError>([&] { mola::io::read_llama2c_header(d / "h.bin"); }, {"more than 2^63"});
}

// A synthetic checkpoint with an unshared classifier: every float is its
// index in the file, so each tensor's values say where they were read from.
class Llama2cConvertTest : public ::testing::Test {
 protected:
  void SetUp() override {
    tokenizer_ = repo_root() + "/data/checkpoints/stories260K/tok512.model";
    if (!exists(tokenizer_)) GTEST_SKIP() << "no " << tokenizer_ << " (a 512-piece tokenizer is needed)";
    std::vector<float> floats(static_cast<size_t>(floats_for(header_)));
    for (size_t i = 0; i < floats.size(); ++i) floats[i] = static_cast<float>(i);
    write_file(dir_ / "m.bin", header_, floats);
  }
  TempDir dir_;
  std::string tokenizer_;
  // dim 8, hidden 12, 2 layers, 2 query heads of size 4, 1 kv head, vocab 512 unshared, seq 4.
  const std::vector<int32_t> header_ = {8, 12, 2, 2, 1, -512, 4};
};

TEST_F(Llama2cConvertTest, WeightsLandUnderHuggingFaceNames) {
  const std::string out = dir_ / "a/b/out";  // parents are created
  const auto h = mola::io::convert_llama2c(dir_ / "m.bin", tokenizer_, out);
  EXPECT_FALSE(h.shared_classifier);
  const auto t = mola::io::load_safetensors(out + "/model.safetensors");
  EXPECT_EQ(t.size(), 2u + 1u + 2u * 9u);  // embed, norm, lm_head, 9 per layer
  const int64_t dim = 8, hidden = 12, hs = 4, L = 2, kv_dim = 4, vocab = 512;
  // File offsets in run.c's order.
  const int64_t embed = 0, rms_att = embed + vocab * dim, wq = rms_att + L * dim, wk = wq + L * dim * dim,
                wv = wk + L * kv_dim * dim, wo = wv + L * kv_dim * dim, rms_ffn = wo + L * dim * dim,
                w1 = rms_ffn + L * dim, w2 = w1 + L * hidden * dim, w3 = w2 + L * dim * hidden,
                final_norm = w3 + L * hidden * dim, wcls = final_norm + dim + 4 * hs;
  auto at = [&](const std::string& name, int64_t r, int64_t c) {
    return static_cast<int64_t>(t.at(name).index({r, c}).item<float>());
  };
  EXPECT_EQ(at("model.embed_tokens.weight", 3, 5), embed + 3 * dim + 5);
  EXPECT_EQ(at("lm_head.weight", 511, 7), wcls + 511 * dim + 7);
  EXPECT_EQ(static_cast<int64_t>(t.at("model.norm.weight")[6].item<float>()), final_norm + 6);
  const std::string l1 = "model.layers.1.";
  EXPECT_EQ(static_cast<int64_t>(t.at(l1 + "input_layernorm.weight")[2].item<float>()), rms_att + dim + 2);
  EXPECT_EQ(static_cast<int64_t>(t.at(l1 + "post_attention_layernorm.weight")[2].item<float>()), rms_ffn + dim + 2);
  EXPECT_EQ(at(l1 + "self_attn.v_proj.weight", 3, 1), wv + kv_dim * dim + 3 * dim + 1);
  EXPECT_EQ(at(l1 + "self_attn.o_proj.weight", 7, 2), wo + dim * dim + 7 * dim + 2);
  EXPECT_EQ(at(l1 + "mlp.gate_proj.weight", 11, 3), w1 + hidden * dim + 11 * dim + 3);
  EXPECT_EQ(at(l1 + "mlp.down_proj.weight", 7, 11), w2 + dim * hidden + 7 * hidden + 11);
  EXPECT_EQ(at(l1 + "mlp.up_proj.weight", 0, 0), w3 + hidden * dim);
  // Rotate-half row r of a head takes the interleaved row 2j + half, where
  // r = half * hs/2 + j (transformers' convert_llama_weights_to_hf permute).
  for (int64_t r = 0; r < dim; ++r) {
    const int64_t head = r / hs, within = r % hs, half = within / (hs / 2), j = within % (hs / 2);
    const int64_t src = head * hs + 2 * j + half;
    EXPECT_EQ(at(l1 + "self_attn.q_proj.weight", r, 1), wq + dim * dim + src * dim + 1) << "q row " << r;
    if (r < kv_dim)
      EXPECT_EQ(at(l1 + "self_attn.k_proj.weight", r, 1), wk + kv_dim * dim + src * dim + 1) << "k row " << r;
  }

  std::ifstream cfg_in(out + "/config.json");
  const auto cfg = nlohmann::json::parse(cfg_in);
  EXPECT_EQ(cfg.at("tie_word_embeddings"), false);
  EXPECT_EQ(cfg.at("num_key_value_heads"), 1);
  EXPECT_EQ(cfg.at("max_position_embeddings"), 4);
  const auto parsed = mola::models::ModelConfig::from_json_file(out + "/config.json");
  EXPECT_EQ(parsed.head_dim, 4);
  EXPECT_EQ(parsed.rms_norm_eps, 1e-5);
  ASSERT_EQ(parsed.eos_token_ids.size(), 1u);
  EXPECT_EQ(parsed.eos_token_ids[0], 2);
  EXPECT_TRUE(exists(out + "/tokenizer.model"));
}

TEST_F(Llama2cConvertTest, BadTokenizersWriteNothing) {
  const std::string out = dir_ / "out";
  expect_error<Llama2cFileNotFoundError>([&] { mola::io::convert_llama2c(dir_ / "m.bin", dir_ / "no.model", out); },
                                         {dir_ / "no.model", "no such file"});
  std::ofstream(dir_ / "junk.model") << "not a protobuf";
  expect_error<Llama2cError>([&] { mola::io::convert_llama2c(dir_ / "m.bin", dir_ / "junk.model", out); },
                             {dir_ / "junk.model", "not a SentencePiece model"});
  const std::string llama = repo_root() + "/data/tokenizers/llama2/tokenizer.model";
  if (exists(llama))
    expect_error<Llama2cError>([&] { mola::io::convert_llama2c(dir_ / "m.bin", llama, out); },
                               {"has 32000 pieces", "vocab_size 512"});
  EXPECT_FALSE(exists(out));
}

TEST(Llama2cConfigsTest, ModelConfigsParse) {
  const std::string dir = repo_root() + "/configs/models/";
  if (!exists(dir)) GTEST_SKIP() << "no " << dir;
  using mola::models::ModelConfig;
  using mola::models::Activation;
  const auto llama = ModelConfig::from_json_file(dir + "llama-2-7b.json");
  EXPECT_EQ(llama.num_key_value_heads, 32);
  EXPECT_EQ(llama.head_dim, 128);
  EXPECT_FALSE(llama.tie_word_embeddings);
  EXPECT_EQ(llama.rope_theta, 10000.0);
  const auto mistral = ModelConfig::from_json_file(dir + "mistral-7b-v0.1.json");
  EXPECT_EQ(mistral.num_key_value_heads, 8);
  ASSERT_TRUE(mistral.sliding_window.has_value());
  EXPECT_EQ(*mistral.sliding_window, 4096);
  for (const char* g : {"gemma-2b.json", "gemma-7b.json"}) {
    const auto gemma = ModelConfig::from_json_file(dir + g);
    EXPECT_EQ(gemma.head_dim, 256) << g;
    EXPECT_TRUE(gemma.tie_word_embeddings) << g;
    EXPECT_EQ(gemma.activation, Activation::kGELUTanh) << g;
    EXPECT_EQ(gemma.bos_token_id.value_or(-1), 2) << g;
  }
  EXPECT_EQ(ModelConfig::from_json_file(dir + "gemma-2b.json").num_key_value_heads, 1);
  EXPECT_EQ(ModelConfig::from_json_file(dir + "gemma-7b.json").num_key_value_heads, 16);
  const auto tiny = ModelConfig::from_json_file(dir + "tiny.json");
  EXPECT_EQ(tiny.hidden_size, 64);
  EXPECT_EQ(tiny.num_key_value_heads, 4);
  EXPECT_TRUE(tiny.tie_word_embeddings);
}

}  // namespace
