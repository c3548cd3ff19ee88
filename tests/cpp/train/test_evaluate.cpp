// Tests of mola/train/evaluate.h: parse_answer on hand-made outputs (the
// expected values are Python's re.findall with exactly one match), EvalOptions'
// strict JSON, the majority baseline, and evaluate on a tiny random llama with
// the LLaMA-2 tokenizer: log-likelihood scores equal an unbatched computation,
// batching does not change generation, errors and the written files.
// The comparison with transformers is tests/python/train/test_evaluate.py.
#include <gtest/gtest.h>

#include <mola/train/evaluate.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/grad_mode.h>
#include <torch/utils.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <stdlib.h>
#include <unistd.h>

namespace {

using mola::train::EvalOptions;
using mola::train::parse_answer;
using nlohmann::json;

std::optional<std::string> none() { return std::nullopt; }

TEST(EvaluateParse, AuthorsRegexWithExactlyOneMatch) {
  EXPECT_EQ(parse_answer("The answer is B."), std::optional<std::string>("B"));
  EXPECT_EQ(parse_answer(""), none());
  EXPECT_EQ(parse_answer("I think it is B."), none());                          // zero matches
  EXPECT_EQ(parse_answer("The answer is A. The answer is B."), none());         // two matches
  EXPECT_EQ(parse_answer("The answer is A. The answer is A."), none());         // two, even equal letters
  EXPECT_EQ(parse_answer("The answer is A.The answer is A."), none());          // adjacent, not overlapping
  EXPECT_EQ(parse_answer("the answer is b."), none());                          // case-sensitive
  EXPECT_EQ(parse_answer("The answer is C"), none());                           // the regex needs one more char
  EXPECT_EQ(parse_answer("The answer is D!"), std::optional<std::string>("D"));  // "." is any char
  EXPECT_EQ(parse_answer("The answer is E "), std::optional<std::string>("E"));
  EXPECT_EQ(parse_answer("The answer is F\n"), none());   // Python's "." stops at a newline
  EXPECT_EQ(parse_answer("The answer is G\r"), std::optional<std::string>("G"));  // but not at "\r"
  EXPECT_EQ(parse_answer("The answer is AB."), std::optional<std::string>("A"));
  EXPECT_EQ(parse_answer("The answer is a."), none());
  EXPECT_EQ(parse_answer("The answer is \xc3\x84."), none());                      // not [A-Z]
  EXPECT_EQ(parse_answer("The answer is H\xe2\x82\xac then"), std::optional<std::string>("H"));  // multi-byte char
  EXPECT_EQ(parse_answer("Answer: The answer is C.\n\nExplanation: C is right."), std::optional<std::string>("C"));
  EXPECT_EQ(parse_answer("so The answer is D. and the answer is E."), std::optional<std::string>("D"));
}

TEST(EvaluateOptions, DefaultsJsonAndStrictKeys) {
  const EvalOptions d;
  EXPECT_EQ(d.batch_size, 8);
  EXPECT_EQ(d.max_new_tokens, 128);
  EXPECT_EQ(d.max_examples, 0);
  EXPECT_EQ(d.methods, (std::vector<std::string>{"generate", "loglik"}));
  const EvalOptions o = EvalOptions::from_json(json{{"batch_size", 4}, {"methods", "loglik"}});
  EXPECT_EQ(o.batch_size, 4);
  EXPECT_EQ(o.methods, std::vector<std::string>{"loglik"});
  EXPECT_EQ(EvalOptions::from_json(o.to_json()).to_json(), o.to_json());
  try {
    EvalOptions::from_json(json{{"max_new_token", 3}});
    FAIL() << "an unknown key must throw";
  } catch (const mola::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean \"max_new_tokens\""), std::string::npos) << e.what();
  }
  EXPECT_THROW(EvalOptions::from_json(json{{"batch_size", 0}}), mola::ConfigError);
  EXPECT_THROW(EvalOptions::from_json(json{{"batch_size", 2.5}}), mola::ConfigError);
  EXPECT_THROW(EvalOptions::from_json(json{{"max_examples", -1}}), mola::ConfigError);
  EXPECT_THROW(EvalOptions::from_json(json{{"methods", json::array()}}), mola::ConfigError);
  EXPECT_THROW(EvalOptions::from_json(json{{"methods", {"loglik", "loglik"}}}), mola::ConfigError);
  try {
    EvalOptions::from_json(json{{"methods", {"generat"}}});
    FAIL() << "an unknown method must throw";
  } catch (const mola::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("did you mean \"generate\""), std::string::npos) << e.what();
  }
}

mola::data::Row row(std::string id, std::string answer, std::vector<std::string> options = {"A", "B"},
                    std::string instruction = "Question: which one?\nOptions: (A) yes (B) no\n") {
  mola::data::Row r;
  r.id = std::move(id);
  r.instruction = std::move(instruction);
  r.answer = std::move(answer);
  r.options = std::move(options);
  return r;
}

TEST(EvaluateMajority, MostFrequentAnswerTiesToTheFirstLetter) {
  const auto m = mola::train::majority_baseline({row("0", "B"), row("1", "A"), row("2", "B"), row("3", "C"),
                                                 row("4", "A"), row("5", "B")});
  EXPECT_EQ(m.answer, "B");
  EXPECT_EQ(m.count, 3);
  EXPECT_DOUBLE_EQ(m.accuracy, 50.0);
  EXPECT_EQ(mola::train::majority_baseline({row("0", "B"), row("1", "A")}).answer, "A");
  EXPECT_THROW(mola::train::majority_baseline({}), std::invalid_argument);
  EXPECT_THROW(mola::train::majority_baseline({row("0", "")}), std::invalid_argument);
}

// The repository's LLaMA-2 tokenizer: searched upwards from the working
// directory and from the test binary (ctest runs in the build tree, a
// developer from the repository root; __FILE__ is relative under ccache's
// base_dir, so it cannot anchor the search).
std::string tokenizer_path() {
  const std::filesystem::path rel = "data/tokenizers/llama2/tokenizer.model";
  std::error_code ec;
  for (auto start : {std::filesystem::current_path(ec), std::filesystem::read_symlink("/proc/self/exe", ec)}) {
    for (auto dir = start; !dir.empty(); dir = dir.parent_path()) {
      if (std::filesystem::exists(dir / rel)) return (dir / rel).string();
      if (dir == dir.parent_path()) break;
    }
  }
  return rel.string();
}

class EvaluateModel : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(tokenizer_path())) GTEST_SKIP() << tokenizer_path() << " is missing";
    tok = mola::data::Tokenizer::from_file(tokenizer_path());
    const auto config = mola::models::ModelConfig::from_json(json::parse(R"({
      "model_type": "llama", "vocab_size": 32000, "hidden_size": 16, "intermediate_size": 32,
      "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu",
      "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})"));
    torch::manual_seed(3);
    model = std::make_shared<mola::models::CausalLMImpl>(config);
    tmpl.prompt_input = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";
    tmpl.prompt_no_input = "### Instruction:\n{instruction}\n\n### Response:\n";
    tmpl.response_split = "### Response:";
    rows = {row("a", "A"), row("b", "B", {"A", "B", "C"}, "Is it?"), row("c", "C", {"A", "B", "C", "D"}, "Odd?"),
            row("d", "B")};
    rows[1].input = "some context";
  }

  mola::data::Tokenizer tok;
  std::shared_ptr<mola::models::CausalLMImpl> model;
  mola::data::PromptTemplate tmpl;
  std::vector<mola::data::Row> rows;
};

TEST_F(EvaluateModel, LoglikScoresEqualAnUnbatchedSum) {
  EvalOptions o;
  o.methods = {"loglik"};
  o.batch_size = 3;  // 11 sequences: batches of 3, 3, 3, 2 with right padding
  model->train();
  const auto result = mola::train::evaluate(*model, tok, tmpl, rows, o);
  EXPECT_TRUE(model->is_training());  // the mode comes back
  model->eval();
  at::NoGradGuard no_grad;
  int64_t correct = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto prompt = tok.encode(tmpl.prompt(rows[i].instruction, rows[i].input), true);
    const auto& pred = result.predictions[i];
    ASSERT_EQ(pred.option_scores.size(), rows[i].options.size());
    size_t best = 0;
    for (size_t k = 0; k < rows[i].options.size(); ++k) {
      const auto full = tok.encode(
          tmpl.prompt(rows[i].instruction, rows[i].input, "Answer: The answer is " + rows[i].options[k] + "."), true);
      size_t start = 0;
      while (start < prompt.size() && prompt[start] == full[start]) ++start;
      const at::Tensor ids = at::tensor(full, at::kLong).unsqueeze(0);
      const at::Tensor logp = model->forward(ids).logits[0].log_softmax(-1);  // [len, vocab]
      double expected = 0.0;
      for (size_t t = std::max<size_t>(start, 1); t < full.size(); ++t) expected += logp[t - 1][full[t]].item<double>();
      EXPECT_NEAR(pred.option_scores[k], expected, 1e-4) << rows[i].id << " option " << rows[i].options[k];
      if (pred.option_scores[k] > pred.option_scores[best]) best = k;
    }
    EXPECT_EQ(pred.loglik_choice, rows[i].options[best]);
    correct += rows[i].options[best] == rows[i].answer;
  }
  EXPECT_EQ(result.loglik_correct, correct);
  EXPECT_DOUBLE_EQ(result.loglik_accuracy, 100.0 * correct / 4);
  EXPECT_FALSE(result.to_json().contains("generate_accuracy"));
}

TEST_F(EvaluateModel, GenerationDoesNotDependOnTheBatchSize) {
  EvalOptions o;
  o.methods = {"generate"};
  o.max_new_tokens = 6;
  o.batch_size = 1;
  const auto one = mola::train::evaluate(*model, tok, tmpl, rows, o);
  o.batch_size = 3;
  const auto three = mola::train::evaluate(*model, tok, tmpl, rows, o);
  ASSERT_EQ(one.predictions.size(), 4u);
  for (size_t i = 0; i < 4; ++i) EXPECT_EQ(one.predictions[i].response, three.predictions[i].response) << i;
  EXPECT_EQ(one.to_json(), three.to_json());
  EXPECT_EQ(one.generate_failed + one.generate_correct <= 4, true);
}

TEST_F(EvaluateModel, ErrorsMaxExamplesAndFiles) {
  EvalOptions o;
  o.max_new_tokens = 2;
  EXPECT_THROW(mola::train::evaluate(*model, tok, tmpl, {}, o), std::invalid_argument);
  auto bad = rows;
  bad[2].answer = "";
  EXPECT_THROW(mola::train::evaluate(*model, tok, tmpl, bad, o), std::invalid_argument);
  bad = rows;
  bad[1].options.clear();
  try {
    mola::train::evaluate(*model, tok, tmpl, bad, o);
    FAIL() << "a row without options must throw under loglik";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("row 1 (id \"b\") has no options"), std::string::npos) << e.what();
  }
  o.max_examples = 2;
  const auto result = mola::train::evaluate(*model, tok, tmpl, rows, o);
  EXPECT_EQ(result.n, 2);
  EXPECT_EQ(result.majority.answer, "A");  // A, B tie: the first letter
  // POSIX calls for the temporary directory: libtorch exports its own
  // std::filesystem::remove_all, which crashes when called from here.
  char dir_template[] = "/tmp/mola-eval-XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::filesystem::path dir = dir_template;
  mola::train::write_eval_files(result, dir.string());
  std::ifstream summary(dir / "eval.json");
  EXPECT_EQ(json::parse(summary), result.to_json());
  std::ifstream lines(dir / "eval_predictions.jsonl");
  std::string line;
  int64_t count = 0;
  while (std::getline(lines, line)) {
    const json j = json::parse(line);
    EXPECT_EQ(j.at("id"), result.predictions[count].id);
    EXPECT_TRUE(j.contains("response") && j.contains("option_scores") && j.contains("loglik_choice"));
    ++count;
  }
  EXPECT_EQ(count, 2);
  std::remove((dir / "eval.json").c_str());
  std::remove((dir / "eval_predictions.jsonl").c_str());
  ::rmdir(dir.c_str());
  EXPECT_THROW(mola::train::write_eval_files(result, (dir / "missing").string()), std::runtime_error);
}

}  // namespace
