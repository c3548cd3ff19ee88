// load_rows: JSON Lines task files (data/README.md) into instruction rows in
// the authors' multiple-choice format (docs/design.md, Fidelity to the papers and the authors' code, their ScienceQA
// "CQM-A" format):
//   instruction  "Context: {context}\nQuestion: {question}\nOptions: (A) {c0} (B) {c1} ...\n"
//   input        ""
//   output       "Answer: The answer is {L}."
//   answer       L;  options: the option letters in order
// with runs of spaces in the instruction collapsed to one (the authors'
// text.replace("  ", " ") is a single pass that leaves a double space where
// there were three; MRPC, RTE and CommonsenseQA have such runs).
//
// The authors published this preparation for ScienceQA only. The other five
// tasks use these wordings, mola's own:
//   scienceqa        the rows already carry instruction / output / answer
//                    (the authors' file); used as they are; options = the
//                    letters of `choices`.
//   commonsense_qa,  Context: N/A
//   openbookqa       Question: {question}
//                    Options: each choice with its own label, in order
//   mrpc             Context: Sentence 1: {sentence1} Sentence 2: {sentence2}
//                    Question: Do the two sentences have the same meaning?
//                    Options: (A) yes (B) no;  A when label == 1 (equivalent)
//   rte              Context: Premise: {sentence1} Hypothesis: {sentence2}
//                    Question: Does the premise entail the hypothesis?
//                    Options: (A) yes (B) no;  A when label == 0 (entailment)
//   cola             Context: Sentence: {sentence}
//                    Question: Is the sentence grammatically acceptable?
//                    Options: (A) yes (B) no;  A when label == 1 (acceptable)
// Task "instruction" takes instruction / input / output (answer, options
// optional) as they are; null instruction or input count as "" (the authors'
// instruction-stage rows have both null).
#include <sys/stat.h>

#include "detail/text.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "mola/data/dataset.h"

namespace mola::data {
namespace {

using nlohmann::json;

using mola::detail::cat;

// Where a row came from, for messages: "path:line".
struct Where {
  const std::string& path;
  size_t line;
  std::string str() const { return cat(path, ":", line); }
};

std::string collapse_spaces(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s)
    if (!(c == ' ' && !out.empty() && out.back() == ' ')) out += c;
  return out;
}

// Every value load_rows accepts for `task`, the nearest to `word` first.
std::string valid_tasks_nearest_first(const std::string& word) {
  std::vector<std::string> names = task_names();
  names.insert(names.begin(), {"auto", "instruction"});
  std::string out;
  for (const auto& n : mola::detail::names_nearest_first(word, names)) out += (out.empty() ? "" : ", ") + n;
  return out;
}

bool known_task(const std::string& t) {
  const auto& names = task_names();
  return std::find(names.begin(), names.end(), t) != names.end();
}

const json& field(const json& row, const char* key, const Where& w, const std::string& task) {
  const auto it = row.find(key);
  if (it == row.end())
    throw DataError(cat(w.str(), ": field \"", key, "\" is missing; a row of task \"", task, "\" needs it "
                        "(data/README.md gives each task's schema)"));
  return *it;
}

std::string str_field(const json& row, const char* key, const Where& w, const std::string& task,
                      bool null_is_empty = false) {
  const json& v = field(row, key, w, task);
  if (null_is_empty && v.is_null()) return "";
  if (!v.is_string())
    throw DataError(cat(w.str(), ": field \"", key, "\" must be a string, got ", v.type_name(), " ", v.dump()));
  return v.get<std::string>();
}

// GLUE labels: 0 or 1 only (unlabelled GLUE test rows carry -1).
int64_t binary_label(const json& row, const Where& w, const std::string& task) {
  const json& v = field(row, "label", w, task);
  if (!v.is_number_integer() || (v.get<int64_t>() != 0 && v.get<int64_t>() != 1))
    throw DataError(cat(w.str(), ": field \"label\" must be the integer 0 or 1, got ", v.type_name(), " ", v.dump(),
                        "; unlabelled rows (GLUE test files mark them -1) cannot be trained on or scored"));
  return v.get<int64_t>();
}

std::string letter(size_t i) { return std::string(1, static_cast<char>('A' + i)); }

// The options as letters A, B, ... for `n` choices (ScienceQA's `choices`).
std::vector<std::string> letters(size_t n, const Where& w, const char* key) {
  if (n == 0 || n > 26)
    throw DataError(cat(w.str(), ": field \"", key, "\" has ", n, " choices; give between 1 and 26"));
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(letter(i));
  return out;
}

void check_answer(Row& r, const Where& w) {
  if (r.answer.empty() || r.options.empty()) return;
  if (std::find(r.options.begin(), r.options.end(), r.answer) == r.options.end()) {
    std::string opts;
    for (const auto& o : r.options) opts += (opts.empty() ? "" : ", ") + o;
    throw DataError(cat(w.str(), ": field \"answer\" is \"", r.answer, "\", which is not one of the options (", opts,
                        ")"));
  }
}

// The authors' CQM-A instruction and output (docs/design.md, Fidelity to the papers and the authors' code).
void set_cqm(Row& r, const std::string& context, const std::string& question,
             const std::vector<std::pair<std::string, std::string>>& choices, const std::string& answer) {
  std::string opts;
  for (const auto& [label, text] : choices) {
    opts += (opts.empty() ? "(" : " (") + label + ") " + text;
    r.options.push_back(label);
  }
  r.instruction = collapse_spaces("Context: " + context + "\nQuestion: " + question + "\nOptions: " + opts + "\n");
  r.input = "";
  r.answer = answer;
  r.output = "Answer: The answer is " + answer + ".";
}

Row convert_instruction(const json& j, const Where& w, const std::string& task) {
  Row r;
  r.instruction = str_field(j, "instruction", w, task, /*null_is_empty=*/true);
  r.input = j.contains("input") ? str_field(j, "input", w, task, true) : "";
  r.output = str_field(j, "output", w, task);
  if (j.contains("answer") && !j["answer"].is_null()) r.answer = str_field(j, "answer", w, task);
  if (j.contains("options")) {
    const json& o = j["options"];
    if (!o.is_array() || !std::all_of(o.begin(), o.end(), [](const json& x) { return x.is_string(); }))
      throw DataError(cat(w.str(), ": field \"options\" must be a list of option letters (strings), got ", o.dump()));
    for (const auto& x : o) r.options.push_back(x.get<std::string>());
  } else if (j.contains("choices") && j["choices"].is_array()) {
    r.options = letters(j["choices"].size(), w, "choices");
  }
  check_answer(r, w);
  return r;
}

Row convert_scienceqa(const json& j, const Where& w) {
  Row r = convert_instruction(j, w, "scienceqa");
  const json& choices = field(j, "choices", w, "scienceqa");
  if (!choices.is_array())
    throw DataError(cat(w.str(), ": field \"choices\" must be a list of strings, got ", choices.type_name()));
  r.options = letters(choices.size(), w, "choices");
  r.answer = str_field(j, "answer", w, "scienceqa");
  check_answer(r, w);
  return r;
}

Row convert_multiple_choice(const json& j, const Where& w, const std::string& task) {
  const std::string question = str_field(j, "question", w, task);
  const json& cj = field(j, "choices", w, task);
  if (!cj.is_array() || cj.empty())
    throw DataError(cat(w.str(), ": field \"choices\" must be a non-empty list of {\"label\", \"text\"} objects, got ",
                        cj.dump()));
  std::vector<std::pair<std::string, std::string>> choices;
  for (size_t i = 0; i < cj.size(); ++i) {
    const json& c = cj[i];
    if (!c.is_object() || !c.contains("label") || !c.contains("text") || !c["label"].is_string() ||
        !c["text"].is_string())
      throw DataError(cat(w.str(), ": field \"choices\"[", i, "] must be {\"label\": string, \"text\": string}, got ",
                          c.dump()));
    choices.emplace_back(c["label"].get<std::string>(), c["text"].get<std::string>());
  }
  Row r;
  set_cqm(r, "N/A", question, choices, str_field(j, "answer", w, task));
  check_answer(r, w);
  return r;
}

Row convert_glue(const json& j, const Where& w, const std::string& task) {
  const std::vector<std::pair<std::string, std::string>> yes_no = {{"A", "yes"}, {"B", "no"}};
  Row r;
  if (task == "cola") {
    const std::string s = str_field(j, "sentence", w, task);
    set_cqm(r, "Sentence: " + s, "Is the sentence grammatically acceptable?", yes_no,
            binary_label(j, w, task) == 1 ? "A" : "B");
    return r;
  }
  const std::string s1 = str_field(j, "sentence1", w, task), s2 = str_field(j, "sentence2", w, task);
  const int64_t label = binary_label(j, w, task);
  if (task == "mrpc")
    set_cqm(r, "Sentence 1: " + s1 + " Sentence 2: " + s2, "Do the two sentences have the same meaning?", yes_no,
            label == 1 ? "A" : "B");
  else  // rte: GLUE's 0 is entailment
    set_cqm(r, "Premise: " + s1 + " Hypothesis: " + s2, "Does the premise entail the hypothesis?", yes_no,
            label == 0 ? "A" : "B");
  return r;
}

// The task of one row under `requested` ("auto" looks at the row).
std::string row_task(const json& j, const std::string& requested, const Where& w) {
  const auto t = j.find("task");
  const bool named = t != j.end() && t->is_string() && known_task(t->get<std::string>());
  if (requested != "auto") {
    // The GLUE files share one schema: an MRPC file read as RTE would
    // silently flip every label's meaning.
    if (named && requested != "instruction" && requested != "scienceqa" && t->get<std::string>() != requested)
      throw DataError(cat(w.str(), ": the row says \"task\": \"", t->get<std::string>(), "\" but load_rows was asked "
                          "for task \"", requested, "\"; pass task=\"auto\" or the row's own task"));
    return requested;
  }
  if (named) return t->get<std::string>();
  if (j.contains("instruction") || j.contains("output")) {
    const auto c = j.find("choices");
    return c != j.end() && c->is_array() && j.contains("answer") ? "scienceqa" : "instruction";
  }
  if (t != j.end() && t->is_string())
    throw DataError(cat(w.str(), ": unknown task \"", t->get<std::string>(), "\" in field \"task\" and no instruction "
                        "field; valid tasks, nearest first: ", valid_tasks_nearest_first(t->get<std::string>())));
  throw DataError(cat(w.str(), ": cannot tell this row's task: it has neither a \"task\" field naming one of ",
                      valid_tasks_nearest_first(""), " nor instruction/output fields; pass task= to load_rows"));
}

std::string file_stem(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  std::string stem = path.substr(slash == std::string::npos ? 0 : slash + 1);
  const size_t dot = stem.find('.');
  return dot == std::string::npos ? stem : stem.substr(0, dot);
}

}  // namespace

const std::vector<std::string>& task_names() {
  static const std::vector<std::string> names = {"scienceqa", "commonsense_qa", "openbookqa", "mrpc", "cola", "rte"};
  return names;
}

std::vector<Row> load_rows(const std::string& path, const std::string& task) {
  if (task != "auto" && task != "instruction" && !known_task(task))
    throw DataError(cat("load_rows(", path, "): unknown task \"", task, "\"; valid tasks, nearest first: ",
                        valid_tasks_nearest_first(task)));
  struct stat st {};
  std::ifstream in(path, std::ios::binary);
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode) || !in)
    throw DataFileNotFoundError(cat("load_rows: data file '", path, "' not found; give a JSON Lines file such as "
                                    "data/tasks/scienceqa/train.jsonl (paths are relative to the working directory)"));
  std::vector<Row> rows;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (n == 1 && line.compare(0, 3, "\xEF\xBB\xBF") == 0) line.erase(0, 3);  // UTF-8 byte order mark
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;  // blank lines carry no row
    const Where w{path, n};
    json j;
    try {
      j = json::parse(line);
    } catch (const json::parse_error& e) {
      // e.what(): "[json.exception.parse_error.101] parse error at line 1, column 9: ..."
      std::string why = e.what();
      const size_t at = why.find("column");
      throw DataError(cat(w.str(), ": malformed JSON (", at == std::string::npos ? why : why.substr(at),
                          "); each line of a JSON Lines file must be one complete JSON object"));
    } catch (const json::out_of_range& e) {  // a number past double's range, such as 1e999
      throw DataError(cat(w.str(), ": a number out of range (", e.what(), "); write it within +-1.7e308"));
    }
    if (!j.is_object())
      throw DataError(cat(w.str(), ": expected a JSON object, got a JSON ", j.type_name(),
                          "; each line of a JSON Lines file must be one object"));
    const std::string t = row_task(j, task, w);
    Row r = t == "instruction"                              ? convert_instruction(j, w, t)
            : t == "scienceqa"                              ? convert_scienceqa(j, w)
            : t == "commonsense_qa" || t == "openbookqa"    ? convert_multiple_choice(j, w, t)
                                                            : convert_glue(j, w, t);
    const auto id = j.find("id");
    if (id != j.end() && id->is_string()) r.id = id->get<std::string>();
    else if (id != j.end() && id->is_number_integer()) r.id = std::to_string(id->get<int64_t>());
    // Rows without an id (ScienceQA's file) get <task>-<file stem>-<row>,
    // the bundled GLUE files' scheme.
    else r.id = cat(t == "instruction" ? "" : t + "-", file_stem(path), "-", rows.size());
    rows.push_back(std::move(r));
  }
  if (in.bad()) throw DataError(cat(path, ": read error after ", rows.size(), " rows"));
  if (rows.empty())
    throw DataError(cat(path, ": no rows (the file is empty or blank); a data file needs one JSON object per line"));
  return rows;
}

}  // namespace mola::data
