// kernels/moe_lora_grouped.cu: the grouped (sparse) strategy of moe_lora
// (docs/design.md, Strategies and kernels, kernel 4): a device-side stable sort of the routed
// slots by expert, then SGMV-style shrink, expand and weight-gradient kernels
// that do only each slot's own expert's work. Contract: moe_lora_grouped.h.
//
// Why these shapes (the path is memory-bound, docs/design.md, Strategies and kernels):
// - sort: in moe_lora_grouped_sort.cu (device-side, stable, fixed grids).
// - shrink: one block per 64-row tile of one expert's segment (the tile table
//   comes from the sort); the gathered input rows are read once per tile and
//   the expert's weight tile is shared by all 64 rows.
// - expand: needs no sort: a block owns a column tile of the output for 256
//   tokens and keeps that column tile of every expert's weight in shared
//   memory, so each output element is summed and written by one thread.
// - weight grad: one block per (expert, column tile) walks its segment in
//   sorted order, so the sums are deterministic without atomics.
// One rank-generic kernel per product (runtime rank bound, register tiles of
// fixed size) keeps the instantiations to one per dtype.
#include "moe_lora_grouped.h"

#include <cstring>

#include "common.cuh"

namespace mola {
namespace kernels {
namespace {

constexpr int kThreads = 256;           // every grouped kernel but the scan
constexpr int kRankLanes = 16;          // rank columns rr = lane + 16 * j, j < 4
constexpr int kRankSteps = kGroupedMaxRank / kRankLanes;
constexpr int kWPitch = kGroupedMaxRank + 1;  // odd pitch: column-wise stores hit distinct banks
static_assert(kRankSteps == 4, "the register tiles below hold 4 rank columns per thread");


// Shrink: 64 rows x (up to) 64 rank columns per block, K staged BK at a time
// (32 for double, so the fp64 tiles stay under the 48 KB static limit).
template <typename T>
constexpr int shrink_bk() {
  return sizeof(T) == 8 ? 32 : 64;
}

// Weight grad: 64 columns of the input x (up to) 64 rank columns per block,
// the segment staged 32 rows at a time.
constexpr int kGradCols = 64;
constexpr int kGradRows = 32;

// Expand: 256 tokens per block; BN (64, 32 or 16) output columns, 4 per thread.
constexpr int kExpandTokens = 256;
constexpr int kExpandUBudget = 16 * 1024;        // bytes of staged u per token batch
constexpr int kExpandStaticSmem = 48 * 1024;     // no opt-in needed up to here
constexpr int kExpandMaxSmem = 96 * 1024;        // fits 2 blocks per SM on H100, 1 on A100

// Blocks per SM the register budget of the shrink and weight-grad kernels
// targets: two (<= 128 registers) for the 16-bit dtypes, where it costs no
// spills; fp32/fp64 tiles need more registers and run one block per SM.
template <typename T>
constexpr int min_blocks() {
  return sizeof(T) == 2 ? 2 : 1;
}

template <typename T>
__device__ __forceinline__ T zero_of() {
  return from_acc<T>(acc_t<T>(0));
}

// Four consecutive elements src[0, 4), of which `avail` exist (none when <= 0):
// one vector load when `vec` says the address is aligned to 4 elements.
template <typename T>
__device__ __forceinline__ void load4(const T* src, int64_t avail, bool vec, T (&dst)[4]) {
  if (vec && avail >= 4) {
    if constexpr (sizeof(T) == 2) {
      const uint2 r = *reinterpret_cast<const uint2*>(src);
      memcpy(dst, &r, sizeof(r));
    } else if constexpr (sizeof(T) == 4) {
      const uint4 r = *reinterpret_cast<const uint4*>(src);
      memcpy(dst, &r, sizeof(r));
    } else {
      const uint4 a = reinterpret_cast<const uint4*>(src)[0];
      const uint4 b = reinterpret_cast<const uint4*>(src)[1];
      memcpy(dst, &a, sizeof(a));
      memcpy(dst + 2, &b, sizeof(b));
    }
  } else {
#pragma unroll
    for (int q = 0; q < 4; ++q) dst[q] = q < avail ? src[q] : zero_of<T>();
  }
}

// Four consecutive shared-memory values (16-byte aligned), widened to acc_t.
__device__ __forceinline__ void lds4(const float* p, float (&d)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  d[0] = v.x, d[1] = v.y, d[2] = v.z, d[3] = v.w;
}
__device__ __forceinline__ void lds4(const double* p, double (&d)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  d[0] = a.x, d[1] = a.y, d[2] = b.x, d[3] = b.y;
}
template <typename T>
__device__ __forceinline__ void lds4(const T* p, float (&d)[4]) {  // __half, __nv_bfloat16
  const uint2 r = *reinterpret_cast<const uint2*>(p);
  T v[4];
  memcpy(v, &r, sizeof(r));
#pragma unroll
  for (int q = 0; q < 4; ++q) d[q] = to_acc(v[q]);
}

__device__ __forceinline__ void sts4(float* p, const float (&d)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(d[0], d[1], d[2], d[3]);
}
__device__ __forceinline__ void sts4(double* p, const double (&d)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(d[0], d[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(d[2], d[3]);
}

// The dropout multipliers of mask elements i0 .. i0+3 (philox.h): at most two
// Philox blocks, since four consecutive indices span at most two groups of 4.
template <typename Acc>
__device__ __forceinline__ void dropout_multipliers4(uint64_t seed, uint32_t stream, uint64_t i0, float p,
                                                     Acc (&m)[4]) {
  const float scale = philox::dropout_scale(p);
  const philox::U32x4 r0 = philox::dropout_bits4(seed, i0 >> 2, stream);
  const philox::U32x4 r1 =
      ((i0 + 3) >> 2) != (i0 >> 2) ? philox::dropout_bits4(seed, (i0 + 3) >> 2, stream) : r0;
  const unsigned off = static_cast<unsigned>(i0 & 3u);
#pragma unroll
  for (unsigned q = 0; q < 4; ++q) {
    const unsigned lane = off + q;
    const uint32_t bits =
        lane < 4 ? philox::u32x4_lane(r0, lane) : philox::u32x4_lane(r1, lane - 4);
    m[q] = static_cast<Acc>(philox::u32_to_uniform(bits) >= p ? scale : 0.0f);
  }
}

// x~ values of a group of 4 input elements: widened, and when dropout is on,
// masked and rounded to T as ATen's x~ tensor is (dropout.h: x * m, rounded once).
template <typename T>
__device__ __forceinline__ void masked4(const T (&raw)[4], bool dropout, uint64_t seed, uint32_t stream,
                                        uint64_t i0, float p, acc_t<T> (&out)[4]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = to_acc(raw[q]);
  if (dropout) {
    acc_t<T> m[4];
    dropout_multipliers4(seed, stream, i0, p, m);
#pragma unroll
    for (int q = 0; q < 4; ++q) out[q] = round_to<T>(out[q] * m[q]);
  }
}



// -------------------------------------------------------------- shrink ----

template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>())
    grouped_shrink_kernel(const GroupedShrinkParams p, bool vec_input) {
  using Acc = acc_t<T>;
  constexpr int BK = shrink_bk<T>();
  constexpr int kRows = kGroupedTileRows;
  constexpr int kXPitch = BK + 4;                        // 16-byte rows for float4 access
  constexpr int kGroupsPerRow = BK / 4;
  constexpr int kXLoads = kRows * kGroupsPerRow / kThreads;  // groups of 4 per thread
  constexpr int kWLoads = BK * kGroupedMaxRank / kThreads;   // weight elements per thread
  static_assert(kXLoads * kThreads == kRows * kGroupsPerRow, "x tile split evenly");
  __shared__ __align__(16) Acc xs[kRows * kXPitch];  // [row][kk]  x~ of the tile
  __shared__ Acc ws[BK * kWPitch];                   // [kk][rr]   W_e^T slice
  __shared__ int s_slot[kRows];
  __shared__ int s_tok[kRows];

  const int E = p.num_experts;
  const int b = blockIdx.x;
  if (b >= p.tile_offsets[E]) return;  // block-uniform, before any barrier
  // The expert of tile b: the last e with tile_offsets[e] <= b (tile_offsets[0] = 0).
  int lo = 0, hi = E - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (p.tile_offsets[mid] <= b) lo = mid; else hi = mid - 1;
  }
  const int e = lo;
  const int row0 = p.expert_offsets[e] + (b - p.tile_offsets[e]) * kRows;
  const int nrows = min(kRows, p.expert_offsets[e + 1] - row0);

  const int tid = threadIdx.x;
  if (tid < kRows) {
    const int slot = tid < nrows ? p.sorted_slots[row0 + tid] : -1;
    s_slot[tid] = slot;
    s_tok[tid] = slot >= 0 ? slot / p.top_k : -1;
  }
  __syncthreads();

  const T* input = static_cast<const T*>(p.input);
  const T* weight = static_cast<const T*>(p.weight) + e * p.w_stride_e;
  const int64_t in = p.in_features;
  const int rank = p.rank;
  const int nj = (rank + kRankLanes - 1) / kRankLanes;  // rank columns per thread in use
  const int rp = nj * kRankLanes;                       // staged rank columns (zero past rank)
  const bool w_k_fast = p.w_stride_k == 1 || (p.w_stride_r != 1 && p.w_stride_k < p.w_stride_r);
  const bool dropout = p.dropout.enabled;
  const uint64_t seed = dropout ? load_seed(p.dropout.seed_ptr, p.dropout.seed) : 0;
  const uint32_t stream = p.dropout.per_expert ? philox::expert_stream(e) : 0u;  // this tile's expert's mask

  T xr[kXLoads][4];  // the next K step, prefetched into registers
  T wr[kWLoads];
  auto prefetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < kXLoads; ++q) {
      const int id = tid + q * kThreads, row = id / kGroupsPerRow, g = id % kGroupsPerRow;
      const int t = s_tok[row];
      const int64_t k = k0 + 4 * g;
      load4(input + static_cast<int64_t>(t) * p.input_row_stride + k, t >= 0 ? in - k : 0,
            vec_input, xr[q]);
    }
#pragma unroll
    for (int q = 0; q < kWLoads; ++q) {
      const int id = tid + q * kThreads;
      const int kk = w_k_fast ? id % BK : id / rp, rr = w_k_fast ? id / BK : id % rp;
      const int64_t k = k0 + kk;
      wr[q] = (id < BK * rp && rr < rank && k < in)
                  ? weight[rr * p.w_stride_r + k * p.w_stride_k]
                  : zero_of<T>();
    }
  };

  Acc acc[4][kRankSteps] = {};
  const int rg = tid / kRankLanes, cg = tid % kRankLanes;  // rows rg*4 + i, ranks cg + 16 j
  prefetch(0);
  for (int64_t k0 = 0; k0 < in; k0 += BK) {  // block-uniform trip count
    __syncthreads();                         // the previous step's reads are done
#pragma unroll
    for (int q = 0; q < kXLoads; ++q) {
      const int id = tid + q * kThreads, row = id / kGroupsPerRow, g = id % kGroupsPerRow;
      const int t = s_tok[row];
      Acc v[4];
      masked4<T>(xr[q], dropout && t >= 0, seed, stream,
                 static_cast<uint64_t>(t) * static_cast<uint64_t>(in) + k0 + 4 * g,
                 p.dropout.p, v);
      sts4(&xs[row * kXPitch + 4 * g], v);
    }
#pragma unroll
    for (int q = 0; q < kWLoads; ++q) {
      const int id = tid + q * kThreads;
      if (id < BK * rp) {
        const int kk = w_k_fast ? id % BK : id / rp, rr = w_k_fast ? id / BK : id % rp;
        ws[kk * kWPitch + rr] = to_acc(wr[q]);
      }
    }
    __syncthreads();
    if (k0 + BK < in) prefetch(k0 + BK);  // in flight during the products below
    // fp64 tiles already fill the register file: no extra unrolling there.
    constexpr int kUnroll = sizeof(T) == 8 ? 1 : 4;
#pragma unroll kUnroll
    for (int kk = 0; kk < BK; kk += 4) {
      Acc x[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) lds4(&xs[(rg * 4 + i) * kXPitch + kk], x[i]);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
#pragma unroll
        for (int j = 0; j < kRankSteps; ++j) {
          if (j < nj) {
            const Acc w = ws[(kk + q) * kWPitch + cg + kRankLanes * j];
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[i][j] += x[i][q] * w;
          }
        }
      }
    }
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = rg * 4 + i;
#pragma unroll
    for (int j = 0; j < kRankSteps; ++j) {
      const int rr = cg + kRankLanes * j;
      if (row < nrows && rr < rank) {
        out[static_cast<int64_t>(s_slot[row]) * rank + rr] = from_acc<T>(acc[i][j]);
      }
    }
  }
}

// -------------------------------------------------------------- expand ----

// Shapes of one expand launch, fixed by the sizes (launch_grouped_expand).
struct ExpandShape {
  int bn;       // output columns per block: 64, 32 or 16
  int kj;       // slots per token staged at once
  int rank4;    // rank rounded up to 4
  int w_pitch;  // staged weight row pitch (elements), pitch / 4 odd: conflict-free vector reads
  bool w_c_fast;  // weight staging order: output column fastest (else rank fastest)
};

// u[s, rr] = round(v[s, rr] * round(coef[s] * scaling)), or v when coef is null.
template <typename T>
__device__ __forceinline__ acc_t<T> scaled_u(const T* v, const acc_t<T>* coef, acc_t<T> scaling,
                                             int64_t s, int rank, int rr) {
  const acc_t<T> x = to_acc(v[s * rank + rr]);
  if (coef == nullptr) return x;
  return round_to<T>(x * round_to<T>(coef[s] * scaling));
}

template <typename T, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2)
    grouped_expand_kernel(const GroupedExpandParams p, const ExpandShape shape) {
  using Acc = acc_t<T>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int E = p.num_experts, k = p.top_k, rank = p.rank;
  const int bn = shape.bn, cl_count = bn / 4, tl_count = kThreads / cl_count;
  const int kj_max = shape.kj, rank4 = shape.rank4, w_pitch = shape.w_pitch;
  // [E][bn][w_pitch] T (staged only), [tl_count][kj_max][rank4] acc, [tl_count][kj_max] int
  T* w_s = reinterpret_cast<T*>(smem);
  const size_t w_bytes = kStaged ? static_cast<size_t>(E) * bn * w_pitch * sizeof(T) : 0;
  Acc* u_s = reinterpret_cast<Acc*>(smem + w_bytes);
  int* e_s = reinterpret_cast<int*>(u_s + static_cast<size_t>(tl_count) * kj_max * rank4);

  const int tid = threadIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * bn;
  const int64_t t_begin = static_cast<int64_t>(blockIdx.x) * kExpandTokens;
  const int64_t t_end = min(p.num_tokens, t_begin + kExpandTokens);
  const T* weight = static_cast<const T*>(p.weight);
  const T* v = static_cast<const T*>(p.v);
  const Acc* coef = static_cast<const Acc*>(p.coef);
  const Acc scaling = static_cast<Acc>(p.scaling);

  if constexpr (kStaged) {  // the column tile of every expert's weight, zero past out/rank
    const int n = E * bn * rank4;
    for (int id = tid; id < n; id += kThreads) {
      int e, c, rr;
      if (shape.w_c_fast) {
        c = id % bn, rr = (id / bn) % rank4, e = id / (bn * rank4);
      } else {
        rr = id % rank4, c = (id / rank4) % bn, e = id / (bn * rank4);
      }
      const int64_t col = c0 + c;
      w_s[(e * bn + c) * w_pitch + rr] =
          (col < p.out_features && rr < rank)
              ? weight[e * p.w_stride_e + col * p.w_stride_c + rr * p.w_stride_r]
              : zero_of<T>();
    }
  }

  const int tl = tid / cl_count, cl = tid % cl_count;  // token lane, column lane
  const bool dropout = p.dropout.enabled;
  const bool per_expert = dropout && p.dropout.per_expert;
  const uint64_t seed = dropout ? load_seed(p.dropout.seed_ptr, p.dropout.seed) : 0;
  T* out = static_cast<T*>(p.out);

  for (int64_t tb = t_begin; tb < t_end; tb += tl_count) {  // block-uniform
    const int64_t t = tb + tl;
    Acc acc[4] = {};
    for (int j0 = 0; j0 < k; j0 += kj_max) {  // block-uniform
      const int kj = min(kj_max, k - j0);
      __syncthreads();  // the weight tile is staged / the previous u batch is consumed
      for (int id = tid; id < tl_count * kj * rank4; id += kThreads) {
        const int rr = id % rank4, jj = (id / rank4) % kj, tl2 = id / (rank4 * kj);
        const int64_t t2 = tb + tl2;
        u_s[(tl2 * kj_max + jj) * rank4 + rr] =
            (t2 < t_end && rr < rank) ? scaled_u(v, coef, scaling, t2 * k + j0 + jj, rank, rr)
                                      : Acc(0);
      }
      for (int id = tid; id < tl_count * kj; id += kThreads) {
        const int jj = id % kj, tl2 = id / kj;
        const int64_t t2 = tb + tl2;
        e_s[tl2 * kj_max + jj] = t2 < t_end ? checked_expert(p.indices[t2 * k + j0 + jj], E) : -1;
      }
      __syncthreads();
      if (t < t_end) {
        for (int jj = 0; jj < kj; ++jj) {  // slot order, then rank order: fixed sums
          const int e = e_s[tl * kj_max + jj];
          if (e < 0) continue;
          const Acc* u = &u_s[(tl * kj_max + jj) * rank4];
          // Per-expert dropout: this slot's term goes through its expert's mask
          // on its own (a separate sum, masked, then added); else acc sums the
          // terms and the one shared mask is applied to the total below.
          Acc part[4] = {};
          Acc(&sum)[4] = per_expert ? part : acc;
          for (int rr = 0; rr < rank4; rr += 4) {
            Acc uq[4];
            lds4(u + rr, uq);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int c = cl + cl_count * i;
              Acc wq[4];
              if constexpr (kStaged) {
                lds4(&w_s[(e * bn + c) * w_pitch + rr], wq);
              } else {
                const int64_t col = c0 + c;
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                  wq[q] = (col < p.out_features && rr + q < rank)
                              ? to_acc(weight[e * p.w_stride_e + col * p.w_stride_c +
                                              (rr + q) * p.w_stride_r])
                              : Acc(0);
                }
              }
#pragma unroll
              for (int q = 0; q < 4; ++q) sum[i] += uq[q] * wq[q];
            }
          }
          if (per_expert) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const int64_t col = c0 + cl + cl_count * i;
              if (col < p.out_features)
                acc[i] += part[i] * dropout_multiplier<Acc>(
                                        seed, static_cast<uint64_t>(t) * static_cast<uint64_t>(p.out_features) + col,
                                        p.dropout.p, philox::expert_stream(e));
            }
          }
        }
      }
    }
    if (t < t_end) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t col = c0 + cl + cl_count * i;
        if (col >= p.out_features) continue;
        Acc sum = acc[i];
        if (dropout && !per_expert) {
          sum *= dropout_multiplier<Acc>(
              seed, static_cast<uint64_t>(t) * static_cast<uint64_t>(p.out_features) + col,
              p.dropout.p);
        }
        T* o = out + t * p.out_row_stride + col;
        *o = from_acc<T>(p.accumulate ? to_acc(*o) + sum : sum);
      }
    }
  }
}

// --------------------------------------------------------- weight grad ----

template <typename T>
__global__ void __launch_bounds__(kThreads, min_blocks<T>())
    grouped_weight_grad_kernel(const GroupedWeightGradParams p, bool vec_input) {
  using Acc = acc_t<T>;
  constexpr int kXPitch = kGradCols + 4;
  constexpr int kGroupsPerRow = kGradCols / 4;
  constexpr int kXLoads = kGradRows * kGroupsPerRow / kThreads;  // groups of 4 per thread
  constexpr int kULoads = kGradRows * kGroupedMaxRank / kThreads;
  static_assert(kXLoads * kThreads == kGradRows * kGroupsPerRow, "x tile split evenly");
  __shared__ __align__(16) Acc xs[kGradRows * kXPitch];  // [row][c]  x~ rows of the segment
  __shared__ Acc us[kGradRows * kWPitch];                // [row][rr] u rows

  const int e = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kGradCols;
  const int seg_begin = p.expert_offsets[e], seg_end = p.expert_offsets[e + 1];
  const int tid = threadIdx.x;
  const T* input = static_cast<const T*>(p.input);
  const T* v = static_cast<const T*>(p.v);
  const Acc* coef = static_cast<const Acc*>(p.coef);
  const Acc scaling = static_cast<Acc>(p.scaling);
  const int64_t in = p.in_features;
  const int rank = p.rank;
  const int nj = (rank + kRankLanes - 1) / kRankLanes;
  const int rp = nj * kRankLanes;
  const bool dropout = p.dropout.enabled;
  const uint64_t seed = dropout ? load_seed(p.dropout.seed_ptr, p.dropout.seed) : 0;
  const uint32_t stream = p.dropout.per_expert ? philox::expert_stream(e) : 0u;  // this block's expert's mask

  T xr[kXLoads][4];  // the next rows, prefetched into registers
  int xt[kXLoads];   // their tokens (-1: past the segment)
  T vr[kULoads];
  Acc cr[kULoads];   // coef of each staged u element's slot
  auto prefetch = [&](int64_t r0) {
#pragma unroll
    for (int q = 0; q < kXLoads; ++q) {
      const int id = tid + q * kThreads, row = id / kGroupsPerRow, g = id % kGroupsPerRow;
      const int64_t pos = r0 + row;
      const int t = pos < seg_end ? p.sorted_slots[pos] / p.top_k : -1;
      const int64_t c = c0 + 4 * g;
      xt[q] = t;
      load4(input + static_cast<int64_t>(t) * p.input_row_stride + c, t >= 0 ? in - c : 0,
            vec_input, xr[q]);
    }
#pragma unroll
    for (int q = 0; q < kULoads; ++q) {
      const int id = tid + q * kThreads, row = id / rp, rr = id % rp;
      const int64_t pos = r0 + row;
      const bool ok = id < kGradRows * rp && pos < seg_end && rr < rank;
      const int64_t s = ok ? p.sorted_slots[pos] : 0;
      vr[q] = ok ? v[s * rank + rr] : zero_of<T>();
      cr[q] = (ok && coef != nullptr) ? coef[s] : Acc(0);
    }
  };

  Acc acc[4][kRankSteps] = {};
  const int rg = tid / kRankLanes, cg = tid % kRankLanes;  // columns rg*4 + i, ranks cg + 16 j
  prefetch(seg_begin);
  for (int64_t r0 = seg_begin; r0 < seg_end; r0 += kGradRows) {  // block-uniform; no int overflow
    __syncthreads();
#pragma unroll
    for (int q = 0; q < kXLoads; ++q) {
      const int id = tid + q * kThreads, row = id / kGroupsPerRow, g = id % kGroupsPerRow;
      Acc x[4];
      masked4<T>(xr[q], dropout && xt[q] >= 0, seed, stream,
                 static_cast<uint64_t>(xt[q]) * static_cast<uint64_t>(in) + c0 + 4 * g,
                 p.dropout.p, x);
      sts4(&xs[row * kXPitch + 4 * g], x);
    }
#pragma unroll
    for (int q = 0; q < kULoads; ++q) {
      const int id = tid + q * kThreads;
      if (id < kGradRows * rp) {
        const Acc x = to_acc(vr[q]);
        us[(id / rp) * kWPitch + id % rp] =
            coef != nullptr ? round_to<T>(x * round_to<T>(cr[q] * scaling)) : x;
      }
    }
    __syncthreads();
    const int nr = static_cast<int>(min(int64_t{kGradRows}, seg_end - r0));
    if (r0 + kGradRows < seg_end) prefetch(r0 + kGradRows);
    for (int row = 0; row < nr; ++row) {  // sorted (slot) order: deterministic sums
      Acc x[4];
      lds4(&xs[row * kXPitch + rg * 4], x);
#pragma unroll
      for (int j = 0; j < kRankSteps; ++j) {
        if (j < nj) {
          const Acc u = us[row * kWPitch + cg + kRankLanes * j];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] += x[i] * u;
        }
      }
    }
  }

  T* grad = static_cast<T*>(p.grad) + e * p.g_stride_e;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t c = c0 + rg * 4 + i;
#pragma unroll
    for (int j = 0; j < kRankSteps; ++j) {
      const int rr = cg + kRankLanes * j;
      if (c < in && rr < rank) grad[c * p.g_stride_c + rr * p.g_stride_r] = from_acc<T>(acc[i][j]);
    }
  }
}

// ------------------------------------------------------------- helpers ----

bool dropout_ok(const DropoutMask& d) {
  return !d.enabled || (d.p >= 0.0f && d.p <= 1.0f);  // also rejects NaN
}

// The common size checks of the header: 1 <= rank <= 64, 1 <= E <= 256,
// top_k >= 1, num_tokens >= 0 and num_tokens * top_k < 2^31.
bool sizes_ok(int64_t num_tokens, int top_k, int num_experts, int rank, int64_t features) {
  return num_tokens >= 0 && top_k >= 1 && num_experts >= 1 &&
         num_experts <= kGroupedMaxExperts && rank >= 1 && rank <= kGroupedMaxRank &&
         features >= 1 && num_tokens <= (int64_t{INT32_MAX}) / top_k;
}

// Whether row starts of a [rows, cols] matrix with this stride are aligned
// to 4 elements (the vector loads of load4).
template <typename T>
bool rows_aligned4(const void* base, int64_t row_stride) {
  return reinterpret_cast<uintptr_t>(base) % (4 * sizeof(T)) == 0 && row_stride % 4 == 0;
}

}  // namespace

template <typename T>
cudaError_t launch_grouped_shrink(const GroupedShrinkParams& params, cudaStream_t stream) {
  if (!sizes_ok(params.num_tokens, params.top_k, params.num_experts, params.rank,
                params.in_features) ||
      !dropout_ok(params.dropout)) {
    return cudaErrorInvalidValue;
  }
  if (params.num_tokens == 0) return cudaSuccess;
  if (params.input == nullptr || params.weight == nullptr || params.out == nullptr ||
      params.sorted_slots == nullptr || params.expert_offsets == nullptr ||
      params.tile_offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t tiles = grouped_max_tiles(params.num_tokens * params.top_k, params.num_experts);
  grouped_shrink_kernel<T><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      params, rows_aligned4<T>(params.input, params.input_row_stride));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grouped_expand(const GroupedExpandParams& params, cudaStream_t stream) {
  if (!sizes_ok(params.num_tokens, params.top_k, params.num_experts, params.rank,
                params.out_features) ||
      !dropout_ok(params.dropout)) {
    return cudaErrorInvalidValue;
  }
  if (params.num_tokens == 0) return cudaSuccess;
  if (params.v == nullptr || params.indices == nullptr || params.weight == nullptr ||
      params.out == nullptr) {
    return cudaErrorInvalidValue;
  }
  using Acc = acc_t<T>;
  const int E = params.num_experts, k = params.top_k;
  ExpandShape shape{};
  shape.rank4 = (params.rank + 3) / 4 * 4;
  shape.w_pitch = (shape.rank4 / 4) % 2 == 1 ? shape.rank4 : shape.rank4 + 4;
  shape.w_c_fast = params.w_stride_c == 1 && params.w_stride_r != 1;
  // Largest column tile whose shared memory fits without opting in, else the
  // smallest that fits the opt-in limit, else the weight is read from global.
  auto smem_for = [&](int bn, bool staged, int* kj_out) {
    const int64_t tl = kThreads / (bn / 4);
    const int64_t per_slot = tl * (shape.rank4 * static_cast<int64_t>(sizeof(Acc)) + 4);
    const int64_t kj = std::max<int64_t>(1, std::min<int64_t>(k, kExpandUBudget / per_slot));
    *kj_out = static_cast<int>(kj);
    const int64_t w = staged ? static_cast<int64_t>(E) * bn * shape.w_pitch * sizeof(T) : 0;
    return w + kj * per_slot;
  };
  int64_t smem = 0;
  bool staged = false;
  for (int bn : {64, 32, 16}) {
    int kj = 0;
    const int64_t bytes = smem_for(bn, true, &kj);
    if (bytes <= kExpandStaticSmem || (bn == 16 && bytes <= kExpandMaxSmem)) {
      shape.bn = bn, shape.kj = kj, smem = bytes, staged = true;
      break;
    }
  }
  if (!staged) {
    shape.bn = 64;
    smem = smem_for(64, false, &shape.kj);
  }
  const int64_t col_tiles = ceil_div(params.out_features, shape.bn);
  if (col_tiles > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
  const dim3 grid(static_cast<unsigned>(ceil_div(params.num_tokens, kExpandTokens)),
                  static_cast<unsigned>(col_tiles));
  auto kernel = staged ? grouped_expand_kernel<T, true> : grouped_expand_kernel<T, false>;
  if (smem > kExpandStaticSmem) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kThreads, static_cast<size_t>(smem), stream>>>(params, shape);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grouped_weight_grad(const GroupedWeightGradParams& params,
                                       cudaStream_t stream) {
  if (!sizes_ok(params.num_tokens, params.top_k, params.num_experts, params.rank,
                params.in_features) ||
      !dropout_ok(params.dropout)) {
    return cudaErrorInvalidValue;
  }
  if (params.num_tokens == 0) return cudaSuccess;
  if (params.input == nullptr || params.v == nullptr || params.grad == nullptr ||
      params.sorted_slots == nullptr || params.expert_offsets == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t col_tiles = ceil_div(params.in_features, kGradCols);
  if (col_tiles > 65535) return cudaErrorInvalidValue;  // gridDim.y limit
  const dim3 grid(static_cast<unsigned>(params.num_experts), static_cast<unsigned>(col_tiles));
  grouped_weight_grad_kernel<T><<<grid, kThreads, 0, stream>>>(
      params, rows_aligned4<T>(params.input, params.input_row_stride));
  return cudaGetLastError();
}

#define MOLA_GROUPED_INSTANTIATE(T)                                                            \
  template cudaError_t launch_grouped_shrink<T>(const GroupedShrinkParams&, cudaStream_t);     \
  template cudaError_t launch_grouped_expand<T>(const GroupedExpandParams&, cudaStream_t);     \
  template cudaError_t launch_grouped_weight_grad<T>(const GroupedWeightGradParams&,           \
                                                     cudaStream_t);
MOLA_GROUPED_INSTANTIATE(double)
MOLA_GROUPED_INSTANTIATE(float)
MOLA_GROUPED_INSTANTIATE(__half)
MOLA_GROUPED_INSTANTIATE(__nv_bfloat16)
#undef MOLA_GROUPED_INSTANTIATE

}  // namespace kernels
}  // namespace mola
