// The trainer's side of torch.distributed (docs/distributed.md), private to
// src/train/: a thin layer over a c10d::ProcessGroup that is a no-op without
// one, so the loop reads the same for one process and for N ranks.
//
// The trainer makes N ranks equal one process on the same global batch:
// every rank draws the same batch (the sampler is seeded, not random), rank r
// runs the micro-batches j with j % N == r, each scaled by 1 / (micro-batches
// in the batch) as one process scales them, and the gradients are summed
// across ranks. The sum of the ranks' partial sums is the one-process sum, so
// clipping and AdamW see the same gradient (to float rounding), and the same
// holds for the logged losses and token counts. Whether a parameter has a
// gradient at all (an expert no token was routed to in any micro-batch has
// none, and AdamW then skips it) is reduced too.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include <cstdint>
#include <vector>

namespace mola::train::detail {

class Collective {
 public:
  // `group` may be null: one process, every call below is a no-op.
  // `device`: where the tensors live (the barrier's device, so a group with
  // several backends picks Gloo for the CPU and NCCL for CUDA).
  Collective(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device);

  bool active() const { return static_cast<bool>(group_); }
  int rank() const { return rank_; }
  int size() const { return size_; }
  bool is_main() const { return rank_ == 0; }
  // Whether micro-batch `index` of a batch is this rank's (index % size == rank).
  bool owns(int64_t index) const { return index % size_ == rank_; }

  // Sums `t` (any dtype Gloo / NCCL reduce, on `device`) across the ranks, in place.
  void sum(at::Tensor& t) const;
  // Sums the gradients of `params` across the ranks, in one flat buffer per
  // dtype. A parameter ends with a gradient when any rank had one (the sum,
  // zeros standing in for the ranks without one), and without one otherwise.
  void sum_gradients(const std::vector<at::Tensor>& params) const;
  // Copies rank 0's values of `params` to every rank (DDP's start-of-training
  // broadcast), so the ranks start from one adapter however they initialised it.
  void broadcast_from_main(const std::vector<at::Tensor>& params) const;
  // Every rank waits here until all arrive (after rank 0 wrote files the others read).
  void barrier() const;

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  at::Device device_;
  int rank_ = 0;
  int size_ = 1;
};

// The seed of the dropout draws of micro-batch `micro` of optimizer step
// `step` (0-based) in a distributed run: a function of (seed, step, micro)
// only, so any number of ranks draws the same masks for the same micro-batch,
// and a resumed run the same as the interrupted one, without sharing
// generator states. (splitmix64 over the three, Steele et al. 2014.)
uint64_t micro_batch_seed(int64_t seed, int64_t step, int64_t micro);

}  // namespace mola::train::detail
