// A MoLALinear layer from C++: wrap a frozen linear layer with 8 routed LoRA
// experts, fit a target that needs the adapter, add the balance loss, and read
// the per-layer plan of a preset from an adapter config. Exits non-zero if the
// loss does not fall, so the test suite runs it as a check.
//
//   build/py/examples/cpp/moe_lora_layer [configs/adapters/mola-triangle.json]
#include <mola/mola.h>

#include <torch/torch.h>

#include <iostream>

int main(int argc, char** argv) {
  torch::manual_seed(0);
  const std::string config_path = argc > 1 ? argv[1] : "configs/adapters/mola-triangle.json";
  mola::AdapterConfig cfg;
  try {
    cfg = mola::AdapterConfig::from_json_file(config_path);
  } catch (const mola::ConfigError& e) {
    std::cerr << e.what() << "\n";
    return 2;
  }
  const mola::ResolvedAdapter plan = cfg.resolve(32);
  std::cout << config_path << ": experts in layers 0, 8, 16, 24 = " << plan.experts[0] << ", "
            << plan.experts[8] << ", " << plan.experts[16] << ", " << plan.experts[24] << "\n";

  // One layer with the plan's first-layer settings.
  const int64_t dim = 64;
  mola::nn::MoLALinear layer(mola::nn::MoLALinearOptions(dim, dim)
                                 .num_experts(plan.experts[0])
                                 .top_k(plan.top_k[0])
                                 .rank(plan.rank[0])
                                 .alpha(cfg.alpha)
                                 .layer_index(0));
  // The change the adapter must learn: low rank, as LoRA assumes.
  auto target = torch::mm(torch::randn({dim, 4}), torch::randn({4, dim})) * 0.05;
  std::vector<torch::Tensor> params = {layer->router, layer->lora_a, layer->lora_b};
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  double first = 0, last = 0;
  for (int step = 0; step <= 200; ++step) {
    auto x = torch::randn({256, dim});
    auto want = layer->base->forward(x).detach() + torch::mm(x, target.t());
    auto mse = torch::mse_loss(layer->forward(x), want);
    auto aux = mola::ops::load_balancing_loss({layer->router_logits}, {layer->options.top_k()},
                                              cfg.aux_loss_coef);
    opt.zero_grad();
    (mse + aux).backward();
    opt.step();
    if (step == 0) first = mse.item<double>();
    last = mse.item<double>();
    if (step % 50 == 0) std::cout << "step " << step << "  mse " << last << "\n";
  }
  std::cout << "mse " << first << " -> " << last << "\n";
  return last < 0.1 * first ? 0 : 1;
}
