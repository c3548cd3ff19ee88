// PromptTemplate and tokenize_row: the authors' prompt building and
// tokenisation (MoLA utils/prompter.py and mola_training.py, both copied from
// alpaca-lora), reproduced to the token. Reading and converting the task files
// lives in tasks.cpp.
//
// Template placeholders follow Python's str.format, which the authors call:
// "{instruction}" and "{input}" are replaced, "{{" and "}}" are literal braces,
// and anything else (another name, "{}", a format spec) is an error, where
// Python would raise KeyError or IndexError mid-training.
#include "mola/data/dataset.h"

#include "detail/text.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <sys/stat.h>

namespace mola::data {
namespace {

using nlohmann::json;

using mola::detail::cat;

// Python's str.format(**values) for templates that use only named fields.
// `where` names the template and the key in messages.
std::string format_named(const std::string& tmpl, const std::vector<std::pair<std::string, const std::string*>>& values,
                         const std::string& where) {
  std::string out;
  out.reserve(tmpl.size() + 256);
  for (size_t i = 0; i < tmpl.size(); ++i) {
    const char c = tmpl[i];
    if (c == '}') {
      if (i + 1 < tmpl.size() && tmpl[i + 1] == '}') {
        out += '}';
        ++i;
        continue;
      }
      throw DataError(cat(where, ": single '}' at offset ", i, "; write '}}' for a literal brace"));
    }
    if (c != '{') {
      out += c;
      continue;
    }
    if (i + 1 < tmpl.size() && tmpl[i + 1] == '{') {
      out += '{';
      ++i;
      continue;
    }
    const size_t close = tmpl.find('}', i + 1);
    if (close == std::string::npos)
      throw DataError(cat(where, ": '{' at offset ", i, " is never closed; write '{{' for a literal brace"));
    const std::string name = tmpl.substr(i + 1, close - i - 1);
    const std::pair<std::string, const std::string*>* hit = nullptr;
    for (const auto& kv : values)
      if (kv.first == name) hit = &kv;
    if (hit == nullptr) {
      std::string allowed;
      for (const auto& kv : values) allowed += (allowed.empty() ? "{" : ", {") + kv.first + "}";
      throw DataError(cat(where, ": placeholder {", name, "} is not one this template may use (", allowed,
                          "); write '{{' and '}}' for literal braces"));
    }
    out += *hit->second;
    i = close;
  }
  return out;
}

// Python's str.strip() with no argument: Unicode whitespace at both ends
// (str.isspace), on UTF-8 text.
bool space_at(const std::string& s, size_t i, size_t* len) {
  const auto u = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = u(i);
  if (c == ' ' || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f)) return *len = 1, true;
  if (c == 0xc2 && i + 1 < s.size() && (u(i + 1) == 0x85 || u(i + 1) == 0xa0)) return *len = 2, true;
  if (i + 2 >= s.size()) return false;
  const unsigned b1 = u(i + 1), b2 = u(i + 2);
  const bool hit = (c == 0xe1 && b1 == 0x9a && b2 == 0x80) ||                               // U+1680
                   (c == 0xe2 && b1 == 0x80 && (b2 <= 0x8a || b2 == 0xa8 || b2 == 0xa9 || b2 == 0xaf)) ||
                   (c == 0xe2 && b1 == 0x81 && b2 == 0x9f) ||                                // U+205F
                   (c == 0xe3 && b1 == 0x80 && b2 == 0x80);                                  // U+3000
  if (hit) *len = 3;
  return hit;
}

std::string py_strip(const std::string& s) {
  size_t begin = 0, len = 0;
  while (begin < s.size() && space_at(s, begin, &len)) begin += len;
  size_t end = s.size();
  while (end > begin) {
    // Step back over one UTF-8 character (continuation bytes are 10xxxxxx).
    size_t start = end - 1;
    while (start > begin && (static_cast<unsigned char>(s[start]) & 0xc0) == 0x80) --start;
    if (!space_at(s, start, &len) || start + len != end) break;
    end = start;
  }
  return s.substr(begin, end - begin);
}

std::string template_where(const PromptTemplate& t, const char* key) {
  return cat("prompt template '", t.name.empty() ? "<unnamed>" : t.name, "', ", key);
}

// The authors' tokenize(): BOS + pieces cut at cutoff_len, EOS appended when
// add_eos, there is room, and the text does not already end in EOS.
std::vector<int64_t> tokenize_like_authors(const Tokenizer& tok, const std::string& text, int64_t cutoff_len,
                                           bool add_eos) {
  std::vector<int64_t> ids = tok.encode(text, /*add_bos=*/true, /*add_eos=*/false);
  if (static_cast<int64_t>(ids.size()) > cutoff_len) ids.resize(cutoff_len);
  if (add_eos && static_cast<int64_t>(ids.size()) < cutoff_len && (ids.empty() || ids.back() != tok.eos_id()))
    ids.push_back(tok.eos_id());
  return ids;
}

void check_options(const DataOptions& opts) {
  if (opts.cutoff_len < 2)
    throw DataError(cat("DataOptions.cutoff_len is ", opts.cutoff_len, ", but it must be >= 2 (BOS plus at least "
                        "one token of text); the authors use 256"));
}

}  // namespace

PromptTemplate PromptTemplate::from_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  struct stat st {};
  if (!in || ::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode))
    throw DataFileNotFoundError(cat("prompt template '", path, "' not found; give a template JSON file such as "
                                    "data/templates/alpaca.json, or use the raw template"));
  std::stringstream buf;
  buf << in.rdbuf();
  json j;
  try {
    j = json::parse(buf.str());
  } catch (const json::parse_error& e) {
    throw DataError(cat(path, ": not valid JSON (", e.what(), "); a template is one JSON object with "
                        "prompt_input, prompt_no_input and response_split"));
  } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
    throw DataError(cat(path, ": holds a number out of range (", e.what(), "); write it within +-1.7e308"));
  }
  if (!j.is_object())
    throw DataError(cat(path, ": a template must be a JSON object with prompt_input, prompt_no_input and "
                        "response_split; got a JSON ", j.type_name()));
  PromptTemplate t;
  // The name is the file's stem, as the authors name templates ("alpaca").
  const size_t slash = path.find_last_of('/');
  t.name = path.substr(slash == std::string::npos ? 0 : slash + 1);
  if (t.name.size() > 5 && t.name.compare(t.name.size() - 5, 5, ".json") == 0) t.name.resize(t.name.size() - 5);
  for (auto [key, field] : {std::pair<const char*, std::string*>{"prompt_input", &t.prompt_input},
                            {"prompt_no_input", &t.prompt_no_input},
                            {"response_split", &t.response_split}}) {
    if (!j.contains(key))
      throw DataError(cat(path, ": missing key \"", key, "\"; a template needs prompt_input (with {instruction} "
                          "and {input}), prompt_no_input (with {instruction}) and response_split"));
    if (!j[key].is_string())
      throw DataError(cat(path, ": key \"", key, "\" must be a string, got a JSON ", j[key].type_name()));
    *field = j[key].get<std::string>();
  }
  // Check the placeholders now, so a bad template fails here and names the
  // file, not at the first row.
  const std::string probe = "x";
  format_named(t.prompt_input, {{"instruction", &probe}, {"input", &probe}}, cat(path, ": key \"prompt_input\""));
  format_named(t.prompt_no_input, {{"instruction", &probe}}, cat(path, ": key \"prompt_no_input\""));
  return t;
}

PromptTemplate PromptTemplate::raw() {
  // The authors' instruction stage (templates/meta.json, Prompter.
  // generate_prompt_meta) trains on the text alone: their rows have an empty
  // instruction and the whole text as output. An input, when a row has one,
  // follows the instruction on its own line, as their question and response.
  PromptTemplate t;
  t.name = "raw";
  t.prompt_input = "{instruction}\n{input}";
  t.prompt_no_input = "{instruction}";
  t.response_split = "";
  return t;
}

std::string PromptTemplate::prompt(const std::string& instruction, const std::string& input,
                                   const std::string& output) const {
  // Prompter.generate_prompt: `if input:` picks the form, then `+ label`.
  std::string res = input.empty()
                        ? format_named(prompt_no_input, {{"instruction", &instruction}},
                                       template_where(*this, "prompt_no_input"))
                        : format_named(prompt_input, {{"instruction", &instruction}, {"input", &input}},
                                       template_where(*this, "prompt_input"));
  return res + output;
}

std::string PromptTemplate::response(const std::string& text) const {
  if (response_split.empty()) return py_strip(text);
  // Prompter.get_response: text.split(response_split)[1].strip(), the part
  // between the first and the second marker. Python raises IndexError when
  // the marker is absent; a generation without it has no answer, so "".
  const size_t first = text.find(response_split);
  if (first == std::string::npos) return "";
  const size_t begin = first + response_split.size();
  const size_t second = text.find(response_split, begin);
  return py_strip(text.substr(begin, second == std::string::npos ? std::string::npos : second - begin));
}

Example tokenize_row(const Row& row, const PromptTemplate& tmpl, const Tokenizer& tok, const DataOptions& opts) {
  check_options(opts);
  // generate_and_tokenize_prompt (mola_training.py). The authors call
  // tokenize(full_prompt) with its default add_eos_token=True, so their flag
  // only moves the mask; mola applies it to the full text as well (docs/design.md
  // 8). With the authors' setting, True, the two are the same.
  Example ex;
  ex.input_ids = tokenize_like_authors(tok, tmpl.prompt(row.instruction, row.input, row.output), opts.cutoff_len,
                                       opts.add_eos_token);
  ex.labels = ex.input_ids;
  if (!opts.train_on_inputs) {
    // The prompt alone, tokenised with the same add_eos_token, then one less
    // when add_eos_token. This is "without EOS" except when the prompt alone
    // fills cutoff_len: no EOS fits, yet one is still subtracted, so the last
    // prompt token keeps its label, exactly as in the authors' code.
    const std::vector<int64_t> user =
        tokenize_like_authors(tok, tmpl.prompt(row.instruction, row.input), opts.cutoff_len, opts.add_eos_token);
    int64_t user_len = static_cast<int64_t>(user.size()) - (opts.add_eos_token ? 1 : 0);
    // Python's [-100] * n + labels[n:] would grow the list past input_ids
    // if the prompt alone had more tokens than prompt + output (a template
    // whose last piece merges with the output); labels stay aligned here.
    user_len = std::min<int64_t>(user_len, static_cast<int64_t>(ex.labels.size()));
    std::fill(ex.labels.begin(), ex.labels.begin() + user_len, int64_t{-100});
  }
  return ex;
}

std::vector<Example> tokenize_rows(const std::vector<Row>& rows, const PromptTemplate& tmpl, const Tokenizer& tok,
                                   const DataOptions& opts) {
  check_options(opts);
  std::vector<Example> out;
  out.reserve(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    try {
      out.push_back(tokenize_row(rows[i], tmpl, tok, opts));
    } catch (const DataError& e) {
      // Name the row: a bad template or option fails on the first one.
      throw DataError(cat("row ", i, rows[i].id.empty() ? "" : cat(" (id ", rows[i].id, ")"), ": ", e.what()));
    }
  }
  return out;
}

}  // namespace mola::data
