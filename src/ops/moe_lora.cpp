// Schema of the moe_lora op family and its C++ entry points (include/mola/ops.h).
// The backends register implementations under the same names:
//   src/ops/cpu/      ATen (CPU; also the oracle the CUDA path is tested against)
//   src/ops/cuda/     CUDA host glue around kernels/ (routing, fused shrink, gate scale and
//                     backward, dropout, the grouped products) and cuBLAS for the wide GEMMs
//   src/ops/autograd/ the torch::autograd::Function calling _moe_lora_backward
// Fake (meta) kernels live in Python, mola/_fake.py, so torch.compile traces through.
#include <mola/config.h>
#include <mola/ops.h>

#include "ops/moe_lora_impl.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(mola, m) {
  m.set_python_module("mola._fake");
  m.def(
      "moe_lora(Tensor x, Tensor weight, Tensor? bias, Tensor router, Tensor lora_a, "
      "Tensor lora_b, int top_k, float scaling, float dropout_p=0., bool training=False, "
      "int compute=0, Tensor? dropout_seed=None, bool shared_dropout_mask=False) "
      "-> (Tensor y, Tensor router_logits)");
  m.def(
      "_moe_lora_forward(Tensor x, Tensor weight, Tensor? bias, Tensor router, Tensor lora_a, "
      "Tensor lora_b, int top_k, float scaling, float dropout_p, bool training, int compute, "
      "Tensor? dropout_seed, bool shared_dropout_mask=False) "
      "-> (Tensor y, Tensor router_logits, Tensor lora_hidden)");
  m.def(
      "_moe_lora_backward(Tensor grad_y, Tensor? grad_router_logits, Tensor x, Tensor weight, "
      "Tensor router, Tensor lora_a, Tensor lora_b, Tensor router_logits, Tensor lora_hidden, "
      "int top_k, float scaling, float dropout_p, bool training, int compute, "
      "Tensor? dropout_seed, bool shared_dropout_mask, bool[6] output_mask) -> (Tensor grad_x, "
      "Tensor grad_weight, Tensor grad_bias, Tensor grad_router, Tensor grad_lora_a, Tensor grad_lora_b)");
  m.def(
      "moe_lora_route(Tensor router_logits, int top_k) -> (Tensor weights, Tensor indices, "
      "Tensor gate)");
  m.def("_dropout_mask(Tensor seed, int rows, int cols, float p, int expert=-1) -> Tensor");
}

namespace mola::ops {

// Names and codes: AdapterConfig::compute_modes() lists the names in code order.
Compute parse_compute(const std::string& name) {
  const auto& names = AdapterConfig::compute_modes();
  for (size_t code = 0; code < names.size(); ++code)
    if (names[code] == name) return static_cast<Compute>(code);
  TORCH_CHECK_VALUE(false, "compute: got \"", name,
                    "\"; it must be \"auto\", \"dense\" or \"grouped\"");
}

const char* compute_name(Compute compute) {
  const auto& names = AdapterConfig::compute_modes();
  const auto code = static_cast<size_t>(compute);
  return code < names.size() ? names[code].c_str() : names[0].c_str();
}

Compute resolve_compute(Compute compute, int64_t num_experts, int64_t rank, bool per_expert_dropout) {
  if (per_expert_dropout) return Compute::kGrouped;  // see ops.h
  if (compute != Compute::kAuto) return compute;
  // The starting rule (docs/design.md, Strategies and kernels). On the CPU it matches the measured
  // crossover (bench/crossover.py, bench/results/crossover-cpu-*.json: dense
  // ahead up to E*r = 128, ties at 256, grouped ahead from 512); on CUDA it
  // awaits the same measurement on an H100 (bench/crossover.py --device cuda).
  return num_experts * rank <= 256 ? Compute::kDense : Compute::kGrouped;
}

std::tuple<at::Tensor, at::Tensor> moe_lora(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& router, const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
    double scaling, double dropout_p, bool training, Compute compute,
    const std::optional<at::Tensor>& dropout_seed, bool shared_dropout_mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mola::moe_lora", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                           double, double, bool, int64_t, const std::optional<at::Tensor>&, bool)>();
  return op.call(x, weight, bias, router, lora_a, lora_b, top_k, scaling, dropout_p, training,
                 static_cast<int64_t>(compute), dropout_seed, shared_dropout_mask);
}

at::Tensor load_balancing_loss(at::TensorList router_logits, at::IntArrayRef top_k, double coef,
                               const std::optional<at::Tensor>& mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mola::load_balancing_loss", "")
                       .typed<at::Tensor(at::TensorList, at::IntArrayRef, double,
                                         const std::optional<at::Tensor>&)>();
  return op.call(router_logits, top_k, coef, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_lora_route(const at::Tensor& router_logits,
                                                              int64_t top_k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mola::moe_lora_route", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&,
                                                                             int64_t)>();
  return op.call(router_logits, top_k);
}

at::Tensor dropout_mask(const at::Tensor& seed, int64_t rows, int64_t cols, double p, int64_t expert) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mola::_dropout_mask", "")
                       .typed<at::Tensor(const at::Tensor&, int64_t, int64_t, double, int64_t)>();
  return op.call(seed, rows, cols, p, expert);
}

}  // namespace mola::ops

namespace mola::detail {

void check_moe_lora_args(const at::Tensor& x, const at::Tensor& weight,
                         const std::optional<at::Tensor>& bias, const at::Tensor& router,
                         const at::Tensor& lora_a, const at::Tensor& lora_b, int64_t top_k,
                         double dropout_p, bool training, int64_t compute,
                         const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "moe_lora: x must have a feature dimension; got a 0-d tensor");
  TORCH_CHECK_VALUE(!has_base(weight) || weight.dim() == 2, "moe_lora: weight must be [out, in] (or empty: "
                    "no base, see the op's docs); got ", weight.sizes());
  const int64_t in = x.size(-1);
  TORCH_CHECK_VALUE(lora_b.dim() == 3, "moe_lora: lora_b must be [num_experts, out, rank]; got ", lora_b.sizes());
  const int64_t out = has_base(weight) ? weight.size(0) : lora_b.size(1);
  TORCH_CHECK_VALUE(!has_base(weight) || weight.size(1) == in, "moe_lora: weight.size(1) (",
                    has_base(weight) ? weight.size(1) : 0, ") must equal x.size(-1) (", in,
                    "); x does not fit the base layer");
  TORCH_CHECK_VALUE(router.dim() == 2, "moe_lora: router must be [num_experts, in]; got ",
                    router.sizes());
  const int64_t E = router.size(0);
  TORCH_CHECK_VALUE(E >= 1, "moe_lora: router has 0 experts; give at least one");
  TORCH_CHECK_VALUE(router.size(1) == in, "moe_lora: router.size(1) (", router.size(1),
                    ") must equal x.size(-1) (", in, "); the router was made for another layer");
  TORCH_CHECK_VALUE(lora_a.dim() == 3, "moe_lora: lora_a must be [num_experts, rank, in]; got ",
                    lora_a.sizes());
  TORCH_CHECK_VALUE(lora_a.size(0) == E && lora_a.size(2) == in, "moe_lora: lora_a ",
                    lora_a.sizes(), " must be [", E, ", rank, ", in,
                    "] (num_experts from router, in from x); the adapter was made for another layer");
  const int64_t r = lora_a.size(1);
  TORCH_CHECK_VALUE(r >= 1, "moe_lora: lora_a has rank 0; give a rank of at least 1");
  TORCH_CHECK_VALUE(lora_b.dim() == 3 && lora_b.size(0) == E && lora_b.size(1) == out &&
                        lora_b.size(2) == r,
                    "moe_lora: lora_b ", lora_b.sizes(), " must be [", E, ", ", out, ", ", r,
                    "] (num_experts, out features, rank); the adapter was made for another layer");
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == out, "moe_lora: bias ", bias->sizes(),
                      " must be [", out, "]");
  }
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= E, "moe_lora: top_k (", top_k,
                    ") must be between 1 and the number of experts (", E,
                    "); lower top_k or add experts");
  // The mask is made in float (kernels/philox.h), so p must stay below 1 there too:
  // a p within 2^-25 of 1 passes a double check but rounds to 1.0f.
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && static_cast<float>(dropout_p) < 1.0f, "moe_lora: dropout_p (",
                    dropout_p, ") must be in [0, 1) and below 1 in float; use a smaller dropout");
  TORCH_CHECK_VALUE(compute >= 0 && compute <= 2, "moe_lora: compute (", compute,
                    ") must be 0 (auto), 1 (dense) or 2 (grouped)");
  for (const at::Tensor* t : {&weight, &router, &lora_a, &lora_b}) {
    TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                      "moe_lora: every tensor must match x (", x.scalar_type(), " on ", x.device(),
                      "); got one of ", t->scalar_type(), " on ", t->device(),
                      "; move the adapter with .to(x)");
  }
  TORCH_CHECK_VALUE(at::isFloatingType(x.scalar_type()), "moe_lora: x must be floating point; got ",
                    x.scalar_type());
  if (dropout_active(dropout_p, training)) {
    TORCH_CHECK_VALUE(dropout_seed.has_value() && dropout_seed->defined(),
                      "moe_lora: dropout_p (", dropout_p,
                      ") in training needs dropout_seed, an int64 tensor of one element; draw one "
                      "with torch.randint(0, 2**62, (1,))");
  }
  if (dropout_seed && dropout_seed->defined()) {
    TORCH_CHECK_VALUE(dropout_seed->scalar_type() == at::kLong && dropout_seed->numel() == 1,
                      "moe_lora: dropout_seed must be an int64 tensor of one element; got ",
                      dropout_seed->scalar_type(), " with ", dropout_seed->numel(), " elements");
    TORCH_CHECK_VALUE(dropout_seed->is_cpu() || dropout_seed->device() == x.device(),
                      "moe_lora: dropout_seed is on ", dropout_seed->device(), " but x is on ",
                      x.device(), "; draw the seed on the CPU or on x's device");
  }
}

int64_t read_dropout_seed(const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK_VALUE(dropout_seed && dropout_seed->defined() && dropout_seed->numel() == 1 &&
                        dropout_seed->scalar_type() == at::kLong,
                    "dropout_seed must be an int64 tensor of one element");
  return dropout_seed->item<int64_t>();
}

at::Tensor base_free_output(const at::Tensor& X, const std::optional<at::Tensor>& bias, int64_t out) {
  at::Tensor y = at::zeros({X.size(0), out}, X.options());
  if (bias && bias->defined()) y.add_(bias->to(X.scalar_type()));
  return y;
}

at::Tensor shrink_weight(const at::Tensor& router, const at::Tensor& lora_a) {
  return at::cat({lora_a.reshape({-1, lora_a.size(2)}), router}, 0);
}

at::Tensor cat_lora_b(const at::Tensor& lora_b) {
  return lora_b.permute({1, 0, 2}).reshape({lora_b.size(1), -1});
}

}  // namespace mola::detail
