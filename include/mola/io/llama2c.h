// mola/io/llama2c.h: converting a checkpoint of Karpathy's llama2.c (the
// "legacy", version-0 float32 .bin that run.c reads) into a Hugging Face llama
// checkpoint directory: config.json, model.safetensors, tokenizer.model.
//
// Why mola has this: llama2.c's TinyStories models (stories260K, 15M, 42M,
// 110M) are real pretrained llama decoders small enough to train on a CPU in
// minutes, so they are the bundled `tiny` base model (data/models/stories260K)
// that recipes, examples and tests run on. After conversion nothing in mola
// (or transformers) needs to know where a model came from.
//
// Kept apart from safetensors.h because it is a one-way import of a foreign
// format; the only output format is Hugging Face's.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace mola::io {

// A malformed checkpoint or tokenizer: too short, impossible sizes, a file
// size that does not match its header, a tokenizer of another vocabulary.
// Derived from std::invalid_argument so pybind11 raises ValueError. The
// message starts with the offending file's path.
class Llama2cError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// The checkpoint or the tokenizer does not exist (Python: FileNotFoundError).
class Llama2cFileNotFoundError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The 7-int32 header of a llama2.c checkpoint (run.c's Config), validated.
struct Llama2cHeader {
  int64_t dim = 0;         // hidden_size
  int64_t hidden_dim = 0;  // intermediate_size
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t vocab_size = 0;  // stored negated when the classifier is not shared
  int64_t seq_len = 0;     // max_position_embeddings
  bool shared_classifier = true;  // true: the output head is the embedding (tied)

  int64_t head_size() const { return dim / n_heads; }
  // The float32 values after the header, in run.c's memory_map_weights order.
  int64_t num_floats() const;
  // The byte count the whole file must have: 28 + 4 * num_floats().
  int64_t file_bytes() const;
};

// Reads and validates the header of `checkpoint_bin` and checks that the
// file's size is exactly what the header implies. Throws
// Llama2cFileNotFoundError or Llama2cError naming the file and the problem.
Llama2cHeader read_llama2c_header(const std::string& checkpoint_bin);

// The tokenizer to use when none is given: tokenizer.model beside
// `checkpoint_bin`, else tok512.model there (stories260K's name). Throws
// Llama2cFileNotFoundError naming both paths when neither exists.
std::string default_llama2c_tokenizer(const std::string& checkpoint_bin);

// Converts `checkpoint_bin` with its SentencePiece `tokenizer_model` into
// `out_dir` (created with its parents when missing):
//   config.json            LlamaForCausalLM, rms_norm_eps 1e-5, rope_theta 1e4,
//                          bos/eos ids from the tokenizer, float32
//   model.safetensors      Hugging Face names; q_proj/k_proj rows permuted
//                          from llama2.c's interleaved rotary pairs to
//                          transformers' rotate-half layout
//   generation_config.json bos/eos ids
//   tokenizer.model        a byte copy of `tokenizer_model`
// Every file is written to a temporary name and renamed into place, and
// config.json last, so a directory with config.json is complete. The
// tokenizer's piece count must equal the checkpoint's vocab_size. Returns the
// validated header. Throws Llama2cFileNotFoundError, Llama2cError, or
// std::runtime_error when out_dir cannot be written.
Llama2cHeader convert_llama2c(const std::string& checkpoint_bin, const std::string& tokenizer_model,
                              const std::string& out_dir);

}  // namespace mola::io
