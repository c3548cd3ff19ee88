// kernels/moe_lora_dense.cu: the fused shrink of moe_lora's dense strategy
// (docs/design.md, Strategies and kernels, kernels 2 and 3; contract in
// moe_lora_dense.h). The gate steps are in gate.cu, the dropout pass in dropout.cu.
//
// Why these and not more: the wide products (x W^T, u B_cat^T, dy B_cat,
// dh A_cat, the weight gradients) are cuBLAS GEMMs called by the host glue with
// beta = 1 where they accumulate. What cuBLAS cannot do is what lives here:
// applying a dropout mask regenerated from its Philox seed while x streams
// through a GEMM (the fused shrink), and the small per-token steps that would
// otherwise be a dozen ATen launches each (the gate scale, the routing
// backward).
//
// fused_shrink_kernel: C[t, n] over a virtual weight of [A_cat ; pad ; Wr]
// rows. The A rows are padded to a multiple of 16 so that every 16-column
// fragment reads either the masked x~ tile or the raw x tile, never both: the
// router sees x (no dropout on the router input, docs/design.md, The MoLA layer), the experts
// x~. Tiles: 64 tokens x 128 columns per block, K in steps of kBlockK. Half and
// bfloat16 use tensor cores through WMMA (16x16x16, fp32 accumulators); float
// and double run a register-tiled FMA loop so fp32 results match the CPU op to
// 1e-5 (tensor-core TF32 would not) and fp64 gradchecks run this code.
#include "moe_lora_dense.h"

#include <math_constants.h>
#include <mma.h>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

// ---- fused shrink ------------------------------------------------------------------

constexpr int kShrinkRows = 64;      // tokens per block
constexpr int kShrinkCols = 128;     // virtual columns per block
constexpr int kShrinkThreads = 128;  // 4 warps
constexpr int kFragment = 16;        // WMMA m = n = k

template <typename T>
constexpr bool kUseTensorCores = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// K step: 32 for the 16-bit types (two WMMA k-steps), 16 for float and double
// (keeps the double tiles within the 48 KB of static shared memory).
template <typename T>
constexpr int kShrinkK = kUseTensorCores<T> ? 32 : 16;

// Row pitch of a shared tile: for WMMA 8 extra elements (16 bytes) break bank
// conflicts and keep every fragment pointer 32-byte aligned; for the FMA loop
// one extra element puts the 16 weight rows a warp reads in distinct banks.
template <typename T>
constexpr int kShrinkPitch = kUseTensorCores<T> ? kShrinkK<T> + 8 : kShrinkK<T> + 1;

// Blocks per SM the register budget targets (ptxas -v, sm_80/sm_90): 2 for
// the WMMA kernels (they take about 200 registers; capping them at 168 for 3
// blocks spilled bf16), 4 for float's 8x8 FMA tiles (127 registers, no spill),
// 1 for double's, whose tiles take twice the registers. To revisit with
// measured occupancy on an H100 (bench/kernels.py).
template <typename T>
constexpr int kShrinkMinBlocks = kUseTensorCores<T> ? 2 : std::is_same_v<T, float> ? 4 : 1;

template <typename T>
struct ShrinkTiles {
  T x[kShrinkRows][kShrinkPitch<T>];       // raw x, for the router columns
  T xm[kShrinkRows][kShrinkPitch<T>];      // x~ = round_T(x * mask), for the A columns
  T w[kShrinkCols][kShrinkPitch<T>];       // virtual weight rows (n, k)
};

// Shared memory of a block: the tiles during the K loop; for WMMA the fp32
// accumulators are staged through the same bytes afterwards.
template <typename T>
constexpr size_t kShrinkSmemBytes =
    kUseTensorCores<T>
        ? (sizeof(ShrinkTiles<T>) > sizeof(float) * kShrinkRows * (kShrinkCols + 4)
               ? sizeof(ShrinkTiles<T>)
               : sizeof(float) * kShrinkRows * (kShrinkCols + 4))
        : sizeof(ShrinkTiles<T>);

// Loads the x tile (rows m0.., columns k0..) into tiles.x and, when dropout is
// on, the masked copy into tiles.xm. Four consecutive columns per step: their
// mask elements t*in + c .. +3 span at most two Philox groups, so a thread pays
// one or two generator calls per four elements.
template <typename T>
__device__ __forceinline__ void load_x_tile(const FusedShrinkParams& p, uint64_t seed, int64_t m0,
                                            int64_t k0, ShrinkTiles<T>& tiles, bool masked) {
  constexpr int kK = kShrinkK<T>;
  constexpr int kQuads = kShrinkRows * kK / 4;
  const T* x = static_cast<const T*>(p.x);
  for (int q = threadIdx.x; q < kQuads; q += kShrinkThreads) {
    const int row = q / (kK / 4);
    const int col = (q % (kK / 4)) * 4;
    const int64_t t = m0 + row;
    T v[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = k0 + col + j;
      v[j] = (t < p.num_tokens && c < p.in_features) ? x[t * p.x_row_stride + c]
                                                      : from_acc<T>(acc_t<T>(0));
      tiles.x[row][col + j] = v[j];
    }
    if (!masked) continue;
    const uint64_t i0 = static_cast<uint64_t>(t) * static_cast<uint64_t>(p.in_features) +
                        static_cast<uint64_t>(k0 + col);
    const philox::U32x4 b0 = philox::dropout_bits4(seed, i0 >> 2);
    const philox::U32x4 b1 =
        ((i0 + 3) >> 2) != (i0 >> 2) ? philox::dropout_bits4(seed, (i0 >> 2) + 1) : b0;
    const float scale = philox::dropout_scale(p.dropout.p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint64_t i = i0 + j;
      const uint32_t bits = philox::u32x4_lane((i >> 2) == (i0 >> 2) ? b0 : b1,
                                               static_cast<unsigned>(i & 3u));
      const acc_t<T> m =
          static_cast<acc_t<T>>(philox::u32_to_uniform(bits) >= p.dropout.p ? scale : 0.0f);
      tiles.xm[row][col + j] = from_acc<T>(to_acc(v[j]) * m);
    }
  }
}

// The virtual weight row n (A_cat rows, zero padding to a multiple of 16, then
// the router rows, then zeros), columns k0.. into tiles.w.
template <typename T>
__device__ __forceinline__ void load_w_tile(const FusedShrinkParams& p, int a_pad, int64_t n0,
                                            int64_t k0, ShrinkTiles<T>& tiles) {
  constexpr int kK = kShrinkK<T>;
  const T* a = static_cast<const T*>(p.lora_a);
  const T* router = static_cast<const T*>(p.router);
  for (int q = threadIdx.x; q < kShrinkCols * kK; q += kShrinkThreads) {
    const int n = q / kK;
    const int k = q % kK;
    const int64_t g = n0 + n;
    const int64_t c = k0 + k;
    T v = from_acc<T>(acc_t<T>(0));
    if (c < p.in_features) {
      if (g < p.num_a_rows) {
        v = a[g * p.in_features + c];
      } else if (g >= a_pad && g < a_pad + p.num_experts) {
        v = router[(g - a_pad) * p.in_features + c];
      }
    }
    tiles.w[n][k] = v;
  }
}

// Writes C[t, g] to hidden (g < num_a_rows) or logits (router columns).
template <typename T>
__device__ __forceinline__ void store_shrink(const FusedShrinkParams& p, int a_pad, int64_t t,
                                             int64_t g, acc_t<T> value) {
  if (t >= p.num_tokens) return;
  if (g < p.num_a_rows) {
    static_cast<T*>(p.hidden)[t * p.hidden_row_stride + g] = from_acc<T>(value);
  } else if (g >= a_pad && g < a_pad + p.num_experts) {
    static_cast<T*>(p.logits)[t * p.logits_row_stride + (g - a_pad)] = from_acc<T>(value);
  }
}

template <typename T>
__global__ void __launch_bounds__(kShrinkThreads, kShrinkMinBlocks<T>) fused_shrink_kernel(const FusedShrinkParams p) {
  constexpr int kK = kShrinkK<T>;
  __shared__ __align__(128) unsigned char smem[kShrinkSmemBytes<T>];
  ShrinkTiles<T>& tiles = *reinterpret_cast<ShrinkTiles<T>*>(smem);

  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kShrinkCols;
  const int a_pad = (p.num_a_rows + kFragment - 1) / kFragment * kFragment;
  // Block-uniform: whether any of this block's columns are expert columns.
  const bool masked = p.dropout.enabled && n0 < a_pad;
  const uint64_t seed = masked ? load_seed(p.dropout.seed_ptr, p.dropout.seed) : 0;

  if constexpr (kUseTensorCores<T>) {
    using namespace nvcuda;
    // Warps 2 x 2 over the 64 x 128 tile: 32 rows x 64 columns (2 x 4 fragments) each.
    const int warp = threadIdx.x / kWarpSize;
    const int warp_row = (warp / 2) * 32;
    const int warp_col = (warp % 2) * 64;
    wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int64_t k0 = 0; k0 < p.in_features; k0 += kK) {
      load_x_tile<T>(p, seed, m0, k0, tiles, masked);
      load_w_tile<T>(p, a_pad, n0, k0, tiles);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kK; kk += kFragment) {
        wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, T, wmma::row_major> fx[2],
            fxm[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fx[i], &tiles.x[warp_row + 16 * i][kk], kShrinkPitch<T>);
          if (masked) {
            wmma::load_matrix_sync(fxm[i], &tiles.xm[warp_row + 16 * i][kk], kShrinkPitch<T>);
          }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = warp_col + 16 * j;
          // B[k][n] = w[n][k]: the weight tile read column-major.
          wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, T, wmma::col_major> fw;
          wmma::load_matrix_sync(fw, &tiles.w[col][kk], kShrinkPitch<T>);
          const bool expert_cols = masked && n0 + col < a_pad;  // warp-uniform
          // Two branches rather than a selected fragment: a fragment chosen
          // at run time would be copied through local memory.
          if (expert_cols) {
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fxm[i], fw, acc[i][j]);
          } else {
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fx[i], fw, acc[i][j]);
          }
        }
      }
      __syncthreads();
    }
    // Stage the accumulators in shared memory (the tiles are done) and write
    // the outputs row by row, coalesced along the columns.
    float* staged = reinterpret_cast<float*>(smem);
    constexpr int kPitch = kShrinkCols + 4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(&staged[(warp_row + 16 * i) * kPitch + warp_col + 16 * j],
                                acc[i][j], kPitch, wmma::mem_row_major);
      }
    }
    __syncthreads();
    for (int q = threadIdx.x; q < kShrinkRows * kShrinkCols; q += kShrinkThreads) {
      const int row = q / kShrinkCols;
      const int col = q % kShrinkCols;
      store_shrink<T>(p, a_pad, m0 + row, n0 + col, staged[row * kPitch + col]);
    }
  } else {
    // FMA micro-tiles: thread (ty, tx) owns rows ty + 8 i and columns tx + 16 j.
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    acc_t<T> acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0;
    }
    // Column tx + 16 j is an expert column iff n0 + tx + 16 j < a_pad; a_pad is
    // a multiple of 16, so this depends on j only: one bit per j.
    unsigned expert_col_bits = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (masked && n0 + 16 * j < a_pad) expert_col_bits |= 1u << j;
    }
    for (int64_t k0 = 0; k0 < p.in_features; k0 += kK) {
      load_x_tile<T>(p, seed, m0, k0, tiles, masked);
      load_w_tile<T>(p, a_pad, n0, k0, tiles);
      __syncthreads();
#pragma unroll 4
      for (int k = 0; k < kK; ++k) {
        acc_t<T> xs[8], xm[8], ws[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          xs[i] = to_acc(tiles.x[ty + 8 * i][k]);
          xm[i] = masked ? to_acc(tiles.xm[ty + 8 * i][k]) : xs[i];
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) ws[j] = to_acc(tiles.w[tx + 16 * j][k]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            acc[i][j] += ((expert_col_bits >> j) & 1u ? xm[i] : xs[i]) * ws[j];
          }
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        store_shrink<T>(p, a_pad, m0 + ty + 8 * i, n0 + tx + 16 * j, acc[i][j]);
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t launch_fused_shrink(const FusedShrinkParams& p, cudaStream_t stream) {
  const int64_t a_pad = (static_cast<int64_t>(p.num_a_rows) + kFragment - 1) / kFragment * kFragment;
  const int64_t cols = a_pad + p.num_experts;
  if (p.num_tokens < 0 || p.in_features < 1 || p.num_a_rows < 1 || p.num_experts < 1 ||
      cols > kFusedShrinkMaxCols || (p.dropout.enabled && !(p.dropout.p >= 0.0f && p.dropout.p < 1.0f))) {
    return cudaErrorInvalidValue;
  }
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.x == nullptr || p.lora_a == nullptr || p.router == nullptr || p.hidden == nullptr ||
      p.logits == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t row_blocks = ceil_div(p.num_tokens, kShrinkRows);
  if (row_blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(ceil_div(cols, kShrinkCols)));
  fused_shrink_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

#define MOLA_DENSE_INSTANTIATE(T)                                                          \
  template cudaError_t launch_fused_shrink<T>(const FusedShrinkParams&, cudaStream_t);
MOLA_DENSE_INSTANTIATE(double)
MOLA_DENSE_INSTANTIATE(float)
MOLA_DENSE_INSTANTIATE(__half)
MOLA_DENSE_INSTANTIATE(__nv_bfloat16)
#undef MOLA_DENSE_INSTANTIATE

}  // namespace kernels
}  // namespace mola
