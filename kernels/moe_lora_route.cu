// kernels/moe_lora_route.cu: the MoLA routing kernel (docs/design.md, Strategies and kernels,
// kernel 1): one pass per token over its E router logits giving the fp32
// softmax, the top-k experts, their renormalised weights, the dense gate row,
// and optionally the load-balancing statistics (docs/design.md, The balance loss).
//
// Layout of the work: one warp per token; lane l holds the probabilities of
// experts l, l+32, l+64, ... in registers (kPerLane of them, a template
// parameter picked from E, so E <= 32 costs one register and E = 256 eight).
// Every reduction is a butterfly shuffle, so no shared memory is needed except
// for the optional per-block expert statistics. Routing reads T*E values and
// is tiny next to the expert GEMMs; simplicity wins over squeezing small-E
// cases into fewer lanes.
//
// Numerics (each as the MoLA authors' PyTorch code and the CPU op):
// - softmax in fp32 with the row maximum subtracted (docs/design.md, The MoLA layer, "P =
//   softmax(z) in fp32"; the usual overflow-safe form, as torch.softmax);
// - top-k selection repeated k times as a warp argmax under the total order
//   (higher probability first, then LOWER expert index), so the slots come out
//   sorted descending like torch.topk(sorted=True), and ties go to the lower
//   index: mola's contract on every device (the CPU kernel ranks the same way,
//   the ATen fallback and the balance loss take a stable descending sort;
//   torch.topk's order among ties is unspecified and differs by device). A NaN
//   probability ranks above everything; such a row is NaN throughout anyway;
// - w = v / sum(v), with the sum taken in slot order (descending), as
//   `v / v.sum(-1, keepdim=True)` in the authors' code;
// - k == E is dense routing (docs/design.md, The MoLA layer): w = P in expert order, indices
//   0..E-1, no renormalisation.
#include "moe_lora_route.h"

#include <climits>

#include <math_constants.h>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

constexpr int kWarpsPerBlock = 4;  // 128 threads: one token per warp
constexpr int kThreads = kWarpsPerBlock * kWarpSize;
// Grid cap: warps loop over tokens beyond it. 1024 blocks x 4 warps keep an
// H100 (132 SMs) full while bounding the block-level statistic flushes to
// 1024 * E global atomics however large T is.
constexpr int64_t kMaxBlocks = 1024;
static_assert(kMoeLoraRouteMaxExperts <= 8 * kWarpSize, "kPerLane tops out at 8");

// (v, e) ranks before (best_v, best_e): higher value, then lower index.
__device__ __forceinline__ bool ranks_before(float v, int e, float best_v, int best_e) {
  return v > best_v || (v == best_v && e < best_e);
}

template <typename T, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    moe_lora_route_fwd_kernel(const MoeLoraRouteParams p) {
  __shared__ float s_counts[kMoeLoraRouteMaxExperts];
  __shared__ float s_prob_sum[kMoeLoraRouteMaxExperts];

  const int E = p.num_experts;
  const int k = p.top_k;
  const bool dense = (k == E);
  // Block-uniform, so the __syncthreads() under it are safe.
  const bool stats = (p.counts != nullptr) || (p.prob_sum != nullptr);
  if (stats) {
    for (int e = threadIdx.x; e < E; e += kThreads) {
      s_counts[e] = 0.0f;
      s_prob_sum[e] = 0.0f;
    }
    __syncthreads();
  }

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const T* logits = static_cast<const T*>(p.logits);
  const int64_t token_stride = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;

  // All 32 lanes of a warp walk the same tokens, so full-mask shuffles are valid.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp; t < p.num_tokens;
       t += token_stride) {
    const T* z = logits + t * p.logits_row_stride;  // [E]

    // Softmax, max-subtracted, fp32. prob[j] is expert j*32 + lane; the
    // padding slots (expert >= E) hold 0 and never take part below.
    float prob[kPerLane];
    float row_max = -CUDART_INF_F;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarpSize + lane;
      prob[j] = e < E ? to_float(z[e]) : -CUDART_INF_F;
      row_max = fmaxf(row_max, prob[j]);
    }
    row_max = warp_max(row_max);
    float denom = 0.0f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarpSize + lane;
      prob[j] = e < E ? expf(prob[j] - row_max) : 0.0f;
      denom += prob[j];
    }
    denom = warp_sum(denom);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) prob[j] = prob[j] / denom;

    // slot[j]: the output slot of expert j*32 + lane, or -1 if not chosen.
    int slot[kPerLane];
    float chosen_sum = 0.0f;  // sum of the chosen probabilities, slot order
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarpSize + lane;
      slot[j] = (dense && e < E) ? e : -1;
    }
    if (!dense) {
      for (int s = 0; s < k; ++s) {
        // This lane's best unchosen expert; j ascending keeps the lower index on ties.
        float best_v = -CUDART_INF_F;
        int best_e = INT_MAX;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int e = j * kWarpSize + lane;
          const float v = isnan(prob[j]) ? CUDART_INF_F : prob[j];
          if (e < E && slot[j] < 0 && ranks_before(v, e, best_v, best_e)) {
            best_v = v;
            best_e = e;
          }
        }
        // Warp argmax. The order is total on distinct (v, e), so every lane
        // ends with the same winner; since k <= E, an unchosen expert with
        // v >= 0 always exists and beats the (-inf, INT_MAX) placeholders.
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
          const float other_v = __shfl_xor_sync(kFullWarpMask, best_v, offset);
          const int other_e = __shfl_xor_sync(kFullWarpMask, best_e, offset);
          if (ranks_before(other_v, other_e, best_v, best_e)) {
            best_v = other_v;
            best_e = other_e;
          }
        }
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          if (j * kWarpSize + lane == best_e) slot[j] = s;
        }
        chosen_sum += best_v;
      }
    }

    // Each lane writes its own experts: the gate row coalesced, the k
    // (weight, index) pairs scattered into their slots.
    float* gate = p.gate + t * p.gate_row_stride;              // [E]
    float* weights = p.weights + t * p.weights_row_stride;     // [k]
    int64_t* indices = p.indices + t * p.indices_row_stride;   // [k]
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int e = j * kWarpSize + lane;
      if (e >= E) continue;
      const bool chosen = slot[j] >= 0;
      const float w = !chosen ? 0.0f : dense ? prob[j] : prob[j] / chosen_sum;
      gate[e] = w;
      if (chosen) {
        weights[slot[j]] = w;
        indices[slot[j]] = e;
      }
      if (stats) {
        if (chosen) atomicAdd(&s_counts[e], 1.0f);
        atomicAdd(&s_prob_sum[e], prob[j]);
      }
    }
  }

  // One global atomic per expert per block instead of one per (token, expert).
  if (stats) {
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += kThreads) {
      if (p.counts != nullptr) atomicAdd(&p.counts[e], s_counts[e]);
      if (p.prob_sum != nullptr) atomicAdd(&p.prob_sum[e], s_prob_sum[e]);
    }
  }
}

template <typename T, int kPerLane>
cudaError_t launch_with(const MoeLoraRouteParams& params, cudaStream_t stream) {
  const int64_t blocks = ceil_div(params.num_tokens, kWarpsPerBlock);
  const unsigned grid = static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
  moe_lora_route_fwd_kernel<T, kPerLane><<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t launch_moe_lora_route_fwd(const MoeLoraRouteParams& params, cudaStream_t stream) {
  const int E = params.num_experts;
  if (params.num_tokens < 0 || E < 1 || E > kMoeLoraRouteMaxExperts || params.top_k < 1 ||
      params.top_k > E) {
    return cudaErrorInvalidValue;
  }
  if (params.num_tokens == 0) return cudaSuccess;
  if (params.logits == nullptr || params.weights == nullptr || params.indices == nullptr ||
      params.gate == nullptr) {
    return cudaErrorInvalidValue;
  }
  // Registers per lane: the fewest that cover E experts with 32 lanes.
  if (E <= 1 * kWarpSize) return launch_with<T, 1>(params, stream);
  if (E <= 2 * kWarpSize) return launch_with<T, 2>(params, stream);
  if (E <= 4 * kWarpSize) return launch_with<T, 4>(params, stream);
  return launch_with<T, 8>(params, stream);
}

template cudaError_t launch_moe_lora_route_fwd<float>(const MoeLoraRouteParams&, cudaStream_t);
template cudaError_t launch_moe_lora_route_fwd<__half>(const MoeLoraRouteParams&, cudaStream_t);
template cudaError_t launch_moe_lora_route_fwd<__nv_bfloat16>(const MoeLoraRouteParams&,
                                                              cudaStream_t);

}  // namespace kernels
}  // namespace mola
