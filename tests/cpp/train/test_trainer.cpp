// Tests for batching (mola/data/batch.h), the trainer's options and schedules
// (mola/train/options.h) and the trainer itself (mola/train/trainer.h) on a
// tiny random llama: collate's padding, the sampler's determinism, epochs and
// position, length grouping, strict options, lr values computed by hand from
// transformers' formulas, and a fit / resume / NaN-guard round trip. The
// comparisons against transformers itself are in tests/python/train/test_trainer.py.
#include "mola/data/batch.h"
#include "mola/models/decoder.h"
#include "mola/train/options.h"
#include "mola/train/trainer.h"
#include "train/checkpoint.h"
#include "train/progress.h"

#include <gtest/gtest.h>

#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>
#include <string>

namespace {

using mola::data::BatchSampler;
using mola::data::Example;
using mola::train::TrainOptions;
using nlohmann::json;

Example example(std::vector<int64_t> ids, int64_t masked_prefix = 0) {
  Example e{ids, ids};
  for (int64_t i = 0; i < masked_prefix; ++i) e.labels[static_cast<size_t>(i)] = -100;
  return e;
}

// ---- collate ------------------------------------------------------------------------

TEST(BatchCollate, PadsRightToAMultipleOfEight) {
  const std::vector<Example> ex{example({5, 6, 7}, 1), example({1, 2, 3, 4, 5, 6, 7, 8, 9, 10})};
  const auto b = mola::data::collate(ex);
  ASSERT_EQ(b.input_ids.sizes(), (at::IntArrayRef{2, 16}));  // longest 10 -> 16
  EXPECT_EQ(b.num_tokens, 13);
  EXPECT_TRUE(b.input_ids[0].slice(0, 0, 3).equal(torch::tensor({5, 6, 7}, torch::kLong)));
  EXPECT_TRUE(b.input_ids[0].slice(0, 3).eq(0).all().item<bool>());
  EXPECT_EQ(b.attention_mask.sum(1)[0].item<int64_t>(), 3);
  EXPECT_EQ(b.attention_mask.sum(1)[1].item<int64_t>(), 10);
  EXPECT_EQ(b.labels[0][0].item<int64_t>(), -100);  // the masked prompt stays masked
  EXPECT_EQ(b.labels[0][1].item<int64_t>(), 6);
  EXPECT_TRUE(b.labels[0].slice(0, 3).eq(-100).all().item<bool>());
  EXPECT_TRUE(b.labels[1].slice(0, 0, 10).equal(b.input_ids[1].slice(0, 0, 10)));
  EXPECT_TRUE(b.labels[1].slice(0, 0, 10).ne(-100).all().item<bool>());
}

TEST(BatchCollate, ExactMultiplesPadIdAndNoRounding) {
  EXPECT_EQ(mola::data::collate({example(std::vector<int64_t>(8, 3))}).input_ids.size(1), 8);
  EXPECT_EQ(mola::data::collate({example(std::vector<int64_t>(9, 3))}).input_ids.size(1), 16);
  const auto b = mola::data::collate({example({4}), example({4, 4, 4})}, /*pad_id=*/2, /*pad_to_multiple_of=*/1);
  EXPECT_EQ(b.input_ids.size(1), 3);
  EXPECT_TRUE(b.input_ids[0].equal(torch::tensor({4, 2, 2}, torch::kLong)));
  // A subset by index, in the given order.
  const std::vector<Example> ex{example({1}), example({2, 2}), example({3, 3, 3})};
  const auto s = mola::data::collate(ex, std::vector<int64_t>{2, 0}, 0, 1);
  EXPECT_TRUE(s.input_ids.equal(torch::tensor({{3, 3, 3}, {1, 0, 0}}, torch::kLong)));
}

TEST(BatchCollate, Errors) {
  EXPECT_THROW(mola::data::collate(std::vector<Example>{}), std::invalid_argument);
  Example bad{{1, 2, 3}, {1, 2}};
  try {
    mola::data::collate({bad});
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("3 input_ids but 2 labels"), std::string::npos) << e.what();
  }
}

// ---- sampler ---------------------------------------------------------------------------

std::vector<int64_t> flat(const std::vector<std::vector<int64_t>>& micro) {
  std::vector<int64_t> out;
  for (const auto& m : micro) out.insert(out.end(), m.begin(), m.end());
  return out;
}

TEST(BatchSampler, DeterministicPermutationsThatDifferByEpochAndSeed) {
  const std::vector<int64_t> lengths(50, 4);
  BatchSampler a(lengths, 8, 4, 7), b(lengths, 8, 4, 7), c(lengths, 8, 4, 8);
  const auto e0 = a.epoch_order(0), e1 = a.epoch_order(1);
  EXPECT_EQ(e0, b.epoch_order(0));
  EXPECT_NE(e0, e1);
  EXPECT_NE(e0, c.epoch_order(0));
  std::vector<int64_t> sorted = e0, identity(50);
  std::sort(sorted.begin(), sorted.end());
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(sorted, identity);
  EXPECT_NE(e0, identity);
}

TEST(BatchSampler, BatchesMicroBatchesAndThePartialLastBatch) {
  BatchSampler s(std::vector<int64_t>(10, 4), 4, 2, 1);
  EXPECT_EQ(s.batches_per_epoch(), 3);
  std::vector<int64_t> seen;
  const std::vector<size_t> micro_counts{2, 2, 1};
  for (size_t i = 0; i < 3; ++i) {
    const auto batch = s.next();
    ASSERT_EQ(batch.size(), micro_counts[i]);
    for (const auto& m : batch) EXPECT_LE(m.size(), 2u);
    for (int64_t x : flat(batch)) seen.push_back(x);
  }
  EXPECT_EQ(seen, s.epoch_order(0));
  EXPECT_EQ(s.position(), (mola::data::SamplerPosition{1, 0}));
  const auto order1 = s.epoch_order(1);
  EXPECT_EQ(flat(s.next()), std::vector<int64_t>(order1.begin(), order1.begin() + 4));
  EXPECT_THROW(BatchSampler(std::vector<int64_t>(4, 1), 4, 3, 0), std::invalid_argument);
  EXPECT_THROW(BatchSampler({}, 4, 2, 0), std::invalid_argument);
}

TEST(BatchSampler, PositionSaveAndRestore) {
  const std::vector<int64_t> lengths(23, 4);
  BatchSampler a(lengths, 4, 2, 3);
  for (int i = 0; i < 8; ++i) a.next();  // into the second epoch (6 batches each)
  const auto pos = a.position();
  EXPECT_EQ(pos, (mola::data::SamplerPosition{1, 2}));
  BatchSampler b(lengths, 4, 2, 3);
  b.set_position(pos);
  for (int i = 0; i < 7; ++i) EXPECT_EQ(a.next(), b.next()) << i;
  EXPECT_THROW(b.set_position({0, 7}), std::invalid_argument);
  b.set_position({2, 6});  // the end of epoch 2 is the start of epoch 3
  EXPECT_EQ(b.position(), (mola::data::SamplerPosition{3, 0}));
}

TEST(BatchSampler, GroupByLengthByHand) {
  // N = 8, batch 2: mega_batch_mult = max(1, min(8 / 8, 50)) = 1, megabatches of 2.
  const std::vector<int64_t> lengths{5, 1, 9, 3, 7, 2, 4, 8};
  const std::vector<int64_t> perm{0, 1, 2, 3, 4, 5, 6, 7};
  // sorted pairs: [0,1] [2,3] [4,5] [7,6]; heads' lengths 5, 9, 7, 8: the
  // second wins, its head (2) swaps with the first head (0).
  EXPECT_EQ(mola::data::group_by_length(perm, lengths, 2), (std::vector<int64_t>{2, 1, 0, 3, 4, 5, 7, 6}));
  // N = 40, batch 2: mult = 5, megabatches of 10, each sorted longest first.
  std::vector<int64_t> len40(40), perm40(40);
  for (int64_t i = 0; i < 40; ++i) len40[i] = (i * 7) % 13, perm40[i] = 39 - i;
  const auto g = mola::data::group_by_length(perm40, len40, 2);
  EXPECT_EQ(len40[g[0]], 12);
  for (size_t m = 0; m < 4; ++m)
    for (size_t i = m * 10 + 1; i + 1 < (m + 1) * 10; ++i)
      EXPECT_GE(len40[g[i]], len40[g[i + 1]]) << i;
  // The sampler applies it to each epoch's permutation.
  BatchSampler s(len40, 2, 1, 4, /*group_by_length=*/true);
  EXPECT_EQ(len40[s.epoch_order(0)[0]], 12);
  EXPECT_NE(s.epoch_order(0), s.epoch_order(1));
}

// ---- options and schedules ---------------------------------------------------------------

std::string error_of(const json& j) {
  try {
    TrainOptions::from_json(j);
  } catch (const mola::ConfigError& e) {
    return e.what();
  }
  return "";
}

TEST(TrainerOptions, JsonRoundTripAndDefaults) {
  const TrainOptions d;
  EXPECT_EQ(d.batch_size, 128);
  EXPECT_EQ(d.micro_batch_size, 8);
  EXPECT_DOUBLE_EQ(d.lr, 3e-4);
  EXPECT_EQ(d.warmup_steps, 100);
  EXPECT_EQ(TrainOptions::from_json(d.to_json()), d);
  EXPECT_EQ(d.to_json().size(), TrainOptions::keys().size());
  TrainOptions o = TrainOptions::from_json(json::parse(
      R"({"lr": 1e-3, "schedule": "cosine", "resume": "out/checkpoints/step-200", "group_by_length": true,
          "max_steps": 10, "init_adapter": "stage1"})"));
  EXPECT_EQ(std::get<std::string>(o.resume), "out/checkpoints/step-200");
  EXPECT_EQ(TrainOptions::from_json(o.to_json()), o);
  EXPECT_NE(o, d);
  EXPECT_TRUE(std::get<bool>(TrainOptions::from_json(json::parse(R"({"resume": true})")).resume));
}

TEST(TrainerOptions, ErrorsNameTheKeyValueAndFix) {
  auto has = [](const std::string& msg, const std::string& part) {
    EXPECT_NE(msg.find(part), std::string::npos) << "'" << part << "' not in: " << msg;
  };
  has(error_of(json::parse(R"({"micro_batchsize": 4})")), R"(unknown key "micro_batchsize"; did you mean "micro_batch_size")");
  has(error_of(json::parse(R"({"batch_size": 8, "micro_batch_size": 3})")), "micro_batch_size (3) must divide batch_size (8)");
  has(error_of(json::parse(R"({"lr": -1})")), "lr is -1");
  has(error_of(json::parse(R"({"schedule": "cosin"})")), "use one of linear, cosine, constant");
  has(error_of(json::parse(R"({"epochs": 2.5})")), "epochs must be an integer; got 2.5");
  has(error_of(json::parse(R"({"resume": 1})")), "resume must be false, true or the path");
  has(error_of(json::parse(R"({"max_steps": 0})")), "max_steps is 0");
  has(error_of(json::parse(R"({"adam_beta2": 1.0})")), "adam_beta2 is 1");
  has(error_of(json::parse("[1]")), "expected a JSON object");
}

TEST(TrainerSchedule, HandValues) {
  using mola::train::lr_multiplier;
  // linear, warmup 10, total 110: ramps over 10 steps, then decays over 100.
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 0, 10, 110), 0.0);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 5, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 10, 10, 110), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 60, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 110, 10, 110), 0.0);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 130, 10, 110), 0.0);
  EXPECT_DOUBLE_EQ(lr_multiplier("cosine", 5, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier("cosine", 10, 10, 110), 1.0);
  EXPECT_NEAR(lr_multiplier("cosine", 35, 10, 110), 0.5 * (1 + std::sqrt(0.5)), 1e-15);  // a quarter of the way
  EXPECT_NEAR(lr_multiplier("cosine", 60, 10, 110), 0.5, 1e-15);
  EXPECT_NEAR(lr_multiplier("cosine", 110, 10, 110), 0.0, 1e-15);
  EXPECT_DOUBLE_EQ(lr_multiplier("constant", 5, 10, 110), 0.5);
  EXPECT_DOUBLE_EQ(lr_multiplier("constant", 500, 10, 110), 1.0);
  EXPECT_DOUBLE_EQ(lr_multiplier("linear", 0, 0, 4), 1.0);  // no warmup: full lr at once
  EXPECT_THROW(lr_multiplier("step", 0, 0, 4), mola::ConfigError);
}

// ---- the trainer on a tiny random llama ---------------------------------------------------------

std::shared_ptr<mola::models::CausalLMImpl> tiny_model(uint64_t seed, double dropout) {
  torch::manual_seed(seed);
  auto m = std::make_shared<mola::models::CausalLMImpl>(mola::models::ModelConfig::from_json(json::parse(R"({
    "model_type": "llama", "vocab_size": 61, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "hidden_act": "silu", "max_position_embeddings": 64, "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0, "tie_word_embeddings": false})")));
  mola::AdapterConfig cfg;
  cfg.experts = "2,4,6,8";
  cfg.top_k = 2;
  cfg.rank = 4;
  cfg.dropout = dropout;
  m->attach(cfg);
  return m;
}

std::vector<Example> random_examples(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out;
  for (int64_t i = 0; i < n; ++i) {
    std::vector<int64_t> ids(4 + rng() % 9);
    for (auto& t : ids) t = static_cast<int64_t>(1 + rng() % 60);
    out.push_back(example(ids, 1));
  }
  return out;
}

class TrainerRun : public ::testing::Test {
 protected:
  std::string dir;
  void SetUp() override {
    char tmpl[] = "/tmp/mola_test_trainer_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir = tmpl;
    torch::set_num_threads(1);
  }
  void TearDown() override { mola::train::detail::remove_tree(dir); }
  std::vector<json> metrics(const std::string& out) const {
    std::vector<json> lines;
    std::ifstream in(out + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) lines.push_back(json::parse(line));
    return lines;
  }
};

TEST_F(TrainerRun, ResumeContinuesTheSameRun) {
  const auto data = random_examples(12, 1);
  TrainOptions o;
  o.batch_size = 4;
  o.micro_batch_size = 2;
  o.lr = 1e-2;
  o.warmup_steps = 1;
  o.max_steps = 5;  // 3 steps an epoch: the resume crosses an epoch
  o.save_every = 2;
  o.eval_every = 0;
  o.save_total_limit = 0;
  mola::train::Trainer full(tiny_model(0, 0.1), o, dir + "/full");
  const auto result = full.fit(data);
  EXPECT_EQ(result.steps, 5);
  EXPECT_EQ(result.checkpoint, dir + "/full/checkpoints/step-5");
  const auto full_lines = metrics(dir + "/full");
  ASSERT_EQ(full_lines.size(), 5u);

  TrainOptions r = o;
  r.resume = dir + "/full/checkpoints/step-2";
  mola::train::Trainer resumed(tiny_model(0, 0.1), r, dir + "/resumed");
  resumed.fit(data);
  const auto lines = metrics(dir + "/resumed");
  ASSERT_EQ(lines.size(), 3u);
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(lines[i]["step"], full_lines[i + 2]["step"]);
    EXPECT_NEAR(lines[i]["loss"].get<double>(), full_lines[i + 2]["loss"].get<double>(), 1e-6) << i;
    EXPECT_NEAR(lines[i]["grad_norm"].get<double>(), full_lines[i + 2]["grad_norm"].get<double>(), 1e-6) << i;
  }
  // Completeness: a temporary or a step-<N> without trainer_state.json is not a checkpoint.
  mola::train::detail::make_dirs(dir + "/full/checkpoints/step-9.tmp-1");
  mola::train::detail::make_dirs(dir + "/full/checkpoints/step-8");
  const auto listed = mola::train::list_checkpoints(dir + "/full");
  ASSERT_EQ(listed.size(), 3u);
  EXPECT_EQ(listed.back().first, 5);
}

TEST_F(TrainerRun, NonFiniteLossStopsTheRun) {
  auto model = tiny_model(0, 0.0);
  {
    at::NoGradGuard no_grad;
    model->named_parameters()["model.layers.2.mlp.down_proj.mola.lora_b"].fill_(NAN);
  }
  TrainOptions o;
  o.batch_size = 4;
  o.micro_batch_size = 4;
  o.max_steps = 3;
  mola::train::Trainer t(model, o, dir + "/nan");
  try {
    t.fit(random_examples(8, 2));
    FAIL() << "no NonFiniteLossError";
  } catch (const mola::train::NonFiniteLossError& e) {
    EXPECT_EQ(e.step, 1);
    EXPECT_TRUE(std::isnan(e.value));
    EXPECT_EQ(e.checkpoint, "");
    const std::string msg = e.what();
    EXPECT_NE(msg.find("step 1 (epoch 0.5)"), std::string::npos) << msg;
    EXPECT_NE(msg.find("none saved yet"), std::string::npos) << msg;
  }
  const auto lines = metrics(dir + "/nan");
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_TRUE(lines[0]["loss"].is_null());
  EXPECT_EQ(lines[0]["step"], 1);
}

TEST_F(TrainerRun, RejectsBadExamplesAndModelsWithoutAdapter) {
  TrainOptions o;
  o.batch_size = 2;
  o.micro_batch_size = 2;
  mola::train::Trainer t(tiny_model(0, 0.0), o, dir + "/bad");
  try {
    t.fit({example({1, 2, 99})});
    FAIL();
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("input_ids[2] = 99 is outside the model's vocabulary [0, 61)"),
              std::string::npos)
        << e.what();
  }
  EXPECT_THROW(t.fit({}), std::invalid_argument);
  torch::manual_seed(0);
  auto bare = std::make_shared<mola::models::CausalLMImpl>(t.model()->config());
  EXPECT_THROW(mola::train::Trainer(bare, o, dir + "/bare"), std::invalid_argument);
}

}  // namespace

// A pass that takes a while reports its rows and the time; a short one stays quiet.
TEST(PassProgress, ReportsRowsAfterTheQuietPeriod) {
  std::FILE* out = std::tmpfile();
  ASSERT_NE(out, nullptr);
  {
    mola::train::detail::PassProgress quiet("mola: quiet", 10, out);  // 3 s before the first line
    quiet.advance(10);
  }
  {
    mola::train::detail::PassProgress progress("mola: evaluating", 10, out, /*quiet_s=*/0.0, /*every_s=*/0.0);
    progress.advance(4);
    progress.advance(6);
  }
  std::rewind(out);
  std::string text;
  for (int c; (c = std::fgetc(out)) != EOF;) text += static_cast<char>(c);
  std::fclose(out);
  EXPECT_EQ(text.find("quiet"), std::string::npos) << text;
  EXPECT_NE(text.find("mola: evaluating: 4/10 rows, 0:00<"), std::string::npos) << text;
  EXPECT_NE(text.find("mola: evaluating: 10/10 rows, 0:00\n"), std::string::npos) << text;
}

// A fresh run refuses a directory that holds a run's files, removes them only
// when told to overwrite, and leaves other files alone.
TEST(ClaimOutputDir, RefusesOrOverwritesAFormerRun) {
  char pattern[] = "/tmp/mola_claim_XXXXXX";
  const std::string dir = ::mkdtemp(pattern);
  mola::train::TrainOptions o;
  const std::vector<std::string> outputs{"metrics.jsonl", "checkpoints", "stage-*"};
  auto claim = [&](bool remove) {
    mola::train::detail::claim_output_dir(dir, o, outputs, "", "RESUME", "OVERWRITE", remove);
  };
  std::ofstream(dir + "/notes.txt") << "mine";
  claim(true);  // nothing of a run's: fine
  std::ofstream(dir + "/metrics.jsonl") << "{}\n";
  mola::train::detail::make_dirs(dir + "/stage-1-a");
  try {
    claim(false);
    ADD_FAILURE() << "a second run was let in";
  } catch (const std::invalid_argument& e) {
    const std::string msg = e.what();
    for (const char* part : {"holds a run already", "metrics.jsonl, stage-1-a", "RESUME", "OVERWRITE"})
      EXPECT_NE(msg.find(part), std::string::npos) << msg;
  }
  o.resume = true;
  claim(true);  // resuming: left as it is
  EXPECT_TRUE(mola::train::detail::path_exists(dir + "/metrics.jsonl"));
  o.resume = false;
  o.overwrite_output_dir = true;
  claim(false);  // the check alone removes nothing
  EXPECT_TRUE(mola::train::detail::path_exists(dir + "/metrics.jsonl"));
  claim(true);
  EXPECT_EQ(mola::train::detail::list_dir(dir), std::vector<std::string>{"notes.txt"});
  mola::train::detail::remove_tree(dir);
}
