// The GradPower transform phi_p(g) = sign(g) * (|g| + eps)^p, written once
// against the SIMD vocabulary of simd.h (AVX-512, AVX2 and scalar run the same
// algorithm).
//
// x^p = 2^y with y = p * log2(x), all in fp32 lanes:
//   x = 2^e * m with m in [3/4, 3/2);  log2 m = t * Q(t), t = m - 1
//   p * e is kept exactly (two_prod, p itself as a float pair) so the large
//   integer part of y never rounds away the fraction; y = k + f with k = round(y), f in [-1/2, 1/2]
//   2^f = 1 + f * R(f); the result is 2^f scaled by 2^k with one rounding
//   (overflow -> +Inf, gradual underflow into subnormals).
// Q (degree 8) and R (degree 5) are fp32 Chebyshev fits with max errors of
// 1.9e-8 (abs) and 8.7e-9 (rel), printed by fit_polynomials.py beside this file.
// tests/test_native_kernel.py checks the result against a float64 reference
// over the whole fp32 range to 2e-7 relative.
#pragma once

#include "simd.h"

namespace gradpower {
namespace {

// log2(1 + t) ~= t * Q(t) for t in [-1/4, 1/2].
constexpr float kLog2Q[9] = {1.442695022e+00f,  -7.213484645e-01f, 4.809022248e-01f,
                             -3.605765700e-01f, 2.881863117e-01f,  -2.427019030e-01f,
                             2.163585573e-01f,  -1.744437814e-01f, 7.827980071e-02f};
// 2^f ~= 1 + f * R(f) for f in [-1/2, 1/2].
constexpr float kExp2R[6] = {6.931471825e-01f, 2.402265072e-01f, 5.550356954e-02f,
                             9.618056938e-03f, 1.339086681e-03f, 1.546144777e-04f};

template <class V, int N>
GP_INLINE typename V::F horner(const float (&c)[N], typename V::F x) {
  typename V::F r = V::set1(c[N - 1]);
  for (int i = N - 2; i >= 0; --i) r = V::fma(r, x, V::set1(c[i]));
  return r;
}

// The exponent as an unevaluated sum hi + lo of two floats, so that p * e keeps
// the precision of a double p (torch's pow uses the exact Python float).
struct Exponent {
  float hi, lo;
  explicit Exponent(double p) : hi(float(p)), lo(float(p - double(float(p)))) {}
};

// x^p lane-wise for finite x > 0 (subnormals included) and p > 0; zero, Inf and
// NaN give junk and are handled by the caller.
template <class V>
GP_INLINE typename V::F pow_positive(typename V::F x, Exponent power) {
  using F = typename V::F;
  const F p = V::set1(power.hi);
  F e, m;
  V::frexp(x, e, m);
  const F t = V::sub(m, V::set1(1.0f));       // exact
  const F tq = V::mul(t, horner<V>(kLog2Q, t));  // log2(m), |tq| <= 1/2
  F pe_hi, pe_lo;
  V::two_prod(p, e, pe_hi, pe_lo);  // p.hi * e == pe_hi + pe_lo exactly
  pe_lo = V::fma(V::set1(power.lo), e, pe_lo);
  const F k = V::round(V::fma(p, tq, pe_hi));
  const F f = V::fma(p, tq, V::add(V::sub(pe_hi, k), pe_lo));  // y - k, in [-1/2, 1/2]
  const F r = V::fma(f, horner<V>(kExp2R, f), V::set1(1.0f));
  return V::ldexp(r, k);
}

// phi_p(g) = sign(g) * (|g| + eps)^p lane-wise: phi(0) = 0, NaN stays NaN, +-Inf stay +-Inf.
// kEps: eps != 0 (the authors' variant); without it p = 1 is the identity.
template <class V, bool kPow, bool kEps>
GP_INLINE typename V::F grad_power(typename V::F g, Exponent p, typename V::F eps) {
  if constexpr (!kPow && !kEps) return g;
  const typename V::F a = kEps ? V::add(V::abs(g), eps) : V::abs(g);
  const typename V::F mag = kPow ? pow_positive<V>(a, p) : a;
  // Lanes with g = +-0, +-Inf or NaN keep g (phi(0) = 0 even with eps), as g + 0: under DAZ (flush-denormal
  // mode) a subnormal g compares equal to 0 and must give 0, as torch's own arithmetic does there, not g.
  const typename V::M special = kEps ? V::mask_or(V::eq(g, V::set1(0.0f)), V::zero_or_not_finite(a))
                                     : V::zero_or_not_finite(a);
  return V::select(special, V::add(g, V::set1(0.0f)), V::copysign(mag, g));
}

}  // namespace
}  // namespace gradpower
