// kernels/gate.cu: the gate-scale step and the gate backward of moe_lora,
// shared by the dense and grouped strategies (contracts in gate.h): the small
// per-token steps that would otherwise be a dozen ATen launches each.
#include "gate.h"

#include <math_constants.h>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

template <typename T>
__global__ void __launch_bounds__(kElementwiseThreads) gate_scale_kernel(const GateScaleParams p) {
  using Acc = acc_t<T>;
  const int64_t width = static_cast<int64_t>(p.num_experts) * p.rank;  // E*r
  const int64_t n = p.num_tokens * width;
  const T* h = static_cast<const T*>(p.hidden);
  const Acc* gate = static_cast<const Acc*>(p.gate);
  T* out = static_cast<T*>(p.out);
  const Acc s = static_cast<Acc>(p.scaling);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / width;
    const int64_t e = (i % width) / p.rank;
    // ATen: g = (gate * s).to(dtype); u = h * g, each product rounded once.
    const Acc g = round_to<T>(gate[t * p.gate_row_stride + e] * s);
    out[i] = from_acc<T>(to_acc(h[i]) * g);
  }
}

// ---- gate backward -------------------------------------------------------------------

constexpr int kGateWarps = 4;
constexpr int kGateThreads = kGateWarps * kWarpSize;
constexpr int kGateMaxExperts = 256;  // the routing kernel's limit
constexpr int64_t kGateMaxBlocks = 2048;

template <typename T>
__global__ void __launch_bounds__(kGateThreads)
    gate_backward_kernel(const GateBackwardParams p) {
  using Acc = acc_t<T>;
  __shared__ Acc s_prob[kGateWarps][kGateMaxExperts];
  __shared__ Acc s_dprob[kGateWarps][kGateMaxExperts];
  __shared__ Acc s_dw[kGateWarps][kGateMaxExperts];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int E = p.num_experts, k = p.top_k, r = p.rank;
  const Acc s = static_cast<Acc>(p.scaling);
  const T* du = static_cast<const T*>(p.grad_u);
  const T* h = static_cast<const T*>(p.hidden);
  T* dh = static_cast<T*>(p.grad_hidden);
  const T* logits = static_cast<const T*>(p.logits);
  const Acc* gate = static_cast<const Acc*>(p.gate);
  const Acc* weights = static_cast<const Acc*>(p.weights);
  const T* grad_logits = static_cast<const T*>(p.grad_logits);
  T* dz = static_cast<T*>(p.grad_router_logits);
  Acc* prob = s_prob[warp];
  Acc* dprob = s_dprob[warp];
  Acc* dw = s_dw[warp];

  // Every lane of a warp walks the same tokens: full-mask shuffles are valid.
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kGateWarps + warp; t < p.num_tokens;
       t += static_cast<int64_t>(gridDim.x) * kGateWarps) {
    const int64_t* idx = p.indices + t * k;
    const Acc* w = weights + t * k;

    // dw_j = s * sum_r du * h over slot j's rank block; the grouped layout
    // also writes dh = du * round(s * w_j) here.
    for (int j = 0; j < k; ++j) {
      const int64_t e = idx[j];
      const int64_t base = p.dense ? (t * E + e) * r : (t * k + j) * r;
      const Acc ws = round_to<T>(w[j] * s);
      Acc partial = 0;
      for (int rr = lane; rr < r; rr += kWarpSize) {
        const Acc d = to_acc(du[base + rr]);
        partial += d * to_acc(h[base + rr]);
        if (!p.dense) dh[base + rr] = from_acc<T>(d * ws);
      }
      const Acc sum = warp_sum(partial);
      if (lane == 0) dw[j] = sum * s;
    }
    if (p.dense) {  // dh over every expert block: g is 0 off the top-k
      const Acc* g = gate + t * p.gate_row_stride;
      for (int64_t i = lane; i < static_cast<int64_t>(E) * r; i += kWarpSize) {
        const Acc gs = round_to<T>(g[i / r] * s);
        dh[t * E * r + i] = from_acc<T>(to_acc(du[t * E * r + i]) * gs);
      }
    }

    // P = softmax(z) in acc_t, max-subtracted (as the forward's routing).
    const T* z = logits + t * p.logits_row_stride;
    Acc row_max = static_cast<Acc>(-CUDART_INF);
    for (int e = lane; e < E; e += kWarpSize) row_max = fmax(row_max, to_acc(z[e]));
    row_max = warp_max(row_max);
    Acc denom = 0;
    for (int e = lane; e < E; e += kWarpSize) {
      const Acc v = exp(to_acc(z[e]) - row_max);
      prob[e] = v;
      dprob[e] = 0;
      denom += v;
    }
    denom = warp_sum(denom);
    for (int e = lane; e < E; e += kWarpSize) prob[e] /= denom;
    __syncwarp();

    // dP at the routed experts: through w = v / sum(v) (docs/design.md, Strategies and kernels), or
    // directly when k == E (dense routing, w = P). k is small: one lane does it.
    if (lane == 0) {
      if (k == E) {
        for (int j = 0; j < k; ++j) dprob[idx[j]] = dw[j];
      } else {
        Acc sum_v = 0, dw_dot_w = 0;
        for (int j = 0; j < k; ++j) {
          sum_v += prob[idx[j]];
          dw_dot_w += dw[j] * w[j];
        }
        for (int j = 0; j < k; ++j) dprob[idx[j]] = (dw[j] - dw_dot_w) / sum_v;
      }
    }
    __syncwarp();

    // dz = P (.) (dP - sum_e P_e dP_e) + the gradient arriving on the logits.
    Acc dot = 0;
    for (int e = lane; e < E; e += kWarpSize) dot += prob[e] * dprob[e];
    dot = warp_sum(dot);
    for (int e = lane; e < E; e += kWarpSize) {
      Acc v = prob[e] * (dprob[e] - dot);
      if (grad_logits != nullptr) v += to_acc(grad_logits[t * p.grad_logits_row_stride + e]);
      dz[t * E + e] = from_acc<T>(v);
    }
    __syncwarp();  // prob/dprob/dw are rewritten for the next token
  }
}

}  // namespace

template <typename T>
cudaError_t launch_gate_scale(const GateScaleParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.rank < 1) return cudaErrorInvalidValue;
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.hidden == nullptr || p.gate == nullptr || p.out == nullptr) return cudaErrorInvalidValue;
  const int64_t n = p.num_tokens * p.num_experts * p.rank;
  gate_scale_kernel<T><<<elementwise_grid(n), kElementwiseThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gate_backward(const GateBackwardParams& p, cudaStream_t stream) {
  if (p.num_tokens < 0 || p.num_experts < 1 || p.num_experts > kGateMaxExperts || p.top_k < 1 ||
      p.top_k > p.num_experts || p.rank < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.grad_u == nullptr || p.hidden == nullptr || p.grad_hidden == nullptr ||
      p.logits == nullptr || p.weights == nullptr || p.indices == nullptr ||
      p.grad_router_logits == nullptr || (p.dense && p.gate == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = ceil_div(p.num_tokens, kGateWarps);
  const unsigned grid = static_cast<unsigned>(blocks < kGateMaxBlocks ? blocks : kGateMaxBlocks);
  gate_backward_kernel<T><<<grid, kGateThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define MOLA_GATE_INSTANTIATE(T) \
  template cudaError_t launch_gate_scale<T>(const GateScaleParams&, cudaStream_t); \
  template cudaError_t launch_gate_backward<T>(const GateBackwardParams&, cudaStream_t);
MOLA_GATE_INSTANTIATE(double)
MOLA_GATE_INSTANTIATE(float)
MOLA_GATE_INSTANTIATE(__half)
MOLA_GATE_INSTANTIATE(__nv_bfloat16)
#undef MOLA_GATE_INSTANTIATE

}  // namespace kernels
}  // namespace mola
