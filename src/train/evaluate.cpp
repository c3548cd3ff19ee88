// mola/train/evaluate.h: the answer regex, EvalOptions' strict JSON, the
// majority baseline, and evaluate's two scorers (generation with parsing,
// option log-likelihood) over batches of rows.
#include <mola/train/evaluate.h>

#include "detail/text.h"
#include "train/progress.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>

namespace mola::train {
namespace {

using mola::detail::cat;

template <class... Parts>
void require(bool ok, const Parts&... parts) {
  mola::detail::require(ok, "evaluate: ", parts...);
}

using mola::detail::join;

std::string row_name(const std::vector<data::Row>& rows, size_t i) {
  return rows[i].id.empty() ? cat("row ", i) : cat("row ", i, " (id \"", rows[i].id, "\")");
}

// The continuation scored for option `letter`: the authors' output format.
std::string continuation(const std::string& letter) { return "Answer: The answer is " + letter + "."; }

double percent(int64_t k, int64_t n) { return n == 0 ? 0.0 : 100.0 * static_cast<double>(k) / static_cast<double>(n); }

// ---- generate ---------------------------------------------------------------------

void score_by_generation(models::CausalLMImpl& model, const data::Tokenizer& tok, const data::PromptTemplate& tmpl,
                         const std::vector<data::Row>& rows, const EvalOptions& opts, EvalResult& result,
                         std::FILE* stream) {
  detail::PassProgress progress("mola: evaluating by generation", static_cast<int64_t>(rows.size()), stream);
  const at::Device device = model.model->embed_tokens->weight.device();
  std::set<int64_t> stop(model.config().eos_token_ids.begin(), model.config().eos_token_ids.end());
  stop.insert(tok.eos_id());
  models::GenerateOptions gen;
  gen.max_new_tokens = opts.max_new_tokens;
  const int64_t pad = tok.pad_id();
  for (size_t begin = 0; begin < rows.size(); begin += static_cast<size_t>(opts.batch_size)) {
    const size_t end = std::min(rows.size(), begin + static_cast<size_t>(opts.batch_size));
    std::vector<std::vector<int64_t>> prompts;
    size_t width = 0;
    for (size_t i = begin; i < end; ++i) {
      prompts.push_back(tok.encode(tmpl.prompt(rows[i].instruction, rows[i].input), /*add_bos=*/true));
      width = std::max(width, prompts.back().size());
    }
    const int64_t batch = static_cast<int64_t>(prompts.size());
    // Left padding, as the authors' tokenizer.padding_side = "left": every
    // row's continuation starts right after its own last prompt token.
    at::Tensor ids = at::full({batch, static_cast<int64_t>(width)}, pad, at::kLong);   // [batch, width]
    at::Tensor mask = at::zeros({batch, static_cast<int64_t>(width)}, at::kLong);     // [batch, width]
    for (int64_t b = 0; b < batch; ++b) {
      const auto& p = prompts[b];
      const int64_t offset = static_cast<int64_t>(width - p.size());
      ids[b].narrow(0, offset, static_cast<int64_t>(p.size()))
          .copy_(at::tensor(p, at::TensorOptions().dtype(at::kLong)));
      mask[b].narrow(0, offset, static_cast<int64_t>(p.size())).fill_(1);
    }
    const at::Tensor out = model.generate(ids.to(device), gen, mask.to(device)).to(at::kCPU);  // [batch, width + new]
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<int64_t> generated;
      const at::Tensor row = out[b].narrow(0, static_cast<int64_t>(width), out.size(1) - static_cast<int64_t>(width));
      const auto* data = row.data_ptr<int64_t>();
      for (int64_t t = 0; t < row.size(0) && stop.count(data[t]) == 0; ++t) generated.push_back(data[t]);
      // The authors decode the whole sequence and split at response_split
      // (Prompter.get_response); a template without one (raw) has no marker,
      // so only the new tokens are its response.
      std::vector<int64_t> text_ids;
      if (!tmpl.response_split.empty()) text_ids = prompts[b];
      text_ids.insert(text_ids.end(), generated.begin(), generated.end());
      ExamplePrediction& pred = result.predictions[begin + b];
      pred.response = tmpl.response(tok.decode(text_ids));
      pred.parsed = parse_answer(pred.response);
      if (!pred.parsed) ++result.generate_failed;
      else if (*pred.parsed == pred.gold) ++result.generate_correct;
    }
    progress.advance(batch);
  }
  result.generate_accuracy = percent(result.generate_correct, result.n);
}

// ---- loglik -----------------------------------------------------------------------

struct Scored {
  size_t row, option;
  std::vector<int64_t> ids;  // prompt + continuation, BOS first
  int64_t start;             // the first scored token
};

void score_by_loglik(models::CausalLMImpl& model, const data::Tokenizer& tok, const data::PromptTemplate& tmpl,
                     const std::vector<data::Row>& rows, const EvalOptions& opts, EvalResult& result,
                     std::FILE* stream) {
  const at::Device device = model.model->embed_tokens->weight.device();
  std::vector<Scored> seqs;
  for (size_t i = 0; i < rows.size(); ++i) {
    const std::vector<int64_t> prompt = tok.encode(tmpl.prompt(rows[i].instruction, rows[i].input), true);
    for (size_t o = 0; o < rows[i].options.size(); ++o) {
      Scored s{i, o, tok.encode(tmpl.prompt(rows[i].instruction, rows[i].input, continuation(rows[i].options[o])), true),
               0};
      // The tokens the prompt's own tokenisation shares with the whole text
      // are the prompt; a token merged across the boundary differs and so is
      // scored with the continuation. BOS (token 0) is never scored.
      const auto diverge = std::mismatch(prompt.begin(), prompt.end(), s.ids.begin(), s.ids.end());
      s.start = std::max<int64_t>(1, diverge.first - prompt.begin());
      require(s.start < static_cast<int64_t>(s.ids.size()), row_name(rows, i), ": option \"", rows[i].options[o],
              "\" adds no token after the prompt");
      seqs.push_back(std::move(s));
    }
  }
  detail::PassProgress progress("mola: evaluating by log-likelihood", static_cast<int64_t>(rows.size()), stream);
  for (size_t begin = 0; begin < seqs.size(); begin += static_cast<size_t>(opts.batch_size)) {
    const size_t end = std::min(seqs.size(), begin + static_cast<size_t>(opts.batch_size));
    // Rows whose last option is in this batch are done.
    int64_t rows_done = 0;
    for (size_t k = begin; k < end; ++k) rows_done += seqs[k].option + 1 == rows[seqs[k].row].options.size();
    size_t width = 0;
    for (size_t k = begin; k < end; ++k) width = std::max(width, seqs[k].ids.size());
    const int64_t batch = static_cast<int64_t>(end - begin);
    // Right padding: positions 0.. in every row, as an unpadded forward
    // (transformers' forward without position_ids), padding keys masked.
    at::Tensor ids = at::full({batch, static_cast<int64_t>(width)}, tok.pad_id(), at::kLong);  // [batch, width]
    at::Tensor mask = at::zeros({batch, static_cast<int64_t>(width)}, at::kLong);             // [batch, width]
    for (int64_t b = 0; b < batch; ++b) {
      const auto& s = seqs[begin + b].ids;
      ids[b].narrow(0, 0, static_cast<int64_t>(s.size())).copy_(at::tensor(s, at::TensorOptions().dtype(at::kLong)));
      mask[b].narrow(0, 0, static_cast<int64_t>(s.size())).fill_(1);
    }
    const at::Tensor logits = model.forward(ids.to(device), mask.to(device)).logits;  // [batch, width, vocab]
    for (int64_t b = 0; b < batch; ++b) {
      const Scored& s = seqs[begin + b];
      const int64_t len = static_cast<int64_t>(s.ids.size()), n = len - s.start;
      // Logits at t predict token t + 1; log-softmax in fp32 (bf16 logits
      // would round the per-token log-probabilities).
      const at::Tensor logp = logits[b].narrow(0, s.start - 1, n).to(at::kFloat).log_softmax(-1);  // [n, vocab]
      const at::Tensor target = ids[b].narrow(0, s.start, n).to(logits.device()).unsqueeze(1);    // [n, 1]
      const double score = logp.gather(1, target).sum().to(at::kDouble).item<double>();
      result.predictions[s.row].option_scores[s.option] = score;
    }
    progress.advance(rows_done);
  }
  progress.finish();
  for (size_t i = 0; i < rows.size(); ++i) {
    ExamplePrediction& pred = result.predictions[i];
    const auto best = std::max_element(pred.option_scores.begin(), pred.option_scores.end());  // first of ties
    pred.loglik_choice = pred.options[best - pred.option_scores.begin()];
    if (pred.loglik_choice == pred.gold) ++result.loglik_correct;
  }
  result.loglik_accuracy = percent(result.loglik_correct, result.n);
}

}  // namespace

// ---- parse_answer -------------------------------------------------------------------

std::optional<std::string> parse_answer(const std::string& response) {
  // "[^\n]" for Python's "." (any character but a newline; ECMAScript's "."
  // also refuses "\r"). std::regex sees bytes: a multi-byte character after
  // the letter matches by its first byte, and since the next match starts
  // with "T" the count of matches is Python's.
  static const std::regex pattern("The answer is ([A-Z])[^\n]");
  std::optional<std::string> found;
  int matches = 0;
  // sregex_iterator resumes after each match, as findall's non-overlapping scan.
  for (auto it = std::sregex_iterator(response.begin(), response.end(), pattern); it != std::sregex_iterator(); ++it) {
    if (++matches > 1) return std::nullopt;
    found = (*it)[1].str();
  }
  return found;
}

// ---- results ------------------------------------------------------------------------

MajorityBaseline majority_baseline(const std::vector<data::Row>& rows) {
  require(!rows.empty(), "no rows to evaluate; give a non-empty data file");
  std::map<std::string, int64_t> counts;  // sorted: ties go to the letter that sorts first
  for (size_t i = 0; i < rows.size(); ++i) {
    require(!rows[i].answer.empty(), row_name(rows, i), " has no answer; evaluation needs the gold option letter "
            "(\"answer\"), which the task schemas of data/README.md provide");
    ++counts[rows[i].answer];
  }
  MajorityBaseline m;
  for (const auto& [answer, count] : counts)
    if (count > m.count) m = {answer, count, 0.0};
  m.accuracy = percent(m.count, static_cast<int64_t>(rows.size()));
  return m;
}

nlohmann::json ExamplePrediction::to_json(const std::vector<std::string>& methods) const {
  nlohmann::json j{{"id", id}, {"gold", gold}};
  for (const auto& m : methods) {
    if (m == "generate") {
      j["response"] = response;
      j["parsed"] = parsed ? nlohmann::json(*parsed) : nlohmann::json(nullptr);
      j["generate_correct"] = parsed.has_value() && *parsed == gold;
    } else if (m == "loglik") {
      j["options"] = options;
      j["option_scores"] = option_scores;
      j["loglik_choice"] = loglik_choice;
      j["loglik_correct"] = loglik_choice == gold;
    }
  }
  return j;
}

nlohmann::json EvalResult::to_json() const {
  nlohmann::json j{{"n", n}, {"majority_answer", majority.answer}, {"majority_accuracy", majority.accuracy}};
  for (const auto& m : methods) {
    if (m == "generate") {
      j["generate_accuracy"] = generate_accuracy;
      j["generate_correct"] = generate_correct;
      j["generate_failed"] = generate_failed;
    } else if (m == "loglik") {
      j["loglik_accuracy"] = loglik_accuracy;
      j["loglik_correct"] = loglik_correct;
    }
  }
  return j;
}

std::string EvalResult::predictions_jsonl() const {
  std::string out;
  for (const auto& p : predictions) out += p.to_json(methods).dump() + "\n";
  return out;
}

void write_eval_files(const EvalResult& result, const std::string& dir) {
  for (const auto& [name, text] : {std::pair<std::string, std::string>{"eval.json", result.to_json().dump(2) + "\n"},
                                   {"eval_predictions.jsonl", result.predictions_jsonl()}}) {
    const std::string path = dir + "/" + name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    out.close();
    if (!out) throw std::runtime_error(cat(path, ": cannot write the evaluation results; check that ", dir,
                                           " exists and is writable"));
  }
}

// ---- evaluate -----------------------------------------------------------------------

EvalResult evaluate(models::CausalLMImpl& model, const data::Tokenizer& tok, const data::PromptTemplate& tmpl,
                    const std::vector<data::Row>& all_rows, const EvalOptions& opts, std::FILE* progress) {
  opts.validate();
  require(!all_rows.empty(), "no rows to evaluate; give a non-empty data file");
  const std::vector<data::Row> rows(
      all_rows.begin(),
      all_rows.begin() + static_cast<std::ptrdiff_t>(opts.max_examples > 0
                                                         ? std::min<size_t>(all_rows.size(), opts.max_examples)
                                                         : all_rows.size()));
  EvalResult result;
  result.methods = opts.methods;
  result.n = static_cast<int64_t>(rows.size());
  result.majority = majority_baseline(rows);  // also checks every row has an answer
  if (opts.uses("loglik")) {
    for (size_t i = 0; i < rows.size(); ++i) {
      const auto& r = rows[i];
      require(!r.options.empty(), row_name(rows, i), " has no options; scoring by log-likelihood needs the option "
              "letters (task data, data/README.md), or use methods [\"generate\"]");
      require(std::find(r.options.begin(), r.options.end(), r.answer) != r.options.end(), row_name(rows, i),
              ": the answer \"", r.answer, "\" is not one of its options (", join(r.options), ")");
    }
  }
  for (const auto& r : rows) {
    ExamplePrediction p;
    p.id = r.id;
    p.gold = r.answer;
    p.options = r.options;
    p.option_scores.assign(r.options.size(), 0.0);
    result.predictions.push_back(std::move(p));
  }

  const bool was_training = model.is_training();
  model.eval();
  at::NoGradGuard no_grad;
  try {
    if (opts.uses("generate")) score_by_generation(model, tok, tmpl, rows, opts, result, progress);
    if (opts.uses("loglik")) score_by_loglik(model, tok, tmpl, rows, opts, result, progress);
  } catch (...) {
    model.train(was_training);
    throw;
  }
  model.train(was_training);
  return result;
}

}  // namespace mola::train
