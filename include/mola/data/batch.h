// mola/data/batch.h: turning tokenised Examples into padded batches, and the
// order in which a run visits them (docs/recipes.md, docs/design.md, Fidelity to the papers and the authors' code).
//
//   collate       transformers' DataCollatorForSeq2Seq(pad_to_multiple_of=8):
//                 pad on the right with pad_id, attention_mask 0 and labels
//                 -100 on the padding, the length rounded up to a multiple of 8.
//   BatchSampler  one seeded permutation per epoch (optionally grouped by
//                 length as transformers' LengthGroupedSampler), cut into
//                 optimizer batches of batch_size and those into micro-batches
//                 of micro_batch_size. Its position {epoch, step} is all a
//                 checkpoint needs to continue the same order after a resume.
//
// The sampler uses its own generator (std::mt19937_64 seeded from seed and
// epoch) rather than torch's, so the data order neither consumes nor depends on
// the RNG that dropout draws from, and each epoch's order can be recomputed
// from two integers.
#pragma once

#include <mola/data/dataset.h>

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace mola::data {

struct Batch {
  at::Tensor input_ids;       // [batch, seq] int64, pad_id on padding
  at::Tensor attention_mask;  // [batch, seq] int64, 1 = token, 0 = padding
  at::Tensor labels;          // [batch, seq] int64, -100 on padding
  int64_t num_tokens = 0;     // attention_mask.sum(): the real tokens
};

// Pads `examples` on the right to the longest one, rounded up to a multiple of
// pad_to_multiple_of (<= 1: no rounding). Throws std::invalid_argument for an
// empty list or an example whose labels and input_ids differ in length.
Batch collate(const std::vector<Example>& examples, int64_t pad_id = 0, int64_t pad_to_multiple_of = 8);
// The same for examples[indices[i]], without copying the examples.
Batch collate(const std::vector<Example>& examples, const std::vector<int64_t>& indices, int64_t pad_id = 0,
              int64_t pad_to_multiple_of = 8);

// Where a BatchSampler is: the next batch is batch `step` (0-based) of epoch
// `epoch` (0-based).
struct SamplerPosition {
  int64_t epoch = 0;
  int64_t step = 0;
  friend bool operator==(const SamplerPosition& a, const SamplerPosition& b) {
    return a.epoch == b.epoch && a.step == b.step;
  }
};

// transformers' get_length_grouped_indices (trainer_pt_utils.py) applied to a
// given permutation: megabatches of mega_batch_mult * batch_size, with
// mega_batch_mult = min(N / (4 * batch_size), 50) and at least 1, each sorted by
// length, longest first (a stable sort, so ties keep the permutation's order),
// then the longest item of all swapped to the very front so an out-of-memory
// batch shows up at once.
std::vector<int64_t> group_by_length(const std::vector<int64_t>& permutation, const std::vector<int64_t>& lengths,
                                     int64_t batch_size);

class BatchSampler {
 public:
  // lengths: one per example (their token counts); N = lengths.size() >= 1.
  // micro_batch_size must divide batch_size. Throws std::invalid_argument.
  BatchSampler(std::vector<int64_t> lengths, int64_t batch_size, int64_t micro_batch_size, uint64_t seed,
               bool group_by_length = false);

  int64_t num_examples() const { return static_cast<int64_t>(lengths_.size()); }
  // ceil(N / batch_size): the last batch of an epoch may be partial (kept, as
  // transformers keeps it).
  int64_t batches_per_epoch() const;
  // The order of the examples in `epoch`: a permutation of 0..N-1, the same
  // for the same (seed, epoch) on every machine.
  std::vector<int64_t> epoch_order(int64_t epoch) const;
  // The batch at the current position as its micro-batches (micro_batch_size
  // indices each; the last one of a partial batch may be shorter), then moves
  // to the next position (the next epoch after the last batch).
  std::vector<std::vector<int64_t>> next();

  SamplerPosition position() const { return position_; }
  // Throws std::invalid_argument for a negative epoch or a step outside
  // [0, batches_per_epoch()].
  void set_position(const SamplerPosition& position);

 private:
  std::vector<int64_t> lengths_;
  int64_t batch_size_, micro_batch_size_;
  uint64_t seed_;
  bool group_by_length_;
  SamplerPosition position_;
  int64_t cached_epoch_ = -1;  // the epoch whose order is in order_
  std::vector<int64_t> order_;
};

}  // namespace mola::data
