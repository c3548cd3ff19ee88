// CPU dropout of moe_lora (see dropout.h). Philox4x32-10 is 10 rounds of 32x32
// -> 64-bit products, which compilers do not vectorise on their own: the block
// generator has AVX-512 (16 counters per register) and AVX2 (8) versions, chosen
// at run time, and a portable scalar one. Each turns a block of 64 elements
// straight into their multipliers (0 or 1/(1-p)): the keep test u >= p is done on
// the integers behind the uniforms (see keep_threshold) and the four lanes of each
// counter are transposed into element order in registers. Integer arithmetic
// and exact comparisons make all three give the bits of the scalar definition in
// kernels/philox.h (tests/cpp check each against it).
#include "ops/cpu/dropout.h"

#include <philox.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOLA_HAVE_X86_PATHS 1
#endif

namespace mola::detail {
namespace {

constexpr int64_t kBlockGroups = 16;                // Philox counters per block
constexpr int64_t kBlock = 4 * kBlockGroups;        // elements per block

// u = (r >> 8) * 2^-24 >= p exactly when the integer (r >> 8) >= ceil(p * 2^24):
// scaling by 2^24 is exact for a float p, and (r >> 8) is an integer.
uint32_t keep_threshold(float p) {
  return static_cast<uint32_t>(std::ceil(static_cast<double>(p) * 16777216.0));
}

// The multipliers of elements 4*g0 .. 4*g0 + 63 into m[0..63].
void multiplier_block_scalar(uint64_t seed, uint32_t stream, uint64_t g0, uint32_t thr, float scale, float* m) {
  for (int j = 0; j < kBlockGroups; ++j) {
    const philox::U32x4 r = philox::dropout_bits4(seed, g0 + static_cast<uint64_t>(j), stream);
    m[4 * j + 0] = (r.x >> 8) >= thr ? scale : 0.0f;
    m[4 * j + 1] = (r.y >> 8) >= thr ? scale : 0.0f;
    m[4 * j + 2] = (r.z >> 8) >= thr ? scale : 0.0f;
    m[4 * j + 3] = (r.w >> 8) >= thr ? scale : 0.0f;
  }
}

#ifdef MOLA_HAVE_X86_PATHS
// Counters g0 + j (j = 0..lanes-1) split into their low and high 32 bits.
template <int Lanes>
void counter_words(uint64_t g0, uint32_t* lo, uint32_t* hi) {
  for (int j = 0; j < Lanes; ++j) {
    const uint64_t g = g0 + static_cast<uint64_t>(j);
    lo[j] = static_cast<uint32_t>(g);
    hi[j] = static_cast<uint32_t>(g >> 32);
  }
}

// --- AVX2: two halves of 8 counters ---
// hi and lo 32 bits of a * m for the 8 lanes of a.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo = _mm256_mullo_epi32(a, m);
}

// scale where (r >> 8) >= thr, else 0, per lane (thr_minus_1 = thr - 1 as int32:
// (r >> 8) < 2^24 and thr <= 2^24, so the signed compare is exact).
__attribute__((target("avx2"))) inline __m256 multiplier8(__m256i r, __m256i thr_minus_1,
                                                          __m256 scale) {
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(r, 8), thr_minus_1);
  return _mm256_and_ps(_mm256_castsi256_ps(keep), scale);
}

__attribute__((target("avx2"))) void multiplier_block_avx2(uint64_t seed, uint32_t stream, uint64_t g0,
                                                           uint32_t thr, float scale, float* m) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(philox::kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(philox::kM1));
  const __m256i thr1 = _mm256_set1_epi32(static_cast<int>(thr) - 1);
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int half = 0; half < kBlockGroups; half += 8) {
    alignas(32) uint32_t lo32[8], hi32[8];
    counter_words<8>(g0 + static_cast<uint64_t>(half), lo32, hi32);
    __m256i x = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32));
    __m256i y = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32));
    __m256i z = _mm256_set1_epi32(static_cast<int>(stream)), w = _mm256_setzero_si256();
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
    // Lane j of X, Y, Z, W holds elements 4j .. 4j+3 of this half: a 4x8 transpose.
    const __m256 X = multiplier8(x, thr1, vscale), Y = multiplier8(y, thr1, vscale);
    const __m256 Z = multiplier8(z, thr1, vscale), W = multiplier8(w, thr1, vscale);
    const __m256 t0 = _mm256_unpacklo_ps(X, Y), t1 = _mm256_unpackhi_ps(X, Y);
    const __m256 t2 = _mm256_unpacklo_ps(Z, W), t3 = _mm256_unpackhi_ps(Z, W);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    float* o = m + 4 * half;  // u0..u3: groups (0,4), (1,5), (2,6), (3,7) per 128-bit lane
    _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
    _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
    _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
    _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
  }
}

// --- AVX-512: the 16 counters of a block in one register ---
#define MOLA_AVX512 __attribute__((target("avx512f")))

MOLA_AVX512 inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
  lo = _mm512_mullo_epi32(a, m);
}

MOLA_AVX512 inline __m512 multiplier16(__m512i r, __m512i thr, __m512 scale) {
  return _mm512_maskz_mov_ps(_mm512_cmpge_epu32_mask(_mm512_srli_epi32(r, 8), thr), scale);
}

MOLA_AVX512 void multiplier_block_avx512(uint64_t seed, uint32_t stream, uint64_t g0, uint32_t thr, float scale,
                                         float* m) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(philox::kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(philox::kM1));
  alignas(64) uint32_t lo32[16], hi32[16];
  counter_words<16>(g0, lo32, hi32);
  __m512i x = _mm512_load_si512(lo32);
  __m512i y = _mm512_load_si512(hi32);
  __m512i z = _mm512_set1_epi32(static_cast<int>(stream)), w = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < philox::kRounds; ++round) {
    if (round > 0) {
      k0 += philox::kW0;
      k1 += philox::kW1;
    }
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(x, m0, hi0, lo0);
    mulhilo16(z, m1, hi1, lo1);
    x = _mm512_xor_si512(_mm512_xor_si512(hi1, y), _mm512_set1_epi32(static_cast<int>(k0)));
    z = _mm512_xor_si512(_mm512_xor_si512(hi0, w), _mm512_set1_epi32(static_cast<int>(k1)));
    y = lo1;
    w = lo0;
  }
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512 X = multiplier16(x, vthr, vscale), Y = multiplier16(y, vthr, vscale);
  const __m512 Z = multiplier16(z, vthr, vscale), W = multiplier16(w, vthr, vscale);
  // A 4x16 transpose: per 128-bit lane L, u_c holds group 4L + c in element order.
  const __m512 t0 = _mm512_unpacklo_ps(X, Y), t1 = _mm512_unpackhi_ps(X, Y);
  const __m512 t2 = _mm512_unpacklo_ps(Z, W), t3 = _mm512_unpackhi_ps(Z, W);
  const __m512 u0 = _mm512_shuffle_ps(t0, t2, 0x44), u1 = _mm512_shuffle_ps(t0, t2, 0xEE);
  const __m512 u2 = _mm512_shuffle_ps(t1, t3, 0x44), u3 = _mm512_shuffle_ps(t1, t3, 0xEE);
  // Gather lane L of u0..u3 (groups 4L .. 4L+3) into output vector L.
  const __m512 a = _mm512_shuffle_f32x4(u0, u1, 0x44), b = _mm512_shuffle_f32x4(u2, u3, 0x44);
  const __m512 c = _mm512_shuffle_f32x4(u0, u1, 0xEE), d = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  _mm512_storeu_ps(m + 0, _mm512_shuffle_f32x4(a, b, 0x88));
  _mm512_storeu_ps(m + 16, _mm512_shuffle_f32x4(a, b, 0xDD));
  _mm512_storeu_ps(m + 32, _mm512_shuffle_f32x4(c, d, 0x88));
  _mm512_storeu_ps(m + 48, _mm512_shuffle_f32x4(c, d, 0xDD));
}

// Float data, a whole block: dst = src * m, and the pair form (xd = x * m, g *= m).
MOLA_AVX512 void apply_block_f32_avx512(const float* src, float* dst, const float* m) {
  for (int j = 0; j < kBlock; j += 16) {
    _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_loadu_ps(src + j), _mm512_loadu_ps(m + j)));
  }
}
#undef MOLA_AVX512

__attribute__((target("avx2"))) void apply_block_f32_avx2(const float* src, float* dst,
                                                          const float* m) {
  for (int j = 0; j < kBlock; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_loadu_ps(src + j), _mm256_loadu_ps(m + j)));
  }
}
#endif

void apply_block_f32_scalar(const float* src, float* dst, const float* m) {
  for (int j = 0; j < kBlock; ++j) dst[j] = src[j] * m[j];
}

using MultiplierFn = void (*)(uint64_t, uint32_t, uint64_t, uint32_t, float, float*);
using ApplyF32Fn = void (*)(const float*, float*, const float*);

struct BlockPath {
  MultiplierFn multipliers;
  ApplyF32Fn apply_f32;  // dst = src * m over one whole block of floats
};

BlockPath block_path(DropoutIsa isa) {
  switch (isa) {
#ifdef MOLA_HAVE_X86_PATHS
    case DropoutIsa::kAvx512:
      return {&multiplier_block_avx512, &apply_block_f32_avx512};
    case DropoutIsa::kAvx2:
      return {&multiplier_block_avx2, &apply_block_f32_avx2};
#endif
    default:
      return {&multiplier_block_scalar, &apply_block_f32_scalar};
  }
}

DropoutIsa best_isa() {
  static const DropoutIsa isa = dropout_isas().back();
  return isa;
}

// Calls fn(begin_element, count, multipliers) for consecutive blocks of n
// elements, in parallel; multipliers[j] belongs to element begin_element + j.
template <typename Fn>
void for_each_block(const BlockPath& path, int64_t n, uint64_t seed, uint32_t stream, float p, const Fn& fn) {
  const uint32_t thr = keep_threshold(p);
  const float scale = philox::dropout_scale(p);
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  at::parallel_for(0, blocks, 256, [&](int64_t begin, int64_t end) {
    alignas(64) float m[kBlock];
    for (int64_t b = begin; b < end; ++b) {
      path.multipliers(seed, stream, static_cast<uint64_t>(b * kBlockGroups), thr, scale, m);
      const int64_t start = b * kBlock;
      fn(start, std::min(kBlock, n - start), m);
    }
  });
}

// The same over selected rows of a [*, cols] matrix: for each r in
// [0, rows.size()), fn(r, col0, count, multipliers) for the columns col0 ..
// col0 + count - 1 of mask row rows[r] (elements rows[r] * cols + col), in
// blocks; rows in parallel.
template <typename Fn>
void for_each_row_block(const BlockPath& path, const int64_t* rows, int64_t n_rows, int64_t cols, uint64_t seed,
                        uint32_t stream, float p, const Fn& fn) {
  const uint32_t thr = keep_threshold(p);
  const float scale = philox::dropout_scale(p);
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, cols));
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float m[kBlock];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t first = rows[r] * cols, last = first + cols;  // the row's element range
      for (int64_t b = first / kBlock; b * kBlock < last; ++b) {
        path.multipliers(seed, stream, static_cast<uint64_t>(b * kBlockGroups), thr, scale, m);
        const int64_t lo = std::max(first, b * kBlock), hi = std::min(last, (b + 1) * kBlock);
        fn(r, lo - first, hi - lo, m + (lo - b * kBlock));
      }
    }
  });
}

// dst = src * m elementwise, in acc_t (float, double for double), rounded to T.
template <typename T>
void apply_span(const T* src, T* dst, int64_t count, const float* m, const BlockPath& path) {
  if constexpr (std::is_same_v<T, float>) {
    if (count == kBlock) return path.apply_f32(src, dst, m);
  }
  using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;
  for (int64_t j = 0; j < count; ++j) {
    dst[j] = static_cast<T>(static_cast<acc_t>(src[j]) * static_cast<acc_t>(m[j]));
  }
}

template <typename T>
void apply(const T* in, T* out, int64_t n, uint64_t seed, uint32_t stream, float p, const BlockPath& path) {
  for_each_block(path, n, seed, stream, p, [&](int64_t start, int64_t count, const float* m) {
    apply_span(in + start, out + start, count, m, path);
  });
}

// x~ = x * m into xd, and g *= m in place, with one generation of the mask m.
template <typename T>
void apply_pair(const T* x, T* xd, T* g, int64_t n, uint64_t seed, uint32_t stream, float p,
                const BlockPath& path) {
  for_each_block(path, n, seed, stream, p, [&](int64_t start, int64_t count, const float* m) {
    apply_span(x + start, xd + start, count, m, path);
    apply_span(g + start, g + start, count, m, path);
  });
}

void check_dropout_input(const at::Tensor& x, double p) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(),
              "dropout (CPU): expected a contiguous CPU tensor; got ", x.device());
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout: p (", p, ") must be in [0, 1)");
}

}  // namespace

at::Tensor dropout_apply_cpu(const at::Tensor& x, uint64_t seed, double p, uint32_t stream) {
  check_dropout_input(x, p);
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply", [&] {
    apply<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.numel(), seed, stream,
                    static_cast<float>(p), block_path(best_isa()));
  });
  return out;
}

void dropout_apply_cpu_(at::Tensor& x, uint64_t seed, double p, uint32_t stream) {
  check_dropout_input(x, p);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_", [&] {
    scalar_t* data = x.mutable_data_ptr<scalar_t>();
    apply<scalar_t>(data, data, x.numel(), seed, stream, static_cast<float>(p), block_path(best_isa()));
  });
}

at::Tensor dropout_apply_pair_cpu(const at::Tensor& x, at::Tensor& grad, uint64_t seed, double p, uint32_t stream) {
  check_dropout_input(x, p);
  check_dropout_input(grad, p);
  TORCH_CHECK(x.sizes() == grad.sizes() && x.scalar_type() == grad.scalar_type(),
              "dropout_apply_pair: x ", x.sizes(), " and grad ", grad.sizes(), " must match");
  at::Tensor out = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_pair", [&] {
    apply_pair<scalar_t>(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                         grad.mutable_data_ptr<scalar_t>(), x.numel(), seed, stream, static_cast<float>(p),
                         block_path(best_isa()));
  });
  return out;
}

at::Tensor dropout_mask_values_cpu(uint64_t seed, int64_t rows, int64_t cols, double p, uint32_t stream) {
  return dropout_mask_values_cpu(seed, rows, cols, p, best_isa(), stream);
}

at::Tensor dropout_mask_values_cpu(uint64_t seed, int64_t rows, int64_t cols, double p,
                                   DropoutIsa isa, uint32_t stream) {
  at::Tensor mask = at::empty({rows, cols}, at::TensorOptions().dtype(at::kFloat));
  float* out = mask.data_ptr<float>();
  for_each_block(block_path(isa), rows * cols, seed, stream, static_cast<float>(p),
                 [&](int64_t start, int64_t count, const float* m) {
                   std::copy(m, m + count, out + start);
                 });
  return mask;
}

namespace {
void check_rows(const at::Tensor& x, const at::Tensor& rows, double p) {
  check_dropout_input(x, p);
  TORCH_CHECK(x.dim() == 2 && rows.dim() == 1 && rows.scalar_type() == at::kLong && rows.is_contiguous() &&
                  rows.device().is_cpu(),
              "dropout rows (CPU): expected x [rows, cols] and contiguous int64 CPU row indices");
}
}  // namespace

at::Tensor dropout_apply_rows_cpu(const at::Tensor& x, const at::Tensor& rows, uint64_t seed, double p,
                                  uint32_t stream) {
  check_rows(x, rows, p);
  const int64_t n = rows.numel(), cols = x.size(1);
  at::Tensor out = at::empty({n, cols}, x.options());
  const int64_t* idx = rows.const_data_ptr<int64_t>();
  const BlockPath path = block_path(best_isa());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_apply_rows", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_row_block(path, idx, n, cols, seed, stream, static_cast<float>(p),
                       [&](int64_t r, int64_t col0, int64_t count, const float* m) {
                         apply_span(src + idx[r] * cols + col0, dst + r * cols + col0, count, m, path);
                       });
  });
  return out;
}

at::Tensor dropout_apply_rows_pair_cpu(const at::Tensor& x, const at::Tensor& rows, at::Tensor& grad,
                                       uint64_t seed, double p, uint32_t stream) {
  check_rows(x, rows, p);
  check_dropout_input(grad, p);
  const int64_t n = rows.numel(), cols = x.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == n && grad.size(1) == cols && grad.scalar_type() == x.scalar_type(),
              "dropout_apply_rows_pair: grad ", grad.sizes(), " must be [", n, ", ", cols, "] in x's dtype");
  at::Tensor out = at::empty({n, cols}, x.options());
  const int64_t* idx = rows.const_data_ptr<int64_t>();
  const BlockPath path = block_path(best_isa());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dropout_rows_pair", [&] {
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    scalar_t* g = grad.mutable_data_ptr<scalar_t>();
    for_each_row_block(path, idx, n, cols, seed, stream, static_cast<float>(p),
                       [&](int64_t r, int64_t col0, int64_t count, const float* m) {
                         apply_span(src + idx[r] * cols + col0, dst + r * cols + col0, count, m, path);
                         apply_span(g + r * cols + col0, g + r * cols + col0, count, m, path);
                       });
  });
  return out;
}

std::vector<DropoutIsa> dropout_isas() {
  std::vector<DropoutIsa> isas{DropoutIsa::kScalar};
#ifdef MOLA_HAVE_X86_PATHS
  if (__builtin_cpu_supports("avx2")) isas.push_back(DropoutIsa::kAvx2);
  if (__builtin_cpu_supports("avx512f")) isas.push_back(DropoutIsa::kAvx512);
#endif
  return isas;
}

}  // namespace mola::detail
