// CausalLM::generate (mola/models/decoder.h): autoregressive decoding with a
// KV cache, greedy or sampled with temperature and nucleus (top-p)
// filtering (Holtzman et al. 2020), stopping rows at EOS as transformers'
// generate does: a stopped row is filled with pad_token_id (else the first
// eos id) and decoding ends once every row has stopped. Left-padded batches
// carry their attention mask through the cached steps, so each row has its
// own positions and never attends to its padding.
#include "mola/models/decoder.h"

#include "detail/text.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <limits>
#include <stdexcept>
#include <vector>

namespace mola::models {
namespace {

using mola::detail::require;

// The next token of every row from its last logits [batch, vocab].
at::Tensor next_tokens(const at::Tensor& logits, const GenerateOptions& opts, std::optional<at::Generator>& gen) {
  if (!opts.do_sample) return logits.argmax(-1);  // [batch]
  at::Tensor scores = logits.to(at::kFloat) / opts.temperature;  // [batch, vocab]
  if (opts.top_p < 1.0) {
    // Keep the most probable tokens until their mass reaches top_p: a token
    // goes when the mass before it is already past top_p (the first stays).
    const auto [sorted, order] = scores.sort(-1, /*descending=*/true);  // [batch, vocab] each
    const at::Tensor probs = sorted.softmax(-1);
    const at::Tensor before = probs.cumsum(-1) - probs;  // mass of the more probable tokens
    const at::Tensor drop = before.gt(opts.top_p);       // [batch, vocab] in sorted order
    scores = scores.scatter(-1, order, sorted.masked_fill(drop, -std::numeric_limits<float>::infinity()));
  }
  // Sampled on the CPU so that a seeded CPU generator drives it on any device.
  const at::Tensor probs = scores.softmax(-1).to(at::kCPU);
  return at::multinomial(probs, 1, /*replacement=*/false, gen).squeeze(-1).to(logits.device());  // [batch]
}

}  // namespace

at::Tensor CausalLMImpl::generate(const at::Tensor& input_ids, const GenerateOptions& opts,
                                  const std::optional<at::Tensor>& attention_mask) {
  require(input_ids.dim() == 2 && !at::isFloatingType(input_ids.scalar_type()) && input_ids.size(1) > 0,
          "CausalLM.generate: input_ids must be integer token ids of shape [batch, seq] with seq > 0");
  require(opts.max_new_tokens >= 0, "CausalLM.generate: max_new_tokens must be >= 0, got ", opts.max_new_tokens);
  if (opts.do_sample) {
    require(opts.temperature > 0.0, "CausalLM.generate: temperature must be > 0 when sampling, got ",
            opts.temperature);
    require(opts.top_p > 0.0 && opts.top_p <= 1.0, "CausalLM.generate: top_p must be in (0, 1], got ", opts.top_p);
  }
  if (attention_mask) {
    require(attention_mask->sizes() == input_ids.sizes(),
            "CausalLM.generate: attention_mask must have input_ids' shape [batch, seq]");
    require(attention_mask->eq(0).logical_or(attention_mask->eq(1)).all().item<bool>(),
            "CausalLM.generate: attention_mask must hold only 0 (padding) and 1 (token)");
  }
  // A left-padded batch (the authors evaluate in left-padded batches of 8,
  // docs/design.md, Fidelity to the papers and the authors' code): padding must precede every row's tokens, so that each
  // row's new tokens follow its last real one. Right padding would put the
  // continuation after padding.
  const bool padded = attention_mask.has_value() && !attention_mask->ne(0).all().item<bool>();
  if (padded) {
    const at::Tensor keep = attention_mask->ne(0);  // [batch, seq]
    require(!keep.logical_not().logical_and(keep.to(at::kLong).cumsum(1).gt(0)).any().item<bool>(),
            "CausalLM.generate: attention_mask has padding (0) after a token (1); generation continues each row "
            "after its last column, so pad on the left (tokenizer padding_side=\"left\")");
    require(keep.any(1).all().item<bool>(),
            "CausalLM.generate: a row of attention_mask is all padding; every prompt needs at least one token");
  }

  at::NoGradGuard no_grad;
  std::optional<at::Generator> gen;
  if (opts.do_sample && opts.seed) gen = at::make_generator<at::CPUGeneratorImpl>(*opts.seed);

  const auto& eos = config().eos_token_ids;
  const int64_t pad = config().pad_token_id.value_or(eos.empty() ? 0 : eos.front());
  const at::Device device = model->embed_tokens->weight.device();
  const at::Tensor eos_ids = at::tensor(eos, at::TensorOptions().dtype(at::kLong)).to(device);  // [n_eos]

  at::Tensor ids = input_ids.to(at::kLong).to(device);  // [batch, seq + generated]
  at::Tensor done = at::zeros({ids.size(0)}, at::TensorOptions().dtype(at::kBool).device(device));
  // The mask grows by a column of ones per step (the new tokens are real,
  // also a stopped row's pad fill, as in transformers' generate); without
  // padding it stays absent so the forward keeps its causal fast path.
  std::optional<at::Tensor> mask;  // [batch, seq + generated]
  if (padded) mask = attention_mask->ne(0).to(at::kLong).to(device);
  KVCache cache;
  at::Tensor step = ids;  // the tokens the cache has not seen yet
  for (int64_t t = 0; t < opts.max_new_tokens; ++t) {
    const at::Tensor logits = forward(step, mask, std::nullopt, &cache).logits.select(1, -1);  // [batch, vocab]
    at::Tensor next = next_tokens(logits, opts, gen);  // [batch]
    next = at::where(done, at::full_like(next, pad), next);
    ids = at::cat({ids, next.unsqueeze(1)}, 1);
    if (mask) mask = at::cat({*mask, at::ones({ids.size(0), 1}, mask->options())}, 1);
    if (!eos.empty()) {
      done = done.logical_or(at::isin(next, eos_ids));
      if (done.all().item<bool>()) break;
    }
    step = next.unsqueeze(1);  // [batch, 1]
  }
  return ids;
}

}  // namespace mola::models
