// MoLEx on the C++ decoder (mola/models/decoder.h, molex_layer_forward;
// docs/design.md, MoLEx): running layer t's own block and the block its gate chose,
// and mixing them. The gate itself (pooling, routing, mix) is
// mola::nn::MoLExGate (src/nn/molex.cpp); this file decides which rows go
// through which block, and keeps the second blocks' KV caches for
// generation.
//
// Cost: one extra block per layer (about twice the base forward). Rows that
// share j run as one call on their rows (index_select in, index_copy out), so
// a batch whose sequences all chose the same j is a single full-batch call;
// rows with j == t reuse u_t. Listing the distinct j is the one host sync per
// layer. Per-token routing ("token") runs u_j on the whole batch for each
// distinct j used and selects per token: up to L extra blocks per layer in
// the worst case, typically a few.
#include "mola/models/decoder.h"

#include "detail/text.h"

#include <stdexcept>
#include <utility>
#include <vector>

namespace mola::models {
namespace {

using mola::detail::cat;

// t's rows `rows` when t is per row ([batch, ...]); shared tensors ([1, ...],
// undefined) and `rows` undefined (every row) pass through.
at::Tensor rows_of(const at::Tensor& t, const at::Tensor& rows, int64_t batch) {
  if (!t.defined() || !rows.defined() || t.size(0) != batch) return t;
  return t.index_select(0, rows);
}

// Layer `layer` as the second block. Its adapters' router_logits are put
// back afterwards: the balance loss sees each layer's routers on its own
// input only (see molex_layer_forward in decoder.h).
at::Tensor run_branch(DecoderLayerImpl& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      const at::Tensor& mask, bool checkpoint, at::Tensor* past_key = nullptr,
                      at::Tensor* past_value = nullptr) {
  std::vector<std::pair<nn::MoLAAdapterImpl*, nn::MoLAAdapterImpl::Routing>> kept;
  for (const auto& name : projection_names()) {
    AdaptableLinear p = layer.projection(name);
    if (p->attached()) kept.emplace_back(p->mola.get(), p->mola->routing());
  }
  const at::Tensor out = checkpoint ? checkpointed_layer_forward(layer, x, cos, sin, mask)
                                    : layer.forward(x, cos, sin, mask, past_key, past_value);
  for (auto& [adapter, routing] : kept) adapter->set_routing(std::move(routing));
  return out;
}

DecoderLayerImpl& layer_at(DecoderModelImpl& model, int64_t i) {
  return *model.layers->ptr(static_cast<size_t>(i))->as<DecoderLayerImpl>();
}

// The distinct values of `choice` on the host (one sync).
std::vector<int64_t> distinct(const at::Tensor& choice) {
  const at::Tensor values = std::get<0>(at::_unique2(choice.reshape({-1}), /*sorted=*/true)).to(at::kCPU);
  return std::vector<int64_t>(values.data_ptr<int64_t>(), values.data_ptr<int64_t>() + values.numel());
}

}  // namespace

void DecoderLayerImpl::attach_molex(nn::MoLExGate gate) {
  if (has_molex()) throw std::logic_error("DecoderLayer.attach_molex: the layer has a MoLEx gate already");
  molex = register_module("molex", std::move(gate));
}

at::Tensor molex_layer_forward(DecoderModelImpl& model, int64_t t, const at::Tensor& z, const at::Tensor& cos,
                               const at::Tensor& sin, const at::Tensor& mask, const at::Tensor& padding,
                               KVCache* cache, bool checkpoint) {
  DecoderLayerImpl& layer = layer_at(model, t);
  nn::MoLExGateImpl& gate = *layer.molex;
  const int64_t batch = z.size(0);
  const auto i = static_cast<size_t>(t);

  if (gate.options.pool() == "token") {
    if (cache != nullptr)
      throw std::invalid_argument(
          "MoLEx with molex_pool \"token\" routes every token on its own, so generation would need every layer's "
          "keys and values for every layer; it runs without a KV cache only. Evaluate it by log-likelihood "
          "(eval methods [\"loglik\"]) or train with molex_pool \"mean\" or \"last\"");
    const at::Tensor own = checkpoint ? checkpointed_layer_forward(layer, z, cos, sin, mask)
                                      : layer.forward(z, cos, sin, mask);  // [batch, seq, hidden]
    const nn::MoLExRouting r = gate.route(z, padding);                    // choice [batch, seq]
    at::Tensor other = at::zeros_like(own);
    for (const int64_t d : distinct(r.choice)) {
      const at::Tensor u = d == t ? own : run_branch(layer_at(model, d), z, cos, sin, mask, checkpoint);
      other = at::where(r.choice.eq(d).unsqueeze(-1), u, other);  // [batch, seq, hidden]
    }
    return gate.mix(own, other, r.scale.unsqueeze(-1));
  }

  const at::Tensor own = cache != nullptr ? layer.forward(z, cos, sin, mask, &cache->keys[i], &cache->values[i])
                         : checkpoint     ? checkpointed_layer_forward(layer, z, cos, sin, mask)
                                          : layer.forward(z, cos, sin, mask);  // [batch, seq, hidden]
  if (cache != nullptr) {
    cache->molex.resize(model.layers->size());
    cache->molex_choice.resize(model.layers->size());
    cache->molex_scale.resize(model.layers->size());
    if (!cache->molex_choice[i].defined()) {
      // Prefill: choose from the prompt, then keep j for the generated tokens.
      const nn::MoLExRouting r = gate.route(z, padding);
      cache->molex_choice[i] = r.choice;
      cache->molex_scale[i] = r.scale.detach();
      const std::vector<int64_t> sources = distinct(r.choice);
      for (const int64_t d : sources) {
        if (d == t) continue;
        KVCache::MoLExBranch b;
        b.source = d;
        if (sources.size() > 1) b.rows = r.choice.eq(d).nonzero().squeeze(1);  // [n]
        cache->molex[i].push_back(std::move(b));
      }
    }
    at::Tensor other = own;  // rows with j == t: u_j = u_t
    for (auto& b : cache->molex[i]) {
      const at::Tensor u = run_branch(layer_at(model, b.source), rows_of(z, b.rows, batch),
                                      rows_of(cos, b.rows, batch), rows_of(sin, b.rows, batch),
                                      rows_of(mask, b.rows, batch), false, &b.key, &b.value);
      other = b.rows.defined() ? other.index_copy(0, b.rows, u) : u;
    }
    return gate.mix(own, other, cache->molex_scale[i].view({batch, 1, 1}));
  }

  const nn::MoLExRouting r = gate.route(z, padding);  // choice [batch]
  const std::vector<int64_t> sources = distinct(r.choice);
  at::Tensor other;
  if (sources.size() == 1) {
    // Every row chose the same layer: one full-batch call (or none for j == t).
    other = sources[0] == t ? own : run_branch(layer_at(model, sources[0]), z, cos, sin, mask, checkpoint);
  } else {
    other = own;  // rows with j == t keep u_t
    for (const int64_t d : sources) {
      if (d == t) continue;
      const at::Tensor rows = r.choice.eq(d).nonzero().squeeze(1);  // [n]
      const at::Tensor u = run_branch(layer_at(model, d), z.index_select(0, rows), rows_of(cos, rows, batch),
                                      rows_of(sin, rows, batch), rows_of(mask, rows, batch), checkpoint);
      other = other.index_copy(0, rows, u);  // [batch, seq, hidden]
    }
  }
  return gate.mix(own, other, r.scale.view({batch, 1, 1}));
}

}  // namespace mola::models
