// kernels/moe_lora_grouped_sort.cu: the device-side sort of the grouped
// strategy (contract in moe_lora_grouped.h, GroupedSortParams): routed slots
// stable-sorted by expert, with segment and tile offsets, in three passes of
// fixed grid (chunk histograms, one-block scan, chunk scatter) so nothing waits
// on the host and a CUDA graph can capture it. Stability (hence deterministic
// sums in the kernels that walk the segments) comes from each warp walking its
// chunk in slot order. The grouped products are in moe_lora_grouped.cu.
#include "moe_lora_grouped.h"

#include <cstdint>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {
// Sort: one warp per chunk of slots; 4 warps (chunks) per block.
constexpr int kSortChunk = 512;
constexpr int kSortWarps = 4;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v += __shfl_xor_sync(kFullWarpMask, v, offset);
  }
  return v;
}

// Pass 1: workspace[chunk, e] = slots of expert e in the chunk.
__global__ void __launch_bounds__(kSortWarps * kWarpSize)
    grouped_sort_histogram_kernel(const int64_t* __restrict__ indices, int64_t num_slots,
                                  int num_experts, int32_t* __restrict__ workspace) {
  __shared__ int s_count[kSortWarps][kGroupedMaxExperts];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  const int64_t num_chunks = ceil_div(num_slots, kSortChunk);
  if (chunk >= num_chunks) return;  // warp-uniform; no block barrier below
  int* count = s_count[warp];
  for (int e = lane; e < num_experts; e += kWarpSize) count[e] = 0;
  __syncwarp();
  const int64_t end = min(num_slots, (chunk + 1) * kSortChunk);
  for (int64_t i = chunk * kSortChunk + lane; i < end; i += kWarpSize) {
    const int e = checked_expert(indices[i], num_experts);
    if (e >= 0) atomicAdd(&count[e], 1);  // counts are order-independent
  }
  __syncwarp();
  for (int e = lane; e < num_experts; e += kWarpSize) workspace[chunk * num_experts + e] = count[e];
}

// Pass 2 (one block): segment and tile offsets, and workspace[chunk, e] turned
// into the absolute position of the chunk's first slot of expert e.
__global__ void __launch_bounds__(kScanThreads)
    grouped_sort_scan_kernel(int64_t num_slots, int num_experts, int32_t* __restrict__ workspace,
                             int32_t* __restrict__ expert_offsets,
                             int32_t* __restrict__ tile_offsets) {
  __shared__ int s_total[kGroupedMaxExperts];
  __shared__ int s_base[kGroupedMaxExperts];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  constexpr int kWarps = kScanThreads / kWarpSize;
  const int64_t num_chunks = ceil_div(num_slots, kSortChunk);
  // Lane l of the warp of expert e owns chunks [l * per, (l + 1) * per).
  const int64_t per = ceil_div(num_chunks, kWarpSize);
  const int64_t c_begin = min(num_chunks, lane * per), c_end = min(num_chunks, c_begin + per);

  for (int e = warp; e < num_experts; e += kWarps) {  // warp-uniform loop
    int sum = 0;
    for (int64_t c = c_begin; c < c_end; ++c) sum += workspace[c * num_experts + e];
    sum = warp_sum_int(sum);
    if (lane == 0) s_total[e] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {  // E <= 256: a serial scan is cheaper than another barrier tree
    int running = 0, tiles = 0;
    for (int e = 0; e < num_experts; ++e) {
      expert_offsets[e] = running;
      tile_offsets[e] = tiles;
      s_base[e] = running;
      running += s_total[e];
      tiles += static_cast<int>(ceil_div(s_total[e], kGroupedTileRows));
    }
    expert_offsets[num_experts] = running;
    tile_offsets[num_experts] = tiles;
  }
  __syncthreads();
  for (int e = warp; e < num_experts; e += kWarps) {
    int sum = 0;
    for (int64_t c = c_begin; c < c_end; ++c) sum += workspace[c * num_experts + e];
    // Exclusive scan of the lane sums (Hillis-Steele on the inclusive form).
    int incl = sum;
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset <<= 1) {
      const int up = __shfl_up_sync(kFullWarpMask, incl, offset);
      if (lane >= offset) incl += up;
    }
    int running = s_base[e] + incl - sum;
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int v = workspace[c * num_experts + e];
      workspace[c * num_experts + e] = running;
      running += v;
    }
  }
}

// Pass 3: each warp places its chunk's slots, 32 at a time in slot order; peers
// with the same expert take consecutive places by lane, so the sort is stable.
__global__ void __launch_bounds__(kSortWarps * kWarpSize)
    grouped_sort_scatter_kernel(const int64_t* __restrict__ indices, int64_t num_slots,
                                int num_experts, const int32_t* __restrict__ workspace,
                                int32_t* __restrict__ sorted_slots) {
  __shared__ int s_cursor[kSortWarps][kGroupedMaxExperts];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kSortWarps + warp;
  const int64_t num_chunks = ceil_div(num_slots, kSortChunk);
  if (chunk >= num_chunks) return;  // warp-uniform: full-mask intrinsics stay valid
  int* cursor = s_cursor[warp];
  for (int e = lane; e < num_experts; e += kWarpSize) {
    cursor[e] = workspace[chunk * num_experts + e];
  }
  __syncwarp();
  const int64_t begin = chunk * kSortChunk, end = min(num_slots, begin + kSortChunk);
  const unsigned lanes_below = (1u << lane) - 1u;
  for (int64_t base = begin; base < end; base += kWarpSize) {  // all 32 lanes iterate
    const int64_t i = base + lane;
    const int e = i < end ? checked_expert(indices[i], num_experts) : -1;
    const unsigned peers = __match_any_sync(kFullWarpMask, e);
    if (e >= 0) sorted_slots[cursor[e] + __popc(peers & lanes_below)] = static_cast<int32_t>(i);
    __syncwarp();  // every lane has read cursor[e] before the leader moves it
    if (e >= 0 && lane == __ffs(peers) - 1) cursor[e] += __popc(peers);
    __syncwarp();
  }
}

}  // namespace

int64_t grouped_sort_workspace_elems(int64_t num_slots, int num_experts) {
  return num_slots <= 0 || num_experts <= 0 ? 0 : ceil_div(num_slots, kSortChunk) * num_experts;
}

int64_t grouped_max_tiles(int64_t num_slots, int num_experts) {
  return ceil_div(num_slots, kGroupedTileRows) + num_experts;
}

cudaError_t launch_grouped_sort(const GroupedSortParams& params, cudaStream_t stream) {
  const int64_t n = params.num_slots;
  const int E = params.num_experts;
  if (n < 0 || n > INT32_MAX || E < 1 || E > kGroupedMaxExperts ||
      params.expert_offsets == nullptr || params.tile_offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (n > 0 && (params.indices == nullptr || params.sorted_slots == nullptr ||
                params.workspace == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const int64_t blocks = ceil_div(ceil_div(n, kSortChunk), kSortWarps);
  if (blocks > 0) {
    grouped_sort_histogram_kernel<<<static_cast<unsigned>(blocks), kSortWarps * kWarpSize, 0,
                                    stream>>>(params.indices, n, E, params.workspace);
  }
  // Runs even for n == 0, so the offsets read back as zeros.
  grouped_sort_scan_kernel<<<1, kScanThreads, 0, stream>>>(n, E, params.workspace,
                                                           params.expert_offsets,
                                                           params.tile_offsets);
  if (blocks > 0) {
    grouped_sort_scatter_kernel<<<static_cast<unsigned>(blocks), kSortWarps * kWarpSize, 0,
                                  stream>>>(params.indices, n, E, params.workspace,
                                            params.sorted_slots);
  }
  return cudaGetLastError();
}

}  // namespace kernels
}  // namespace mola
