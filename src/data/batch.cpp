// Batching (mola/data/batch.h): collate and the epoch sampler. Both are plain
// index arithmetic on the CPU; the tensors are built once per micro-batch.
#include <mola/data/batch.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>

namespace mola::data {

namespace {

// A uniform integer in [0, n) by rejection, so the permutation does not depend
// on the standard library's uniform_int_distribution (whose algorithm is
// implementation-defined) and is the same on every platform.
uint64_t bounded(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: the biased low values
  for (;;) {
    const uint64_t r = rng();
    if (r >= threshold) return r % n;
  }
}

}  // namespace

Batch collate(const std::vector<Example>& examples, int64_t pad_id, int64_t pad_to_multiple_of) {
  std::vector<int64_t> indices(examples.size());
  std::iota(indices.begin(), indices.end(), int64_t{0});
  return collate(examples, indices, pad_id, pad_to_multiple_of);
}

Batch collate(const std::vector<Example>& examples, const std::vector<int64_t>& indices, int64_t pad_id,
              int64_t pad_to_multiple_of) {
  if (indices.empty()) throw std::invalid_argument("collate: no examples to batch; give at least one Example");
  int64_t longest = 0;
  for (const int64_t i : indices) {
    if (i < 0 || i >= static_cast<int64_t>(examples.size()))
      throw std::invalid_argument("collate: index " + std::to_string(i) + " is outside the " +
                                  std::to_string(examples.size()) + " examples");
    const Example& e = examples[static_cast<size_t>(i)];
    if (e.labels.size() != e.input_ids.size())
      throw std::invalid_argument("collate: example " + std::to_string(i) + " has " +
                                  std::to_string(e.input_ids.size()) + " input_ids but " +
                                  std::to_string(e.labels.size()) +
                                  " labels; labels must be input_ids with -100 where no loss is taken");
    longest = std::max<int64_t>(longest, static_cast<int64_t>(e.input_ids.size()));
  }
  int64_t seq = longest;
  if (pad_to_multiple_of > 1) seq = (longest + pad_to_multiple_of - 1) / pad_to_multiple_of * pad_to_multiple_of;

  const auto rows = static_cast<int64_t>(indices.size());
  Batch b;
  b.input_ids = at::full({rows, seq}, pad_id, at::kLong);  // [batch, seq]
  b.attention_mask = at::zeros({rows, seq}, at::kLong);
  b.labels = at::full({rows, seq}, int64_t{-100}, at::kLong);
  int64_t* ids = b.input_ids.data_ptr<int64_t>();
  int64_t* mask = b.attention_mask.data_ptr<int64_t>();
  int64_t* labels = b.labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const Example& e = examples[static_cast<size_t>(indices[static_cast<size_t>(r)])];
    const auto n = static_cast<int64_t>(e.input_ids.size());
    std::copy(e.input_ids.begin(), e.input_ids.end(), ids + r * seq);
    std::copy(e.labels.begin(), e.labels.end(), labels + r * seq);
    std::fill(mask + r * seq, mask + r * seq + n, int64_t{1});
    b.num_tokens += n;
  }
  return b;
}

std::vector<int64_t> group_by_length(const std::vector<int64_t>& permutation, const std::vector<int64_t>& lengths,
                                     int64_t batch_size) {
  const auto n = static_cast<int64_t>(permutation.size());
  if (n == 0) return {};
  // transformers: mega_batch_mult = min(len // (batch_size * 4), 50), at least 1.
  const int64_t mult = std::max<int64_t>(1, std::min<int64_t>(n / (batch_size * 4), 50));
  const int64_t mega = mult * batch_size;
  std::vector<int64_t> out(permutation);
  std::vector<int64_t> heads;  // the first index of each megabatch in `out`
  for (int64_t start = 0; start < n; start += mega) {
    const auto first = out.begin() + start;
    const auto last = out.begin() + std::min(n, start + mega);
    // Python's sorted(..., reverse=True) is stable: equal lengths keep their order.
    std::stable_sort(first, last, [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
    heads.push_back(start);
  }
  // The megabatch with the longest head (the first on ties, as torch.argmax)
  // gives its head to the front.
  size_t best = 0;
  for (size_t h = 1; h < heads.size(); ++h)
    if (lengths[out[heads[h]]] > lengths[out[heads[best]]]) best = h;
  std::swap(out[0], out[heads[best]]);
  return out;
}

BatchSampler::BatchSampler(std::vector<int64_t> lengths, int64_t batch_size, int64_t micro_batch_size,
                           uint64_t seed, bool group_by_length)
    : lengths_(std::move(lengths)),
      batch_size_(batch_size),
      micro_batch_size_(micro_batch_size),
      seed_(seed),
      group_by_length_(group_by_length) {
  if (lengths_.empty()) throw std::invalid_argument("BatchSampler: no examples; the training set is empty");
  if (batch_size_ < 1 || micro_batch_size_ < 1 || batch_size_ % micro_batch_size_ != 0)
    throw std::invalid_argument("BatchSampler: micro_batch_size (" + std::to_string(micro_batch_size_) +
                                ") must be >= 1 and divide batch_size (" + std::to_string(batch_size_) + ")");
}

int64_t BatchSampler::batches_per_epoch() const { return (num_examples() + batch_size_ - 1) / batch_size_; }

std::vector<int64_t> BatchSampler::epoch_order(int64_t epoch) const {
  std::vector<int64_t> order(lengths_.size());
  std::iota(order.begin(), order.end(), int64_t{0});
  const auto e = static_cast<uint64_t>(epoch);
  std::seed_seq seq{static_cast<uint32_t>(seed_), static_cast<uint32_t>(seed_ >> 32), static_cast<uint32_t>(e),
                    static_cast<uint32_t>(e >> 32)};
  std::mt19937_64 rng(seq);
  // Fisher-Yates, last position first.
  for (size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[bounded(rng, i)]);
  if (group_by_length_) order = group_by_length(order, lengths_, batch_size_);
  return order;
}

std::vector<std::vector<int64_t>> BatchSampler::next() {
  if (cached_epoch_ != position_.epoch) {
    order_ = epoch_order(position_.epoch);
    cached_epoch_ = position_.epoch;
  }
  const int64_t begin = position_.step * batch_size_;
  const int64_t end = std::min(begin + batch_size_, num_examples());
  std::vector<std::vector<int64_t>> micro;
  for (int64_t m = begin; m < end; m += micro_batch_size_)
    micro.emplace_back(order_.begin() + m, order_.begin() + std::min(end, m + micro_batch_size_));
  ++position_.step;
  if (position_.step >= batches_per_epoch()) position_ = {position_.epoch + 1, 0};
  return micro;
}

void BatchSampler::set_position(const SamplerPosition& position) {
  if (position.epoch < 0 || position.step < 0 || position.step > batches_per_epoch())
    throw std::invalid_argument("BatchSampler: position {epoch " + std::to_string(position.epoch) + ", step " +
                                std::to_string(position.step) + "} is outside an epoch of " +
                                std::to_string(batches_per_epoch()) +
                                " batches; the checkpoint was made with another batch_size or data set");
  position_ = position;
  if (position_.step == batches_per_epoch()) position_ = {position_.epoch + 1, 0};
}

}  // namespace mola::data
