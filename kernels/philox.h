// kernels/philox.h: the counter-based Philox4x32-10 generator and the dropout
// mask that mola defines on top of it.
//
// Why a separate plain-C++ header: the dropout mask is a contract between the
// CPU op (compiled by g++, no nvcc) and the CUDA kernels (which regenerate the
// mask in backward instead of storing it, docs/design.md, Strategies and kernels). Both include
// this one file, so the bits cannot drift apart. Nothing here uses a CUDA-only
// type; MOLA_HD expands to `__host__ __device__` only under nvcc.
//
// Generator: Philox4x32-10 of Salmon, Moraes, Dror and Shaw, "Parallel random
// numbers: as easy as 1, 2, 3" (SC 2011), in the round/key-schedule order of
// their Random123 library: round(counter, key) ten times, with the key bumped
// by the Weyl constants between rounds (nine bumps, none after the last
// round). tests/cpp/ops/test_philox.cpp checks Random123's published known-answer
// vectors.
//
// Dropout mask (the contract; the same on CPU and GPU): for a row-major
// [rows, cols] input, element i = row * cols + col of stream s uses
//   r = philox4x32_10(counter = {lo32(i / 4), hi32(i / 4), s, 0},
//                     key     = {lo32(seed),  hi32(seed)})[i % 4]
//   u = float(r >> 8) * 2^-24        (24 random bits, exact in float, [0, 1))
//   keep  iff u >= float(p);   kept elements are scaled by 1.0f / (1.0f - float(p))
// So four consecutive elements share one Philox call, which lets vectorised
// loops (4 elements per thread) pay for one call per group. The stream picks
// one of 2^32 independent masks over the same elements: moe_lora's per-expert
// masks (each routed expert of a token sees its own mask over the token's
// features, as the MoLA authors' per-expert dropout calls do) are stream e + 1
// for expert e; the shared mask (one for all experts) is stream 0.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MOLA_HD __host__ __device__ __forceinline__
#else
#define MOLA_HD inline
#endif

namespace mola {
namespace philox {

// Random123's constants: multipliers M0, M1 and Weyl key increments W0, W1
// (W0 is the golden ratio, W1 sqrt(3) - 1, both times 2^32).
constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;
constexpr int kRounds = 10;

// Four 32-bit words: a Philox counter or output block. Named fields (not an
// array) so device code never indexes it dynamically and it stays in registers.
struct U32x4 {
  uint32_t x, y, z, w;
};

// Two 32-bit words: a Philox key.
struct U32x2 {
  uint32_t x, y;
};

// Four uniforms in [0, 1), the group of elements 4*i4 .. 4*i4+3.
struct Uniform4 {
  float x, y, z, w;
};

// The 32x32 -> 64 bit product, split. A 64-bit multiply compiles to
// mul.wide.u32 on the GPU and to one mul on x86-64, so host and device share it.
MOLA_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
}

// One Philox S-box round (Random123's philox4x32round).
MOLA_HD U32x4 philox_round(U32x4 ctr, U32x2 key) {
  uint32_t hi0, lo0, hi1, lo1;
  mulhilo32(kM0, ctr.x, hi0, lo0);
  mulhilo32(kM1, ctr.z, hi1, lo1);
  return U32x4{hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0};
}

// Philox4x32 with 10 rounds: round, then (bump key, round) nine times.
MOLA_HD U32x4 philox4x32_10(U32x4 ctr, U32x2 key) {
  ctr = philox_round(ctr, key);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 1; r < kRounds; ++r) {
    key.x += kW0;
    key.y += kW1;
    ctr = philox_round(ctr, key);
  }
  return ctr;
}

// The Philox block for group i4 (elements 4*i4 .. 4*i4+3) of a mask with
// `seed`, in `stream` (0: the shared mask; e + 1: expert e's).
MOLA_HD U32x4 dropout_bits4(uint64_t seed, uint64_t i4, uint32_t stream = 0) {
  const U32x4 ctr{static_cast<uint32_t>(i4), static_cast<uint32_t>(i4 >> 32), stream, 0u};
  const U32x2 key{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  return philox4x32_10(ctr, key);
}

// 32 random bits -> float in [0, 1) from the top 24 bits. (r >> 8) < 2^24 is
// exact in float and 2^-24 is a power of two, so the result is bit-identical on
// any IEEE host or device, with no rounding mode or FMA contraction involved.
MOLA_HD float u32_to_uniform(uint32_t r) {
  return static_cast<float>(r >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

// The uniforms of group i4, i.e. of elements 4*i4 + {0, 1, 2, 3}.
MOLA_HD Uniform4 dropout_uniform4(uint64_t seed, uint64_t i4) {
  const U32x4 r = dropout_bits4(seed, i4);
  return Uniform4{u32_to_uniform(r.x), u32_to_uniform(r.y), u32_to_uniform(r.z),
                  u32_to_uniform(r.w)};
}

// Lane `lane` (0..3) of a block, by selects rather than an array index, so the
// GPU keeps the block in registers.
MOLA_HD uint32_t u32x4_lane(const U32x4& r, unsigned lane) {
  return lane == 0 ? r.x : lane == 1 ? r.y : lane == 2 ? r.z : r.w;
}

// The uniform of element i: lane i % 4 of group i / 4.
MOLA_HD float dropout_uniform(uint64_t seed, uint64_t i, uint32_t stream = 0) {
  return u32_to_uniform(u32x4_lane(dropout_bits4(seed, i >> 2, stream), static_cast<unsigned>(i & 3u)));
}

// Whether element i survives dropout with probability p of being zeroed.
MOLA_HD bool dropout_keep(uint64_t seed, uint64_t i, float p, uint32_t stream = 0) {
  return dropout_uniform(seed, i, stream) >= p;
}

// The stream of expert e's mask under per-expert dropout (0 is the shared mask's).
MOLA_HD uint32_t expert_stream(int64_t e) { return static_cast<uint32_t>(e) + 1u; }

// The factor applied to kept elements, 1 / (1 - p) in float (inverted dropout,
// as torch.nn.functional.dropout). For p >= 1 nothing is kept (u < 1 <= p) and
// 0 is returned instead of inf, so `keep ? x * scale : 0` never makes a NaN.
MOLA_HD float dropout_scale(float p) {
  return p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
}

}  // namespace philox
}  // namespace mola
