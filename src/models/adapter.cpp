// Adapters on the C++ decoder (mola/models/adapter.h and the adapter members
// of CausalLM in decoder.h): attaching MoLA or LoRA to the projections, the
// balance loss over the last forward's router logits, and the two adapter
// files. Apart from decoder.cpp because none of it is needed to run a base
// model, and the file format is a contract of its own (docs/design.md, The adapter files).
#include "mola/models/adapter.h"

#include "detail/parameters.h"
#include "detail/text.h"

#include <ATen/CPUGeneratorImpl.h>

#include <mola/io/safetensors.h>
#include <mola/train/options.h>  // TrainOptions::trainables

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace mola::models {
namespace {

using mola::detail::cat;

using mola::detail::shape_str;

std::string layer_path(int64_t layer) { return cat("model.layers.", layer); }

// The adapter trains in fp32 over a 16-bit base (its AdamW state then is
// fp32 too), as PEFT's autocast_adapter_dtype; the forward casts it to the
// activations' dtype.
at::ScalarType adapter_dtype(at::ScalarType base) {
  return base == at::kBFloat16 || base == at::kHalf ? at::kFloat : base;
}

// "a", "b", "c" and 3 more: for messages listing keys.
std::string list_some(const std::vector<std::string>& names) {
  std::string out;
  for (size_t i = 0; i < names.size() && i < 5; ++i) out += cat(i ? ", " : "", "\"", names[i], "\"");
  if (names.size() > 5) out += cat(" and ", names.size() - 5, " more");
  return out;
}

bool is_dir(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

// mkdir -p with POSIX calls (no <filesystem>: see src/config.cpp).
void make_dirs(const std::string& dir) {
  for (size_t pos = 1; pos <= dir.size(); ++pos) {
    if (pos != dir.size() && dir[pos] != '/') continue;
    const std::string prefix = dir.substr(0, pos);
    if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST)
      throw std::runtime_error(cat("save_adapter: cannot create directory \"", prefix, "\": ", std::strerror(errno)));
  }
  if (!is_dir(dir))
    throw std::runtime_error(cat("save_adapter: \"", dir, "\" exists and is not a directory; give a directory path"));
}

// The file keys of `r` on `model` with the shapes they must have: router [E, in],
// lora_a [E, r, in], lora_b [E, out, r] for every layer and target.
std::map<std::string, std::vector<int64_t>> expected_shapes(const CausalLMImpl& model, const ResolvedAdapter& r) {
  std::map<std::string, std::vector<int64_t>> out;
  for (int64_t l = 0; l < r.num_layers; ++l) {
    const auto* layer = model.model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>();
    for (const auto& name : projection_names()) {
      if (std::find(r.targets.begin(), r.targets.end(), name) == r.targets.end()) continue;
      const AdaptableLinear p = layer->projection(name);
      const std::string key = cat(layer_path(l), ".", DecoderLayerImpl::projection_path(name), ".mola.");
      const auto i = static_cast<size_t>(l);
      out[key + "router"] = {r.experts[i], p->in_features};
      out[key + "lora_a"] = {r.experts[i], r.rank[i], p->in_features};
      out[key + "lora_b"] = {r.experts[i], p->out_features, r.rank[i]};
    }
    if (r.is_molex()) {  // the gates are part of a MoLEx adapter (mola/nn/molex.h)
      const std::string key = layer_path(l) + ".molex.";
      out[key + "gate.weight"] = {r.num_layers, model.config().hidden_size};
      out[key + "gate.bias"] = {r.num_layers};
      if (r.molex_alpha_learned) out[key + "alpha"] = {1};
    }
  }
  return out;
}

// Throws ConfigError when `attached` and `loaded` would build different modules.
void check_same_adapter(const ResolvedAdapter& attached, const ResolvedAdapter& loaded, const std::string& source) {
  if (attached.targets != loaded.targets)
    throw ConfigError(cat(source, ": targets differ from the attached adapter's; load into a model without an "
                                  "adapter, or attach the config of this file"));
  const struct {
    const char* field;
    const std::vector<int64_t>& a;
    const std::vector<int64_t>& b;
  } fields[] = {{"experts", attached.experts, loaded.experts},
                {"top_k", attached.top_k, loaded.top_k},
                {"rank", attached.rank, loaded.rank}};
  for (const auto& f : fields)
    for (size_t l = 0; l < f.a.size(); ++l)
      if (f.a[l] != f.b[l])
        throw ConfigError(cat(source, ": layer ", l, " (", layer_path(static_cast<int64_t>(l)), ") has ", f.field,
                              " ", f.b[l], " in the file but the attached adapter has ", f.field, " ", f.a[l],
                              "; load into a model without an adapter, or attach the config of this file"));
  if (attached.scaling != loaded.scaling)
    throw ConfigError(cat(source, ": alpha ", loaded.alpha, " differs from the attached adapter's ", attached.alpha));
  // PiSSA changed the base weights at attach; another init left them as loaded.
  if ((attached.init == "pissa") != (loaded.init == "pissa"))
    throw ConfigError(cat(source, ": init \"", loaded.init, "\" in the file but the attached adapter has init \"",
                          attached.init, "\", and only PiSSA adjusts the base weights; load into a model without an "
                          "adapter"));
  // MoLEx settings shape the forward (and the gate tensors): they must agree too.
  nlohmann::json a = attached.to_json(), b = loaded.to_json();
  for (const auto& key : AdapterConfig::molex_keys())
    if (a.value(key, nlohmann::json()) != b.value(key, nlohmann::json()))
      throw ConfigError(cat(source, ": ", key, " is ", b.value(key, nlohmann::json("(not MoLEx)")).dump(),
                            " in the file but ", a.value(key, nlohmann::json("(not MoLEx)")).dump(),
                            " in the attached adapter; load into a model without an adapter, or attach the "
                            "config of this file"));
  if (attached.method != loaded.method)
    throw ConfigError(cat(source, ": method \"", loaded.method, "\" differs from the attached adapter's \"",
                          attached.method, "\"; load into a model without an adapter"));
}

}  // namespace

// ---- CausalLM's adapter members ---------------------------------------------------------

void CausalLMImpl::attach(const AdapterConfig& cfg) { attach(cfg.resolve(config().num_hidden_layers)); }

void CausalLMImpl::attach(const ResolvedAdapter& r) {
  if (adapter_)
    throw std::logic_error("CausalLM.attach: the model already has an adapter; build or load a fresh model to "
                           "attach another");
  if (r.num_layers != config().num_hidden_layers)
    throw ConfigError(cat("CausalLM.attach: the adapter is for ", r.num_layers, " layers but the model has ",
                          config().num_hidden_layers, "; resolve the config for this model"));
  for (const auto& t : r.targets)
    if (std::find(projection_names().begin(), projection_names().end(), t) == projection_names().end())
      throw ConfigError(cat("targets: \"", t, "\" is not a projection of the ", config().model_type,
                            " decoder; did you mean \"", mola::detail::nearest_name(t, projection_names()),
                            "\"? Valid targets: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"));
  if (r.init == "pissa" && quantization_ != quant::Kind::kNone)
    throw ConfigError(cat("init \"pissa\" moves part of each base weight into the adapter, but this model's base is "
                          "quantized (", quant::kind_name(quantization_), "); use init \"kaiming\" or \"gaussian\", "
                          "or load the base without quantize"));
  const ops::Compute compute = ops::parse_compute(r.compute);
  for (int64_t l = 0; l < r.num_layers; ++l) {
    const auto* layer = model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>();
    const auto i = static_cast<size_t>(l);
    for (const auto& name : projection_names()) {
      if (std::find(r.targets.begin(), r.targets.end(), name) == r.targets.end()) continue;
      AdaptableLinear p = layer->projection(name);
      const auto options = nn::MoLALinearOptions(p->in_features, p->out_features)
                               .bias(p->bias.defined())
                               .num_experts(r.experts[i])
                               .top_k(r.top_k[i])
                               .rank(r.rank[i])
                               .alpha(r.alpha)
                               .dropout(r.dropout)
                               .dropout_masks(r.dropout_masks)
                               .compute(compute)
                               .layer_index(l)
                               .init(r.init);
      p->attach(nn::MoLAAdapter(options, p->weight.options().dtype(adapter_dtype(p->weight.scalar_type()))));
      // PiSSA moves the top-r singular part of the weight into the experts
      // (nn::detail::pissa_init); load_adapter attaches through here, so a saved
      // PiSSA adapter finds the same adjusted weight in a fresh base model.
      if (r.init == "pissa") {
        nn::detail::pissa_init(p->weight, p->mola->lora_a, p->mola->lora_b, r.scaling[i]);
        p->mola->pissa_a0 = p->mola->lora_a[0].detach().clone();  // [r, in], the base model's principal part
        p->mola->pissa_b0 = p->mola->lora_b[0].detach().clone();  // [out, r]
      }
      p->mola->train(is_training());
      p->adapter_enabled = adapter_enabled_;
    }
  }
  if (r.is_molex()) {
    for (int64_t l = 0; l < r.num_layers; ++l) {
      auto* layer = model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>();
      const auto options = nn::MoLExGateOptions(config().hidden_size, r.num_layers, l)
                               .pool(r.molex_pool)
                               .alpha(r.molex_alpha)
                               .alpha_learned(r.molex_alpha_learned)
                               .gate_grad(r.molex_gate_grad)
                               .exclude_self(r.molex_exclude_self);
      const at::Tensor& ref = model->embed_tokens->weight;
      layer->attach_molex(nn::MoLExGate(options, ref.options().dtype(adapter_dtype(ref.scalar_type()))));
      layer->molex->train(is_training());
    }
  }
  // Only the routers and experts train (docs/design.md, The MoLA layer), and MoLEx's gates.
  for (auto& param : parameters(/*recurse=*/true)) param.requires_grad_(false);
  for (const auto& a : adapted_projections())
    for (auto& param : a.module->mola->parameters()) param.requires_grad_(true);
  for (const auto& layer : *model->layers)
    if (layer->as<DecoderLayerImpl>()->has_molex())
      for (auto& param : layer->as<DecoderLayerImpl>()->molex->parameters()) param.requires_grad_(true);
  adapter_ = r;
  if (adapter_->base_model_name.empty()) adapter_->base_model_name = name_or_path;
}

void CausalLMImpl::set_adapter_enabled(bool enabled) {
  if (!adapter_)
    throw std::logic_error("CausalLM.adapter_enabled: the model has no adapter to switch; attach or load one first");
  adapter_enabled_ = enabled;
  for (auto& a : adapted_projections()) a.module->adapter_enabled = enabled;
  for (const auto& layer : *model->layers)
    if (layer->as<DecoderLayerImpl>()->has_molex()) layer->as<DecoderLayerImpl>()->molex->enabled = enabled;
}

CausalLMImpl::TrainableCounts CausalLMImpl::set_trainable(const std::string& which) {
  const auto& valid = train::TrainOptions::trainables();
  if (std::find(valid.begin(), valid.end(), which) == valid.end())
    detail::raise<std::invalid_argument>("set_trainable: trainable=", detail::quote(which), " is not one of ",
                                         detail::join(valid),
                                         " (all: routers and experts; experts: routers frozen; routers: experts frozen)");
  if (!adapter_)
    throw std::logic_error("set_trainable: the model has no adapter; attach or load one first");
  const bool routers = which != "experts", experts = which != "routers";
  TrainableCounts counts;
  const auto set = [&](const at::Tensor& t, bool on) {
    t.requires_grad_(on);
    (on ? counts.trainable : counts.frozen) += t.numel();
  };
  for (const auto& a : adapted_projections()) {
    set(a.module->mola->router, routers);
    set(a.module->mola->lora_a, experts);
    set(a.module->mola->lora_b, experts);
  }
  // MoLEx's gates route between layers: they count as routers.
  for (auto& p : named_parameters(/*recurse=*/true))
    if (p.key().find(".molex.") != std::string::npos) set(p.value(), routers);
  return counts;
}

void CausalLMImpl::detach_adapter() {
  if (!adapter_) throw std::logic_error("CausalLM.detach_adapter: the model has no adapter; nothing to take out");
  for (auto& a : adapted_projections()) a.module->detach();
  for (const auto& layer : *model->layers) {
    auto* l = layer->as<DecoderLayerImpl>();
    if (l->has_molex()) {
      l->unregister_module("molex");
      l->molex = nn::MoLExGate(nullptr);
    }
  }
  // attach froze the base; it trains again, as before attach.
  for (auto& param : parameters(/*recurse=*/true)) param.requires_grad_(true);
  adapter_.reset();
  adapter_enabled_ = true;
}

namespace {

// The state's keys of a quantized projection weight: "<path>.weight.quantized.<data|scale|...>".
std::string quantized_key(const std::string& path, const std::string& part) {
  return cat(path, ".weight.quantized.", part);
}

// Every projection of every layer with its module path, adapted or not.
template <typename Fn>
void for_each_projection(const DecoderModelImpl& model, Fn&& fn) {
  for (size_t l = 0; l < model.layers->size(); ++l) {
    const auto* layer = model.layers->ptr(l)->as<DecoderLayerImpl>();
    for (const auto& name : projection_names())
      fn(cat(layer_path(static_cast<int64_t>(l)), ".", DecoderLayerImpl::projection_path(name)),
         layer->projection(name));
  }
}

}  // namespace

CausalLMImpl::State CausalLMImpl::state() const {
  State st;
  st.config = config();
  st.name_or_path = name_or_path;
  st.adapter = adapter_;
  for (const auto& p : named_parameters(/*recurse=*/true)) {
    st.tensors[p.key()] = p.value();
    if (p.value().requires_grad()) st.trainable.push_back(p.key());
  }
  for (const auto& a : adapted_projections())
    if (a.module->mola->pissa_a0.defined()) {
      st.tensors[a.path + ".mola.pissa_a0"] = a.module->mola->pissa_a0;
      st.tensors[a.path + ".mola.pissa_b0"] = a.module->mola->pissa_b0;
    }
  st.quantization = quantization_;
  if (quantization_ != quant::Kind::kNone)
    for_each_projection(*model, [&](const std::string& path, AdaptableLinear p) {
      for (const auto& [part, t] : p->quantized->tensors()) st.tensors[quantized_key(path, part)] = t;
    });
  st.training = is_training();
  st.gradient_checkpointing = gradient_checkpointing();
  st.adapter_enabled = adapter_enabled_;
  return st;
}

std::shared_ptr<CausalLMImpl> CausalLMImpl::from_state(const State& st, bool clone) {
  std::shared_ptr<CausalLMImpl> out;
  {
    // Uninitialised CPU tensors (pages never touched) that the state's tensors replace.
    mola::detail::ParameterScope scope(at::TensorOptions().dtype(at::kFloat));
    out = std::make_shared<CausalLMImpl>(st.config);
    out->name_or_path = st.name_or_path;
    if (st.adapter) {
      // Attached as "kaiming" so that PiSSA's SVD does not run again (its result
      // is in the tensors); the MoLEx gates' Linear draws its init from the CPU
      // generator, which is put back.
      ResolvedAdapter plain = *st.adapter;
      plain.init = "kaiming";
      auto gen = at::detail::getDefaultCPUGenerator();
      at::Tensor rng;
      {
        std::lock_guard<std::mutex> lock(gen.mutex());
        rng = gen.get_state();
      }
      out->attach(plain);
      {
        std::lock_guard<std::mutex> lock(gen.mutex());
        gen.set_state(rng);
      }
      out->adapter_ = *st.adapter;
    }
  }
  const auto take = [&](const std::string& key, const at::Tensor& like) {
    const auto it = st.tensors.find(key);
    if (it == st.tensors.end())
      throw std::invalid_argument(cat("CausalLM state: no tensor \"", key, "\"; the state is incomplete"));
    if (like.defined() && it->second.sizes() != like.sizes())
      throw std::invalid_argument(cat("CausalLM state: \"", key, "\" has shape ", shape_str(it->second.sizes()),
                                      " but the model needs ", shape_str(like.sizes())));
    return clone ? it->second.detach().clone() : it->second.detach();
  };
  at::NoGradGuard no_grad;
  if (st.quantization != quant::Kind::kNone) {
    // The projections take their stored tensors first: "weight" becomes empty.
    for_each_projection(*out->model, [&](const std::string& path, AdaptableLinear p) {
      quant::QuantizedWeight q;
      q.kind = st.quantization;
      q.out_features = p->out_features;
      q.in_features = p->in_features;
      q.data = take(quantized_key(path, "data"), at::Tensor());
      q.scale = take(quantized_key(path, "scale"), at::Tensor());
      if (st.tensors.count(quantized_key(path, "scale_scale")) != 0) {
        q.scale_scale = take(quantized_key(path, "scale_scale"), at::Tensor());
        q.scale_offset = take(quantized_key(path, "scale_offset"), at::Tensor());
      }
      p->set_quantized(std::move(q));
    });
    out->quantization_ = st.quantization;
  }
  for (auto& p : out->named_parameters(/*recurse=*/true)) p.value().set_data(take(p.key(), p.value()));
  for (auto& a : out->adapted_projections())
    if (st.tensors.count(a.path + ".mola.pissa_a0")) {
      a.module->mola->pissa_a0 = take(a.path + ".mola.pissa_a0", at::Tensor());
      a.module->mola->pissa_b0 = take(a.path + ".mola.pissa_b0", at::Tensor());
    }
  auto params = out->named_parameters(/*recurse=*/true);
  for (auto& p : params) p.value().requires_grad_(false);
  for (const auto& key : st.trainable)
    if (params.contains(key)) params[key].requires_grad_(true);
  out->train(st.training);
  out->set_gradient_checkpointing(st.gradient_checkpointing);
  if (out->adapter_) out->set_adapter_enabled(st.adapter_enabled);
  return out;
}

const ResolvedAdapter& CausalLMImpl::adapter_config() const {
  if (!adapter_) throw std::logic_error("CausalLM.adapter_config: no adapter is attached; call attach() first");
  return *adapter_;
}

std::vector<CausalLMImpl::AdaptedProjection> CausalLMImpl::adapted_projections() const {
  std::vector<AdaptedProjection> out;
  for (int64_t l = 0; l < config().num_hidden_layers; ++l) {
    const auto* layer = model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>();
    for (const auto& name : projection_names()) {
      AdaptableLinear p = layer->projection(name);
      if (p->attached()) out.push_back({cat(layer_path(l), ".", DecoderLayerImpl::projection_path(name)), l, p});
    }
  }
  return out;
}

at::Tensor CausalLMImpl::aux_loss(std::optional<double> coef, const std::optional<at::Tensor>& mask) {
  const ResolvedAdapter& r = adapter_config();
  std::vector<std::vector<at::Tensor>> per_layer(static_cast<size_t>(r.num_layers));
  for (auto& a : adapted_projections()) {
    std::vector<at::Tensor> logits = a.module->mola->take_router_logits();  // each [tokens, E]
    if (logits.empty())
      throw std::logic_error(cat("CausalLM.aux_loss: ", a.path, " has no router logits; run a forward first"));
    auto& layer = per_layer[static_cast<size_t>(a.layer)];
    layer.insert(layer.end(), logits.begin(), logits.end());
  }
  std::vector<at::Tensor> stacked;
  for (auto& logits : per_layer) stacked.push_back(at::cat(logits, 0));  // [modules * tokens, E_l]
  std::optional<at::Tensor> token_mask;
  if (mask && mask->defined()) token_mask = mask->reshape({-1}).ne(0);  // [batch * seq]
  at::Tensor loss = ops::load_balancing_loss(stacked, r.top_k, coef.value_or(r.aux_loss_coef), token_mask);
  if (r.is_molex() && r.molex_aux_loss_coef > 0) {
    at::Tensor gates = at::zeros({}, loss.options().dtype(at::kFloat));
    for (const auto& layer : *model->layers) gates = gates + layer->as<DecoderLayerImpl>()->molex->balance_loss();
    loss = loss + r.molex_aux_loss_coef * gates;
  }
  return loss;
}

// ---- files ----------------------------------------------------------------------------

std::map<std::string, at::Tensor> adapter_state_dict(const CausalLMImpl& model) {
  std::map<std::string, at::Tensor> out;
  for (const auto& a : model.adapted_projections()) {
    out[a.path + ".mola.router"] = a.module->mola->router;
    out[a.path + ".mola.lora_a"] = a.module->mola->lora_a;
    out[a.path + ".mola.lora_b"] = a.module->mola->lora_b;
  }
  for (int64_t l = 0; l < model.config().num_hidden_layers; ++l) {
    const auto* layer = model.model->layers->ptr(static_cast<size_t>(l))->as<DecoderLayerImpl>();
    if (!layer->has_molex()) continue;
    out[layer_path(l) + ".molex.gate.weight"] = layer->molex->gate->weight;
    out[layer_path(l) + ".molex.gate.bias"] = layer->molex->gate->bias;
    if (layer->molex->alpha.defined()) out[layer_path(l) + ".molex.alpha"] = layer->molex->alpha;
  }
  return out;
}

void save_adapter(const CausalLMImpl& model, const std::string& dir) {
  if (!model.has_adapter())
    throw std::logic_error("save_adapter: the model has no adapter; call attach() or load_adapter() first");
  make_dirs(dir);
  const std::string config_path = dir + "/" + kAdapterConfigFile;
  const std::string tmp = cat(config_path, ".tmp.", ::getpid());
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << model.adapter_config().to_json().dump(2) << "\n";
    out.close();
    if (!out) throw std::runtime_error(cat("save_adapter: cannot write \"", tmp, "\"; check space and permissions"));
  }
  if (std::rename(tmp.c_str(), config_path.c_str()) != 0) {
    const std::string why = std::strerror(errno);
    std::remove(tmp.c_str());
    throw std::runtime_error(cat("save_adapter: cannot rename \"", tmp, "\" to \"", config_path, "\": ", why));
  }
  std::map<std::string, at::Tensor> tensors;
  for (const auto& [key, t] : adapter_state_dict(model)) tensors[key] = t.detach();
  io::save_safetensors(dir + "/" + kAdapterWeightsFile, tensors,
                       {{"format", "pt"}, {"method", model.adapter_config().method}});
}

void load_adapter(CausalLMImpl& model, const std::string& dir_or_checkpoint, bool is_trainable) {
  // A whole-model directory keeps its adapter in mola_adapter/.
  std::string dir = dir_or_checkpoint;
  if (!exists(dir + "/" + kAdapterConfigFile) && exists(dir + "/mola_adapter/" + kAdapterConfigFile))
    dir += "/mola_adapter";
  const std::string config_path = dir + "/" + kAdapterConfigFile;
  const std::string weights_path = dir + "/" + kAdapterWeightsFile;
  if (!is_dir(dir))
    throw ModelFileNotFoundError(cat(dir, ": no such adapter directory; give the directory save_adapter wrote"));
  for (const auto& path : {config_path, weights_path})
    if (!exists(path))
      throw ModelFileNotFoundError(cat(path, " does not exist; an adapter directory holds ", kAdapterConfigFile,
                                       " and ", kAdapterWeightsFile));

  ResolvedAdapter r;
  {
    std::ifstream in(config_path);
    const nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) throw ConfigError(cat(config_path, " is not valid JSON"));
    try {
      r = ResolvedAdapter::from_json(j);
    } catch (const ConfigError& e) {
      throw ConfigError(cat(config_path, ": ", e.what()));
    }
  }
  if (r.num_layers != model.config().num_hidden_layers)
    throw ConfigError(cat(config_path, ": the adapter is for ", r.num_layers, " layers but the model has ",
                          model.config().num_hidden_layers, "; it was trained on another base model"));
  for (const auto& t : r.targets)
    if (std::find(projection_names().begin(), projection_names().end(), t) == projection_names().end())
      throw ConfigError(cat(config_path, ": targets: \"", t, "\" is not a projection of the ", model.config().model_type,
                            " decoder (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj); the adapter "
                            "was made for another model: load it into that one"));
  if (model.has_adapter()) check_same_adapter(model.adapter_config(), r, config_path);

  // Check every tensor before touching the model.
  std::map<std::string, at::Tensor> loaded = io::load_safetensors(weights_path);
  const auto expected = expected_shapes(model, r);
  std::vector<std::string> missing, unexpected;
  for (const auto& [key, shape] : expected) {
    const auto it = loaded.find(key);
    if (it == loaded.end()) {
      missing.push_back(key);
      continue;
    }
    if (it->second.sizes() != at::IntArrayRef(shape))
      throw std::invalid_argument(cat(weights_path, ": \"", key, "\" has shape ", shape_str(it->second.sizes()),
                                      " but ", kAdapterConfigFile, " and the model need ", shape_str(shape),
                                      "; the two files do not belong together"));
  }
  for (const auto& [key, t] : loaded)
    if (!expected.count(key)) unexpected.push_back(key);
  if (!missing.empty())
    throw std::invalid_argument(cat(weights_path, ": lacks ", missing.size(), " tensor(s) ", kAdapterConfigFile,
                                    " calls for: ", list_some(missing)));
  if (!unexpected.empty())
    throw std::invalid_argument(cat(weights_path, ": has ", unexpected.size(), " tensor(s) ", kAdapterConfigFile,
                                    " does not call for: ", list_some(unexpected),
                                    "; check that its targets match the file"));

  if (!model.has_adapter()) model.attach(r);
  {
    at::NoGradGuard no_grad;
    for (auto& [key, param] : adapter_state_dict(model)) param.copy_(loaded.at(key));  // casts dtype, moves device
  }
  for (auto& [key, param] : adapter_state_dict(model)) param.requires_grad_(is_trainable);
  if (!is_trainable) model.eval();
}

}  // namespace mola::models
