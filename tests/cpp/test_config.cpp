// Tests for mola/config.h: preset expansion (docs/design.md, The MoLA layer), every malformed
// input with the content of its message, JSON round trips, file errors and the
// LLaMA-2-7B parameter counts the MoLA papers report. No torch needed, so these
// run in any build.
#include "mola/config.h"
#include "detail/text.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <initializer_list>

namespace {

using mola::AdapterConfig;
using mola::ConfigError;
using mola::LinearShape;
using mola::PerLayerSpec;
using nlohmann::json;
using V = std::vector<int64_t>;

// 4 group values spread over layer-group sizes, e.g. groups({8,6,4,2}, {8,8,8,8}).
V groups(const V& values, const V& sizes) {
  V out;
  for (size_t g = 0; g < values.size(); ++g) out.insert(out.end(), static_cast<size_t>(sizes[g]), values[g]);
  return out;
}

// Runs f, expects a ConfigError whose message contains every one of `parts`.
void expect_error(const std::function<void()>& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected a ConfigError containing \"" << *parts.begin() << "\"";
  } catch (const ConfigError& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing \"" << p << "\" in: " << msg;
  }
}

AdapterConfig with_experts(PerLayerSpec experts) {
  AdapterConfig c;
  c.experts = std::move(experts);
  return c;
}

std::vector<LinearShape> llama2_7b_shapes() {
  return {{"q_proj", 4096, 4096},     {"k_proj", 4096, 4096}, {"v_proj", 4096, 4096},   {"o_proj", 4096, 4096},
          {"gate_proj", 4096, 11008}, {"up_proj", 4096, 11008}, {"down_proj", 11008, 4096}};
}

TEST(ConfigPresets, NamedPresetsOn32And28Layers) {
  const std::vector<std::pair<std::string, V>> cases = {
      {"rectangle", {5, 5, 5, 5}}, {"triangle", {8, 6, 4, 2}}, {"inverted", {2, 4, 6, 8}},
      {"hourglass", {8, 2, 2, 8}}, {"diamond", {2, 8, 8, 2}}};
  for (const auto& [name, values] : cases) {
    EXPECT_EQ(mola::expand_preset(name, 32), groups(values, {8, 8, 8, 8})) << name;
    EXPECT_EQ(mola::expand_preset(name, 28), groups(values, {7, 7, 7, 7})) << name;
  }
  EXPECT_EQ(mola::preset_names(),
            (std::vector<std::string>{"rectangle", "triangle", "inverted", "hourglass", "diamond"}));
}

TEST(ConfigPresets, TriangleHasMoreExpertsInLowerLayers) {
  const V e = mola::expand_preset("triangle", 32);
  EXPECT_EQ(e.front(), 8);
  EXPECT_EQ(e.back(), 2);
}

TEST(ConfigPresets, DigitStringsAndGroupLists) {
  EXPECT_EQ(mola::expand_preset("2468", 32), groups({2, 4, 6, 8}, {8, 8, 8, 8}));
  EXPECT_EQ(mola::expand_preset("8888", 32), V(32, 8));
  EXPECT_EQ(mola::expand_preset("4444", 28), V(28, 4));
  EXPECT_EQ(mola::expand_preset("6532", 28), groups({6, 5, 3, 2}, {7, 7, 7, 7}));
  EXPECT_EQ(mola::expand_preset("10-2-2-2", 32), groups({10, 2, 2, 2}, {8, 8, 8, 8}));
  EXPECT_EQ(mola::expand_preset("2-2-2-10", 28), groups({2, 2, 2, 10}, {7, 7, 7, 7}));
  EXPECT_EQ(mola::expand_preset("2,4,6,8", 32), mola::expand_preset("inverted", 32));
  EXPECT_EQ(mola::expand_preset("2, 4, 6, 8", 32), mola::expand_preset("inverted", 32));
  EXPECT_EQ(mola::expand_preset(" Triangle ", 32), mola::expand_preset("triangle", 32));
}

TEST(ConfigPresets, UnevenSplitsGiveTheFirstGroupsOneLayerMore) {
  EXPECT_EQ(mola::expand_preset("2468", 30), groups({2, 4, 6, 8}, {8, 8, 7, 7}));
  EXPECT_EQ(mola::expand_preset("2468", 5), groups({2, 4, 6, 8}, {2, 1, 1, 1}));
  EXPECT_EQ(mola::expand_preset("2468", 31), groups({2, 4, 6, 8}, {8, 8, 8, 7}));
  EXPECT_EQ(mola::expand_preset("2468", 2), (V{2, 4}));
  EXPECT_EQ(mola::expand_preset("2468", 1), (V{2}));
}

TEST(ConfigPresets, ListsIntsAndFullLists) {
  V full(32);
  for (size_t i = 0; i < full.size(); ++i) full[i] = static_cast<int64_t>(i % 3 + 1);
  EXPECT_EQ(PerLayerSpec(full).resolve("experts", 32, true), full);
  EXPECT_EQ(PerLayerSpec(V{2, 4, 6, 8}).resolve("experts", 28, true), groups({2, 4, 6, 8}, {7, 7, 7, 7}));
  EXPECT_EQ(PerLayerSpec(V{2, 4, 6, 8}).resolve("rank", 30, false), groups({2, 4, 6, 8}, {8, 8, 7, 7}));
  EXPECT_EQ(PerLayerSpec(V{2, 4, 6, 8}).resolve("experts", 4, true), (V{2, 4, 6, 8}));  // per layer == groups
  EXPECT_EQ(PerLayerSpec(3).resolve("top_k", 5, false), V(5, 3));
}

TEST(ConfigPresets, MalformedStrings) {
  expect_error([] { mola::expand_preset("2-4-x-8", 32); },
               {"experts: group 3 of \"2-4-x-8\" (\"x\")", "not a whole number", "10-2-2-2"});
  expect_error([] { mola::expand_preset("", 32); }, {"empty string is not a preset", "triangle", "2468"});
  expect_error([] { mola::expand_preset("24680", 32); }, {"\"24680\"", "5 digits", "not a preset", "exactly 4"});
  expect_error([] { mola::expand_preset("246", 32); }, {"3 digits", "exactly 4"});
  expect_error([] { mola::expand_preset("trangle", 32); }, {"unknown preset \"trangle\"", "did you mean \"triangle\""});
  expect_error([] { mola::expand_preset("diamand", 32); }, {"did you mean \"diamond\""});
  expect_error([] { mola::expand_preset("2-4-6", 32); }, {"\"2-4-6\"", "3 group counts", "exactly 4"});
  expect_error([] { mola::expand_preset("2,4,6,8,10", 32); }, {"5 group counts", "JSON list"});
  expect_error([] { mola::expand_preset("2048", 32); },
               {"experts: group 2 of \"2048\" is 0", ">= 1", "at least one expert"});
  expect_error([] { mola::expand_preset("2-0-6-8", 32); }, {"group 2 of \"2-0-6-8\" is 0", ">= 1"});
  expect_error([] { mola::expand_preset("-2-4-6-8", 32); }, {"5 group counts"});
  expect_error([] { mola::expand_preset("2-4--8", 32); }, {"group 3 of \"2-4--8\" is empty"});
  expect_error([] { mola::expand_preset("2-4- -8", 32); }, {"group 3", "is empty"});
  expect_error([] { mola::expand_preset("2-,4-6", 32); }, {"group 2", "is empty"});
  expect_error([] { mola::expand_preset("2-4-6-99999999999", 32); }, {"too large"});
  expect_error([] { mola::expand_preset("2468", 0); }, {"num_layers 0", ">= 1", "transformer layers"});
  expect_error([] { mola::expand_preset("2468", -3); }, {"num_layers -3"});
}

TEST(ConfigPresets, MalformedCountsForExpertsTopKAndRank) {
  expect_error([] { PerLayerSpec(V{1, 2, 3, 4, 5}).resolve("experts", 32, true); },
               {"experts: a list of 5 entries fits neither 4 groups nor the model's 32 layers",
                "give 4 group counts or one count per layer"});
  expect_error([] { PerLayerSpec(V(31, 2)).resolve("rank", 32, false); }, {"rank: a list of 31 entries", "32 layers"});
  expect_error([] { PerLayerSpec(V{}).resolve("top_k", 32, false); }, {"top_k: an empty list"});
  expect_error([] { with_experts(0).validate(); }, {"experts is 0", ">= 1", "at least one expert"});
  expect_error([] { with_experts(V{2, -1, 6, 8}).validate(); }, {"experts[1] is -1", ">= 1"});
  expect_error([] { with_experts("fancy").validate(); }, {"unknown preset \"fancy\""});
  AdapterConfig c;
  c.top_k = "2468";
  expect_error([&] { c.validate(); }, {"top_k: \"2468\" is a string", "experts only", "as an int"});
  c = AdapterConfig();
  c.rank = "triangle";
  expect_error([&] { c.validate(); }, {"rank: \"triangle\" is a string", "experts only"});
  c = AdapterConfig();
  c.top_k = 0;
  expect_error([&] { c.validate(); }, {"top_k is 0", "routed to at least one expert"});
  c = AdapterConfig();
  c.rank = V{8, 8, 0, 8};
  expect_error([&] { c.validate(); }, {"rank[2] is 0", "rank >= 1"});
  expect_error([] { AdapterConfig().resolve(0); }, {"num_layers 0"});
}

TEST(ConfigPresets, TopKMustNotExceedExpertsInAnyLayer) {
  AdapterConfig c = with_experts(V{2, 2, 2, 1, 2, 2});
  expect_error([&] { c.resolve(6); },
               {"top_k 2 exceeds experts 1 in layer 3", "lower top_k or give that layer more experts"});
  c = with_experts(2);
  c.top_k = 4;
  expect_error([&] { c.validate(); }, {"top_k 4 exceeds experts 2", "lower top_k"});
  c = with_experts("1222");
  expect_error([&] { c.resolve(32); }, {"top_k 2 exceeds experts 1 in layer 0"});
  c.top_k = 1;
  EXPECT_NO_THROW(c.resolve(32));
  c = with_experts("triangle");
  c.top_k = 2;  // top_k == experts in the top group: dense routing, allowed
  EXPECT_NO_THROW(c.resolve(32));
}

TEST(ConfigJson, RoundTripKeepsSpellingAndKeys) {
  std::vector<AdapterConfig> configs(4);
  configs[1].experts = "triangle";
  configs[2].experts = "10-2-2-2";
  configs[2].top_k = V{1, 2, 2, 2};
  configs[2].rank = V{4, 8, 8, 16};
  configs[3].experts = V(32, 3);
  configs[3].alpha = 32;
  configs[3].dropout = 0;
  configs[3].targets = {"q_proj", "v_proj"};
  configs[3].aux_loss_coef = 0;
  configs[3].compute = "grouped";
  for (const auto& c : configs) {
    const json j = c.to_json();
    std::vector<std::string> keys;
    for (const auto& item : j.items()) keys.push_back(item.key());
    std::vector<std::string> expected = AdapterConfig::keys();
    std::sort(expected.begin(), expected.end());
    EXPECT_EQ(keys, expected);  // nlohmann's json keeps keys sorted
    EXPECT_EQ(AdapterConfig::from_json(j), c);
    EXPECT_EQ(AdapterConfig::from_json_string(j.dump(2)), c);
    EXPECT_EQ(j.get<AdapterConfig>(), c);
  }
  EXPECT_EQ(configs[1].to_json()["experts"], json("triangle"));
  EXPECT_EQ(configs[2].to_json()["experts"], json("10-2-2-2"));
  EXPECT_EQ(configs[2].to_json()["rank"], json({4, 8, 8, 16}));
  EXPECT_EQ(configs[0].to_json()["experts"], json(8));
}

TEST(ConfigJson, DefaultsAndMissingKeys) {
  const AdapterConfig d = AdapterConfig::from_json(json::object());
  EXPECT_EQ(d, AdapterConfig());
  EXPECT_EQ(d.method, "mola");
  EXPECT_EQ(d.experts, PerLayerSpec(8));
  EXPECT_EQ(d.top_k, PerLayerSpec(2));
  EXPECT_EQ(d.rank, PerLayerSpec(8));
  EXPECT_EQ(d.alpha, 16.0);
  EXPECT_EQ(d.dropout, 0.05);
  EXPECT_EQ(d.targets.size(), 7u);
  EXPECT_EQ(d.aux_loss_coef, 0.001);
  EXPECT_EQ(d.compute, "auto");
  const AdapterConfig c = AdapterConfig::from_json_string(R"({"experts": "diamond", "rank": 16})");
  EXPECT_EQ(c.experts, PerLayerSpec("diamond"));
  EXPECT_EQ(c.rank, PerLayerSpec(16));
  EXPECT_EQ(c.top_k, PerLayerSpec(2));
}

TEST(ConfigJson, UnknownKeysNameTheNearestKey) {
  expect_error([] { AdapterConfig::from_json_string(R"({"experst": 8})"); },
               {"unknown key \"experst\"", "did you mean \"experts\"", "Valid keys"});
  expect_error([] { AdapterConfig::from_json_string(R"({"topk": 2})"); }, {"\"topk\"", "did you mean \"top_k\""});
  expect_error([] { AdapterConfig::from_json_string(R"({"aux_loss": 0.1})"); }, {"did you mean \"aux_loss_coef\""});
  expect_error([] { AdapterConfig::from_json_string(R"({"lora_alpha": 16})"); }, {"did you mean \"alpha\""});
}

TEST(ConfigJson, BadValuesAndTypes) {
  const auto bad = [](const char* text, std::initializer_list<std::string> parts) {
    expect_error([&] { AdapterConfig::from_json_string(text); }, parts);
  };
  bad(R"([1, 2])", {"must be a JSON object", "[1,2]"});
  bad(R"({"experts": 8.5})", {"experts must be an integer", "preset string", "8.5"});
  bad(R"({"experts": true})", {"experts must be an integer", "true"});
  bad(R"({"top_k": 2.0})", {"top_k must be an integer", "2.0"});
  bad(R"({"rank": [8, "8", 8, 8]})", {"rank[1] is \"8\"", "not a whole number"});
  bad(R"({"experts": "2-4-x-8"})", {"experts: group 3", "\"x\"", "not a whole number"});
  bad(R"({"experts": "24680"})", {"5 digits", "not a preset"});
  bad(R"({"top_k": "2"})", {"top_k: \"2\" is a string", "experts only"});
  bad(R"({"method": "molx"})", {"method \"molx\"", "not one of mola", "did you mean \"molex\""});
  bad(R"({"method": 1})", {"method must be a string", "1"});
  bad(R"({"compute": "groupd"})", {"compute \"groupd\"", "auto, dense, grouped", "did you mean \"grouped\""});
  bad(R"({"alpha": 0})", {"alpha 0", "> 0"});
  bad(R"({"alpha": "16"})", {"alpha must be a number", "\"16\""});
  bad(R"({"dropout": 1.0})", {"dropout 1", "0 <= dropout < 1"});
  bad(R"({"dropout": -0.1})", {"dropout -0.1", "0 <= dropout < 1"});
  bad(R"({"aux_loss_coef": -1})", {"aux_loss_coef -1", ">= 0", "0 turns the load-balancing loss off"});
  bad(R"({"targets": []})", {"targets is empty"});
  bad(R"({"targets": "q_proj"})", {"targets must be a list", "\"q_proj\""});
  bad(R"({"targets": ["q_proj", 3]})", {"targets: 3 is not a string"});
  bad(R"({"targets": ["q_proj", "v_proj", "q_proj"]})", {"targets lists \"q_proj\" twice"});
  bad(R"({"targets": ["q_proj", ""]})", {"targets[1] is an empty name"});
  bad(R"({"experts": 8,})", {"not valid JSON", "byte", "line 1"});
  bad(R"({"experts": 2, "top_k": 3})", {"top_k 3 exceeds experts 2"});
}

// A fresh temporary directory per test. POSIX calls rather than <filesystem>:
// this binary links libtorch, whose exported std::filesystem::remove_all
// crashes (pytorch/pytorch#133437).
class ConfigFiles : public ::testing::Test {
 protected:
  std::string dir;
  std::vector<std::string> files;
  void SetUp() override {
    char tmpl[] = "/tmp/mola_test_config_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir = tmpl;
  }
  void TearDown() override {
    for (const auto& f : files) std::remove(f.c_str());
    ::rmdir(dir.c_str());
  }
  std::string write(const std::string& name, const std::string& text) {
    files.push_back(dir + "/" + name);
    std::ofstream(files.back()) << text;
    return files.back();
  }
};

TEST_F(ConfigFiles, ReadsAFile) {
  const std::string path = write("ok.json", R"({"experts": "inverted", "alpha": 32})");
  const AdapterConfig c = AdapterConfig::from_json_file(path);
  EXPECT_EQ(c.experts, PerLayerSpec("inverted"));
  EXPECT_EQ(c.alpha, 32.0);
}

TEST_F(ConfigFiles, ErrorsNameTheFile) {
  const std::string missing = dir + "/missing.json";
  expect_error([&] { AdapterConfig::from_json_file(missing); }, {missing, "does not exist", "check the path"});
  expect_error([&] { AdapterConfig::from_json_file(dir); }, {dir, "is a directory"});
  const std::string broken = write("broken.json", "{\n  \"experts\": 8\n  \"rank\": 4\n}\n");
  expect_error([&] { AdapterConfig::from_json_file(broken); }, {broken, "not valid JSON", "line 3", "column"});
  const std::string bad = write("bad.json", R"({"expert": 8})");
  expect_error([&] { AdapterConfig::from_json_file(bad); }, {bad, "unknown key \"expert\"", "\"experts\""});
}

TEST(ConfigResolve, PerLayerListsAndScaling) {
  AdapterConfig c = with_experts("triangle");
  c.rank = V{4, 8, 8, 16};
  c.alpha = 16;
  const mola::ResolvedAdapter r = c.resolve(28);
  EXPECT_EQ(r.num_layers, 28);
  EXPECT_EQ(r.experts, groups({8, 6, 4, 2}, {7, 7, 7, 7}));
  EXPECT_EQ(r.top_k, V(28, 2));
  EXPECT_EQ(r.rank, groups({4, 8, 8, 16}, {7, 7, 7, 7}));
  EXPECT_EQ(r.scaling.front(), 4.0);
  EXPECT_EQ(r.scaling.back(), 1.0);
  const json j = r.to_json();
  for (const char* key : {"method", "num_layers", "experts", "top_k", "rank", "scaling", "alpha", "dropout",
                          "dropout_masks", "targets", "aux_loss_coef", "compute"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j.size(), 12u);
  EXPECT_EQ(j["experts"].size(), 28u);
  const mola::ResolvedAdapter back = mola::ResolvedAdapter::from_json(j);
  EXPECT_EQ(back.to_json(), j);
  json named = j;
  named["base_model_name"] = "meta-llama/Llama-2-7b-hf";
  EXPECT_EQ(mola::ResolvedAdapter::from_json(named).base_model_name, "meta-llama/Llama-2-7b-hf");
  EXPECT_EQ(mola::ResolvedAdapter::from_json(named).to_json(), named);
  named["base_model"] = "x";
  expect_error([&] { mola::ResolvedAdapter::from_json(named); }, {"unknown key \"base_model\"", "\"base_model_name\""});
  json wrong = j;
  wrong["scaling"][0] = 3.0;
  expect_error([&] { mola::ResolvedAdapter::from_json(wrong); }, {"scaling", "alpha / rank"});
  wrong = j;
  wrong.erase("num_layers");
  expect_error([&] { mola::ResolvedAdapter::from_json(wrong); }, {"needs \"num_layers\""});
}

TEST(ConfigParameterCount, Llama2_7bMatchesThePapers) {
  const auto shapes = llama2_7b_shapes();
  EXPECT_EQ(with_experts("5555").num_parameters(shapes, 32), 105635840);
  EXPECT_EQ(with_experts("rectangle").num_parameters(shapes, 32), 105635840);
  EXPECT_EQ(with_experts("8888").num_parameters(shapes, 32), 169017344);
  EXPECT_EQ(with_experts("4444").num_parameters(shapes, 32), 84508672);
  // Every 160-expert preset costs the same as 5555: the count is linear in E.
  for (const char* p : {"triangle", "inverted", "hourglass", "diamond"})
    EXPECT_EQ(with_experts(p).num_parameters(shapes, 32), 105635840) << p;
}

TEST(ConfigParameterCount, TargetsAndShapes) {
  AdapterConfig c = with_experts(1);
  c.top_k = 1;
  c.rank = 2;
  c.targets = {"q_proj"};
  // 3 layers * 1 expert * (2 * (10 + 20) + 10); other shapes are ignored.
  EXPECT_EQ(c.num_parameters({{"q_proj", 10, 20}, {"v_proj", 5, 5}}, 3), 3 * (2 * 30 + 10));
  expect_error([&] { c.num_parameters({{"v_proj", 5, 5}}, 3); },
               {"no shape is given for target \"q_proj\"", "got: v_proj"});
  expect_error([&] { c.num_parameters({{"q_proj", 0, 5}}, 3); }, {"\"q_proj\" is 0 -> 5", ">= 1"});
  expect_error([&] { c.num_parameters({{"q_proj", 4, 5}, {"q_proj", 5, 4}}, 3); }, {"two different shapes"});
}

TEST(ConfigDetail, EditDistanceAndNearestName) {
  EXPECT_EQ(mola::detail::edit_distance("", "abc"), 3u);
  EXPECT_EQ(mola::detail::edit_distance("kitten", "sitting"), 3u);
  EXPECT_EQ(mola::detail::edit_distance("top_k", "top_k"), 0u);
  EXPECT_EQ(mola::detail::nearest_name("RANK", AdapterConfig::keys()), "rank");
  EXPECT_EQ(mola::detail::nearest_name("x", {}), "");
}

TEST(ConfigMethod, LoraIsOneExpertWithTopOne) {
  // Missing experts and top_k take the method's defaults, 1 and 1.
  const AdapterConfig c = AdapterConfig::from_json_string(R"({"method": "lora", "rank": 4})");
  EXPECT_EQ(c.experts, mola::PerLayerSpec(1));
  EXPECT_EQ(c.top_k, mola::PerLayerSpec(1));
  const mola::ResolvedAdapter r = c.resolve(3);
  EXPECT_EQ(r.method, "lora");
  EXPECT_EQ(r.experts, std::vector<int64_t>(3, 1));
  EXPECT_EQ(r.top_k, std::vector<int64_t>(3, 1));
  EXPECT_EQ(r.scaling, std::vector<double>(3, 4.0));
  // Explicit ones (also per layer, as adapter_config.json writes them) are fine.
  EXPECT_NO_THROW(AdapterConfig::from_json_string(R"({"method": "lora", "experts": 1, "top_k": [1, 1, 1]})"));
  EXPECT_EQ(mola::ResolvedAdapter::from_json(r.to_json()).experts, r.experts);
  EXPECT_EQ(AdapterConfig::from_json(c.to_json()), c);
  // Anything else names the field and the value.
  expect_error([] { AdapterConfig::from_json_string(R"({"method": "lora", "experts": 4})"); },
               {"experts 4", "method \"lora\"", "use method \"mola\""});
  expect_error([] { AdapterConfig::from_json_string(R"({"method": "lora", "experts": "2468"})"); },
               {"experts \"2468\"", "method \"lora\""});
  expect_error([] { AdapterConfig::from_json_string(R"({"method": "lora", "top_k": [1, 2]})"); },
               {"top_k [1,2]", "method \"lora\""});
  AdapterConfig struct_default;  // experts 8 and top_k 2: the struct's defaults are mola's
  struct_default.method = "lora";
  expect_error([&] { struct_default.validate(); }, {"experts 8"});
  EXPECT_NO_THROW(AdapterConfig::for_method("lora").validate());
}

}  // namespace

// Did-you-mean picks what a person would: a shortened name finds its long
// form before a short name of similar edit distance.
TEST(NearestName, PicksWhatAPersonWould) {
  const std::vector<std::string> tasks{"boolq", "piqa", "cola", "scienceqa", "commonsenseqa", "openbookqa"};
  EXPECT_EQ(mola::detail::nearest_name("sciqa", tasks), "scienceqa");
  EXPECT_EQ(mola::detail::nearest_name("commonsense", tasks), "commonsenseqa");
  EXPECT_EQ(mola::detail::nearest_name("booql", tasks), "boolq");
  EXPECT_EQ(mola::detail::nearest_name("epcohs", {"epochs", "eval_every", "seed"}), "epochs");
  EXPECT_EQ(mola::detail::nearest_name("x", {}), "");
  const auto ordered = mola::detail::names_nearest_first("openbook", tasks);
  EXPECT_EQ(ordered.front(), "openbookqa");
  EXPECT_EQ(ordered.size(), tasks.size());
}
