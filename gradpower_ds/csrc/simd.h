// A minimal SIMD vocabulary with three implementations: AVX-512, AVX2 (+FMA,
// F16C) and scalar. The kernels are written once against this vocabulary
// (templates over `V`), so every instruction set runs the same algorithm.
//
// Each struct's functions carry the matching `target` attribute; kernels are
// instantiated inside functions with the same attribute (native_adam_power.cpp),
// so the library as a whole is compiled for baseline x86-64 and the wide code
// only runs after a run-time CPU check. The x86 structs exist only where the
// target is x86 (GP_X86); elsewhere (aarch64: GH200/GB200 hosts) the scalar
// one alone is built.
//
// Vocabulary: F = W fp32 lanes, I = W int32 lanes, M = W-lane mask.
#pragma once

#if defined(__x86_64__) || defined(__i386__)
#define GP_X86 1
#include <immintrin.h>
#else
#define GP_X86 0
#endif

#include <cstdint>

// Kernels are plain inline templates; the per-ISA entry points are marked
// `flatten`, so the whole call tree is inlined into a function compiled for
// that ISA (always_inline would fail: a template has no target of its own).
#define GP_INLINE inline
#define GP_FLATTEN __attribute__((flatten))
#if GP_X86
#define GP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#define GP_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif

namespace gradpower {
namespace {

// IEEE binary16 storage: _Float16 on x86 (GCC >= 12), __fp16 on aarch64 (GCC's C++ has no _Float16 there yet).
#if GP_X86
using Half = _Float16;
#else
using Half = __fp16;
#endif

// frexp for normal x (or x = +0, which gives junk), from the bit pattern:
// x = 2^e * m with m in [1, 2).
template <class V>
GP_INLINE void frexp_normal_bits(typename V::F x, typename V::F& e, typename V::F& m) {
  const typename V::I bits = V::as_int(x);
  e = V::sub(V::to_float(V::template srl_i<23>(bits)), V::set1(127.0f));
  m = V::as_float(V::or_i(V::and_i(bits, V::set1_i(0x007fffff)), V::set1_i(0x3f800000)));
}

// frexp for instruction sets without getexp/getmant, subnormal x included (scaled by 2^24 first).
template <class V>
GP_INLINE void frexp_bits(typename V::F x, typename V::F& e, typename V::F& m) {
  const typename V::M tiny = V::lt(x, V::set1(0x1p-126f));
  frexp_normal_bits<V>(V::select(tiny, V::mul(x, V::set1(0x1p24f)), x), e, m);
  e = V::sub(e, V::select(tiny, V::set1(24.0f), V::set1(0.0f)));
}

#if GP_X86
struct Avx512 {
  static constexpr int W = 16;
  // frexp and ldexp_eighths cover the whole range in one instruction each: no normal-range fast path.
  static constexpr bool kNormalFastPath = false;
  using F = __m512; using I = __m512i; using M = __mmask16;
#define GP_FN GP_TARGET_AVX512 GP_INLINE static
  GP_FN F load(const float* p) { return _mm512_loadu_ps(p); }
  GP_FN void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  GP_FN F set1(float x) { return _mm512_set1_ps(x); }
  GP_FN F add(F a, F b) { return _mm512_add_ps(a, b); }
  GP_FN F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  GP_FN F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  GP_FN F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  GP_FN F div(F a, F b) { return _mm512_div_ps(a, b); }
  GP_FN F sqrt(F a) { return _mm512_sqrt_ps(a); }
  GP_FN M lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  GP_FN M eq(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  GP_FN M is_nan(F a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  GP_FN M not_lt(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_NLT_UQ); }
  GP_FN M mask_or(M a, M b) { return a | b; }
  GP_FN M zero_or_not_finite(F a) {  // +-0, +-Inf or NaN, in one fpclass test
    return _mm512_fpclass_ps_mask(a, 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x80);
  }
  GP_FN F select(M m, F yes, F no) { return _mm512_mask_blend_ps(m, no, yes); }
  GP_FN I as_int(F x) { return _mm512_castps_si512(x); }
  GP_FN F as_float(I x) { return _mm512_castsi512_ps(x); }
  GP_FN I set1_i(int32_t x) { return _mm512_set1_epi32(x); }
  GP_FN I and_i(I a, I b) { return _mm512_and_si512(a, b); }
  GP_FN F abs(F a) { return _mm512_abs_ps(a); }
  GP_FN F copysign(F mag, F sign) {  // mag >= 0
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_castps_si512(mag), _mm512_castps_si512(sign),
                                                          _mm512_set1_epi32(int32_t(0x80000000u)), 0xf8));
  }
  GP_FN I or_i(I a, I b) { return _mm512_or_si512(a, b); }
  GP_FN I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  template <int N> GP_FN I srl_i(I a) { return _mm512_srli_epi32(a, N); }
  GP_FN F to_float(I a) { return _mm512_cvtepi32_ps(a); }
  GP_FN F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  GP_FN I to_int(F a) { return _mm512_cvtps_epi32(a); }  // out of int32 range: INT32_MIN
  // x = 2^e * m with m in [1, 2), e integer valued (subnormal x handled); 0/Inf/NaN give junk.
  GP_FN void frexp(F x, F& e, F& m) {
    m = _mm512_getmant_ps(x, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);
    e = _mm512_getexp_ps(x);
  }
  // table[i & 7] per lane: the 8 entries in both halves of one register, one permute.
  GP_FN F lookup8(const float (&table)[8], I i) {
    return _mm512_permutexvar_ps(i, _mm512_broadcast_f32x8(_mm256_loadu_ps(table)));
  }
  // r * 2^floor(n8 / 8) for integer-valued n8, one rounding (overflow -> Inf, gradual underflow).
  GP_FN F ldexp_eighths(F r, F n8) { return _mm512_scalef_ps(r, mul(n8, set1(0.125f))); }
  // Low-precision loads (exact) and stores of W lanes.
  GP_FN F load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  GP_FN F load_fp16(const Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  GP_FN void store_u16(uint16_t* p, I x) { _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(x)); }
  GP_FN void store_fp16(Half* p, F x) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
#undef GP_FN
};

struct Avx2 {
  static constexpr int W = 8;
  // Subnormal inputs and results cost AVX2 a dozen extra instructions per vector: vectors whose
  // lanes are all zero or normal with a normal result take the *_normal variants below.
  static constexpr bool kNormalFastPath = true;
  using F = __m256; using I = __m256i; using M = __m256;
#define GP_FN GP_TARGET_AVX2 GP_INLINE static
  GP_FN F load(const float* p) { return _mm256_loadu_ps(p); }
  GP_FN void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  GP_FN F set1(float x) { return _mm256_set1_ps(x); }
  GP_FN F add(F a, F b) { return _mm256_add_ps(a, b); }
  GP_FN F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  GP_FN F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  GP_FN F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  GP_FN F div(F a, F b) { return _mm256_div_ps(a, b); }
  GP_FN F sqrt(F a) { return _mm256_sqrt_ps(a); }
  GP_FN M lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  GP_FN M eq(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  GP_FN M is_nan(F a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  GP_FN M not_lt(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_NLT_UQ); }
  GP_FN M mask_or(M a, M b) { return _mm256_or_ps(a, b); }
  GP_FN M zero_or_not_finite(F a) {  // for a >= 0 or NaN: a == 0, +Inf or NaN
    return mask_or(eq(a, _mm256_setzero_ps()), not_lt(a, set1(__builtin_inff())));
  }
  GP_FN F select(M m, F yes, F no) { return _mm256_blendv_ps(no, yes, m); }
  GP_FN F and_not(M m, F x) { return _mm256_andnot_ps(m, x); }  // x, with the lanes in m zeroed
  GP_FN I as_int(F x) { return _mm256_castps_si256(x); }
  GP_FN F as_float(I x) { return _mm256_castsi256_ps(x); }
  GP_FN I set1_i(int32_t x) { return _mm256_set1_epi32(x); }
  GP_FN I and_i(I a, I b) { return _mm256_and_si256(a, b); }
  GP_FN F abs(F a) { return _mm256_and_ps(a, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }
  GP_FN F copysign(F mag, F sign) {  // mag >= 0
    return _mm256_or_ps(mag, _mm256_and_ps(sign, _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(0x80000000u)))));
  }
  GP_FN I or_i(I a, I b) { return _mm256_or_si256(a, b); }
  GP_FN I add_i(I a, I b) { return _mm256_add_epi32(a, b); }
  template <int N> GP_FN I srl_i(I a) { return _mm256_srli_epi32(a, N); }
  GP_FN F to_float(I a) { return _mm256_cvtepi32_ps(a); }
  GP_FN F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  GP_FN I to_int(F a) { return _mm256_cvtps_epi32(a); }  // out of int32 range: INT32_MIN
  GP_FN void frexp(F x, F& e, F& m) { frexp_bits<Avx2>(x, e, m); }
  GP_FN F lookup8(const float (&table)[8], I i) { return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), i); }
  // r * 2^k1 * 2^k2 with k = floor(n8 / 8) (n8 clamped to +-2016, where the result is 0 or
  // Inf anyway), k1 = floor(k / 2), k2 = k - k1: whenever the result is representable,
  // r * 2^k1 is a normal float (exact), so only the second product rounds.
  GP_FN F ldexp_eighths(F r, F n8) {
    const I k = _mm256_srai_epi32(to_int(_mm256_min_ps(_mm256_max_ps(n8, set1(-2016.0f)), set1(2016.0f))), 3);
    const I k1 = _mm256_srai_epi32(k, 1);
    return mul(mul(r, pow2(k1)), pow2(_mm256_sub_epi32(k, k1)));
  }
  // The normal-range fast path: x normal (or +0: junk); r * 2^floor(n8 / 8) normal, so the
  // scaling is an add to r's exponent field (k << 23, with k's low bits from n8 << 20).
  GP_FN void frexp_normal(F x, F& e, F& m) { frexp_normal_bits<Avx2>(x, e, m); }
  GP_FN F ldexp_eighths_normal(F r, F n8) {
    const I k = _mm256_and_si256(_mm256_slli_epi32(to_int(n8), 20), set1_i(int32_t(0xff800000u)));
    return as_float(_mm256_add_epi32(as_int(r), k));
  }
  // Whether every lane is +0 or has lo <= bits(a) <= hi (a >= 0, lo >= 1): bits(a) - 1 >= lo - 1
  // as unsigned (so +0, which wraps to the top, passes), compared signed after flipping the sign bit.
  GP_FN bool zero_or_within(F a, int32_t lo, int32_t hi) {
    const I u = as_int(a);
    const I below = _mm256_cmpgt_epi32(set1_i(int32_t(uint32_t(lo - 1) ^ 0x80000000u)),
                                       _mm256_add_epi32(u, set1_i(0x7fffffff)));
    const I outside = _mm256_or_si256(below, _mm256_cmpgt_epi32(u, set1_i(hi)));
    return _mm256_testz_si256(outside, outside);
  }
  GP_FN F pow2(I k) {  // 2^k for integer k in [-126, 127]
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  }
  GP_FN F load_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  GP_FN F load_fp16(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  GP_FN void store_u16(uint16_t* p, I x) {
    const __m128i lo = _mm256_castsi256_si128(x), hi = _mm256_extracti128_si256(x, 1);
    _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(lo, hi));  // lanes hold values < 2^16
  }
  GP_FN void store_fp16(Half* p, F x) {
    _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
#undef GP_FN
};
#endif  // GP_X86

struct Scalar {
  static constexpr int W = 1;
  static constexpr bool kNormalFastPath = false;
  using F = float; using I = uint32_t; using M = bool;
#define GP_FN GP_INLINE static
  GP_FN F load(const float* p) { return *p; }
  GP_FN void store(float* p, F x) { *p = x; }
  GP_FN F set1(float x) { return x; }
  GP_FN F add(F a, F b) { return a + b; }
  GP_FN F sub(F a, F b) { return a - b; }
  GP_FN F mul(F a, F b) { return a * b; }
  // a * b is exact in double, so this rounds like a fused multiply-add (bar a
  // rare double rounding) without needing FMA hardware.
  GP_FN F fma(F a, F b, F c) { return float(double(a) * double(b) + double(c)); }
  GP_FN F div(F a, F b) { return a / b; }
  GP_FN F sqrt(F a) { return __builtin_sqrtf(a); }
  GP_FN M lt(F a, F b) { return a < b; }
  GP_FN M eq(F a, F b) { return a == b; }
  GP_FN M is_nan(F a) { return a != a; }
  GP_FN M not_lt(F a, F b) { return !(a < b); }
  GP_FN M mask_or(M a, M b) { return a || b; }
  GP_FN M zero_or_not_finite(F a) { return a == 0.0f || !(__builtin_fabsf(a) < __builtin_inff()); }
  GP_FN F select(M m, F yes, F no) { return m ? yes : no; }
  GP_FN I as_int(F x) { return __builtin_bit_cast(I, x); }
  GP_FN F as_float(I x) { return __builtin_bit_cast(F, x); }
  GP_FN I set1_i(int32_t x) { return I(x); }
  GP_FN I and_i(I a, I b) { return a & b; }
  GP_FN F abs(F a) { return __builtin_fabsf(a); }
  GP_FN F copysign(F mag, F sign) { return __builtin_copysignf(mag, sign); }
  GP_FN I or_i(I a, I b) { return a | b; }
  GP_FN I add_i(I a, I b) { return a + b; }
  template <int N> GP_FN I srl_i(I a) { return a >> N; }
  GP_FN F to_float(I a) { return float(int32_t(a)); }
  GP_FN F round(F a) {  // nearest-even; |a| >= 2^22 is already integral (or Inf/NaN)
    const float shift = 0x1.8p23f;
    return __builtin_fabsf(a) < 0x1p22f ? (a + shift) - shift : a;
  }
  GP_FN I to_int(F a) {  // as the x86 conversion: out of int32 range (or NaN) gives INT32_MIN
    return (a > -0x1p31f && a < 0x1p31f) ? I(int32_t(a)) : I(0x80000000u);
  }
  GP_FN void frexp(F x, F& e, F& m) { frexp_bits<Scalar>(x, e, m); }
  GP_FN F lookup8(const float (&table)[8], I i) { return table[i & 7]; }
  GP_FN F ldexp_eighths(F r, F n8) {  // through double; k = floor(n8 / 8) clamped so 2^k stays a normal double
    n8 = n8 < -2400.0f ? -2400.0f : (n8 > 2400.0f ? 2400.0f : n8);
    const int32_t k = int32_t(n8) >> 3;
    const int64_t bits = int64_t(k + 1023) << 52;
    return float(double(r) * __builtin_bit_cast(double, bits));
  }
  GP_FN F load_bf16(const uint16_t* p) { return __builtin_bit_cast(float, uint32_t(*p) << 16); }
  GP_FN F load_fp16(const Half* p) { return static_cast<float>(*p); }
  GP_FN void store_u16(uint16_t* p, I x) { *p = uint16_t(x); }
  GP_FN void store_fp16(Half* p, F x) { *p = static_cast<Half>(x); }
#undef GP_FN
};

}  // namespace
}  // namespace gradpower
