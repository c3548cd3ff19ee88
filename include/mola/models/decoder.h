// mola/models/decoder.h: the decoder-only transformer behind mola's
// CausalLM, one implementation with variants for llama, mistral and gemma
// (docs/design.md, Models and loading), selected by ModelConfig::family.
//
// Modules carry Hugging Face's names, so named_parameters() keys equal the
// checkpoint's keys ("model.layers.3.self_attn.q_proj.weight") and adapters
// named after the same module paths (docs/design.md, The adapter files) find their layer.
//
// The family differences are small and kept in one place each:
//   RMSNorm   gemma scales by (1 + w) in fp32; llama/mistral cast, then scale by w
//   MLP       SwiGLU (silu) or GeGLU (tanh GELU, gemma)
//   attention mistral's sliding window
//   model     gemma multiplies the embeddings by sqrt(hidden_size) and ties lm_head
//
// Adapters (docs/design.md, The MoLA layer, 6.4): each of the seven projections is an
// AdaptableLinear that keeps its "weight" (and "bias") under the checkpoint's
// name and gains a child "mola" (nn::MoLAAdapter) when CausalLM::attach adds
// one. attach, aux_loss and the adapter files are in src/models/adapter.cpp
// (free functions in mola/models/adapter.h).
//
// Generation (src/models/generate.cpp): a KVCache of past keys and values
// per layer, and CausalLM::generate, greedy or sampled, on left-padded
// batches too. Gradient checkpointing per layer (src/models/checkpoint.cpp):
// CausalLM::set_gradient_checkpointing.
#pragma once

#include <mola/config.h>
#include <mola/models/config.h>
#include <mola/nn/moe_lora_linear.h>
#include <mola/nn/molex.h>
#include <mola/quant.h>

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace mola::models {

// The past keys and values of every layer, [batch, kv_heads, past, head_dim]
// each, before the grouped-query repeat. A forward given a cache appends the
// new tokens' keys and values and numbers its tokens from length() on.
struct KVCache {
  std::vector<at::Tensor> keys, values;  // one per layer; undefined before the first forward
  int64_t length() const { return keys.empty() || !keys[0].defined() ? 0 : keys[0].size(2); }

  // MoLEx (docs/design.md, MoLEx): the gate of layer t picks j from the prompt at
  // prefill and keeps it for every generated token; the second block u_j
  // sees layer t's input, so its keys and values are its own, cached per
  // (t, group of rows that chose the same j). Empty without MoLEx.
  struct MoLExBranch {
    int64_t source = 0;  // j
    at::Tensor rows;     // [n] int64 rows of the batch that chose j; undefined: every row
    at::Tensor key, value;
  };
  std::vector<std::vector<MoLExBranch>> molex;  // [layer t] -> branches (j == t needs none: it reuses u_t)
  std::vector<at::Tensor> molex_choice;         // [layer t] -> [batch] int64, fixed at prefill
  std::vector<at::Tensor> molex_scale;          // [layer t] -> [batch] fp32, fixed at prefill
};

// A linear layer y = x W^T + b under a Hugging Face module name, with an
// optional MoLA adapter. The parameters are "weight" [out, in] and "bias"
// [out] (when bias), as torch::nn::Linear's, so checkpoints load by name;
// the adapter, when attached, is the child "mola" and computes the whole
// layer through the op, base included.
class AdaptableLinearImpl : public torch::nn::Module {
 public:
  AdaptableLinearImpl(int64_t in_features, int64_t out_features, bool bias);
  at::Tensor forward(const at::Tensor& x);

  // Registers `adapter` as "mola"; the layer must not have one yet.
  void attach(nn::MoLAAdapter adapter);
  // Removes it again; the weight gets PiSSA's principal part back.
  void detach();
  bool attached() const { return !mola.is_empty(); }
  // The layer without its adapter: x W^T + b (with PiSSA, W plus its principal part).
  at::Tensor base_forward(const at::Tensor& x);
  // Holds the weight as `q` from now on (CausalLM::from_pretrained's
  // quantize): "weight" becomes an empty frozen tensor of the compute dtype,
  // the base runs through quant::linear and an adapter through the op's
  // base-free form (mola/ops.h).
  void set_quantized(quant::QuantizedWeight q);

  // As torch::nn::Module's, and a quantized weight follows the device too
  // (its stored dtypes stay).
  void to(torch::Device device, torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Dtype dtype, bool non_blocking = false) override;
  void to(torch::Device device, bool non_blocking = false) override;

  int64_t in_features, out_features;
  at::Tensor weight, bias;  // bias undefined when the layer has none
  std::shared_ptr<const quant::QuantizedWeight> quantized;  // null: `weight` holds the base
  nn::MoLAAdapter mola{nullptr};
  bool adapter_enabled = true;  // false: forward is base_forward (CausalLM::set_adapter_enabled)
};
TORCH_MODULE(AdaptableLinear);

// The names of the adaptable projections, in the order aux_loss stacks them.
const std::vector<std::string>& projection_names();

// x * rsqrt(mean(x^2) + eps) * w, computed in fp32 (transformers' LlamaRMSNorm,
// GemmaRMSNorm). The weight is "weight" with shape [dim].
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, bool unit_offset);
  at::Tensor forward(const at::Tensor& x);

  at::Tensor weight;
  double eps;
  bool unit_offset;  // gemma: the weight is stored as w with scale (1 + w)
};
TORCH_MODULE(RMSNorm);

// Multi-head attention with rotary position embeddings and grouped-query
// key/value heads: q_proj, k_proj, v_proj, o_proj.
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const ModelConfig& config);
  // x [batch, seq, hidden]; cos, sin [batch, seq, head_dim] in x's dtype;
  // mask: a boolean [batch, 1, seq, seq] (true = may attend) or undefined for
  // plain causal attention. With past_key and past_value (a KVCache's
  // entries for this layer) the new keys and values are appended to them and
  // attended to with the past; mask is then [batch, 1, seq, past + seq].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask,
                     at::Tensor* past_key = nullptr, at::Tensor* past_value = nullptr);

  int64_t num_heads, num_kv_heads, head_dim;
  AdaptableLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
};
TORCH_MODULE(Attention);

// down(act(gate(x)) * up(x)): SwiGLU or GeGLU by config.activation.
class MLPImpl : public torch::nn::Module {
 public:
  explicit MLPImpl(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& x);

  Activation activation;
  AdaptableLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(MLP);

// Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).
class DecoderLayerImpl : public torch::nn::Module {
 public:
  explicit DecoderLayerImpl(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& mask,
                     at::Tensor* past_key = nullptr, at::Tensor* past_value = nullptr);

  // The projection called `name` (one of projection_names()).
  AdaptableLinear projection(const std::string& name) const;
  // Its module path below this layer: "self_attn.q_proj", "mlp.down_proj".
  static std::string projection_path(const std::string& name);

  // Registers `gate` as "molex" (MoLEx); the layer must not have one yet.
  void attach_molex(nn::MoLExGate gate);
  bool has_molex() const { return !molex.is_empty(); }

  Attention self_attn{nullptr};
  MLP mlp{nullptr};
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  nn::MoLExGate molex{nullptr};  // MoLEx's gate, when the adapter is "molex"
};
TORCH_MODULE(DecoderLayer);

// layer.forward(x, cos, sin, mask) without keeping its activations: the
// layer runs without autograd, and backward runs it again (same dropout
// masks: the default CPU generator's state is replayed) to get the gradients
// of x and of the layer's trainable parameters. The adapters' router_logits
// stay differentiable, so aux_loss trains the routers as without
// checkpointing. src/models/checkpoint.cpp.
at::Tensor checkpointed_layer_forward(DecoderLayerImpl& layer, const at::Tensor& x, const at::Tensor& cos,
                                      const at::Tensor& sin, const at::Tensor& mask);

class DecoderModelImpl;

// Layer t of `model` under MoLEx (docs/design.md, MoLEx, mola/nn/molex.h):
// alpha * u_t(z) + (1 - alpha) * u_j(z), j from layer t's gate. padding
// [batch, seq] bool (true = token) feeds the gate's pooling (undefined: no
// padding). Rows that chose the same j run u_j as one batched call (one host
// sync per layer to list the distinct j); j == t reuses u_t. The chosen
// blocks' MoLA router logits are left out of the balance loss (ours): each
// layer's routers are balanced over its own input, as without MoLEx.
// With a cache (generation), j is chosen at prefill and kept; "token"
// routing has no cache (std::invalid_argument). src/models/molex.cpp.
at::Tensor molex_layer_forward(DecoderModelImpl& model, int64_t t, const at::Tensor& z, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& mask, const at::Tensor& padding,
                               KVCache* cache, bool checkpoint);

// The stack under "model.": embed_tokens, layers.N, norm. Returns the final
// normed hidden states [batch, seq, hidden].
class DecoderModelImpl : public torch::nn::Module {
 public:
  explicit DecoderModelImpl(const ModelConfig& config);
  // With a cache, the tokens continue it and their keys and values are
  // appended. Without padding their positions follow cache->length(). A
  // padded batch (left-padded generation) gives attention_mask [batch, past +
  // seq] over the cached and the new tokens (transformers' generate
  // convention; [batch, seq] when the cache is empty): each row's positions
  // are cumsum(mask) - 1 (padding at 1) and no query sees a padding key.
  // Without a cache, positions are 0..seq-1 in every row (transformers'
  // forward without position_ids), which is exact for right padding.
  at::Tensor forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                     KVCache* cache = nullptr);

  ModelConfig config;
  // Recompute each layer in backward (training, grad mode on, no cache).
  bool gradient_checkpointing = false;
  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers;
  RMSNorm norm{nullptr};
};
TORCH_MODULE(DecoderModel);

// CausalLM::generate's settings (transformers' GenerationConfig names).
struct GenerateOptions {
  int64_t max_new_tokens = 20;
  bool do_sample = false;     // false: greedy (argmax)
  double temperature = 1.0;   // sampling only; > 0
  double top_p = 1.0;         // sampling only; nucleus in (0, 1]
  std::optional<uint64_t> seed;  // sampling: a private generator; none: torch's default one
};

struct CausalLMOutput {
  at::Tensor logits;  // [batch, seq, vocab] in the model's dtype
  at::Tensor loss;    // fp32 scalar; undefined when no labels were given
};

// Throws std::invalid_argument (a user error: ValueError in Python, exit
// status 2 in the command) when `device` is a CUDA device this process cannot
// use: no GPU or driver, an index past the devices found, or a build of mola
// without its CUDA kernels. The message names the device, what was found and
// `fix` (how to run on the CPU instead).
void check_device(const at::Device& device, const std::string& fix);

class CausalLMImpl : public torch::nn::Module {
 public:
  // A randomly initialised model (normal(0, 0.02) weights as transformers'
  // initializer_range, unit norms), for tests and from_pretrained to fill.
  explicit CausalLMImpl(const ModelConfig& config);

  // Reads dir/config.json and the weights (model.safetensors or a sharded
  // index) and returns the model in eval mode, as transformers'
  // from_pretrained does (call train() to train; Trainer::fit does). The
  // weights are checked against the architecture: every expected key must
  // be present with its shape, and no key may be left over (rotary inv_freq
  // buffers and a tied lm_head.weight excepted). Throws
  // ModelFileNotFoundError, ModelConfigError, io::SafetensorsError or
  // std::invalid_argument naming the key and both shapes.
  // quantize (int8 or nf4) stores the seven projection weights of every
  // layer quantized (mola/quant.h), each read from the file and quantized on
  // the CPU one tensor at a time, from the file's values, then placed on
  // `device`; embeddings, norms and the head stay in `dtype`; double_quant
  // (nf4) stores the block absmaxes as 8-bit codes.
  // Such a model trains adapters, copies and pickles as any other.
  static std::shared_ptr<CausalLMImpl> from_pretrained(const std::string& dir, at::ScalarType dtype = at::kFloat,
                                                       at::Device device = at::kCPU,
                                                       quant::Kind quantize = quant::Kind::kNone,
                                                       bool double_quant = true);

  // input_ids [batch, seq] (int64); attention_mask [batch, seq] with 1 for
  // tokens and 0 for padding; labels [batch, seq] with -100 where no loss is
  // taken. loss = mean cross-entropy of logits[:, t] against labels[:, t+1]
  // over the labels that are not -100 (transformers' ForCausalLMLoss).
  // With a cache the tokens continue the cached ones (see DecoderModel);
  // attention_mask may then cover the cached tokens too, [batch, past + seq].
  CausalLMOutput forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask = {},
                         const std::optional<at::Tensor>& labels = {}, KVCache* cache = nullptr);

  // Continues every row of input_ids [batch, seq] by up to max_new_tokens
  // tokens with a KV cache, without autograd. A row stops at an eos token of
  // the config and is filled with pad_token_id (else the first eos) after
  // it; generation ends early when every row has stopped. Returns [batch,
  // seq + generated] int64. attention_mask [batch, seq] (1 = token, 0 =
  // padding) allows a left-padded batch of prompts of different lengths:
  // each row gets transformers' generate positions (cumsum(mask) - 1) and
  // its padding is masked in every step, so a row's tokens are those of
  // generating its prompt alone. Right padding (a 0 after a 1) throws
  // std::invalid_argument asking for left padding.
  at::Tensor generate(const at::Tensor& input_ids, const GenerateOptions& options = {},
                      const std::optional<at::Tensor>& attention_mask = {});

  // Everything a copy needs, by value: config, name, adapter config, the
  // parameters by name (the model's own tensors) and the PiSSA start tensors
  // ("<path>.mola.pissa_a0" / "pissa_b0"), which parameters train, the mode,
  // gradient checkpointing and the adapter switch. Router logits of past
  // forwards are not part of it.
  struct State {
    ModelConfig config;
    std::string name_or_path;
    std::optional<ResolvedAdapter> adapter;
    std::map<std::string, at::Tensor> tensors;  // a quantized projection's under "<path>.weight.quantized.<part>"
    quant::Kind quantization = quant::Kind::kNone;
    std::vector<std::string> trainable;
    bool training = false, gradient_checkpointing = false, adapter_enabled = true;
  };
  State state() const;
  // The model `state` describes; its tensors are cloned (clone) or taken as
  // they are (not: the caller hands over fresh tensors, e.g. unpickled).
  // Builds without random initialisation and leaves the random generators
  // as they were. Throws std::invalid_argument when a tensor is missing or
  // misshapen.
  static std::shared_ptr<CausalLMImpl> from_state(const State& state, bool clone);
  // A deep copy on the same devices (copy.deepcopy of the Python object).
  std::shared_ptr<CausalLMImpl> copy() const { return from_state(state(), /*clone=*/true); }

  // Gradient checkpointing per decoder layer (see checkpointed_layer_forward).
  void set_gradient_checkpointing(bool on) { model->gradient_checkpointing = on; }
  bool gradient_checkpointing() const { return model->gradient_checkpointing; }

  // Copies `weights` (checkpoint names) into the parameters after the checks
  // described at from_pretrained; `source` names the checkpoint in messages.
  void load_weights(std::map<std::string, at::Tensor> weights, const std::string& source);
  // from_pretrained's loading: the checkpoint in `dir` (model.safetensors or
  // a sharded index) into the parameters, in `dtype` on `device`. Every
  // shard's header is checked first (the same checks); then the shards are
  // read one at a time. On the CPU, a tensor already in `dtype` is a view of
  // the file mapped copy-on-write: no copy is made, its pages are read when
  // first used, and they are file-backed (the kernel can drop and re-read
  // them), so resident memory grows with what the model touches, up to the
  // weights' size. Any other tensor is converted one at a time; onto a GPU
  // the host holds one shard's mapping at a time.
  // With quantize, each projection weight is quantized where it lies in the
  // map, and its pages of the map let go at once (see from_pretrained).
  void load_checkpoint(const std::string& dir, at::ScalarType dtype, at::Device device,
                       quant::Kind quantize = quant::Kind::kNone, bool double_quant = true);
  // How the projection weights are held (kNone: dense, in the model's dtype).
  quant::Kind quantization() const { return quantization_; }

  const ModelConfig& config() const { return model->config; }

  // ---- adapters (src/models/adapter.cpp) ----
  // Adds a MoLA (or LoRA) adapter to every target projection of every layer,
  // with that layer's E, k, r and scaling (cfg resolved for
  // num_hidden_layers), then freezes everything but the adapters. Throws
  // ConfigError for a bad config or target name, std::logic_error when an
  // adapter is attached already.
  void attach(const AdapterConfig& cfg);
  void attach(const ResolvedAdapter& adapter);
  bool has_adapter() const { return adapter_.has_value(); }
  // The attached adapter's settings, base_model_name filled in; throws
  // std::logic_error without one.
  const ResolvedAdapter& adapter_config() const;
  // The load-balancing loss (docs/design.md, The balance loss). Which forwards count: every
  // training forward (training mode, grad mode on) since the loss was last
  // taken, balanced together as one batch of their tokens (two sequences
  // scored separately before one backward); without one, the last forward.
  // Taking it forgets them, and so does a backward pass that reached the
  // adapter before the next forward (nn::detail::RouterLog). Per layer, the
  // router logits of its adapted projections are stacked in
  // projection_names() order. coef defaults to the config's aux_loss_coef.
  // mask [batch, seq] (1 = token) leaves padding out; when several forwards
  // count it covers all their tokens, in call order. A MoLEx adapter adds
  // molex_aux_loss_coef times the sum over layers of the gates' balance
  // loss (mola/nn/molex.h) when that coefficient is > 0; coef does not
  // change it.
  at::Tensor aux_loss(std::optional<double> coef = std::nullopt,
                      const std::optional<at::Tensor>& mask = std::nullopt);
  // Switches the adapter off (the base model alone: each projection its
  // weight, with PiSSA plus the principal part taken out of it; each MoLEx
  // layer its own block) and on again. The adapter stays attached.
  void set_adapter_enabled(bool enabled);
  bool adapter_enabled() const { return adapter_enabled_; }
  // Which adapter tensors train (docs/recipes.md, Training variants):
  // "all" (routers and experts), "experts" (A and B; routers and MoLEx gates
  // frozen) or "routers" (experts frozen); one of train::TrainOptions::trainables().
  // Sets requires_grad on the adapter's tensors; the base stays as it is
  // (frozen since attach). Returns the adapter elements that now train and
  // that are frozen. Throws std::invalid_argument for another value,
  // std::logic_error without an adapter.
  struct TrainableCounts {
    int64_t trainable = 0;
    int64_t frozen = 0;
  };
  TrainableCounts set_trainable(const std::string& which);
  // Removes the adapter: the projections lose their "mola" child (a PiSSA
  // base gets its principal part back), the layers their MoLEx gate, and
  // every base parameter trains again, as before attach. Throws
  // std::logic_error without an adapter.
  void detach_adapter();
  // The adapted projections: {module path, layer index, projection}, layer by
  // layer in projection_names() order.
  struct AdaptedProjection {
    std::string path;  // "model.layers.3.self_attn.q_proj"
    int64_t layer;
    AdaptableLinear module;
  };
  std::vector<AdaptedProjection> adapted_projections() const;

  // The checkpoint's name, recorded as base_model_name in adapters: config.json's
  // "_name_or_path" when set, else the checkpoint directory's name.
  std::string name_or_path;

  DecoderModel model{nullptr};
  AdaptableLinear lm_head{nullptr};  // "lm_head.weight" [vocab, hidden]; null when tied to model.embed_tokens

 private:
  std::optional<ResolvedAdapter> adapter_;
  bool adapter_enabled_ = true;
  quant::Kind quantization_ = quant::Kind::kNone;
};
// The module holder (what TORCH_MODULE(CausalLM) would make) with
// from_pretrained, so that C++ reads as docs/cpp.md:
//   auto model = mola::CausalLM::from_pretrained(dir, torch::kBFloat16, torch::kCUDA);
//   model->attach(cfg);
class CausalLM : public torch::nn::ModuleHolder<CausalLMImpl> {
 public:
  using torch::nn::ModuleHolder<CausalLMImpl>::ModuleHolder;
  using Impl = CausalLMImpl;
  static CausalLM from_pretrained(const std::string& dir, at::ScalarType dtype = at::kFloat,
                                  at::Device device = at::kCPU) {
    return CausalLM(CausalLMImpl::from_pretrained(dir, dtype, device));
  }
};

}  // namespace mola::models
