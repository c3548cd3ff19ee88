// mola::nn::MoLALinear: a frozen linear layer with a router and E LoRA experts
// (docs/design.md, The MoLA layer), thin over mola::ops::moe_lora. Its parameter names equal the
// Python mola.MoLALinear's (base.weight, base.bias, router, lora_a, lora_b), so
// state dicts move between the two.
//
// MoLAAdapter is the same layer without the base: the router and the experts,
// applied to a weight owned by someone else. The C++ models use it, as the child
// "mola" of a projection that keeps its own "weight", so checkpoint keys stay
// Hugging Face's and adapter keys read "...q_proj.mola.lora_a" (docs/design.md, The adapter files).
// Both modules share the checks, the initialisation and the op call below.
#pragma once

#include <mola/ops.h>

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace mola::nn {

struct MoLALinearOptions {
  MoLALinearOptions(int64_t in_features, int64_t out_features)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(bool, bias) = true;
  TORCH_ARG(int64_t, num_experts) = 8;
  TORCH_ARG(int64_t, top_k) = 2;
  TORCH_ARG(int64_t, rank) = 8;
  TORCH_ARG(double, alpha) = 16.0;
  TORCH_ARG(double, dropout) = 0.0;
  // "per_expert" (each routed expert draws its own mask, as the MoLA authors)
  // or "shared" (one mask for every expert; faster): AdapterConfig::dropout_masks.
  TORCH_ARG(std::string, dropout_masks) = "per_expert";
  TORCH_ARG(ops::Compute, compute) = ops::Compute::kAuto;
  // The transformer layer this module belongs to; the balance loss groups by it.
  TORCH_ARG(int64_t, layer_index) = -1;
  // How A and B start: "kaiming", "gaussian" or "pissa" (mola::AdapterConfig::init).
  // "pissa" needs the base weight: MoLALinear applies it to its base at
  // construction, CausalLM::attach to each projection; a bare MoLAAdapter
  // starts as "kaiming" until its owner calls detail::pissa_init.
  TORCH_ARG(std::string, init) = "kaiming";
};

namespace detail {
// The option checks both modules apply; messages start with `who`.
void check_options(const MoLALinearOptions& options, const char* who);
// LoRA's initialisation (docs/design.md, Fidelity to the papers and the authors' code, the authors' code): router and A
// Kaiming-uniform with a = sqrt(5) per expert matrix, i.e. U(-1/sqrt(in),
// 1/sqrt(in)); B zero, so a fresh adapter computes exactly the base layer.
// init "gaussian" draws A from N(0, std 1/r) instead (PEFT's
// init_lora_weights="gaussian"); "pissa" leaves A and B as for "kaiming"
// (pissa_init sets them, with the weight).
void reset_adapter_parameters(at::Tensor& router, at::Tensor& lora_a, at::Tensor& lora_b,
                              const std::string& init = "kaiming");
// PiSSA (Meng et al. 2024, "Principal Singular values and Singular vectors
// Adaptation"): with the top-r SVD weight = U S V^T (computed in fp32, fp64 for
// an fp64 weight), every expert gets A = sqrt(S_r / s) V_r^T [r, in] and
// B = U_r sqrt(S_r / s) [out, r], and weight becomes weight - U_r S_r V_r^T
// (= weight - s B A), in place. The product U_r S_r V_r^T does not depend on
// the signs the SVD picks, so the adjusted weight is the same wherever it is
// recomputed (a saved PiSSA adapter loaded into a fresh base model). Throws
// c10::ValueError when r exceeds min(out, in).
void pissa_init(at::Tensor& weight, at::Tensor& lora_a, at::Tensor& lora_b, double scaling);
// ops::moe_lora with the options' k, scaling, dropout and compute; draws the
// dropout seed when training with dropout. Router and experts in another
// dtype than x (an fp32 adapter over a 16-bit base) are cast to x's dtype,
// differentiably. Returns y and the router logits.
// The router logits a module keeps for the balance loss (CausalLM::aux_loss):
// those of every training forward (training mode, grad mode on, an adapter
// tensor that trains) since the loss was last taken, so that two forwards
// before one backward are balanced together. A backward pass through a
// forward (backward or autograd::grad) drops that forward's logits, whose
// graph it spent (a pre-hook on their autograd node), so a loop that never
// takes the loss holds one step's logits at most.
struct RouterLog {
  // The training forwards since the loss was last taken; shared with the
  // hooks, which hold it weakly.
  std::shared_ptr<std::vector<at::Tensor>> pending = std::make_shared<std::vector<at::Tensor>>();

  // After a forward that gave `logits`.
  void record(const at::Tensor& logits, bool training, const at::Tensor& router, const at::Tensor& lora_a,
              const at::Tensor& lora_b);
  // The logits the balance loss counts, forgotten: `pending`, else {last}
  // (the last forward's, when defined), else {}.
  std::vector<at::Tensor> take(const at::Tensor& last);
};
std::tuple<at::Tensor, at::Tensor> adapter_forward(const MoLALinearOptions& options, bool training,
                                                   const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& router,
                                                   const at::Tensor& lora_a, const at::Tensor& lora_b);
}  // namespace detail

class MoLALinearImpl : public torch::nn::Module {
 public:
  explicit MoLALinearImpl(const MoLALinearOptions& options);
  // Wraps an existing (pretrained) linear layer; its sizes and bias come from it.
  MoLALinearImpl(torch::nn::Linear base, MoLALinearOptions options);

  // detail::reset_adapter_parameters with options.init: router and A drawn
  // again, B zero. PiSSA changes the base weight, so it is applied once, at
  // construction, not here.
  void reset_parameters() { detail::reset_adapter_parameters(router, lora_a, lora_b, options.init()); }

  // y = base(x) + the routed experts; keeps the router logits in router_logits.
  at::Tensor forward(const at::Tensor& x);

  double scaling() const { return options.alpha() / static_cast<double>(options.rank()); }

  // The balance loss's logits (detail::RouterLog): those of the training
  // forwards since it was last taken, else the last forward's; forgets them.
  std::vector<at::Tensor> take_router_logits() { return log_.take(router_logits); }

  MoLALinearOptions options;
  torch::nn::Linear base{nullptr};
  at::Tensor router;   // [E, in]
  at::Tensor lora_a;   // [E, r, in]
  at::Tensor lora_b;   // [E, out, r]
  at::Tensor router_logits;  // [T, E] of the last forward

 private:
  void build();
  detail::RouterLog log_;
};

TORCH_MODULE(MoLALinear);

// The router and experts of one adapted layer, without the base layer: its
// forward takes the frozen weight and bias as arguments. in_features and
// out_features come from the options (bias is ignored); the parameters are
// created with `tensor_options` (the base weight's dtype and device).
class MoLAAdapterImpl : public torch::nn::Module {
 public:
  MoLAAdapterImpl(const MoLALinearOptions& options, const at::TensorOptions& tensor_options);

  void reset_parameters() { detail::reset_adapter_parameters(router, lora_a, lora_b, options.init()); }
  // x W^T + b + the routed experts; keeps the router logits in router_logits.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

  double scaling() const { return options.alpha() / static_cast<double>(options.rank()); }

  // The balance loss's logits (detail::RouterLog): those of the training
  // forwards since it was last taken, else the last forward's; forgets them.
  std::vector<at::Tensor> take_router_logits();
  // What the balance loss would count, kept and put back around a forward
  // that must not count (MoLEx's second block, a checkpoint's recompute).
  struct Routing {
    at::Tensor last;
    std::vector<at::Tensor> pending;
  };
  Routing routing() const { return {router_logits, *log_.pending}; }
  void set_routing(Routing r);
  // Records `logits` as a forward's (router_logits and the balance loss's log).
  void record_routing(const at::Tensor& logits);

  MoLALinearOptions options;
  at::Tensor router;         // [E, in]
  at::Tensor lora_a;         // [E, r, in]
  at::Tensor lora_b;         // [E, out, r]
  at::Tensor router_logits;  // [T, E] of the last forward
  // Its PiSSA start (init "pissa"): every expert's A0 [r, in] and B0 [out, r],
  // the principal part scaling * B0 A0 taken out of the base weight, which
  // the base model alone adds back (CausalLM adapter switch, detach).
  at::Tensor pissa_a0, pissa_b0;

 private:
  detail::RouterLog log_;
};

TORCH_MODULE(MoLAAdapter);

}  // namespace mola::nn
