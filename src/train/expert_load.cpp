// expert_load (mola/train/run.h): which experts the routers pick, per layer,
// on real data. It reads the router logits each MoLA adapter keeps from its
// last forward and routes them again with the op's own routing
// (mola::ops::moe_lora_route), so the counts are the choices the op made.
#include "mola/train/run.h"

#include <mola/data/batch.h>
#include <mola/ops.h>

#include "train/progress.h"

#include <torch/csrc/autograd/grad_mode.h>

#include <map>

namespace mola::train {

nlohmann::json expert_load(models::CausalLMImpl& model, const std::vector<data::Example>& examples,
                           int64_t batch_size, std::FILE* progress_stream) {
  if (!model.has_adapter())
    throw std::logic_error("expert_load: the model has no adapter; attach or load one first");
  if (examples.empty()) throw std::invalid_argument("expert_load: no examples to route");
  if (batch_size < 1) throw std::invalid_argument("expert_load: batch_size must be >= 1");
  const ResolvedAdapter& adapter = model.adapter_config();
  const auto projections = model.adapted_projections();
  const bool was_training = model.is_training();
  model.eval();
  at::NoGradGuard no_grad;

  // counts[path] = [E] selections; the per-layer share sums a layer's targets.
  std::map<std::string, at::Tensor> counts;
  int64_t tokens = 0;
  const at::Device device = model.model->embed_tokens->weight.device();
  detail::PassProgress progress("mola: expert load", static_cast<int64_t>(examples.size()), progress_stream);
  for (size_t start = 0; start < examples.size(); start += static_cast<size_t>(batch_size)) {
    std::vector<int64_t> indices;
    for (size_t i = start; i < std::min(examples.size(), start + static_cast<size_t>(batch_size)); ++i)
      indices.push_back(static_cast<int64_t>(i));
    const data::Batch batch = data::collate(examples, indices, /*pad_id=*/0, /*pad_to_multiple_of=*/1);
    const at::Tensor mask = batch.attention_mask.to(device);
    model.forward(batch.input_ids.to(device), mask);
    const at::Tensor keep = mask.reshape({-1}).ne(0);  // [batch * seq]
    tokens += keep.sum().item<int64_t>();
    for (const auto& p : projections) {
      const int64_t experts = adapter.experts[p.layer], k = adapter.top_k[p.layer];
      const at::Tensor logits = p.module->mola->router_logits.reshape({-1, experts}).index({keep});  // [tokens, E]
      const at::Tensor chosen = std::get<1>(ops::moe_lora_route(logits, k)).reshape({-1});
      const at::Tensor c = at::bincount(chosen.cpu(), /*weights=*/{}, experts);  // [E]
      auto [it, fresh] = counts.emplace(p.path, c);
      if (!fresh) it->second = it->second + c;
    }
    progress.advance(static_cast<int64_t>(indices.size()));
  }
  progress.finish();
  model.train(was_training);

  nlohmann::json layers = nlohmann::json::array();
  for (int64_t layer = 0; layer < adapter.num_layers; ++layer) {
    at::Tensor total;
    nlohmann::json per_target = nlohmann::json::object();
    for (const auto& p : projections) {
      if (p.layer != layer) continue;
      const at::Tensor c = counts.at(p.path).to(at::kDouble);
      total = total.defined() ? total + c : c;
      const at::Tensor share = c / c.sum().clamp_min(1);
      per_target[p.path.substr(p.path.find_last_of('.') + 1)] =
          std::vector<double>(share.data_ptr<double>(), share.data_ptr<double>() + share.numel());
    }
    if (!total.defined()) continue;
    const at::Tensor share = (total / total.sum().clamp_min(1)).contiguous();
    layers.push_back({{"layer", layer},
                      {"experts", adapter.experts[layer]},
                      {"top_k", adapter.top_k[layer]},
                      {"share", std::vector<double>(share.data_ptr<double>(), share.data_ptr<double>() + share.numel())},
                      {"per_target", per_target}});
  }
  return {{"tokens", tokens}, {"examples", examples.size()}, {"layers", layers}};
}

}  // namespace mola::train
