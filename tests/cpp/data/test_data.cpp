// Tests for mola/data/{tokenizer,dataset}.h: every error load_rows, the
// template reader, the tokenizer and tokenize_row can raise, each from a bad
// file written to a fresh temp directory, with the message checked for the
// file, the line and the field; and a few pinned values (token ids from
// sentencepiece's Python package, conversions written out by hand). The
// full oracle comparisons are in tests/python/data/test_data.py.
#include "mola/data/dataset.h"
#include "mola/data/tokenizer.h"

#include <gtest/gtest.h>

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

namespace {

using mola::data::DataError;
using mola::data::DataFileNotFoundError;
using mola::data::DataOptions;
using mola::data::Example;
using mola::data::PromptTemplate;
using mola::data::Row;
using mola::data::Tokenizer;

// The repository root, the directory holding data/templates/alpaca.json:
// MOLA_SOURCE_DIR when set; else from __FILE__ (<root>/tests/cpp/data/test_data.cpp),
// which Ninja gives relative to the build directory, itself <exe dir>/../..;
// else the first such directory above the executable or the working directory.
bool is_repo(const std::string& dir) {
  struct stat st {};
  return ::stat((dir + "/data/templates/alpaca.json").c_str(), &st) == 0;
}

std::string dirname(const std::string& p) {
  const size_t slash = p.find_last_of('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : p.substr(0, slash);
}

std::string find_repo_root() {
  if (const char* env = std::getenv("MOLA_SOURCE_DIR")) return env;
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  const std::string exe_dir = n > 0 ? dirname(std::string(buf, static_cast<size_t>(n))) : ".";
  const std::string file_root = dirname(dirname(dirname(__FILE__)));
  std::vector<std::string> candidates = {file_root[0] == '/' ? file_root : exe_dir + "/../../" + file_root};
  for (std::string d = exe_dir; d.size() > 1; d = dirname(d)) candidates.push_back(d);
  if (char* cwd = ::getcwd(buf, sizeof(buf)))
    for (std::string d = cwd; d.size() > 1; d = dirname(d)) candidates.push_back(d);
  for (const auto& c : candidates)
    if (is_repo(c)) return c;
  return file_root;  // the tests that need data/ then fail naming the path they tried
}

std::string repo_root() {
  static const std::string root = find_repo_root();
  return root;
}

std::string data_path(const std::string& rel) { return repo_root() + "/data/" + rel; }

// A fresh directory, removed with its (flat) contents at the end.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/mola_data_XXXXXX";
    const char* d = ::mkdtemp(tmpl);
    if (d == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = d;
  }
  ~TempDir() {
    if (DIR* dir = ::opendir(path_.c_str())) {
      while (const dirent* e = ::readdir(dir)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") ::unlink((path_ + "/" + n).c_str());
      }
      ::closedir(dir);
    }
    ::rmdir(path_.c_str());
  }
  std::string write(const std::string& name, const std::string& content) const {
    const std::string p = path_ + "/" + name;
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs f, expects an exception of type E, returns its message.
template <typename E>
std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
    return "";
  }
  ADD_FAILURE() << "no exception";
  return "";
}

#define EXPECT_HAS(msg, part) EXPECT_NE((msg).find(part), std::string::npos) << "message: " << (msg) << "\nlacks: " << (part)

const std::string kCola = R"({"id":"c0","task":"cola","sentence":"It rains.","label":1})";
const std::string kRte = R"({"id":"r0","task":"rte","sentence1":"A  b.","sentence2":"C.","label":0})";
const std::string kCsqa =
    R"({"id":"q0","task":"commonsense_qa","question":"Q?","choices":[{"label":"A","text":"x"},{"label":"B","text":"y"}],"answer":"B"})";

// --- load_rows ----------------------------------------------------------------------------------

TEST(DataLoadRows, MissingFileNamesThePath) {
  TempDir d;
  const std::string p = d.path() + "/absent.jsonl";
  const auto msg = message_of<DataFileNotFoundError>([&] { mola::data::load_rows(p); });
  EXPECT_HAS(msg, p);
  EXPECT_HAS(msg, "not found");
}

TEST(DataLoadRows, EmptyAndBlankFiles) {
  TempDir d;
  for (const std::string content : {"", "\n\n  \n", "\t\r\n"}) {
    const auto p = d.write("empty.jsonl", content);
    const auto msg = message_of<DataError>([&] { mola::data::load_rows(p); });
    EXPECT_HAS(msg, p + ": no rows");
  }
}

TEST(DataLoadRows, MalformedJsonNamesFileAndLine) {
  TempDir d;
  const auto p = d.write("bad.jsonl", kCola + "\n" + kCola + "\n{\"id\": \"x\",\n");
  const auto msg = message_of<DataError>([&] { mola::data::load_rows(p); });
  EXPECT_HAS(msg, p + ":3: malformed JSON");
  EXPECT_HAS(msg, "column");
  // A blank line counts in the numbering.
  const auto p2 = d.write("bad2.jsonl", kCola + "\n\n[1, 2]\n");
  EXPECT_HAS(message_of<DataError>([&] { mola::data::load_rows(p2); }), p2 + ":3: expected a JSON object, got a JSON array");
  const auto p3 = d.write("bad3.jsonl", kCola + "\n{\"sentence\": \"\xff\"}\n");
  EXPECT_HAS(message_of<DataError>([&] { mola::data::load_rows(p3, "cola"); }), p3 + ":2: malformed JSON");
}

// A valid first row of each task, so the bad one is on line 2.
std::string good_row(const std::string& task) {
  if (task == "cola") return kCola;
  if (task == "rte") return kRte;
  if (task == "mrpc") return R"({"task":"mrpc","sentence1":"a","sentence2":"b","label":1})";
  if (task == "commonsense_qa") return kCsqa;
  if (task == "openbookqa")
    return R"({"task":"openbookqa","question":"q","choices":[{"label":"A","text":"t"}],"answer":"A"})";
  if (task == "scienceqa") return R"({"instruction":"i","output":"o","choices":["a"],"answer":"A"})";
  return R"({"instruction":"i","output":"o"})";
}

TEST(DataLoadRows, MissingFieldNamesFileLineAndField) {
  TempDir d;
  struct Case {
    std::string task, row, field;
  };
  const std::vector<Case> cases = {
      {"cola", R"({"task":"cola","label":1})", "sentence"},
      {"cola", R"({"task":"cola","sentence":"x"})", "label"},
      {"rte", R"({"task":"rte","sentence1":"x","label":0})", "sentence2"},
      {"mrpc", R"({"task":"mrpc","sentence2":"x","label":0})", "sentence1"},
      {"commonsense_qa", R"({"task":"commonsense_qa","choices":[],"answer":"A"})", "question"},
      {"openbookqa", R"({"task":"openbookqa","question":"q","answer":"A"})", "choices"},
      {"openbookqa", R"({"task":"openbookqa","question":"q","choices":[{"label":"A","text":"t"}]})", "answer"},
      {"scienceqa", R"({"instruction":"i","output":"o","answer":"A"})", "choices"},
      {"scienceqa", R"({"instruction":"i","choices":["a"],"answer":"A"})", "output"},
      {"instruction", R"({"instruction":"i"})", "output"},
  };
  for (const auto& c : cases) {
    const auto p = d.write("f.jsonl", good_row(c.task) + "\n" + c.row + "\n");
    for (const std::string task : {c.task, std::string("auto")}) {
      if (task == "auto" && (c.task == "scienceqa" || c.task == "instruction")) continue;  // auto needs the fields
      const auto msg = message_of<DataError>([&] { mola::data::load_rows(p, task); });
      EXPECT_HAS(msg, p + ":2: field \"" + c.field + "\" is missing; a row of task \"" + c.task + "\"");
    }
  }
}

TEST(DataLoadRows, IllTypedFieldNamesFileLineAndField) {
  TempDir d;
  struct Case {
    std::string row, needle;
  };
  const std::vector<Case> cases = {
      {R"({"task":"cola","sentence":"x","label":"1"})", "field \"label\" must be the integer 0 or 1, got string \"1\""},
      {R"({"task":"cola","sentence":"x","label":-1})", "field \"label\" must be the integer 0 or 1, got number -1"},
      {R"({"task":"cola","sentence":"x","label":1.0})", "field \"label\" must be the integer 0 or 1"},
      {R"({"task":"cola","sentence":7,"label":1})", "field \"sentence\" must be a string, got number 7"},
      {R"({"task":"rte","sentence1":"x","sentence2":null,"label":0})", "field \"sentence2\" must be a string, got null"},
      {R"({"task":"openbookqa","question":"q","choices":"A","answer":"A"})", "field \"choices\" must be a non-empty list"},
      {R"({"task":"openbookqa","question":"q","choices":[{"label":"A"}],"answer":"A"})",
       "field \"choices\"[0] must be {\"label\": string, \"text\": string}"},
      {R"({"task":"openbookqa","question":"q","choices":[{"label":"A","text":"t"}],"answer":"C"})",
       "field \"answer\" is \"C\", which is not one of the options (A)"},
      {R"({"instruction":"i","output":"o","choices":["a","b"],"answer":"E"})",
       "field \"answer\" is \"E\", which is not one of the options (A, B)"},
      {R"({"instruction":"i","output":"o","options":"AB"})", "field \"options\" must be a list of option letters"},
      {R"({"instruction":["i"],"output":"o"})", "field \"instruction\" must be a string, got array"},
  };
  for (const auto& c : cases) {
    const auto p = d.write("f.jsonl", kCola + "\n" + c.row + "\n");
    const auto msg = message_of<DataError>([&] { mola::data::load_rows(p); });
    EXPECT_HAS(msg, p + ":2: ");
    EXPECT_HAS(msg, c.needle);
  }
}

TEST(DataLoadRows, UnknownTaskListsValidNamesNearestFirst) {
  TempDir d;
  const auto p = d.write("f.jsonl", kCola + "\n");
  const auto msg = message_of<DataError>([&] { mola::data::load_rows(p, "mrcp"); });
  EXPECT_HAS(msg, p);
  EXPECT_HAS(msg, "unknown task \"mrcp\"; valid tasks, nearest first: mrpc, ");
  EXPECT_HAS(message_of<DataError>([&] { mola::data::load_rows(p, "scienceQA"); }), "nearest first: scienceqa, ");
  // In a row's "task" field, with no instruction to fall back on.
  const auto p2 = d.write("g.jsonl", kCola + "\n" + R"({"task":"colaa","sentence":"x","label":1})" + "\n");
  const auto msg2 = message_of<DataError>([&] { mola::data::load_rows(p2); });
  EXPECT_HAS(msg2, p2 + ":2: unknown task \"colaa\" in field \"task\"");
  EXPECT_HAS(msg2, "nearest first: cola, ");
  const auto p3 = d.write("h.jsonl", R"({"text":"x"})" "\n");
  EXPECT_HAS(message_of<DataError>([&] { mola::data::load_rows(p3); }), p3 + ":1: cannot tell this row's task");
}

TEST(DataLoadRows, RowTaskMustMatchTheRequestedTask) {
  TempDir d;
  const auto p = d.write("f.jsonl", kRte + "\n");
  const auto msg = message_of<DataError>([&] { mola::data::load_rows(p, "mrpc"); });
  EXPECT_HAS(msg, p + ":1: the row says \"task\": \"rte\" but load_rows was asked for task \"mrpc\"");
  EXPECT_EQ(mola::data::load_rows(p, "rte").size(), 1u);
}

TEST(DataLoadRows, ConvertsByHand) {
  TempDir d;
  const auto p = d.write("mixed.jsonl", "\xEF\xBB\xBF" + kCola + "\r\n" + kRte + "\n\n" + kCsqa + "\n" +
                                            R"({"instruction":"Add.","input":"2 3","output":"5"})" + "\n");
  const auto rows = mola::data::load_rows(p);
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[0].id, "c0");
  EXPECT_EQ(rows[0].instruction,
            "Context: Sentence: It rains.\nQuestion: Is the sentence grammatically acceptable?\nOptions: (A) yes (B) no\n");
  EXPECT_EQ(rows[0].answer, "A");
  EXPECT_EQ(rows[0].output, "Answer: The answer is A.");
  EXPECT_EQ(rows[1].instruction,
            "Context: Premise: A b. Hypothesis: C.\nQuestion: Does the premise entail the hypothesis?\n"
            "Options: (A) yes (B) no\n");  // "A  b." collapsed; label 0 is entailment
  EXPECT_EQ(rows[1].answer, "A");
  EXPECT_EQ(rows[2].instruction, "Context: N/A\nQuestion: Q?\nOptions: (A) x (B) y\n");
  EXPECT_EQ(rows[2].output, "Answer: The answer is B.");
  EXPECT_EQ(rows[2].options, (std::vector<std::string>{"A", "B"}));
  EXPECT_EQ(rows[3].input, "2 3");
  EXPECT_EQ(rows[3].output, "5");
  EXPECT_EQ(rows[3].id, "mixed-3");
  EXPECT_TRUE(rows[3].options.empty());
}

TEST(DataLoadRows, BundledFilesLoad) {
  // Row counts as data/README.md gives them.
  EXPECT_EQ(mola::data::load_rows(data_path("tasks/scienceqa/test.jsonl")).size(), 200u);
  EXPECT_EQ(mola::data::load_rows(data_path("tasks/rte/validation.jsonl"), "rte").size(), 277u);
  const auto rows = mola::data::load_rows(data_path("tasks/openbookqa/test.jsonl"));
  ASSERT_EQ(rows.size(), 500u);
  EXPECT_EQ(rows[2].instruction, "Context: N/A\nQuestion: Predators eat\nOptions: (A) lions (B) humans (C) bunnies (D) grass\n");
  EXPECT_EQ(rows[2].answer, "C");
}

// --- PromptTemplate -----------------------------------------------------------------------------

const std::string kTemplate =
    R"({"description":"d","prompt_input":"I: {instruction} In: {input} R:","prompt_no_input":"I: {instruction} R:","response_split":"R:"})";

TEST(DataTemplate, FileErrorsNameTheFileAndKey) {
  TempDir d;
  const std::string absent = d.path() + "/absent.json";
  EXPECT_HAS(message_of<DataFileNotFoundError>([&] { PromptTemplate::from_json_file(absent); }), absent);
  for (const std::string key : {"prompt_input", "prompt_no_input", "response_split"}) {
    nlohmann::json j = nlohmann::json::parse(kTemplate);
    j.erase(key);
    const auto p = d.write("t.json", j.dump());
    const auto msg = message_of<DataError>([&] { PromptTemplate::from_json_file(p); });
    EXPECT_HAS(msg, p + ": missing key \"" + key + "\"");
  }
  const auto typed = d.write("typed.json", R"({"prompt_input":1,"prompt_no_input":"","response_split":""})");
  EXPECT_HAS(message_of<DataError>([&] { PromptTemplate::from_json_file(typed); }),
             typed + ": key \"prompt_input\" must be a string, got a JSON number");
  const auto broken = d.write("broken.json", "{\"prompt_input\": ");
  EXPECT_HAS(message_of<DataError>([&] { PromptTemplate::from_json_file(broken); }), broken + ": not valid JSON");
  const auto list = d.write("list.json", "[]");
  EXPECT_HAS(message_of<DataError>([&] { PromptTemplate::from_json_file(list); }), list + ": a template must be a JSON object");
  const auto ph = d.write("ph.json", R"({"prompt_input":"{instruction} {output}","prompt_no_input":"{instruction}","response_split":"x"})");
  EXPECT_HAS(message_of<DataError>([&] { PromptTemplate::from_json_file(ph); }),
             ph + ": key \"prompt_input\": placeholder {output} is not one this template may use");
  const auto brace = d.write("brace.json", R"({"prompt_input":"{instruction}{input}","prompt_no_input":"{instruction","response_split":"x"})");
  EXPECT_HAS(message_of<DataError>([&] { PromptTemplate::from_json_file(brace); }), "is never closed");
}

TEST(DataTemplate, PromptAndResponse) {
  TempDir d;
  const auto t = PromptTemplate::from_json_file(d.write("mini.json", kTemplate));
  EXPECT_EQ(t.name, "mini");
  EXPECT_EQ(t.prompt("Do {x}", ""), "I: Do {x} R:");  // values are not formatted again, as in Python
  EXPECT_EQ(t.prompt("Do", "this", " done"), "I: Do In: this R: done");
  EXPECT_EQ(t.response("I: Do R:  A answer \n"), "A answer");
  EXPECT_EQ(t.response("x R: one R: two"), "one");  // split(...)[1]
  EXPECT_EQ(t.response("no marker"), "");
  const auto alpaca = PromptTemplate::from_json_file(data_path("templates/alpaca.json"));
  EXPECT_EQ(alpaca.prompt("Say hi.", "", "Hi!"),
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!");
  EXPECT_EQ(alpaca.response(alpaca.prompt("Q", "", " The answer is B. ")), "The answer is B.");
}

// --- Tokenizer ----------------------------------------------------------------------------------

TEST(DataTokenizer, ErrorsNameThePath) {
  TempDir d;
  const std::string absent = d.path() + "/tokenizer.model";
  auto msg = message_of<DataFileNotFoundError>([&] { Tokenizer::from_file(absent); });
  EXPECT_HAS(msg, absent);
  msg = message_of<DataFileNotFoundError>([&] { Tokenizer::from_file(d.path()); });
  EXPECT_HAS(msg, "the directory given has no tokenizer.model");
  const auto bad = d.write("bad.model", "not a model");
  msg = message_of<DataError>([&] { Tokenizer::from_file(bad); });
  EXPECT_HAS(msg, bad + "' is not a SentencePiece model");
  const auto tok = Tokenizer::from_file(data_path("tokenizers/llama2/tokenizer.model"));
  EXPECT_HAS(message_of<DataError>([&] { tok.decode({1, 40000}); }), "id 40000 at position 1 is outside [0, 32000)");
  EXPECT_THROW(Tokenizer().encode("x"), std::logic_error);
}

TEST(DataTokenizer, PinnedIds) {
  // Expected ids from sentencepiece's Python package on the same files.
  const auto llama = Tokenizer::from_file(data_path("tokenizers/llama2/tokenizer.model"));
  EXPECT_EQ(llama.encode("Hello world"), (std::vector<int64_t>{1, 15043, 3186}));
  EXPECT_EQ(llama.encode("\xC3\x9Cn\xC3\xAF \xF0\x9F\xA4\x97\n"),  // "Ünï 🤗\n": byte fallback for the emoji
            (std::vector<int64_t>{1, 7189, 29876, 30085, 29871, 243, 162, 167, 154, 13}));
  EXPECT_EQ(llama.encode("  two", false), (std::vector<int64_t>{259, 1023}));
  EXPECT_EQ(llama.encode("Hello world", true, true), (std::vector<int64_t>{1, 15043, 3186, 2}));
  EXPECT_EQ(llama.decode({0, 0, 1, 15043, 3186, 2}), "Hello world");
  EXPECT_EQ(llama.bos_id(), 1);
  EXPECT_EQ(llama.eos_id(), 2);
  EXPECT_EQ(llama.pad_id(), 0);
  EXPECT_EQ(llama.vocab_size(), 32000);
  const auto mistral = Tokenizer::from_file(data_path("tokenizers/mistral"));  // a directory: its tokenizer.model
  EXPECT_EQ(mistral.encode("Hello world"), (std::vector<int64_t>{1, 22557, 1526}));
}

// --- tokenize_row -------------------------------------------------------------------------------

TEST(DataTokenizeRow, AuthorsMaskingAndCutoff) {
  const auto tok = Tokenizer::from_file(data_path("tokenizers/llama2/tokenizer.model"));
  const auto alpaca = PromptTemplate::from_json_file(data_path("templates/alpaca.json"));
  Row row;
  row.instruction = "Say hi.";
  row.output = "Hi!";
  // From sentencepiece Python: the prompt alone is 40 ids (BOS first, ending "...:", "\n"),
  // prompt + "Hi!" 42, the last two "Hi" 18567 and "!" 29991.
  DataOptions o;
  o.train_on_inputs = false;
  Example ex = mola::data::tokenize_row(row, alpaca, tok, o);
  ASSERT_EQ(ex.input_ids.size(), 43u);
  EXPECT_EQ(std::vector<int64_t>(ex.input_ids.end() - 3, ex.input_ids.end()), (std::vector<int64_t>{18567, 29991, 2}));
  std::vector<int64_t> want(40, -100);
  want.insert(want.end(), {18567, 29991, 2});
  EXPECT_EQ(ex.labels, want);

  o.cutoff_len = 42;  // the text fills it: no EOS
  ex = mola::data::tokenize_row(row, alpaca, tok, o);
  EXPECT_EQ(ex.input_ids.size(), 42u);
  EXPECT_EQ(ex.input_ids.back(), 29991);

  o.cutoff_len = 40;  // the prompt alone fills it: the authors still subtract the EOS, the last label stays
  ex = mola::data::tokenize_row(row, alpaca, tok, o);
  ASSERT_EQ(ex.labels.size(), 40u);
  EXPECT_EQ(ex.labels[38], -100);
  EXPECT_EQ(ex.labels[39], 13);

  o.train_on_inputs = true;
  o.cutoff_len = 256;
  ex = mola::data::tokenize_row(row, alpaca, tok, o);
  EXPECT_EQ(ex.labels, ex.input_ids);
  EXPECT_EQ(ex.input_ids.back(), 2);
  o.add_eos_token = false;
  EXPECT_EQ(mola::data::tokenize_row(row, alpaca, tok, o).input_ids.size(), 42u);
}

TEST(DataTokenizeRow, RejectsCutoffBelowTwo) {
  const auto tok = Tokenizer::from_file(data_path("tokenizers/llama2/tokenizer.model"));
  for (int64_t c : {1, 0, -1}) {
    DataOptions o;
    o.cutoff_len = c;
    const auto msg = message_of<DataError>([&] { mola::data::tokenize_row(Row{}, PromptTemplate::raw(), tok, o); });
    EXPECT_HAS(msg, "cutoff_len is " + std::to_string(c) + ", but it must be >= 2");
  }
}

}  // namespace
