// tests/cpp/ops/test_philox.cpp: the Philox4x32-10 generator and the dropout-mask
// contract of kernels/philox.h, on the CPU (g++, no CUDA needed).
//
// Why these checks: the CUDA kernels regenerate the dropout mask from a seed
// that the CPU op also uses, so the generator must be the standard one (the
// Random123 known-answer vectors pin it) and the mapping element -> (counter,
// lane) -> uniform must be the documented one (the mask vectors below pin it
// in terms of the KAT, independent of this implementation).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace {

using mola::philox::dropout_bits4;
using mola::philox::dropout_keep;
using mola::philox::dropout_scale;
using mola::philox::dropout_uniform;
using mola::philox::dropout_uniform4;
using mola::philox::philox4x32_10;
using mola::philox::U32x2;
using mola::philox::U32x4;
using mola::philox::Uniform4;

void expect_block(const U32x4& got, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  EXPECT_EQ(got.x, x);
  EXPECT_EQ(got.y, y);
  EXPECT_EQ(got.z, z);
  EXPECT_EQ(got.w, w);
}

// Random123 kat_vectors, philox4x32 with 10 rounds.
TEST(Philox, KnownAnswerZero) {
  expect_block(philox4x32_10(U32x4{0u, 0u, 0u, 0u}, U32x2{0u, 0u}), 0x6627e8d5u, 0xe169c58du,
               0xbc57ac4cu, 0x9b00dbd8u);
}

TEST(Philox, KnownAnswerAllOnes) {
  const uint32_t m = 0xffffffffu;
  expect_block(philox4x32_10(U32x4{m, m, m, m}, U32x2{m, m}), 0x408f276du, 0x41c83b0eu,
               0xa20bc7c6u, 0x6d5451fdu);
}

// The mask contract: seed 0, elements 0..3 are group 0, i.e. counter (0,0,0,0)
// and key (0,0), so their uniforms are the zero KAT's words >> 8, times 2^-24.
TEST(Philox, MaskMatchesContractOnKat) {
  const uint32_t kat[4] = {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u};
  for (uint64_t i = 0; i < 4; ++i) {
    const float expected = std::ldexp(static_cast<float>(kat[i] >> 8), -24);
    EXPECT_EQ(dropout_uniform(0, i), expected) << "element " << i;
  }
}

// Seed low word is key word 0, high word key word 1; i/4 low word is counter
// word 0, high word counter word 1.
TEST(Philox, SeedAndCounterWordOrder) {
  const uint64_t seed = 0x0123456789abcdefull;
  const uint64_t i4 = 0x00000007deadbeefull;
  const U32x4 want =
      philox4x32_10(U32x4{0xdeadbeefu, 0x7u, 0u, 0u}, U32x2{0x89abcdefu, 0x01234567u});
  expect_block(dropout_bits4(seed, i4), want.x, want.y, want.z, want.w);
  // Both seed words matter.
  const U32x4 lo_only = dropout_bits4(seed & 0xffffffffull, i4);
  EXPECT_NE(lo_only.x, want.x);
}

// The scalar path equals the matching lane of the vector path, including
// element indices whose group number needs the counter's high word.
TEST(Philox, ScalarEqualsVectorLane) {
  const uint64_t seeds[] = {0ull, 42ull, 0xfedcba9876543210ull};
  const uint64_t starts[] = {0ull, 1000003ull, (1ull << 34) - 8, (1ull << 40) + 4};
  for (uint64_t seed : seeds) {
    for (uint64_t start : starts) {
      for (uint64_t i4 = start / 4; i4 < start / 4 + 256; ++i4) {
        const Uniform4 u = dropout_uniform4(seed, i4);
        EXPECT_EQ(dropout_uniform(seed, 4 * i4 + 0), u.x);
        EXPECT_EQ(dropout_uniform(seed, 4 * i4 + 1), u.y);
        EXPECT_EQ(dropout_uniform(seed, 4 * i4 + 2), u.z);
        EXPECT_EQ(dropout_uniform(seed, 4 * i4 + 3), u.w);
      }
    }
  }
}

TEST(Philox, UniformInUnitInterval) {
  float lo = 1.0f;
  float hi = 0.0f;
  for (uint64_t i = 0; i < 100000; ++i) {
    const float u = dropout_uniform(7, i);
    lo = std::fmin(lo, u);
    hi = std::fmax(hi, u);
  }
  EXPECT_GE(lo, 0.0f);
  EXPECT_LT(hi, 1.0f);
  EXPECT_LT(lo, 1e-3f);
  EXPECT_GT(hi, 1.0f - 1e-3f);
}

// Dropped fraction over 1e6 elements within 4 binomial standard deviations.
void check_drop_rate(float p, uint64_t seed) {
  const uint64_t n = 1000000;
  uint64_t dropped = 0;
  for (uint64_t i = 0; i < n; ++i) dropped += dropout_keep(seed, i, p) ? 0 : 1;
  const double mean = static_cast<double>(n) * p;
  const double sd = std::sqrt(static_cast<double>(n) * p * (1.0 - p));
  EXPECT_NEAR(static_cast<double>(dropped), mean, 4.0 * sd) << "p=" << p << " seed=" << seed;
}

TEST(Philox, DropRateSmallP) { check_drop_rate(0.05f, 1234); }
TEST(Philox, DropRateHalf) { check_drop_rate(0.5f, 0x9e3779b97f4a7c15ull); }

TEST(Philox, ScaleAndEdgeProbabilities) {
  EXPECT_EQ(dropout_scale(0.0f), 1.0f);
  EXPECT_EQ(dropout_scale(0.5f), 2.0f);
  EXPECT_FLOAT_EQ(dropout_scale(0.05f), 1.0f / 0.95f);
  EXPECT_EQ(dropout_scale(1.0f), 0.0f);  // nothing kept: no inf to multiply
  for (uint64_t i = 0; i < 1000; ++i) {
    EXPECT_TRUE(dropout_keep(3, i, 0.0f));   // u >= 0 always
    EXPECT_FALSE(dropout_keep(3, i, 1.0f));  // u < 1 always
  }
}

}  // namespace
