// Collective (src/train/distributed.h): sums, broadcasts and barriers of the
// trainer over a c10d::ProcessGroup, each waited for at once (the loop needs
// the result before it goes on).
#include "train/distributed.h"

#include <map>
#include <stdexcept>
#include <string>

namespace mola::train::detail {

Collective::Collective(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device)
    : group_(std::move(group)), device_(device) {
  if (group_) {
    rank_ = group_->getRank();
    size_ = group_->getSize();
    if (size_ < 1 || rank_ < 0 || rank_ >= size_)
      throw std::invalid_argument("Trainer: the process group reports rank " + std::to_string(rank_) + " of " +
                                  std::to_string(size_) + "; give an initialised group (torch.distributed."
                                  "init_process_group)");
  }
}

void Collective::sum(at::Tensor& t) const {
  if (!group_) return;
  std::vector<at::Tensor> tensors{t};
  group_->allreduce(tensors)->wait();
}

void Collective::sum_gradients(const std::vector<at::Tensor>& params) const {
  if (!group_) return;
  // One bucket per dtype: [grad of p0 | grad of p1 | ... | has-grad flags].
  std::map<at::ScalarType, std::vector<size_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) buckets[params[i].scalar_type()].push_back(i);
  for (const auto& [dtype, indices] : buckets) {
    std::vector<at::Tensor> parts;
    parts.reserve(indices.size() + 1);
    at::Tensor flags = at::zeros({static_cast<int64_t>(indices.size())}, params[indices[0]].options());
    for (size_t k = 0; k < indices.size(); ++k) {
      const at::Tensor& p = params[indices[k]];
      const at::Tensor& g = p.grad();
      if (g.defined()) {
        parts.push_back(g.reshape({-1}));
        flags[static_cast<int64_t>(k)].fill_(1);
      } else {
        parts.push_back(at::zeros({p.numel()}, p.options()));
      }
    }
    parts.push_back(flags);
    at::Tensor flat = at::cat(parts);  // [sum of numel + parameters]
    sum(flat);
    const at::Tensor has_grad = flat.slice(0, flat.numel() - static_cast<int64_t>(indices.size())).cpu();
    int64_t offset = 0;
    for (size_t k = 0; k < indices.size(); ++k) {
      at::Tensor p = params[indices[k]];
      const at::Tensor reduced = flat.slice(0, offset, offset + p.numel()).view(p.sizes());
      offset += p.numel();
      if (has_grad[static_cast<int64_t>(k)].item<double>() == 0.0) continue;  // no rank had one
      if (p.grad().defined()) p.mutable_grad().copy_(reduced);
      else p.mutable_grad() = reduced.clone();
    }
  }
}

void Collective::broadcast_from_main(const std::vector<at::Tensor>& params) const {
  if (!group_ || params.empty()) return;
  at::NoGradGuard no_grad;
  std::map<at::ScalarType, std::vector<size_t>> buckets;
  for (size_t i = 0; i < params.size(); ++i) buckets[params[i].scalar_type()].push_back(i);
  for (const auto& [dtype, indices] : buckets) {
    std::vector<at::Tensor> parts;
    for (size_t i : indices) parts.push_back(params[i].detach().reshape({-1}));
    std::vector<at::Tensor> flat{at::cat(parts)};
    c10d::BroadcastOptions options;
    options.rootRank = 0;
    group_->broadcast(flat, options)->wait();
    int64_t offset = 0;
    for (size_t i : indices) {
      at::Tensor p = params[i];
      p.detach().copy_(flat[0].slice(0, offset, offset + p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }
}

void Collective::barrier() const {
  if (!group_) return;
  c10d::BarrierOptions options;
  options.device = device_;
  group_->barrier(options)->wait();
}

uint64_t micro_batch_seed(int64_t seed, int64_t step, int64_t micro) {
  auto mix = [](uint64_t z) {  // splitmix64's finaliser
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(mix(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(step)) ^ static_cast<uint64_t>(micro));
}

}  // namespace mola::train::detail
