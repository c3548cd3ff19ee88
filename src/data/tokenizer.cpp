// mola::data::Tokenizer over the SentencePiece C++ library (docs/recipes.md).
//
// encode() reproduces what the authors tokenised with: transformers'
// LlamaTokenizer with its defaults (add_bos_token true, add_eos_token false,
// legacy true), which is SentencePiece's own Encode of the whole text with
// BOS prepended. The tests compare it with sentencepiece's Python package and
// with transformers on the bundled llama2 and mistral models.
#include "mola/data/tokenizer.h"

#include "detail/text.h"

#include <sentencepiece_processor.h>
#include <sys/stat.h>

#include <sstream>

namespace mola::data {
namespace {

using mola::detail::cat;

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::string file = path;
  if (is_dir(path)) file = path + (path.empty() || path.back() == '/' ? "" : "/") + "tokenizer.model";
  if (!is_file(file)) {
    throw DataFileNotFoundError(cat(
        "Tokenizer: no SentencePiece model at '", file, "'",
        file == path ? "" : " (the directory given has no tokenizer.model)",
        "; give the path of a tokenizer.model file, such as data/tokenizers/llama2/tokenizer.model or the one "
        "in a Hugging Face checkpoint directory"));
  }
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->Load(file);
  if (!status.ok()) {
    throw DataError(cat("Tokenizer: '", file, "' is not a SentencePiece model (", status.ToString(),
                        "); give the tokenizer.model that ships with the checkpoint (tokenizer.json alone, "
                        "the Hugging Face fast-tokenizer format, is not read)"));
  }
  // Without BOS and EOS ids the authors' framing (BOS first, EOS appended)
  // cannot be built; every llama, mistral and gemma model has both.
  if (sp->bos_id() < 0 || sp->eos_id() < 0) {
    throw DataError(cat("Tokenizer: '", file, "' has no ", sp->bos_id() < 0 ? "BOS" : "EOS",
                        " piece (bos_id ", sp->bos_id(), ", eos_id ", sp->eos_id(),
                        "); mola needs a model trained with both, as llama, mistral and gemma tokenizers are"));
  }
  Tokenizer tok;
  tok.sp_ = std::move(sp);
  tok.path_ = file;
  return tok;
}

std::vector<int64_t> Tokenizer::encode(const std::string& text, bool add_bos, bool add_eos) const {
  std::vector<int> pieces;
  const auto status = sp().Encode(text, &pieces);
  if (!status.ok()) throw DataError(cat("Tokenizer(", path_, "): encoding failed: ", status.ToString()));
  std::vector<int64_t> ids;
  ids.reserve(pieces.size() + 2);
  if (add_bos) ids.push_back(sp().bos_id());
  ids.insert(ids.end(), pieces.begin(), pieces.end());
  if (add_eos) ids.push_back(sp().eos_id());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  const int64_t n = vocab_size();
  const int64_t bos = bos_id(), eos = eos_id(), pad = pad_id();
  std::vector<int> kept;
  kept.reserve(ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids[i];
    if (id < 0 || id >= n)
      throw DataError(cat("Tokenizer(", path_, ").decode: id ", id, " at position ", i, " is outside [0, ", n,
                          "); the ids come from another tokenizer or model (vocab_size ", n, ")"));
    // pad is 0 (<unk>) for llama and mistral: left padding of a generated
    // batch must not decode to " ⁇ ".
    if (id == bos || id == eos || id == pad) continue;
    kept.push_back(static_cast<int>(id));
  }
  std::string text;
  const auto status = sp().Decode(kept, &text);
  if (!status.ok()) throw DataError(cat("Tokenizer(", path_, "): decoding failed: ", status.ToString()));
  return text;
}

const sentencepiece::SentencePieceProcessor& Tokenizer::sp() const {
  if (!sp_) throw std::logic_error("Tokenizer: this one was default-constructed and holds no model; use Tokenizer::from_file(path)");
  return *sp_;
}

int64_t Tokenizer::bos_id() const { return sp().bos_id(); }
int64_t Tokenizer::eos_id() const { return sp().eos_id(); }
int64_t Tokenizer::pad_id() const { return sp().pad_id() >= 0 ? sp().pad_id() : 0; }
int64_t Tokenizer::vocab_size() const { return sp().GetPieceSize(); }

}  // namespace mola::data
