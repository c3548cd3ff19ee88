// The per-layer modules of mola/models/decoder.h: the adaptable projection,
// RMSNorm, attention with rotary embeddings, the gated MLP and the decoder block. The model-level
// parts (embedding, masks, rotary tables, lm_head, loss, loading) are in
// decoder.cpp; the split keeps each translation unit small and puts what a
// layer computes apart from how a model is assembled.
//
// Numerics follow transformers' modelling code for llama, mistral and gemma
// (the reference the parity tests compare with), so logits agree to
// rounding: fp32 normalisation, the rotary cos/sin cast to the activation
// dtype before use, softmax inside scaled_dot_product_attention.
#include "mola/models/decoder.h"

#include "detail/parameters.h"
#include "ops/cpu/low_precision.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
#include <stdexcept>

namespace mola::models {
namespace {

AdaptableLinear make_linear(int64_t in, int64_t out, bool bias) { return AdaptableLinear(in, out, bias); }

// The rotary embedding's partner of each channel: the two halves of the head
// dimension swapped, the second negated (non-interleaved, as GPT-NeoX and
// transformers' rotate_half; Su et al. 2021, eq. 34, with pairs (i, i + d/2)).
at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor x1 = x.narrow(-1, 0, half);     // [..., d/2]
  const at::Tensor x2 = x.narrow(-1, half, half);  // [..., d/2]
  return at::cat({-x2, x1}, -1);                   // [..., d]
}

}  // namespace

// ---- AdaptableLinear ------------------------------------------------------------------

AdaptableLinearImpl::AdaptableLinearImpl(int64_t in, int64_t out, bool has_bias)
    : in_features(in), out_features(out) {
  weight = register_parameter("weight", mola::detail::new_parameter({out, in}));     // [out, in]
  if (has_bias) bias = register_parameter("bias", mola::detail::new_parameter({out}));  // [out]
  if (!mola::detail::initialise_parameters()) return;  // a checkpoint or a copy fills them
  // torch.nn.Linear's initialisation (kaiming_uniform_(a = sqrt(5)), i.e.
  // U(-1/sqrt(in), 1/sqrt(in)), and the same bound for the bias); CausalLM
  // overwrites it with transformers' init.
  at::NoGradGuard no_grad;
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  weight.uniform_(-bound, bound);
  if (has_bias) bias.uniform_(-bound, bound);
}

at::Tensor AdaptableLinearImpl::forward(const at::Tensor& x) {
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (quantized && mola && adapter_enabled)  // weight is empty: the op adds the experts only
    return quant::linear(x, quantized, b) + mola->forward(x, weight, std::nullopt);
  if (mola && adapter_enabled) return mola->forward(x, weight, b);
  return base_forward(x);
}

void AdaptableLinearImpl::set_quantized(quant::QuantizedWeight q) {
  TORCH_CHECK(q.out_features == out_features && q.in_features == in_features,
              "AdaptableLinear.set_quantized: the weight is [", q.out_features, ", ", q.in_features,
              "] but the layer is [", out_features, ", ", in_features, "]");
  TORCH_CHECK(!mola || !mola->pissa_a0.defined(), "AdaptableLinear.set_quantized: PiSSA changed this weight");
  quantized = std::make_shared<const quant::QuantizedWeight>(std::move(q));
  at::NoGradGuard no_grad;
  weight.set_data(at::empty({0}, weight.options().device(quantized->data.device())));
  weight.requires_grad_(false);
}

void AdaptableLinearImpl::to(torch::Device device, torch::Dtype dtype, bool non_blocking) {
  torch::nn::Module::to(device, dtype, non_blocking);
  if (quantized) quantized = std::make_shared<const quant::QuantizedWeight>(quantized->to(device));
}

void AdaptableLinearImpl::to(torch::Dtype dtype, bool non_blocking) { torch::nn::Module::to(dtype, non_blocking); }

void AdaptableLinearImpl::to(torch::Device device, bool non_blocking) {
  torch::nn::Module::to(device, non_blocking);
  if (quantized) quantized = std::make_shared<const quant::QuantizedWeight>(quantized->to(device));
}

namespace {

// x W^T + b with a frozen 16-bit W on a CPU without native 16-bit matmul
// (ops/cpu/low_precision.h): fp32 compute from the 16-bit weight, block by
// block, forward and backward (dx = dy W is the product ATen would run on its
// slow path). Only x gets a gradient.
struct FrozenLinear16 : public torch::autograd::Function<FrozenLinear16> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias) {
    ctx->saved_data["weight"] = weight;
    const at::Tensor flat = x.reshape({-1, x.size(-1)}).to(at::kFloat);
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return mola::detail::linear_from_16bit(flat, weight, bias).to(x.scalar_type()).view(shape);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor weight = ctx->saved_data["weight"].toTensor();
    const at::Tensor& dy = grads[0];
    const at::Tensor flat = dy.reshape({-1, dy.size(-1)}).to(at::kFloat);
    at::Tensor dx = at::zeros({flat.size(0), weight.size(1)}, flat.options());
    mola::detail::addmm_from_16bit_(dx, flat, weight);
    std::vector<int64_t> shape = dy.sizes().vec();
    shape.back() = weight.size(1);
    return {dx.to(dy.scalar_type()).view(shape), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor AdaptableLinearImpl::base_forward(const at::Tensor& x) {
  const std::optional<at::Tensor> b = bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt;
  if (quantized) return quant::linear(x, quantized, b);
  const bool frozen = !weight.requires_grad() && !(bias.defined() && bias.requires_grad());
  at::Tensor y = frozen && mola::detail::compute_in_fp32_on_cpu(weight) && x.scalar_type() == weight.scalar_type()
                     ? FrozenLinear16::apply(x, weight, b)
                     : at::linear(x, weight, b);
  if (mola && mola->pissa_a0.defined())  // PiSSA: the principal part lives in the adapter's start
    y = y + mola->scaling() * at::linear(at::linear(x, mola->pissa_a0.to(x.scalar_type())),
                                         mola->pissa_b0.to(x.scalar_type()));
  return y;
}

void AdaptableLinearImpl::attach(nn::MoLAAdapter adapter) {
  TORCH_CHECK(!mola, "AdaptableLinear.attach: this projection already has an adapter");
  mola = register_module("mola", std::move(adapter));
}

void AdaptableLinearImpl::detach() {
  if (!mola) return;
  if (mola->pissa_a0.defined()) {
    at::NoGradGuard no_grad;
    const at::ScalarType ct = weight.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    weight.copy_(weight.to(ct) + mola->scaling() * mola->pissa_b0.to(ct).matmul(mola->pissa_a0.to(ct)));
  }
  unregister_module("mola");
  mola = nn::MoLAAdapter(nullptr);
  adapter_enabled = true;
}

const std::vector<std::string>& projection_names() {
  static const std::vector<std::string> names = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                 "gate_proj", "up_proj", "down_proj"};
  return names;
}

// ---- RMSNorm ------------------------------------------------------------------------

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, bool unit_offset_) : eps(eps_), unit_offset(unit_offset_) {
  // Gemma stores w with scale (1 + w), so its neutral weight is 0.
  weight = register_parameter("weight", mola::detail::new_parameter({dim}));
  at::NoGradGuard no_grad;
  if (mola::detail::initialise_parameters()) weight.fill_(unit_offset ? 0.0 : 1.0);
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // Zhang & Sennrich 2019. The mean of squares in fp32 even for bf16
  // activations: a bf16 sum over 4096 channels loses the small ones.
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  // The two families round at different points (transformers' GemmaRMSNorm
  // scales in fp32 then casts; LlamaRMSNorm casts then scales in the weight's
  // dtype); keeping each order keeps bf16 results bit-comparable.
  if (unit_offset) return (h * (1.0 + weight.to(at::kFloat))).to(x.scalar_type());
  return weight * h.to(x.scalar_type());
}

// ---- attention ----------------------------------------------------------------------

AttentionImpl::AttentionImpl(const ModelConfig& c)
    : num_heads(c.num_attention_heads), num_kv_heads(c.num_key_value_heads), head_dim(c.head_dim) {
  q_proj = register_module("q_proj", make_linear(c.hidden_size, num_heads * head_dim, c.attention_bias));
  k_proj = register_module("k_proj", make_linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias));
  v_proj = register_module("v_proj", make_linear(c.hidden_size, num_kv_heads * head_dim, c.attention_bias));
  o_proj = register_module("o_proj", make_linear(num_heads * head_dim, c.hidden_size, c.attention_bias));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                  const at::Tensor& mask, at::Tensor* past_key, at::Tensor* past_value) {
  const int64_t batch = x.size(0), seq = x.size(1);
  // [batch, seq, heads * head_dim] -> [batch, heads, seq, head_dim]
  at::Tensor q = q_proj->forward(x).view({batch, seq, num_heads, head_dim}).transpose(1, 2);
  at::Tensor k = k_proj->forward(x).view({batch, seq, num_kv_heads, head_dim}).transpose(1, 2);
  at::Tensor v = v_proj->forward(x).view({batch, seq, num_kv_heads, head_dim}).transpose(1, 2);

  // Rotary embedding: the same angle table for every head.
  const at::Tensor c = cos.unsqueeze(1);  // [batch, 1, seq, head_dim]
  const at::Tensor s = sin.unsqueeze(1);  // [batch, 1, seq, head_dim]
  q = q * c + rotate_half(q) * s;
  k = k * c + rotate_half(k) * s;

  // KV cache: the keys (rotated at their own positions) and values of the
  // earlier tokens come first; the mask then covers all of them.
  if (past_key != nullptr && past_value != nullptr) {
    if (past_key->defined()) {
      k = at::cat({*past_key, k}, 2);    // [batch, kv_heads, past + seq, head_dim]
      v = at::cat({*past_value, v}, 2);  // [batch, kv_heads, past + seq, head_dim]
    }
    *past_key = k;
    *past_value = v;
  }
  const int64_t kv_len = k.size(2);

  // Grouped-query attention (Ainslie et al. 2023): query head h reads
  // key/value head h / group. Without a mask SDPA takes the kv heads as they
  // are (enable_gqa), which its fused kernels support up to head_dim 256;
  // otherwise each kv head is repeated `group` times in a row, as
  // transformers' repeat_kv. The same choice as transformers' sdpa path, so
  // the same kernel runs and bf16 logits agree bit for bit.
  const int64_t group = num_heads / num_kv_heads;
  const bool native_gqa = group > 1 && !mask.defined() && head_dim <= 256;
  if (group > 1 && !native_gqa) {
    // [batch, kv_heads, seq, d] -> [batch, kv_heads, group, seq, d] -> [batch, heads, seq, d]
    k = k.unsqueeze(2)
            .expand({batch, num_kv_heads, group, kv_len, head_dim})
            .reshape({batch, num_heads, kv_len, head_dim});
    v = v.unsqueeze(2)
            .expand({batch, num_kv_heads, group, kv_len, head_dim})
            .reshape({batch, num_heads, kv_len, head_dim});
  }

  // Without padding or a window the causal flag lets SDPA pick its fused
  // kernels; the explicit mask is the general case.
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  const at::Tensor out =
      mask.defined()
          ? at::scaled_dot_product_attention(q, k, v, mask, 0.0, /*is_causal=*/false, scale)
          : at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale, native_gqa);
  // [batch, heads, seq, head_dim] -> [batch, seq, heads * head_dim]
  return o_proj->forward(out.transpose(1, 2).reshape({batch, seq, num_heads * head_dim}));
}

// ---- MLP ----------------------------------------------------------------------------

MLPImpl::MLPImpl(const ModelConfig& c) : activation(c.activation) {
  gate_proj = register_module("gate_proj", make_linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
  up_proj = register_module("up_proj", make_linear(c.hidden_size, c.intermediate_size, c.mlp_bias));
  down_proj = register_module("down_proj", make_linear(c.intermediate_size, c.hidden_size, c.mlp_bias));
}

at::Tensor MLPImpl::forward(const at::Tensor& x) {
  // Gated linear units (Shazeer 2020): SwiGLU for llama/mistral, GeGLU with
  // the tanh approximation of GELU for gemma.
  const at::Tensor g = gate_proj->forward(x);
  at::Tensor a;
  switch (activation) {
    case Activation::kSiLU: a = at::silu(g); break;
    case Activation::kGELU: a = at::gelu(g); break;
    case Activation::kGELUTanh: a = at::gelu(g, "tanh"); break;
  }
  return down_proj->forward(a * up_proj->forward(x));
}

// ---- decoder block --------------------------------------------------------------------

DecoderLayerImpl::DecoderLayerImpl(const ModelConfig& c) {
  self_attn = register_module("self_attn", Attention(c));
  mlp = register_module("mlp", MLP(c));
  input_layernorm = register_module("input_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_unit_offset));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_unit_offset));
}

AdaptableLinear DecoderLayerImpl::projection(const std::string& name) const {
  if (name == "q_proj") return self_attn->q_proj;
  if (name == "k_proj") return self_attn->k_proj;
  if (name == "v_proj") return self_attn->v_proj;
  if (name == "o_proj") return self_attn->o_proj;
  if (name == "gate_proj") return mlp->gate_proj;
  if (name == "up_proj") return mlp->up_proj;
  if (name == "down_proj") return mlp->down_proj;
  throw std::invalid_argument("DecoderLayer.projection: no projection \"" + name + "\"");
}

std::string DecoderLayerImpl::projection_path(const std::string& name) {
  return (name == "gate_proj" || name == "up_proj" || name == "down_proj" ? "mlp." : "self_attn.") + name;
}

at::Tensor DecoderLayerImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                     const at::Tensor& mask, at::Tensor* past_key, at::Tensor* past_value) {
  const at::Tensor h = x + self_attn->forward(input_layernorm->forward(x), cos, sin, mask, past_key, past_value);
  return h + mlp->forward(post_attention_layernorm->forward(h));
}

}  // namespace mola::models
