// mola::nn::MoLALinear: parameters and initialisation; the math is the op's.
#include <mola/nn/moe_lora_linear.h>

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

namespace mola::nn {

MoLALinearImpl::MoLALinearImpl(const MoLALinearOptions& options_) : options(options_) { build(); }

MoLALinearImpl::MoLALinearImpl(torch::nn::Linear base_, MoLALinearOptions options_)
    : options(std::move(options_.in_features(base_->options.in_features())
                            .out_features(base_->options.out_features())
                            .bias(base_->options.bias()))),
      base(std::move(base_)) {
  build();
}

void MoLALinearImpl::build() {
  const auto& o = options;
  TORCH_CHECK_VALUE(o.in_features() > 0 && o.out_features() > 0, "MoLALinear: in_features (",
                    o.in_features(), ") and out_features (", o.out_features(), ") must be > 0");
  TORCH_CHECK_VALUE(o.num_experts() >= 1, "MoLALinear: num_experts (", o.num_experts(),
                    ") must be at least 1");
  TORCH_CHECK_VALUE(o.top_k() >= 1 && o.top_k() <= o.num_experts(), "MoLALinear: top_k (",
                    o.top_k(), ") must be between 1 and num_experts (", o.num_experts(), ")");
  TORCH_CHECK_VALUE(o.rank() >= 1, "MoLALinear: rank (", o.rank(), ") must be at least 1");
  TORCH_CHECK_VALUE(o.dropout() >= 0.0 && o.dropout() < 1.0, "MoLALinear: dropout (", o.dropout(),
                    ") must be in [0, 1)");
  if (!base) {
    base = torch::nn::Linear(
        torch::nn::LinearOptions(o.in_features(), o.out_features()).bias(o.bias()));
  }
  register_module("base", base);
  for (auto& p : base->parameters()) p.requires_grad_(false);  // the base stays frozen
  const auto opts = base->weight.options().requires_grad(false);
  router = register_parameter("router", at::empty({o.num_experts(), o.in_features()}, opts));
  lora_a = register_parameter("lora_a",
                              at::empty({o.num_experts(), o.rank(), o.in_features()}, opts));
  lora_b = register_parameter("lora_b",
                              at::empty({o.num_experts(), o.out_features(), o.rank()}, opts));
  reset_parameters();
}

void MoLALinearImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  // kaiming_uniform_(a=sqrt(5)) on a [rows, in] matrix: gain sqrt(2/(1+5)),
  // bound = gain * sqrt(3 / fan_in) = 1/sqrt(in). Per expert, so fan_in is `in`.
  const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
  router.uniform_(-bound, bound);
  lora_a.uniform_(-bound, bound);
  lora_b.zero_();
}

at::Tensor MoLALinearImpl::forward(const at::Tensor& x) {
  std::optional<at::Tensor> seed;
  const bool training = is_training();
  if (training && options.dropout() > 0.0) {
    // A fresh mask per call, drawn from torch's default generator (so
    // torch::manual_seed makes runs repeat); the op regenerates it in backward.
    seed = at::randint(std::numeric_limits<int64_t>::max(), {1}, at::TensorOptions(at::kLong));
  }
  const std::optional<at::Tensor> bias =
      base->options.bias() ? std::optional<at::Tensor>(base->bias) : std::nullopt;
  auto [y, logits] = ops::moe_lora(x, base->weight, bias, router, lora_a, lora_b, options.top_k(),
                                   scaling(), options.dropout(), training, options.compute(), seed);
  router_logits = logits;
  return y;
}

}  // namespace mola::nn
