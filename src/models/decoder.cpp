// The model-level half of mola/models/decoder.h: the embedding and the layer
// stack (DecoderModel), the rotary angle table, the attention mask, the
// language-model head with its loss (CausalLM), and loading a Hugging Face
// checkpoint with strict key and shape checks. The per-layer modules are in
// layers.cpp.
#include "mola/models/decoder.h"

#include "detail/parameters.h"
#include "detail/text.h"

#include <mola/io/safetensors.h>

#include <sys/stat.h>

#include <cmath>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <utility>
#include <vector>

namespace mola::models {
namespace {

using mola::detail::cat;
using mola::detail::require;

using mola::detail::shape_str;

// Caller errors are std::invalid_argument (ValueError in Python).
bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// cos and sin of the rotary angles, [rows, seq, head_dim] in `dtype`, for
// the token positions `positions` [rows, seq] (int64; rows = 1 when every
// row shares them, batch for per-row positions of a left-padded batch)
// (Su et al. 2021). inv_freq = theta^(-2i/d) is computed in fp32 exactly as
// transformers' default rope init; each angle is one fp32 product, as
// transformers' inv_freq @ position_ids (inner dimension 1), and the angles
// are duplicated over both halves to pair with rotate_half.
std::pair<at::Tensor, at::Tensor> rotary_tables(const at::Tensor& positions, int64_t head_dim, double theta,
                                                at::ScalarType dtype) {
  const at::Device device = positions.device();
  const at::Tensor exponents =
      at::arange(0, head_dim, 2, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat) /
      static_cast<double>(head_dim);                                      // [d/2]
  const at::Tensor inv_freq = at::reciprocal(at::pow(theta, exponents));  // [d/2]
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(-1) * inv_freq;  // [rows, seq, d/2]
  const at::Tensor angles = at::cat({freqs, freqs}, -1);                       // [rows, seq, d]
  return {angles.cos().to(dtype), angles.sin().to(dtype)};
}

// Positions start..start+seq-1 shared by every row, [1, seq]: transformers'
// forward without position_ids, where right padding leaves every token's
// position unchanged; a KV cache of `start` tokens puts the new ones after it.
at::Tensor shared_positions(int64_t start, int64_t seq, at::Device device) {
  return at::arange(start, start + seq, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(0);
}

// The boolean attention mask [batch, 1, seq, seq] (true = may attend), or an
// undefined tensor when plain causal attention is exact (no padding, no
// window shorter than the sequence), so SDPA can use its fused causal path.
at::Tensor attention_mask_for(int64_t batch, int64_t seq, const std::optional<at::Tensor>& padding,
                              std::optional<int64_t> sliding_window, at::Device device) {
  const bool padded = padding.has_value() && !padding->ne(0).all().item<bool>();
  const bool windowed = sliding_window.has_value() && *sliding_window < seq;
  if (!padded && !windowed) return {};
  const at::Tensor idx = at::arange(seq, at::TensorOptions().dtype(at::kLong).device(device));
  const at::Tensor q = idx.view({seq, 1});   // [seq, 1]
  const at::Tensor kv = idx.view({1, seq});  // [1, seq]
  at::Tensor allowed = kv.le(q);             // [seq, seq]
  // Mistral's window, transformers' convention (sliding_window_overlay):
  // key kv is visible from query q when q - window < kv <= q, so a token
  // sees `window` positions, itself included.
  if (windowed) allowed = allowed.logical_and(kv.gt(q - *sliding_window));
  allowed = allowed.view({1, 1, seq, seq});
  if (padded) allowed = allowed.logical_and(padding->ne(0).view({batch, 1, 1, seq}));  // [batch, 1, seq, seq]
  // A query that sees no key at all (left padding) would get NaN from the
  // softmax and spread it through later layers' sums; it may see every key
  // instead. Its output is padding, and no real token attends to it.
  return allowed.logical_or(allowed.any(-1, /*keepdim=*/true).logical_not());
}

// The mask [1, 1, seq, past + seq] for `seq` tokens after `past` cached
// ones (no padding): causal from each query's own position, within the
// window when there is one. Undefined when there is no past and plain causal
// attention is exact.
at::Tensor cached_attention_mask(int64_t past, int64_t seq, std::optional<int64_t> sliding_window,
                                 at::Device device) {
  if (past == 0 && !(sliding_window.has_value() && *sliding_window < seq)) return {};
  const auto opts = at::TensorOptions().dtype(at::kLong).device(device);
  const at::Tensor q = at::arange(past, past + seq, opts).view({seq, 1});  // [seq, 1]
  const at::Tensor kv = at::arange(past + seq, opts).view({1, past + seq});  // [1, past + seq]
  at::Tensor allowed = kv.le(q);
  if (sliding_window.has_value()) allowed = allowed.logical_and(kv.gt(q - *sliding_window));
  return allowed.view({1, 1, seq, past + seq});
}

// The mask [batch, 1, seq, past + seq] for `seq` new tokens after `past`
// cached ones when `keep` [batch, past + seq] (true = token, false =
// padding) marks padding among them: causal and windowed in the index of
// the padded sequence (transformers' masks are built on cache positions;
// with left padding the real tokens are contiguous, so the window counts
// real tokens), and no query sees a padding key. A padding query that sees
// nothing may see every key instead, as in attention_mask_for.
at::Tensor padded_cached_attention_mask(const at::Tensor& keep, int64_t past, int64_t seq,
                                        std::optional<int64_t> sliding_window) {
  const int64_t batch = keep.size(0);
  const auto opts = at::TensorOptions().dtype(at::kLong).device(keep.device());
  const at::Tensor q = at::arange(past, past + seq, opts).view({seq, 1});    // [seq, 1]
  const at::Tensor kv = at::arange(past + seq, opts).view({1, past + seq});  // [1, past + seq]
  at::Tensor allowed = kv.le(q);                                             // [seq, past + seq]
  if (sliding_window.has_value()) allowed = allowed.logical_and(kv.gt(q - *sliding_window));
  allowed = allowed.view({1, 1, seq, past + seq}).logical_and(keep.view({batch, 1, 1, past + seq}));
  return allowed.logical_or(allowed.any(-1, /*keepdim=*/true).logical_not());  // [batch, 1, seq, past + seq]
}

// config.json's "_name_or_path" (what transformers' save_pretrained records)
// when it is a non-empty string, else the directory's last component.
std::string checkpoint_name(const std::string& dir) {
  std::ifstream in(dir + "/config.json");
  const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (j.is_object() && j.contains("_name_or_path") && j.at("_name_or_path").is_string() &&
      !j.at("_name_or_path").get<std::string>().empty())
    return j.at("_name_or_path").get<std::string>();
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const auto slash = d.find_last_of('/');
  return slash == std::string::npos ? d : d.substr(slash + 1);
}

}  // namespace

// ---- DecoderModel -------------------------------------------------------------------

DecoderModelImpl::DecoderModelImpl(const ModelConfig& c) : config(c) {
  // Given its weight, Embedding skips its own initialisation (CausalLM's, a
  // checkpoint's or a copy's follows).
  embed_tokens = register_module(
      "embed_tokens", torch::nn::Embedding(torch::nn::EmbeddingOptions(c.vocab_size, c.hidden_size)
                                               ._weight(mola::detail::new_parameter({c.vocab_size, c.hidden_size}))));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(DecoderLayer(c));
  norm = register_module("norm", RMSNorm(c.hidden_size, c.rms_norm_eps, c.norm_unit_offset));
}

at::Tensor DecoderModelImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                                     KVCache* cache) {
  const int64_t batch = input_ids.size(0), seq = input_ids.size(1);
  at::Tensor h = embed_tokens->forward(input_ids);  // [batch, seq, hidden]
  if (config.scale_embeddings) {
    // Gemma scales the embeddings by sqrt(hidden_size), the factor rounded to
    // the model dtype first (fp32 -> dtype, as transformers' embed_scale).
    const double factor = std::sqrt(static_cast<double>(config.hidden_size));
    h = h * at::scalar_tensor(factor, at::TensorOptions().dtype(at::kFloat).device(h.device())).to(h.scalar_type());
  }
  const int64_t past = cache != nullptr ? cache->length() : 0;
  const std::optional<int64_t> window = config.sliding_window;  // set for the families that have one
  if (cache != nullptr) {
    const bool padded = attention_mask.has_value() && !attention_mask->ne(0).all().item<bool>();
    cache->keys.resize(layers->size());
    cache->values.resize(layers->size());
    at::Tensor positions, mask;
    if (!padded) {
      positions = shared_positions(past, seq, h.device());  // [1, seq]
      mask = cached_attention_mask(past, seq, window, h.device());
    } else {
      // A padded batch with a cache (left-padded generation): the mask
      // covers the cached tokens and the new ones, and each row numbers its
      // real tokens from 0 as transformers' generate does: position_ids =
      // cumsum(attention_mask) - 1, padding at position 1.
      require(attention_mask->size(1) == past + seq, "CausalLM.forward: with a KV cache holding ", past,
              " tokens and ", seq, " new ones, a padded attention_mask must cover all ", past + seq,
              " (cached tokens first), got ", attention_mask->size(1), " columns");
      const at::Tensor keep = attention_mask->ne(0).to(h.device());  // [batch, past + seq]
      positions = (keep.to(at::kLong).cumsum(-1) - 1).masked_fill(keep.logical_not(), 1).narrow(1, past, seq);
      mask = padded_cached_attention_mask(keep, past, seq, window);  // [batch, 1, seq, past + seq]
    }
    const auto [cos, sin] = rotary_tables(positions, config.head_dim, config.rope_theta, h.scalar_type());
    // MoLEx's gates route at prefill only (the cache is empty then and the mask, if any, is [batch, seq]).
    const at::Tensor padding = past == 0 && padded ? attention_mask->ne(0).to(h.device()) : at::Tensor();
    for (size_t i = 0; i < layers->size(); ++i) {
      auto& l = *(*layers)[i]->as<DecoderLayerImpl>();
      h = l.has_molex() && l.molex->enabled
              ? molex_layer_forward(*this, static_cast<int64_t>(i), h, cos, sin, mask, padding, cache, false)
              : l.forward(h, cos, sin, mask, &cache->keys[i], &cache->values[i]);
    }
    return norm->forward(h);
  }
  const auto [cos, sin] =
      rotary_tables(shared_positions(0, seq, h.device()), config.head_dim, config.rope_theta, h.scalar_type());
  const at::Tensor mask = attention_mask_for(batch, seq, attention_mask, window, h.device());
  const bool checkpoint = gradient_checkpointing && is_training() && at::GradMode::is_enabled();
  const at::Tensor padding = attention_mask.has_value() ? attention_mask->ne(0).to(h.device()) : at::Tensor();
  for (size_t i = 0; i < layers->size(); ++i) {
    auto& l = *(*layers)[i]->as<DecoderLayerImpl>();
    if (l.has_molex() && l.molex->enabled)
      h = molex_layer_forward(*this, static_cast<int64_t>(i), h, cos, sin, mask, padding, nullptr, checkpoint);
    else
      h = checkpoint ? checkpointed_layer_forward(l, h, cos, sin, mask) : l.forward(h, cos, sin, mask);
  }
  return norm->forward(h);
}

// ---- CausalLM -----------------------------------------------------------------------

CausalLMImpl::CausalLMImpl(const ModelConfig& c) {
  model = register_module("model", DecoderModel(c));
  if (!c.tie_word_embeddings)
    lm_head = register_module("lm_head", AdaptableLinear(c.hidden_size, c.vocab_size, /*bias=*/false));
  if (!mola::detail::initialise_parameters()) return;  // a checkpoint or a copy fills them
  // transformers' _init_weights: normal(0, initializer_range = 0.02) for
  // linear and embedding weights, zero biases; norms keep their neutral
  // weight from the constructor.
  at::NoGradGuard no_grad;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    if (ends_with(p.key(), "norm.weight")) continue;
    if (ends_with(p.key(), ".bias")) p.value().zero_();
    else p.value().normal_(0.0, 0.02);
  }
}

CausalLMOutput CausalLMImpl::forward(const at::Tensor& input_ids, const std::optional<at::Tensor>& attention_mask,
                                     const std::optional<at::Tensor>& labels, KVCache* cache) {
  require(input_ids.dim() == 2 && !at::isFloatingType(input_ids.scalar_type()),
                    "CausalLM.forward: input_ids must be integer token ids of shape [batch, seq], got ",
                    input_ids.scalar_type(), " of shape ", shape_str(input_ids.sizes()));
  require(input_ids.size(1) > 0, "CausalLM.forward: input_ids has no tokens (shape ",
                    shape_str(input_ids.sizes()), ")");
  if (attention_mask) {
    // With a cache the mask may also cover the cached tokens (transformers'
    // generate convention), which a left-padded batch needs.
    const int64_t past = cache != nullptr ? cache->length() : 0;
    const bool covers_past = past > 0 && attention_mask->dim() == 2 &&
                             attention_mask->size(0) == input_ids.size(0) &&
                             attention_mask->size(1) == past + input_ids.size(1);
    require(attention_mask->sizes() == input_ids.sizes() || covers_past, "CausalLM.forward: attention_mask has shape ",
            shape_str(attention_mask->sizes()), " but input_ids has ", shape_str(input_ids.sizes()),
            past > 0 ? cat(" and the cache holds ", past, " tokens") : std::string(),
            "; give one 0/1 entry per token", past > 0 ? " (new tokens only, or cached and new)" : "");
  }
  if (labels)
    require(labels->sizes() == input_ids.sizes(), "CausalLM.forward: labels has shape ",
                      shape_str(labels->sizes()), " but input_ids has ", shape_str(input_ids.sizes()),
                      "; give one label per token (-100 where no loss is taken), unshifted");

  const at::Tensor h = model->forward(input_ids, attention_mask, cache);  // [batch, seq, hidden]
  CausalLMOutput out;
  out.logits = lm_head ? lm_head->forward(h) : at::linear(h, model->embed_tokens->weight);  // [batch, seq, vocab]
  if (labels) {
    // Token t predicts label t + 1; the last position predicts nothing.
    // Cross-entropy in fp32 over the labels that are not -100, averaged
    // (transformers' ForCausalLMLoss without num_items_in_batch).
    const int64_t seq = input_ids.size(1);
    const at::Tensor shifted =
        at::constant_pad_nd(labels->to(at::kLong), {0, 1}, -100).narrow(1, 1, seq);  // [batch, seq]
    const int64_t vocab = out.logits.size(-1);
    out.loss = at::cross_entropy_loss(out.logits.to(at::kFloat).reshape({-1, vocab}),  // [batch * seq, vocab]
                                      shifted.reshape({-1}).to(out.logits.device()),   // [batch * seq]
                                      {}, at::Reduction::Mean, -100);
  }
  return out;
}

namespace {

// The checkpoint's tensors (name -> shape) against the parameters: every
// parameter present with its shape, nothing left over but what carries
// nothing new (rotary inv_freq buffers; a tied head written out anyway).
void check_checkpoint(const CausalLMImpl& model, const std::map<std::string, std::vector<int64_t>>& shapes,
                      const std::string& source) {
  const auto params = model.named_parameters(/*recurse=*/true);
  std::vector<std::string> missing;
  for (const auto& p : params) {
    const auto it = shapes.find(p.key());
    if (it == shapes.end()) {
      missing.push_back(p.key());
      continue;
    }
    if (at::IntArrayRef(it->second) != p.value().sizes())
      throw std::invalid_argument(cat(source, ": tensor \"", p.key(), "\" has shape ", shape_str(it->second),
                                      " in the checkpoint but the model built from config.json expects ",
                                      shape_str(p.value().sizes()),
                                      "; the weights and config.json belong to different models"));
  }
  const auto some = [](const std::vector<std::string>& names) {
    std::string out;
    for (size_t i = 0; i < names.size() && i < 5; ++i) out += cat(i ? ", " : "", "\"", names[i], "\"");
    if (names.size() > 5) out += cat(" and ", names.size() - 5, " more");
    return out;
  };
  if (!missing.empty())
    throw std::invalid_argument(cat(source, ": the checkpoint lacks ", missing.size(), " tensor(s) the ",
                                    model.config().model_type, " architecture of config.json needs: ", some(missing),
                                    "; the checkpoint is incomplete or was saved for another model"));
  std::vector<std::string> extra;
  for (const auto& [name, shape] : shapes) {
    if (params.contains(name)) continue;
    // Buffers older transformers versions saved, and a tied head written out
    // anyway: both are recomputed or shared here, so they carry nothing new.
    if (ends_with(name, "rotary_emb.inv_freq")) continue;
    if (name == "lm_head.weight" && model.config().tie_word_embeddings) continue;
    extra.push_back(name);
  }
  if (!extra.empty())
    throw std::invalid_argument(cat(source, ": the checkpoint has ", extra.size(), " tensor(s) the ",
                                    model.config().model_type, " architecture of config.json does not use: ",
                                    some(extra), "; config.json and the weights belong to different models"));
}

}  // namespace

void CausalLMImpl::load_weights(std::map<std::string, at::Tensor> weights, const std::string& source) {
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& [name, t] : weights) shapes[name] = t.sizes().vec();
  check_checkpoint(*this, shapes, source);
  at::NoGradGuard no_grad;
  for (auto& p : named_parameters(/*recurse=*/true)) {
    at::Tensor& t = weights.at(p.key());
    // Adopting the loaded storage avoids a second copy of a large model;
    // a copy is needed only across devices or dtypes.
    if (t.device() == p.value().device() && t.scalar_type() == p.value().scalar_type()) p.value().set_data(t);
    else p.value().copy_(t);
    t = at::Tensor();
  }
}

void CausalLMImpl::load_checkpoint(const std::string& dir, at::ScalarType dtype, at::Device device,
                                   quant::Kind quantize, bool double_quant) {
  // Every shard's header first: names and shapes are checked before any data is read.
  const std::vector<io::CheckpointShard> shards = io::checkpoint_shards(dir);
  std::map<std::string, std::vector<int64_t>> shapes;
  for (const auto& shard : shards) {
    const io::SafetensorsFile f = io::SafetensorsFile::open(shard.path);
    for (const auto& name : shard.names.empty() ? f.names() : shard.names) {
      if (!f.contains(name))
        throw io::SafetensorsError(cat("safetensors: ", f.path(), ": tensor '", name, "' is listed in the index of ",
                                       dir, " but missing from this shard; the index and shards are from different "
                                       "checkpoints: re-download them"));
      shapes[name] = f.info(name).shape;
    }
  }
  check_checkpoint(*this, shapes, dir);
  // Then shard by shard: each parameter takes its tensor in `dtype` on
  // `device`, viewing the mapped file when it already is that (a CPU model in
  // the file's dtype: no copy); otherwise one tensor is converted at a time,
  // and a shard's map is let go once its tensors are placed.
  auto params = named_parameters(/*recurse=*/true);
  // With quantize: the projections' weights by parameter name.
  std::map<std::string, AdaptableLinear> quantized;
  if (quantize != quant::Kind::kNone) {
    for (int64_t l = 0; l < static_cast<int64_t>(model->layers->size()); ++l)
      for (const auto& name : projection_names())
        quantized.emplace(cat("model.layers.", l, ".", DecoderLayerImpl::projection_path(name), ".weight"),
                          model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>()->projection(name));
  }
  at::NoGradGuard no_grad;
  for (const auto& shard : shards) {
    const io::SafetensorsFile f = io::SafetensorsFile::open(shard.path);
    for (const auto& name : shard.names.empty() ? f.names() : shard.names) {
      at::Tensor* param = params.find(name);
      if (param == nullptr) continue;  // checked above: inv_freq, a tied head
      const auto q = quantized.find(name);
      if (q == quantized.end()) {
        param->set_data(f.load(name, dtype, device));
        continue;
      }
      // Read in place from the map in the file's dtype (a copy only when the
      // bytes are misaligned), quantized on the CPU, placed on `device`, and
      // the map's pages of it dropped.
      q->second->set_quantized(
          quant::quantize(f.load(name, f.info(name).scalar_type), quantize, double_quant).to(device));
      f.release_pages(name);
    }
  }
  quantization_ = quantize;
}

void check_device(const at::Device& device, const std::string& fix) {
  if (!device.is_cuda()) {
    require(device.is_cpu(), "device '", device.str(), "' is not one mola runs on (cpu, cuda, cuda:N); ", fix);
    return;
  }
#ifndef MOLA_WITH_CUDA
  require(false, "device '", device.str(), "': this build of mola has no CUDA kernels (it was compiled without "
          "nvcc); ", fix, ", or rebuild mola where the CUDA toolkit is installed");
#endif
  const int64_t found = at::hasCUDA() ? static_cast<int64_t>(at::getNumGPUs()) : 0;
  require(found > 0, "device '", device.str(), "': no usable CUDA GPU was found (torch sees none: no GPU, or no "
          "NVIDIA driver); ", fix);
  require(!device.has_index() || device.index() < found, "device '", device.str(), "': only ", found,
          " CUDA GPU(s) were found (cuda:0", found > 1 ? cat(" to cuda:", found - 1) : std::string(), "); ", fix);
}

std::shared_ptr<CausalLMImpl> CausalLMImpl::from_pretrained(const std::string& dir, at::ScalarType dtype,
                                                            at::Device device, quant::Kind quantize,
                                                            bool double_quant) {
  check_device(device, "load on the CPU with device=\"cpu\"");
  if (!exists(dir))
    throw ModelFileNotFoundError(cat(dir, ": no such checkpoint directory; give a directory holding a Hugging Face "
                                          "checkpoint (config.json and model.safetensors)"));
  const ModelConfig config = ModelConfig::from_json_file(dir + "/config.json");
  if (!exists(dir + "/model.safetensors") && !exists(dir + "/model.safetensors.index.json"))
    throw ModelFileNotFoundError(cat(dir, ": no model.safetensors or model.safetensors.index.json; only safetensors "
                                          "weights are read (re-save with save_pretrained(safe_serialization=True))"));
  require(at::isFloatingType(dtype), "CausalLM.from_pretrained: dtype must be a floating type (float32, "
                                               "bfloat16, float16), got ", dtype);
  std::shared_ptr<CausalLMImpl> model;
  {
    // Parameters made in `dtype` and left uninitialised (their pages never
    // touched) until the checkpoint's tensors replace them.
    mola::detail::ParameterScope scope(at::TensorOptions().dtype(dtype));
    model = std::make_shared<CausalLMImpl>(config);
  }
  model->name_or_path = checkpoint_name(dir);
  model->load_checkpoint(dir, dtype, device, quantize, double_quant);
  model->eval();
  return model;
}

}  // namespace mola::models
