// The GradPower transform phi_p(g) = sign(g) * (|g| + eps)^p, written once
// against the SIMD vocabulary of simd.h (AVX-512, AVX2 and scalar run the same
// algorithm).
//
// x^p = 2^y with y = p * log2(x), all in fp32 lanes, with 8-entry tables (one
// register permute per lookup) and short polynomials:
//   x = 2^e * m, m in [1, 2); i = m's top 3 mantissa bits; c_i ~ 1/m mid-interval:
//   log2 m = L_i + log2(1 + r), L_i = -log2(c_i), r = m * c_i - 1 in [-0.059, 0.059]
//   (one fma), log2(1 + r) = r * Q(r);
//   y8 = 8y = 8p * e + 8p * log2 m, with 8p * e as hi * e (exact: hi has 16
//   significant bits) + lo * e, so the large integer part of y never rounds away
//   the fraction; n8 = round(y8), f = (y8 - n8) / 8 in [-1/16, 1/16];
//   2^y = 2^floor(n8 / 8) * T_j * 2^f with T_j = 2^(j / 8), j = n8 mod 8, and
//   2^f = 1 + f * R(f); the final scaling rounds once (overflow -> +Inf,
//   gradual underflow into subnormals).
// Q (degree 3) and R (degree 2) are fp32 fits with max errors of 2.3e-8 (abs) and
// 4.1e-8 (rel); the tables and fits are printed by fit_polynomials.py beside this
// file. The bound, checked by tests/test_native_adam_power.py against a float64
// reference over the whole fp32 range: 2.5e-7 relative for p <= 2, 1e-6 for
// p <= 8 (the error of y grows with p; measured 1.8e-7 at p = 1.2, 1.9e-7 at 2,
// 4.8e-7 at 8), plus half a subnormal ulp where the result is subnormal.
//
// AVX2 has no single-instruction frexp/ldexp: vectors whose lanes are all zero or
// have x and x^p normal (with margin) take a fast path of plain bit operations;
// others (subnormal, Inf, NaN, or results out of the normal range) the full one.
#pragma once

#include "simd.h"

namespace gradpower {
namespace {

constexpr float kLog2C[8] = {9.411764741e-01f, 8.421052694e-01f, 7.619047761e-01f, 6.956521869e-01f,
                             6.399999857e-01f, 5.925925970e-01f, 5.517241359e-01f, 5.161290169e-01f};
constexpr float kLog2L[8] = {8.746283501e-02f, 2.479275018e-01f, 3.923173845e-01f, 5.235619545e-01f,
                             6.438562274e-01f, 7.548874617e-01f, 8.579810262e-01f, 9.541963339e-01f};
// log2(1 + r) ~= r * Q(r) for |r| <= 0.0588.
constexpr float kLog2Q[4] = {1.442694664e+00f, -7.213466167e-01f, 4.818990827e-01f, -3.617165983e-01f};
constexpr float kExp2T[8] = {1.000000000e+00f, 1.090507746e+00f, 1.189207077e+00f, 1.296839595e+00f,
                             1.414213538e+00f, 1.542210817e+00f, 1.681792855e+00f, 1.834008098e+00f};
// 2^f ~= 1 + f * R(f) for |f| <= 0.0635.
constexpr float kExp2R[3] = {6.931471825e-01f, 2.402555943e-01f, 5.550948530e-02f};
// The same in f8 = 8f: 2^f = 1 + f8 * R8(f8), R8_k = R_k / 8^(k + 1) (exact).
constexpr float kExp2R8[3] = {kExp2R[0] / 8, kExp2R[1] / 64, kExp2R[2] / 512};

template <class V, int N>
GP_INLINE typename V::F horner(const float (&c)[N], typename V::F x) {
  typename V::F r = V::set1(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) r = V::fma(r, x, V::set1(c[i]));
  return r;
}

// The exponent, scaled by 8 (the exp2 table's step): p8 = 8p rounded to fp32, and
// 8p as p8_hi + p8_lo with p8_hi on 16 significant bits, so p8_hi * e is exact in
// fp32 for every exponent |e| < 256. normal_lo and normal_hi bound (as fp32 bit
// patterns) the x for which the normal-range fast path holds: x normal and
// p * log2(x) in [-124, 126], so x^p is normal with margin.
struct Exponent {
  float p8, p8_hi, p8_lo;
  int32_t normal_lo, normal_hi;
  explicit Exponent(double p)
      : p8(float(8.0 * p)), p8_hi(split16(8.0 * p)), p8_lo(float(8.0 * p - double(p8_hi))),
        normal_lo(bits_up(__builtin_fmax(0x1p-126, __builtin_exp2(-124.0 / p)))),
        normal_hi(bits_down(__builtin_fmin(double(__FLT_MAX__), __builtin_exp2(126.0 / p)))) {}
  static float split16(double x) {  // x rounded to 16 significant bits
    int exp2;
    __builtin_frexp(x, &exp2);
    const double unit = __builtin_ldexp(1.0, exp2 - 16);
    return float(__builtin_nearbyint(x / unit) * unit);
  }
  static int32_t bits_up(double x) {  // the bits of the least float >= x > 0
    const float f = float(x);
    return __builtin_bit_cast(int32_t, double(f) < x ? __builtin_nextafterf(f, __builtin_inff()) : f);
  }
  static int32_t bits_down(double x) {  // the bits of the greatest float <= x
    const float f = float(x);
    return __builtin_bit_cast(int32_t, double(f) > x ? __builtin_nextafterf(f, 0.0f) : f);
  }
};

// x^p lane-wise for finite x > 0 (subnormals included) and p > 0; zero, Inf and
// NaN give junk and are handled by the caller. kNormal: only for x in the
// exponent's normal range (V::frexp_normal / V::ldexp_eighths_normal).
template <class V, bool kNormal>
GP_INLINE typename V::F pow_positive(typename V::F x, const Exponent& power) {
  using F = typename V::F;
  F e, m;
  if constexpr (kNormal) V::frexp_normal(x, e, m);
  else V::frexp(x, e, m);
  const typename V::I i = V::template srl_i<20>(V::as_int(m));  // low 3 bits: m's top mantissa bits
  const F r = V::fma(m, V::lookup8(kLog2C, i), V::set1(-1.0f));
  const F log2m = V::fma(r, horner<V>(kLog2Q, r), V::lookup8(kLog2L, i));
  // In units of 1/8 (powers of two: exact): y8 = 8y, n8 = round(y8), f8 = y8 - n8 = 8f.
  const F p8 = V::set1(power.p8);
  const F y8_int = V::mul(V::set1(power.p8_hi), e);  // exact
  const F n8 = V::round(V::fma(p8, log2m, y8_int));
  const F f8 = V::fma(p8, log2m, V::fma(V::set1(power.p8_lo), e, V::sub(y8_int, n8)));
  const F t = V::lookup8(kExp2T, V::to_int(n8));
  const F scaled = V::fma(V::mul(t, f8), horner<V>(kExp2R8, f8), t);  // t * 2^f
  if constexpr (kNormal) return V::ldexp_eighths_normal(scaled, n8);
  else return V::ldexp_eighths(scaled, n8);
}

// phi_p(g) = sign(g) * (|g| + eps)^p lane-wise: phi(0) = 0, NaN stays NaN, +-Inf stay +-Inf.
// kEps: eps != 0 (the authors' variant); without it p = 1 is the identity.
template <class V, bool kPow, bool kEps>
GP_INLINE typename V::F grad_power(typename V::F g, const Exponent& p, typename V::F eps) {
  if constexpr (!kPow && !kEps) return g;
  const typename V::F a = kEps ? V::add(V::abs(g), eps) : V::abs(g);
  if constexpr (kPow && V::kNormalFastPath) {
    // Every lane zero or in the normal range (Inf, NaN and, under DAZ, subnormal g take the full path):
    // zero lanes (g == 0) give +0.
    if (V::zero_or_within(a, p.normal_lo, p.normal_hi))
      return V::and_not(V::eq(g, V::set1(0.0f)), V::copysign(pow_positive<V, true>(a, p), g));
  }
  const typename V::F mag = kPow ? pow_positive<V, false>(a, p) : a;
  // Lanes with g = +-0, +-Inf or NaN keep g (phi(0) = 0 even with eps), as g + 0: under DAZ (flush-denormal
  // mode) a subnormal g compares equal to 0 and must give 0, as torch's own arithmetic does there, not g.
  const typename V::M special = kEps ? V::mask_or(V::eq(g, V::set1(0.0f)), V::zero_or_not_finite(a))
                                     : V::zero_or_not_finite(a);
  return V::select(special, V::add(g, V::set1(0.0f)), V::copysign(mag, g));
}

}  // namespace
}  // namespace gradpower
