// mola/data/dataset.h: instruction data (docs/recipes.md, docs/design.md, Fidelity to the papers and the authors' code).
// Rows come from JSON Lines files: instruction / input / output (and answer)
// as the authors' data, or one of the bundled task schemas (data/README.md)
// converted to the authors' format ("Context: / Question: / Options: (A) ..."
// and "Answer: The answer is X."). A PromptTemplate (alpaca.json, or raw)
// turns a row into text; tokenize_row turns it into input_ids and labels
// exactly as the authors' generate_and_tokenize_prompt.
#pragma once

#include <mola/data/tokenizer.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mola::data {

// One instruction row. answer: the gold option letter for multiple-choice and
// classification tasks (empty for free text); options: the option letters the
// row offers, in order ("A", "B", ...), for scoring by log-likelihood.
struct Row {
  std::string id;
  std::string instruction;
  std::string input;
  std::string output;
  std::string answer;
  std::vector<std::string> options;
};

// A prompt template, as the authors' templates/alpaca.json: prompt_input has
// {instruction} and {input}, prompt_no_input has {instruction};
// response_split marks where the model's answer starts.
struct PromptTemplate {
  std::string name;
  std::string prompt_input;
  std::string prompt_no_input;
  std::string response_split;

  // Reads a template JSON file; errors name the file and the missing key.
  static PromptTemplate from_json_file(const std::string& path);
  // The "raw" template of the instruction stage: the instruction itself, no
  // framing (docs/design.md, Fidelity to the papers and the authors' code).
  static PromptTemplate raw();

  // The prompt for (instruction, input), followed by `output` (empty for the
  // prompt alone).
  std::string prompt(const std::string& instruction, const std::string& input,
                     const std::string& output = "") const;
  // The part of a generated text after response_split (all of it for raw),
  // trimmed.
  std::string response(const std::string& text) const;
};

// Reads a JSON Lines file of rows. task: "auto" (from each row's "task" field,
// else instruction/input/output), "instruction", or one of scienceqa,
// commonsense_qa, openbookqa, mrpc, cola, rte (wordings: src/data/tasks.cpp
// and data/README.md). Blank lines are skipped. Row.id is the row's "id", else
// "<task>-<file stem>-<index>" ("<file stem>-<index>" for task
// "instruction"). A missing file is DataFileNotFoundError; other
// errors are DataError naming the file, the line and the problem (an empty
// file, a malformed line, a missing or ill-typed field, an unknown task with
// the valid ones nearest first).
std::vector<Row> load_rows(const std::string& path, const std::string& task = "auto");

// The value of `field` in every row of a JSON Lines file, in load_rows'
// order (blank lines skipped): strings as they are, numbers written out. For
// splitting a task by a column, e.g. ScienceQA's "topic" for the continual-
// learning sequence (docs/recipes.md). A row without the field, or with another
// type, is a DataError naming the file, the line and the field.
std::vector<std::string> load_field(const std::string& path, const std::string& field);

// The task names load_rows converts.
const std::vector<std::string>& task_names();

struct DataOptions {
  int64_t cutoff_len = 256;     // tokens; longer sequences are truncated
  bool train_on_inputs = true;  // false: prompt tokens get label -100
  bool add_eos_token = true;    // EOS appended when the text was not cut
};

// A tokenised training example; labels are input_ids with -100 where no loss
// is taken.
struct Example {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;
};

// The authors' generate_and_tokenize_prompt (alpaca-lora): tokenise
// prompt + output with BOS, cut at cutoff_len, add EOS when it fits and
// add_eos_token; with train_on_inputs false the tokens of the prompt alone
// (tokenised the same way, without EOS) get -100. As in the authors' code, a
// prompt that alone fills cutoff_len leaves its last token unmasked when
// add_eos_token (they subtract an EOS that did not fit). cutoff_len < 2 is a
// DataError.
Example tokenize_row(const Row& row, const PromptTemplate& tmpl, const Tokenizer& tok, const DataOptions& opts);
std::vector<Example> tokenize_rows(const std::vector<Row>& rows, const PromptTemplate& tmpl, const Tokenizer& tok,
                                   const DataOptions& opts);

}  // namespace mola::data
