// Fine-tuning from C++ (docs/cpp.md), built against the installed package
// (find_package(mola), examples/cpp/finetune/CMakeLists.txt): load the bundled
// pretrained tiny llama (data/models/stories260K, a Hugging Face checkpoint
// directory), attach a MoLA adapter, train it on ScienceQA with mola::Trainer,
// save the adapter and continue a story with it. Exits 1 if the loss does not
// fall, so ctest runs it as a check (tests/cpp/package_install.cmake).
//
//   build/finetune/finetune [OUTPUT_DIR]      (from the mola repository root: it reads data/ and configs/)
#include <mola/mola.h>

#include <iostream>

int main(int argc, char** argv) {
  const std::string out = argc > 1 ? argv[1] : "out/example-finetune";
  const std::string model_dir = "data/models/stories260K";

  // The model, its tokenizer, and an adapter: 2-4-6-8 experts spread over its 5 layers.
  auto model = mola::CausalLM::from_pretrained(model_dir);  // fp32 on the CPU
  mola::AdapterConfig cfg = mola::AdapterConfig::from_json_file("configs/adapters/mola-inverted.json");
  model->attach(cfg);  // freezes everything but the adapters
  const auto tok = mola::data::Tokenizer::from_file(model_dir + "/tokenizer.model");

  // 16 ScienceQA rows in the authors' alpaca format, tokenised as their finetune.py does.
  const auto tmpl = mola::data::PromptTemplate::from_json_file("data/templates/alpaca.json");
  auto rows = mola::data::load_rows("data/tasks/scienceqa/train.jsonl");
  rows.resize(16);
  mola::data::DataOptions data_options;
  data_options.cutoff_len = 512;
  const auto examples = mola::data::tokenize_rows(rows, tmpl, tok, data_options);

  mola::TrainOptions options;
  options.epochs = 4;
  options.batch_size = 8;
  options.micro_batch_size = 8;
  options.lr = 3e-3;
  options.warmup_steps = 2;
  options.save_every = 0;  // one checkpoint, at the end
  mola::Trainer trainer(model, options, out);
  const double before = trainer.evaluate(examples);
  const mola::train::TrainResult result = trainer.fit(examples);
  const double after = trainer.evaluate(examples);
  mola::save_adapter(*model, out + "/adapter");
  std::cout << "loss on the training rows: " << before << " -> " << after << " after " << result.steps
            << " steps; adapter in " << out << "/adapter\n";

  mola::models::GenerateOptions g;
  g.max_new_tokens = 24;
  const auto ids = tok.encode("Once upon a time");
  const at::Tensor prompt = at::tensor(ids, at::TensorOptions().dtype(at::kLong)).view({1, -1});
  const at::Tensor story = model->generate(prompt, g);  // [1, prompt + new]
  std::vector<int64_t> all(story.data_ptr<int64_t>(), story.data_ptr<int64_t>() + story.numel());
  std::cout << tok.decode(all) << "\n";
  return after < before ? 0 : 1;
}
