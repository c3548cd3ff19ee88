// llama2.c checkpoint -> Hugging Face llama directory (mola/io/llama2c.h).
//
// The format is run.c's: 7 little-endian int32 (dim, hidden_dim, n_layers,
// n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays in the order
// of run.c's memory_map_weights, each stacked over layers where per layer:
// token_embedding_table [vocab, dim], rms_att_weight [L, dim], wq [L, dim, dim],
// wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim], rms_ffn_weight
// [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim],
// rms_final_weight [dim], two unused RoPE tables [seq_len * head_size / 2]
// each, and wcls [vocab, dim] only when vocab_size is stored negated.
// Matrices are PyTorch Linear weights ([out, in]), as llama2.c's export.py
// wrote them, so they map onto Hugging Face's names one to one.
//
// POSIX file calls throughout, no <filesystem>: the PyPI libtorch exports
// broken std::filesystem symbols (pytorch/pytorch#133437), see safetensors.cpp.
#include "mola/io/llama2c.h"

#include "detail/text.h"

#include <fcntl.h>
#include <sentencepiece_processor.h>
#include <sys/stat.h>
#include <unistd.h>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <map>
#include <sstream>

#include "mola/io/safetensors.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "llama2.c checkpoints are little-endian; this reader copies the bytes as they are");

namespace mola::io {
namespace {

using mola::detail::cat;

constexpr int64_t kHeaderBytes = 7 * 4;
// export.py's version 1+ files start with this magic ("ak42" little-endian).
constexpr int32_t kVersionedMagic = 0x616b3432;

// Closes a file descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Opens `path` for reading and returns its size; a missing path or a
// directory is Llama2cFileNotFoundError, `what` says which input it is.
int64_t open_input(const std::string& path, const char* what, Fd& f) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw Llama2cFileNotFoundError(cat(path, ": no such file (", what, ")"));
  if (!S_ISREG(st.st_mode)) throw Llama2cFileNotFoundError(cat(path, ": not a regular file (", what, ")"));
  f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd < 0) throw Llama2cError(cat(path, ": cannot be opened (", std::strerror(errno), ")"));
  return static_cast<int64_t>(st.st_size);
}

// Reads exactly `n` bytes at `offset`; pread may return fewer at a time.
void read_exact(const Fd& f, const std::string& path, void* dst, int64_t n, int64_t offset) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::pread(f.fd, p, static_cast<size_t>(std::min<int64_t>(n, 1 << 30)), offset);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0)
      throw Llama2cError(cat(path, ": read failed at byte ", offset, " (",
                             got == 0 ? "unexpected end of file" : std::strerror(errno),
                             "); was the file truncated while converting?"));
    p += got;
    offset += got;
    n -= got;
  }
}

// Writes `bytes` to `path` through `path.tmp.<pid>`, fsync and rename, so a
// crash leaves the old file or the new one (as save_safetensors does).
void write_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = cat(path, ".tmp.", ::getpid());
  {
    Fd f;
    f.fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f.fd < 0) throw std::runtime_error(cat(tmp, ": cannot be created (", std::strerror(errno), ")"));
    size_t done = 0;
    while (done < bytes.size()) {
      const ssize_t n = ::write(f.fd, bytes.data() + done, bytes.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const std::string err = std::strerror(errno);
        ::unlink(tmp.c_str());
        throw std::runtime_error(cat(tmp, ": write failed (", err, ")"));
      }
      done += static_cast<size_t>(n);
    }
    if (::fsync(f.fd) != 0) {
      const std::string err = std::strerror(errno);
      ::unlink(tmp.c_str());
      throw std::runtime_error(cat(tmp, ": fsync failed (", err, ")"));
    }
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string err = std::strerror(errno);
    ::unlink(tmp.c_str());
    throw std::runtime_error(cat(path, ": cannot rename ", tmp, " into place (", err, ")"));
  }
}

// mkdir -p: creates `dir` and its missing parents.
void make_dirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST)
      throw std::runtime_error(cat(prefix, ": cannot create directory (", std::strerror(errno), ")"));
  }
  struct stat st {};
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw std::runtime_error(cat(dir, ": exists but is not a directory; give a directory for the converted model"));
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// transformers' convert_llama_weights_to_hf.py `permute`: llama2.c (like
// Meta's original code) rotates interleaved pairs (x0,x1),(x2,x3),... of each
// head, transformers rotates the halves (x_i, x_{i+hs/2}). Reordering the
// rows of q_proj and k_proj per head, pair element 0s first then 1s, makes
// the two rotations compute the same attention scores.
at::Tensor permute_rotary(const at::Tensor& w, int64_t heads, int64_t head_size) {
  const int64_t in = w.size(1);
  return w.view({heads, head_size / 2, 2, in})  // [heads, pairs, 2, in]
      .transpose(1, 2)                          // [heads, 2, pairs, in]
      .reshape({heads * head_size, in});
}

}  // namespace

int64_t Llama2cHeader::num_floats() const {
  const int64_t kv_dim = n_kv_heads * head_size();
  const int64_t per_layer = 2 * dim                 // rms_att, rms_ffn
                            + 2 * dim * dim          // wq, wo
                            + 2 * kv_dim * dim       // wk, wv
                            + 3 * dim * hidden_dim;  // w1, w2, w3
  return vocab_size * dim * (shared_classifier ? 1 : 2) + n_layers * per_layer + dim + seq_len * head_size();
}

int64_t Llama2cHeader::file_bytes() const { return kHeaderBytes + 4 * num_floats(); }

Llama2cHeader read_llama2c_header(const std::string& path) {
  Fd f;
  const int64_t size = open_input(path, "the llama2.c checkpoint .bin", f);
  if (size < kHeaderBytes)
    throw Llama2cError(cat(path, ": ", size, " bytes, shorter than the 28-byte llama2.c header (7 int32: dim, "
                                 "hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len); the file is "
                                 "truncated or not a llama2.c checkpoint"));
  int32_t raw[7];
  read_exact(f, path, raw, kHeaderBytes, 0);
  if (raw[0] == kVersionedMagic)
    throw Llama2cError(cat(path, ": starts with the magic \"ak42\" of a llama2.c export version ", raw[1],
                           "; only the legacy (version 0) float32 format that run.c reads is converted; re-export "
                           "with llama2.c's export.py --version 0"));
  const char* names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  for (int i = 0; i < 7; ++i) {
    // vocab_size is negated to mark an unshared classifier, but never zero.
    const bool bad = i == 5 ? raw[i] == 0 || raw[i] == INT32_MIN : raw[i] <= 0;
    if (bad)
      throw Llama2cError(cat(path, ": header field ", names[i], " is ", raw[i], "; every size must be positive",
                             i == 5 ? " (or negative for vocab_size, marking an unshared classifier)" : "",
                             "; the file is not a llama2.c checkpoint or its header is corrupt"));
  }
  Llama2cHeader h;
  h.dim = raw[0];
  h.hidden_dim = raw[1];
  h.n_layers = raw[2];
  h.n_heads = raw[3];
  h.n_kv_heads = raw[4];
  h.shared_classifier = raw[5] > 0;
  h.vocab_size = raw[5] > 0 ? raw[5] : -static_cast<int64_t>(raw[5]);
  h.seq_len = raw[6];
  const std::string sizes = cat("dim=", h.dim, ", hidden_dim=", h.hidden_dim, ", n_layers=", h.n_layers,
                                ", n_heads=", h.n_heads, ", n_kv_heads=", h.n_kv_heads, ", vocab_size=", raw[5],
                                ", seq_len=", h.seq_len);
  if (h.dim % h.n_heads != 0)
    throw Llama2cError(cat(path, ": n_heads (", h.n_heads, ") must divide dim (", h.dim, "); header: ", sizes));
  if (h.n_heads % h.n_kv_heads != 0)
    throw Llama2cError(cat(path, ": n_kv_heads (", h.n_kv_heads, ") must divide n_heads (", h.n_heads,
                           "): each key/value head serves a whole group of query heads; header: ", sizes));
  if (h.head_size() % 2 != 0)
    throw Llama2cError(cat(path, ": head size dim/n_heads (", h.head_size(),
                           ") must be even: the rotary embedding rotates pairs; header: ", sizes));
  // In 128 bits: a corrupt header of int32 sizes can imply more than 2^63 bytes.
  const __int128 kv = static_cast<__int128>(h.n_kv_heads) * h.head_size();
  const __int128 floats = static_cast<__int128>(h.vocab_size) * h.dim * (h.shared_classifier ? 1 : 2) +
                          static_cast<__int128>(h.n_layers) *
                              (2 * h.dim + 2 * static_cast<__int128>(h.dim) * h.dim + 2 * kv * h.dim +
                               3 * static_cast<__int128>(h.dim) * h.hidden_dim) +
                          h.dim + static_cast<__int128>(h.seq_len) * h.head_size();
  const __int128 expected = kHeaderBytes + 4 * floats;
  if (expected != size) {
    const bool huge = expected > static_cast<__int128>(INT64_MAX);
    throw Llama2cError(cat(path, ": the file has ", size, " bytes but its header (", sizes, ") implies ",
                           huge ? std::string("more than 2^63") : std::to_string(static_cast<int64_t>(expected)),
                           " bytes (28-byte header + float32 weights",
                           h.shared_classifier ? "" : " with an unshared classifier",
                           "); the file is truncated or padded, or is not a legacy float32 llama2.c checkpoint "
                           "(quantized and version 1+ exports are not read)"));
  }
  return h;
}

std::string default_llama2c_tokenizer(const std::string& checkpoint_bin) {
  const auto slash = checkpoint_bin.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : checkpoint_bin.substr(0, slash == 0 ? 1 : slash);
  const std::string sep = dir == "/" ? "" : "/";
  for (const char* name : {"tokenizer.model", "tok512.model"}) {
    const std::string candidate = dir + sep + name;
    if (exists(candidate)) return candidate;
  }
  throw Llama2cFileNotFoundError(cat(checkpoint_bin, ": no tokenizer given and neither ", dir, sep,
                                     "tokenizer.model nor ", dir, sep,
                                     "tok512.model exists; give the SentencePiece .model the checkpoint was "
                                     "trained with"));
}

Llama2cHeader convert_llama2c(const std::string& checkpoint_bin, const std::string& tokenizer_model,
                              const std::string& out_dir) {
  const Llama2cHeader h = read_llama2c_header(checkpoint_bin);

  // The tokenizer is checked before anything is written: a model with a
  // tokenizer of another vocabulary would load and then emit nonsense.
  std::string tokenizer_bytes;
  {
    Fd f;
    const int64_t size = open_input(tokenizer_model, "the SentencePiece tokenizer.model", f);
    tokenizer_bytes.resize(static_cast<size_t>(size));
    if (size > 0) read_exact(f, tokenizer_model, tokenizer_bytes.data(), size, 0);
  }
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.LoadFromSerializedProto(tokenizer_bytes);
  if (!status.ok())
    throw Llama2cError(cat(tokenizer_model, ": not a SentencePiece model (", status.ToString(),
                           "); give the tokenizer.model the checkpoint was trained with (llama2.c's tokN.model, "
                           "not the tokN.bin export)"));
  if (sp.GetPieceSize() != h.vocab_size)
    throw Llama2cError(cat(tokenizer_model, ": has ", sp.GetPieceSize(), " pieces but ", checkpoint_bin,
                           " has vocab_size ", h.vocab_size, "; give the tokenizer the checkpoint was trained with"));
  if (sp.bos_id() < 0 || sp.eos_id() < 0)
    throw Llama2cError(cat(tokenizer_model, ": has no ", sp.bos_id() < 0 ? "BOS" : "EOS",
                           " piece; llama models need both (<s> and </s>)"));

  if (exists(out_dir + "/model.safetensors.index.json"))
    throw std::runtime_error(cat(out_dir, ": already holds model.safetensors.index.json, which loaders would read "
                                          "instead of the converted model.safetensors; convert into an empty "
                                          "directory"));
  make_dirs(out_dir);

  Fd f;
  open_input(checkpoint_bin, "the llama2.c checkpoint .bin", f);
  at::Tensor data = at::empty({h.num_floats()}, at::kFloat);  // every weight, in file order
  read_exact(f, checkpoint_bin, data.data_ptr<float>(), 4 * h.num_floats(), kHeaderBytes);

  int64_t cursor = 0;
  // The next `numel` floats as a view of `shape`.
  auto take = [&](at::IntArrayRef shape) {
    int64_t numel = 1;
    for (int64_t s : shape) numel *= s;
    at::Tensor t = data.narrow(0, cursor, numel).view(shape);
    cursor += numel;
    return t;
  };
  const int64_t L = h.n_layers, dim = h.dim, hidden = h.hidden_dim, hs = h.head_size();
  const int64_t kv_dim = h.n_kv_heads * hs;
  const at::Tensor embed = take({h.vocab_size, dim});
  const at::Tensor rms_att = take({L, dim});
  const at::Tensor wq = take({L, dim, dim});
  const at::Tensor wk = take({L, kv_dim, dim});
  const at::Tensor wv = take({L, kv_dim, dim});
  const at::Tensor wo = take({L, dim, dim});
  const at::Tensor rms_ffn = take({L, dim});
  const at::Tensor w1 = take({L, hidden, dim});
  const at::Tensor w2 = take({L, dim, hidden});
  const at::Tensor w3 = take({L, hidden, dim});
  const at::Tensor rms_final = take({dim});
  cursor += h.seq_len * hs;  // freq_cis_real and freq_cis_imag: recomputed by every runtime
  std::map<std::string, at::Tensor> tensors;
  tensors["model.embed_tokens.weight"] = embed;
  tensors["model.norm.weight"] = rms_final;
  if (!h.shared_classifier) tensors["lm_head.weight"] = take({h.vocab_size, dim});
  for (int64_t i = 0; i < L; ++i) {
    const std::string p = cat("model.layers.", i, ".");
    tensors[p + "input_layernorm.weight"] = rms_att[i];
    tensors[p + "self_attn.q_proj.weight"] = permute_rotary(wq[i], h.n_heads, hs);
    tensors[p + "self_attn.k_proj.weight"] = permute_rotary(wk[i], h.n_kv_heads, hs);
    tensors[p + "self_attn.v_proj.weight"] = wv[i];
    tensors[p + "self_attn.o_proj.weight"] = wo[i];
    tensors[p + "post_attention_layernorm.weight"] = rms_ffn[i];
    tensors[p + "mlp.gate_proj.weight"] = w1[i];  // SwiGLU: w2(silu(w1 x) * w3 x)
    tensors[p + "mlp.up_proj.weight"] = w3[i];
    tensors[p + "mlp.down_proj.weight"] = w2[i];
  }
  if (cursor != h.num_floats())
    throw std::logic_error(cat("convert_llama2c: read ", cursor, " of ", h.num_floats(), " floats; the layout above "
                               "and Llama2cHeader::num_floats disagree"));

  // llama2.c's model.py: RMSNorm eps 1e-5, RoPE base 10000, SiLU-gated MLP.
  const nlohmann::json config = {
      {"architectures", nlohmann::json::array({"LlamaForCausalLM"})},
      {"model_type", "llama"},
      {"hidden_size", dim},
      {"intermediate_size", hidden},
      {"num_hidden_layers", L},
      {"num_attention_heads", h.n_heads},
      {"num_key_value_heads", h.n_kv_heads},
      {"vocab_size", h.vocab_size},
      {"max_position_embeddings", h.seq_len},
      {"rms_norm_eps", 1e-5},
      {"rope_theta", 10000.0},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", h.shared_classifier},
      {"bos_token_id", sp.bos_id()},
      {"eos_token_id", sp.eos_id()},
      {"torch_dtype", "float32"},
  };
  const nlohmann::json generation = {{"bos_token_id", sp.bos_id()}, {"eos_token_id", sp.eos_id()}};

  // config.json last: its presence is what marks the directory as a model.
  save_safetensors(out_dir + "/model.safetensors", tensors, {{"format", "pt"}});
  write_atomic(out_dir + "/tokenizer.model", tokenizer_bytes);
  write_atomic(out_dir + "/generation_config.json", generation.dump(2) + "\n");
  write_atomic(out_dir + "/config.json", config.dump(2) + "\n");
  return h;
}

}  // namespace mola::io
