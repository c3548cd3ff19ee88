// mola/data/tokenizer.h: the SentencePiece tokenizer that llama, mistral and
// gemma checkpoints ship as tokenizer.model (docs/recipes.md), through the
// SentencePiece C++ library. The processor is held behind a pointer so this
// header does not pull in sentencepiece_processor.h.
//
// The two error types of the data pipeline live here too (dataset.h includes
// this header): a missing file is DataFileNotFoundError (Python:
// FileNotFoundError), anything wrong inside a file or an argument is DataError
// (Python: ValueError).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace mola::data {

// A data, template or tokenizer file that does not exist. The message names
// the path and what to do.
class DataFileNotFoundError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A bad file content or argument: malformed JSON, a missing or ill-typed
// field, an unknown task, a file that is not a SentencePiece model, a bad
// cutoff_len. Derived from std::invalid_argument so that pybind11 raises it
// as ValueError. The message starts with the file (and line) where there is one.
class DataError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

class Tokenizer {
 public:
  // Loads a SentencePiece model file; a directory means its tokenizer.model
  // (a Hugging Face checkpoint directory). Throws DataFileNotFoundError naming
  // the path when it is missing, DataError when it is not a model.
  static Tokenizer from_file(const std::string& path);

  // Token ids of `text`, as transformers' LlamaTokenizer (legacy SentencePiece
  // behaviour) gives them: BOS first when add_bos, EOS last when add_eos.
  // The text is never parsed for special tokens: "<s>" in it is plain text.
  std::vector<int64_t> encode(const std::string& text, bool add_bos = true, bool add_eos = false) const;
  // The text of `ids`; BOS, EOS and pad ids are skipped. An id outside
  // [0, vocab_size) is a DataError naming it.
  std::string decode(const std::vector<int64_t>& ids) const;

  int64_t bos_id() const;
  int64_t eos_id() const;
  // The model's pad id when it has one, else 0 (the authors' pad id).
  int64_t pad_id() const;
  int64_t vocab_size() const;
  const std::string& path() const { return path_; }

 private:
  // The processor; a default-constructed Tokenizer throws std::logic_error.
  const sentencepiece::SentencePieceProcessor& sp() const;

  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
};

}  // namespace mola::data
