// mola/train/evaluate.h: accuracy on multiple-choice and classification rows
// (docs/recipes.md), computed two ways and reported side by side:
//   generate  the authors' protocol (docs/design.md, Fidelity to the papers and the authors' code): greedy generation in
//             left-padded batches, the text after the template's
//             response_split matched with `The answer is ([A-Z]).`, exactly
//             one match required ("FAILED", counted wrong, otherwise);
//   loglik    the summed log-probability of "Answer: The answer is L." after
//             the prompt for every option letter L; the best one is the
//             prediction. It never fails to parse, so it separates what the
//             model knows from whether it keeps the answer format.
// Plus the majority-class baseline of the rows, to read both against.
//
// The options are a recipe's "eval" section (docs/recipes.md); EvalResult's JSON
// is eval.json, its predictions eval_predictions.jsonl.
#pragma once

#include <mola/config.h>
#include <mola/data/dataset.h>
#include <mola/data/tokenizer.h>
#include <mola/models/decoder.h>
#include <mola/train/eval_options.h>

#include <cstdint>
#include <optional>
#include <cstdio>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace mola::train {

// Python's re.findall(r"The answer is ([A-Z]).", response) with exactly one
// match required (the authors' evaluation): the letter, or none ("FAILED").
// The final "." is any character but a newline, as Python's; matches do not
// overlap, so "The answer is A.The answer is B." is two matches (none).
std::optional<std::string> parse_answer(const std::string& response);

// The share of the most frequent gold answer (ties: the letter that sorts
// first), in percent: the accuracy of always answering it.
struct MajorityBaseline {
  std::string answer;
  int64_t count = 0;
  double accuracy = 0.0;
};
// Throws std::invalid_argument for no rows or a row without an answer.
MajorityBaseline majority_baseline(const std::vector<data::Row>& rows);

// What evaluate found for one row.
struct ExamplePrediction {
  std::string id, gold;
  // generate: the response (text after response_split) and its parse (none = FAILED).
  std::string response;
  std::optional<std::string> parsed;
  // loglik: the options, their summed log-probabilities (nats) and the best one.
  std::vector<std::string> options;
  std::vector<double> option_scores;
  std::string loglik_choice;

  // {"id", "gold", and per method run: "response", "parsed" (null = FAILED),
  // "generate_correct"; "options", "option_scores", "loglik_choice",
  // "loglik_correct"}: one line of eval_predictions.jsonl.
  nlohmann::json to_json(const std::vector<std::string>& methods) const;
};

struct EvalResult {
  std::vector<std::string> methods;  // the methods run, as in the options
  int64_t n = 0;                     // rows evaluated
  // generate (when run): correct parses, FAILED parses, accuracy in percent.
  int64_t generate_correct = 0, generate_failed = 0;
  double generate_accuracy = 0.0;
  // loglik (when run): correct choices, accuracy in percent.
  int64_t loglik_correct = 0;
  double loglik_accuracy = 0.0;
  MajorityBaseline majority;
  std::vector<ExamplePrediction> predictions;  // one per row, in order

  // eval.json: {"n", "majority_answer", "majority_accuracy", and per method
  // run "generate_accuracy", "generate_correct", "generate_failed" /
  // "loglik_accuracy", "loglik_correct"}; flat, so it merges into a metrics line.
  nlohmann::json to_json() const;
  // eval_predictions.jsonl: one ExamplePrediction JSON object per line.
  std::string predictions_jsonl() const;
};

// Writes eval.json and eval_predictions.jsonl into `dir` (which must exist);
// throws std::runtime_error naming the file when it cannot be written.
void write_eval_files(const EvalResult& result, const std::string& dir);

// Evaluates `model` on `rows` (the first options.max_examples when set):
//   generate: prompt = tmpl.prompt(instruction, input) encoded with BOS,
//             batches of batch_size rows padded on the left with tok.pad_id(),
//             greedy CausalLM::generate of max_new_tokens, each row cut at its
//             first EOS (the tokenizer's or the config's); response =
//             tmpl.response(decode(prompt + new tokens)) as the authors'
//             Prompter.get_response (decode(new tokens) for a template without
//             response_split, e.g. raw); prediction = parse_answer(response).
//   loglik:   for every option letter L, prompt + "Answer: The answer is L."
//             is tokenised as one text and only the tokens past the prompt's
//             are scored (the longest common prefix of the two tokenisations,
//             so a SentencePiece merge across the boundary is scored too);
//             prediction = the option with the highest sum (ties: the first).
//             Sequences are scored in right-padded batches of batch_size.
// The model runs in eval mode without gradients and gets its training mode
// back afterwards. A pass that takes more than a few seconds reports its
// progress on `progress` (nullptr: silent). Throws ConfigError for bad
// options and std::invalid_argument for an empty row set, a row without an
// answer, or (loglik) a row without options or whose answer is not among them.
EvalResult evaluate(models::CausalLMImpl& model, const data::Tokenizer& tok, const data::PromptTemplate& tmpl,
                    const std::vector<data::Row>& rows, const EvalOptions& options = {},
                    std::FILE* progress = stderr);

}  // namespace mola::train
