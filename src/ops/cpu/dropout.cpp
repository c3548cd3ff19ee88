// CPU dropout of moe_lora (see dropout.h). Philox4x32-10 is 10 rounds of 32x32
// -> 64-bit products, which compilers do not vectorise on their own: the block
// generator has an AVX2 version (8 counters per register, _mm256_mul_epu32 for
// the wide products), chosen at run time, and a portable scalar one. Integer
// arithmetic and the exact u32 -> float conversion make both give the same bits
// as the scalar definition in kernels/philox.h (tests/cpp check this).
#include "ops/cpu/dropout.h"

#include <philox.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOLA_HAVE_AVX2_PATH 1
#endif

namespace mola::detail {
namespace {

constexpr int64_t kBlockGroups = 16;  // Philox counters per vectorised block

// Uniforms of groups g0 .. g0 + kBlockGroups - 1 (4 per group) into u[0..63]:
// lane j of the block is group g0 + j, as philox::dropout_uniform4 defines.
void philox_block_scalar(uint64_t seed, uint64_t g0, float* u) {
  for (int j = 0; j < kBlockGroups; ++j) {
    const philox::Uniform4 v = philox::dropout_uniform4(seed, g0 + static_cast<uint64_t>(j));
    u[4 * j + 0] = v.x;
    u[4 * j + 1] = v.y;
    u[4 * j + 2] = v.z;
    u[4 * j + 3] = v.w;
  }
}

#ifdef MOLA_HAVE_AVX2_PATH
// hi and lo 32 bits of a * m for the 8 lanes of a.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

// float(r >> 8) * 2^-24 per lane: exact, as philox::u32_to_uniform.
__attribute__((target("avx2"))) inline __m256 unit(__m256i r, __m256 to_unit) {
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(r, 8)), to_unit);
}

__attribute__((target("avx2"))) void philox_block_avx2(uint64_t seed, uint64_t g0, float* u) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  const __m256 to_unit = _mm256_set1_ps(5.9604644775390625e-08f);  // 2^-24
  for (int half = 0; half < kBlockGroups; half += 8) {
    alignas(32) uint32_t lo32[8], hi32[8];
    for (int j = 0; j < 8; ++j) {
      const uint64_t g = g0 + static_cast<uint64_t>(half + j);
      lo32[j] = static_cast<uint32_t>(g);
      hi32[j] = static_cast<uint32_t>(g >> 32);
    }
    __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    __m256i y = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
    __m256i z = _mm256_setzero_si256(), w = _mm256_setzero_si256();
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < philox::kRounds; ++round) {
      if (round > 0) {
        k0 += philox::kW0;
        k1 += philox::kW1;
      }
      __m256i hi0, lo0, hi1, lo1;  // philox::philox_round, 8 lanes at once
      mulhilo8(x, m0, hi0, lo0);
      mulhilo8(z, m1, hi1, lo1);
      x = _mm256_xor_si256(_mm256_xor_si256(hi1, y), _mm256_set1_epi32(static_cast<int>(k0)));
      z = _mm256_xor_si256(_mm256_xor_si256(hi0, w), _mm256_set1_epi32(static_cast<int>(k1)));
      y = lo1;
      w = lo0;
    }
    alignas(32) float fx[8], fy[8], fz[8], fw[8];
    _mm256_store_ps(fx, unit(x, to_unit));
    _mm256_store_ps(fy, unit(y, to_unit));
    _mm256_store_ps(fz, unit(z, to_unit));
    _mm256_store_ps(fw, unit(w, to_unit));
    for (int j = 0; j < 8; ++j) {
      float* o = u + 4 * (half + j);
      o[0] = fx[j];
      o[1] = fy[j];
      o[2] = fz[j];
      o[3] = fw[j];
    }
  }
}
#endif

using BlockFn = void (*)(uint64_t, uint64_t, float*);

BlockFn pick_block_fn() {
#ifdef MOLA_HAVE_AVX2_PATH
  if (__builtin_cpu_supports("avx2")) return &philox_block_avx2;
#endif
  return &philox_block_scalar;
}

void philox_block(uint64_t seed, uint64_t g0, float* u) {
  static const BlockFn fn = pick_block_fn();
  fn(seed, g0, u);
}

// Calls fn(begin_element, count, uniforms) for consecutive blocks of n elements,
// in parallel; uniforms[j] belongs to element begin_element + j.
template <typename Fn>
void for_each_uniform_block(int64_t n, uint64_t seed, const Fn& fn) {
  constexpr int64_t kBlock = 4 * kBlockGroups;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    float u[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      philox_block(seed, static_cast<uint64_t>(b * kBlockGroups), u);
      const int64_t start = b * kBlock;
      fn(start, std::min(kBlock, n - start), u);
    }
  });
}

template <typename T>
void apply(const T* in, T* out, int64_t n, uint64_t seed, float p) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const float scale = philox::dropout_scale(p);
  for_each_uniform_block(n, seed, [&](int64_t start, int64_t count, const float* u) {
    acc_t m[4 * kBlockGroups];  // the block's multipliers, 0 or 1/(1-p): a branch-free loop
    for (int64_t j = 0; j < count; ++j) m[j] = static_cast<acc_t>(u[j] >= p ? scale : 0.0f);
    const T* src = in + start;
    T* dst = out + start;
    for (int64_t j = 0; j < count; ++j) dst[j] = static_cast<T>(static_cast<acc_t>(src[j]) * m[j]);
  });
}

// x~ = x * m into xd, and g *= m in place, with one generation of the mask m.
template <typename T>
void apply_pair(const T* x, T* xd, T* g, int64_t n, uint64_t seed, float p) {
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const float scale = philox::dropout_scale(p);
  for_each_uniform_block(n, seed, [&](int64_t start, int64_t count, const float* u) {
    acc_t m[4 * kBlockGroups];
    for (int64_t j = 0; j < count; ++j) m[j] = static_cast<acc_t>(u[j] >= p ? scale : 0.0f);
    for (int64_t j = 0; j < count; ++j) {
      xd[start + j] = static_cast<T>(static_cast<acc_t>(x[start + j]) * m[j]);
      g[start + j] = static_cast<T>(static_cast<acc_t>(g[start + j]) * m[j]);
    }
  });
}

void check_dropout_input(const at::Tensor& x, double p) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(),
              "dropout (CPU): expected a contiguous CPU tensor; got ", x.device());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout: p (", p, ") must be in [0, 1)");
}

}  // namespace

at::Tensor dropout_apply_cpu(const at::Tensor& x, uint64_t seed, double p) {
  check_dropout_input(x, p);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply", [&] {
    apply<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.numel(), seed,
                    static_cast<float>(p));
  });
  return out;
}

void dropout_apply_cpu_(at::Tensor& x, uint64_t seed, double p) {
  check_dropout_input(x, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_", [&] {
    scalar_t* data = x.mutable_data_ptr<scalar_t>();
    apply<scalar_t>(data, data, x.numel(), seed, static_cast<float>(p));
  });
}

at::Tensor dropout_apply_pair_cpu(const at::Tensor& x, at::Tensor& grad, uint64_t seed, double p) {
  check_dropout_input(x, p);
  check_dropout_input(grad, p);
  TORCH_CHECK(x.sizes() == grad.sizes() && x.scalar_type() == grad.scalar_type(),
              "dropout_apply_pair: x ", x.sizes(), " and grad ", grad.sizes(), " must match");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_pair", [&] {
    apply_pair<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                         grad.mutable_data_ptr<scalar_t>(), x.numel(), seed, static_cast<float>(p));
  });
  return out;
}

at::Tensor dropout_mask_values_cpu(uint64_t seed, int64_t rows, int64_t cols, double p) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  const float pf = static_cast<float>(p), scale = philox::dropout_scale(pf);
  float* out = mask.data_ptr<float>();
  for_each_uniform_block(rows * cols, seed, [&](int64_t start, int64_t count, const float* u) {
    for (int64_t j = 0; j < count; ++j) out[start + j] = u[j] >= pf ? scale : 0.0f;
  });
  return mask;
}

}  // namespace mola::detail
