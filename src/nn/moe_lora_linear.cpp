// mola::nn::MoLALinear and MoLAAdapter: parameters and initialisation; the
// math is the op's.
#include <mola/nn/moe_lora_linear.h>

#include "detail/parameters.h"

#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace mola::nn {

namespace detail {

void check_options(const MoLALinearOptions& o, const char* who) {
  TORCH_CHECK_VALUE(o.in_features() > 0 && o.out_features() > 0, who, ": in_features (", o.in_features(),
                    ") and out_features (", o.out_features(), ") must be > 0");
  TORCH_CHECK_VALUE(o.num_experts() >= 1, who, ": num_experts (", o.num_experts(), ") must be at least 1");
  TORCH_CHECK_VALUE(o.top_k() >= 1 && o.top_k() <= o.num_experts(), who, ": top_k (", o.top_k(),
                    ") must be between 1 and num_experts (", o.num_experts(), ")");
  TORCH_CHECK_VALUE(o.rank() >= 1, who, ": rank (", o.rank(), ") must be at least 1");
  TORCH_CHECK_VALUE(o.dropout() >= 0.0 && o.dropout() < 1.0, who, ": dropout (", o.dropout(), ") must be in [0, 1)");
  TORCH_CHECK_VALUE(o.init() == "kaiming" || o.init() == "gaussian" || o.init() == "pissa", who, ": init \"",
                    o.init(), "\" is not one of kaiming, gaussian, pissa");
  TORCH_CHECK_VALUE(o.dropout_masks() == "per_expert" || o.dropout_masks() == "shared", who, ": dropout_masks \"",
                    o.dropout_masks(), "\" is not one of per_expert, shared");
}

void reset_adapter_parameters(at::Tensor& router, at::Tensor& lora_a, at::Tensor& lora_b, const std::string& init) {
  at::NoGradGuard no_grad;
  // kaiming_uniform_(a=sqrt(5)) on a [rows, in] matrix: gain sqrt(2/(1+5)),
  // bound = gain * sqrt(3 / fan_in) = 1/sqrt(in). Per expert, so fan_in is `in`.
  const double bound = 1.0 / std::sqrt(static_cast<double>(router.size(1)));
  router.uniform_(-bound, bound);
  if (init == "gaussian") {
    // PEFT's init_lora_weights="gaussian": nn.init.normal_(lora_A, std=1/r).
    lora_a.normal_(0.0, 1.0 / static_cast<double>(lora_a.size(1)));
  } else {
    lora_a.uniform_(-bound, bound);
  }
  lora_b.zero_();
}

void pissa_init(at::Tensor& weight, at::Tensor& lora_a, at::Tensor& lora_b, double scaling) {
  const int64_t experts = lora_a.size(0), r = lora_a.size(1), out = weight.size(0), in = weight.size(1);
  TORCH_CHECK_VALUE(r <= std::min(out, in), "init pissa: rank ", r, " exceeds min(out, in) = ", std::min(out, in),
                    " of the base weight [", out, ", ", in, "]; lower the rank or use init \"kaiming\"");
  at::NoGradGuard no_grad;
  const at::ScalarType compute = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor w = weight.to(compute);
  auto [u, s, vh] = at::linalg_svd(w, /*full_matrices=*/false);  // [out, m], [m], [m, in]
  const at::Tensor u_r = u.slice(1, 0, r), s_r = s.slice(0, 0, r), vh_r = vh.slice(0, 0, r);
  const at::Tensor root = (s_r / scaling).sqrt();                       // [r]
  const at::Tensor a = root.unsqueeze(1) * vh_r;                        // [r, in]
  const at::Tensor b = u_r * root.unsqueeze(0);                         // [out, r]
  lora_a.copy_(a.unsqueeze(0).expand({experts, r, in}));                // [E, r, in]
  lora_b.copy_(b.unsqueeze(0).expand({experts, out, r}));               // [E, out, r]
  weight.copy_(w - (u_r * s_r.unsqueeze(0)).matmul(vh_r));              // W - U_r S_r V_r^T
}

std::tuple<at::Tensor, at::Tensor> adapter_forward(const MoLALinearOptions& o, bool training, const at::Tensor& x,
                                                   const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                   const at::Tensor& router_param, const at::Tensor& lora_a_param,
                                                   const at::Tensor& lora_b_param) {
  // An fp32 adapter over a 16-bit base computes in the activations' dtype; the
  // casts are differentiable, so its gradients arrive in fp32.
  const auto as_x = [&](const at::Tensor& t) { return t.scalar_type() == x.scalar_type() ? t : t.to(x.scalar_type()); };
  const at::Tensor router = as_x(router_param), lora_a = as_x(lora_a_param), lora_b = as_x(lora_b_param);
  std::optional<at::Tensor> seed;
  if (training && o.dropout() > 0.0) {
    // A fresh mask per call, drawn from torch's default generator (so
    // torch::manual_seed makes runs repeat); the op regenerates it in backward.
    // The CPU generator on every device: gradient checkpointing
    // (src/models/checkpoint.cpp) replays its state. On CUDA the value then
    // travels to the kernels by value, so a CUDA graph captured around this
    // module would replay one mask (the Python module draws on the device).
    seed = at::randint(std::numeric_limits<int64_t>::max(), {1}, at::TensorOptions(at::kLong));
  }
  return ops::moe_lora(x, weight, bias, router, lora_a, lora_b, o.top_k(), o.alpha() / static_cast<double>(o.rank()),
                       o.dropout(), training, o.compute(), seed, o.dropout_masks() == "shared");
}

namespace {

// Drops one forward's logits from a RouterLog when a backward pass runs
// through the autograd node that made them (see RouterLog).
struct SpentForward : torch::autograd::FunctionPreHook {
  SpentForward(const std::shared_ptr<std::vector<at::Tensor>>& pending, const at::Tensor& logits)
      : pending(pending), logits(logits.unsafeGetTensorImpl()) {}
  torch::autograd::variable_list operator()(const torch::autograd::variable_list& grads) override {
    if (auto p = pending.lock())
      p->erase(std::remove_if(p->begin(), p->end(),
                              [&](const at::Tensor& t) { return t.unsafeGetTensorImpl() == logits; }),
               p->end());
    return grads;
  }
  std::weak_ptr<std::vector<at::Tensor>> pending;
  const void* logits;  // identity only: the log holds the tensor while it is there
};

}  // namespace

void RouterLog::record(const at::Tensor& logits, bool training, const at::Tensor& router, const at::Tensor& lora_a,
                       const at::Tensor& lora_b) {
  if (!training || !at::GradMode::is_enabled() ||
      !(router.requires_grad() || lora_a.requires_grad() || lora_b.requires_grad()))
    return;
  pending->push_back(logits);
  if (const auto& node = logits.grad_fn()) node->add_pre_hook(std::make_unique<SpentForward>(pending, logits));
}

std::vector<at::Tensor> RouterLog::take(const at::Tensor& last) {
  std::vector<at::Tensor> out;
  out.swap(*pending);
  if (out.empty() && last.defined()) out.push_back(last);
  return out;
}

}  // namespace detail

// ---- MoLALinear ---------------------------------------------------------------------

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
  detail::check_options(o, "MoLALinear");
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
  if (o.init() == "pissa") detail::pissa_init(base->weight, lora_a, lora_b, scaling());
}

at::Tensor MoLALinearImpl::forward(const at::Tensor& x) {
  const std::optional<at::Tensor> bias =
      base->options.bias() ? std::optional<at::Tensor>(base->bias) : std::nullopt;
  auto [y, logits] = detail::adapter_forward(options, is_training(), x, base->weight, bias, router, lora_a, lora_b);
  router_logits = logits;
  log_.record(logits, is_training(), router, lora_a, lora_b);
  return y;
}

// ---- MoLAAdapter --------------------------------------------------------------------

MoLAAdapterImpl::MoLAAdapterImpl(const MoLALinearOptions& options_, const at::TensorOptions& tensor_options)
    : options(options_) {
  const auto& o = options;
  detail::check_options(o, "MoLAAdapter");
  const auto opts = tensor_options.requires_grad(false);
  router = register_parameter("router", at::empty({o.num_experts(), o.in_features()}, opts));             // [E, in]
  lora_a = register_parameter("lora_a", at::empty({o.num_experts(), o.rank(), o.in_features()}, opts));  // [E, r, in]
  lora_b = register_parameter("lora_b", at::empty({o.num_experts(), o.out_features(), o.rank()}, opts)); // [E, out, r]
  if (mola::detail::initialise_parameters()) reset_parameters();  // else a copy or a file fills them
}

at::Tensor MoLAAdapterImpl::forward(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias) {
  auto [y, logits] = detail::adapter_forward(options, is_training(), x, weight, bias, router, lora_a, lora_b);
  record_routing(logits);
  return y;
}

void MoLAAdapterImpl::record_routing(const at::Tensor& logits) {
  router_logits = logits;
  log_.record(logits, is_training(), router, lora_a, lora_b);
}

std::vector<at::Tensor> MoLAAdapterImpl::take_router_logits() { return log_.take(router_logits); }

void MoLAAdapterImpl::set_routing(Routing r) {
  router_logits = std::move(r.last);
  *log_.pending = std::move(r.pending);
}

}  // namespace mola::nn
