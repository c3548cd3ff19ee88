// MoLExGate (mola/nn/molex.h): pooling, fp32 routing, the gradient path to
// the gate, the mix of the two blocks and the balance loss. The choices the
// paper leaves open are listed, with their defaults, in the header.
#include "mola/nn/molex.h"

#include <torch/nn/init.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace mola::nn {

at::Tensor molex_pool(const at::Tensor& z, const at::Tensor& padding, const std::string& pool) {
  const at::Tensor x = z.to(at::kFloat);  // [batch, seq, hidden]
  if (pool == "token") return x.reshape({-1, x.size(-1)});  // [batch * seq, hidden]
  if (pool == "mean") {
    if (!padding.defined()) return x.mean(1);  // [batch, hidden]
    const at::Tensor m = padding.to(at::kFloat).unsqueeze(-1);  // [batch, seq, 1]
    // A row of padding only (never in real batches) pools to zeros, not NaN.
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0);  // [batch, hidden]
  }
  if (pool == "last") {
    const int64_t seq = x.size(1);
    at::Tensor index;  // [batch]: the last position holding a token
    if (!padding.defined()) {
      index = at::full({x.size(0)}, seq - 1, at::TensorOptions().dtype(at::kLong).device(x.device()));
    } else {
      const at::Tensor pos = at::arange(seq, at::TensorOptions().dtype(at::kLong).device(x.device()));
      index = (padding.to(at::kLong) * pos).amax(1);  // right or left padding alike
    }
    return x.gather(1, index.view({-1, 1, 1}).expand({x.size(0), 1, x.size(2)})).squeeze(1);  // [batch, hidden]
  }
  throw std::invalid_argument("molex_pool: pool \"" + pool + "\" is not one of mean, last, token");
}

MoLExGateImpl::MoLExGateImpl(const MoLExGateOptions& o, const at::TensorOptions& tensor_options) : options(o) {
  if (o.num_layers() < 1 || o.hidden_size() < 1 || o.layer_index() < 0 || o.layer_index() >= o.num_layers())
    throw std::invalid_argument("MoLExGate: need hidden_size >= 1, num_layers >= 1 and 0 <= layer_index < "
                                "num_layers; got " + std::to_string(o.hidden_size()) + ", " +
                                std::to_string(o.num_layers()) + ", " + std::to_string(o.layer_index()));
  gate = register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(o.hidden_size(), o.num_layers())));
  gate->to(tensor_options.dtype().toScalarType());
  gate->to(tensor_options.device());
  if (o.alpha_learned()) alpha = register_parameter("alpha", at::zeros({1}, tensor_options));
  reset_parameters();
}

void MoLExGateImpl::reset_parameters() {
  at::NoGradGuard no_grad;
  // nn.Linear's weight init; the zero bias favours no layer before training.
  torch::nn::init::kaiming_uniform_(gate->weight, std::sqrt(5.0));
  gate->bias.zero_();
  if (alpha.defined()) alpha.fill_(std::log(options.alpha() / (1.0 - options.alpha())));  // sigmoid^-1
}

MoLExRouting MoLExGateImpl::route(const at::Tensor& z, const at::Tensor& padding) {
  const at::Tensor pooled = molex_pool(z, padding, options.pool());  // [units, hidden] fp32
  at::Tensor logits = at::linear(pooled, gate->weight.to(at::kFloat), gate->bias.to(at::kFloat));  // [units, L]
  if (options.exclude_self())
    logits = logits.index_fill(
        1, at::full({1}, options.layer_index(), at::TensorOptions().dtype(at::kLong).device(logits.device())),
        -std::numeric_limits<float>::infinity());
  MoLExRouting r;
  r.probs = logits.softmax(-1);                   // [units, L]
  const at::Tensor choice = r.probs.argmax(-1);   // [units]
  const at::Tensor p = r.probs.gather(1, choice.unsqueeze(1)).squeeze(1);  // [units]
  if (options.gate_grad() == "straight_through") r.scale = p / p.detach();  // value 1, gradient of p_j
  else if (options.gate_grad() == "prob") r.scale = p;
  else r.scale = at::ones_like(p);
  if (options.pool() == "token") {
    r.choice = choice.view({z.size(0), z.size(1)});
    r.scale = r.scale.view({z.size(0), z.size(1)});
    r.valid = padding.defined() ? padding.reshape({-1}).to(at::kBool)
                                : at::ones({choice.size(0)}, choice.options().dtype(at::kBool));
  } else {
    r.choice = choice;
    r.valid = at::ones({choice.size(0)}, choice.options().dtype(at::kBool));
  }
  last = r;
  return r;
}

at::Tensor MoLExGateImpl::alpha_value() const {
  if (alpha.defined()) return alpha.to(at::kFloat).sigmoid().squeeze(0);
  return at::scalar_tensor(options.alpha(), at::TensorOptions().dtype(at::kFloat).device(gate->weight.device()));
}

at::Tensor MoLExGateImpl::mix(const at::Tensor& own, const at::Tensor& other, const at::Tensor& scale) const {
  const at::Tensor a = alpha_value();    // [] fp32
  const at::Tensor w = (1 - a) * scale;  // [batch, 1, 1] or [batch, seq, 1] fp32
  return own * a.to(own.scalar_type()) + other * w.to(own.scalar_type());
}

at::Tensor MoLExGateImpl::balance_loss() const {
  if (!last.probs.defined())
    throw std::logic_error("MoLExGate.balance_loss: the gate has not routed yet; run a forward first");
  const at::Tensor valid = last.valid;  // [units]
  const at::Tensor probs = last.probs.index({valid});  // [n, L]
  const at::Tensor choice = last.choice.reshape({-1}).index({valid});  // [n]
  const int64_t L = options.num_layers();
  const double n_choosable = static_cast<double>(L - (options.exclude_self() ? 1 : 0));
  const at::Tensor count = at::zeros({L}, probs.options()).index_add(
      0, choice, at::ones({choice.size(0)}, probs.options()));  // [L]
  const double units = std::max<double>(1.0, static_cast<double>(choice.size(0)));
  const at::Tensor f = count / units;             // [L] fraction routed to each layer
  const at::Tensor P = probs.sum(0) / units;      // [L] mean probability
  return n_choosable * (f * P).sum();
}

}  // namespace mola::nn
