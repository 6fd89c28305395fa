// The GradPower transform phi_p(g) = sign(g) * (|g| + eps)^p, written once
// against the SIMD vocabulary of simd.h (AVX-512, AVX2 and scalar run the same
// algorithm).
//
// x^p = 2^y with y = p * log2(x), all in fp32 lanes:
//   x = 2^e * m, m folded into [sqrt(1/2), sqrt(2));  log2 m = t * Q(t), t = m - 1
//   p * e is kept exactly (two_prod, p itself as a float pair) so the large
//   integer part of y never rounds away the fraction; y = k + f with k = round(y), f in [-1/2, 1/2]
//   2^f = 1 + f * R(f); the result is 2^f scaled by 2^k with one rounding
//   (overflow -> +Inf, gradual underflow into subnormals).
// Q (degree 8) and R (degree 5) are fp32 Chebyshev fits with max errors of
// 2.1e-8 (abs) and 8.7e-9 (rel). Measured error against a float64 reference
// over the whole fp32 range: < 1.5e-7 relative (tests/test_native_kernel.py).
#pragma once

#include "simd.h"

namespace gradpower {
namespace {

// log2(1 + t) ~= t * Q(t) for t in [-0.2929, 0.4143].
constexpr float kLog2Q[9] = {1.4426950216293335f,   -0.7213473320007324f,  0.48091062903404236f,
                             -0.36070477962493896f, 0.2879178524017334f,   -0.23892173171043396f,
                             0.2156766653060913f,   -0.207412451505661f,   0.12611600756645203f};
// 2^f ~= 1 + f * R(f) for f in [-1/2, 1/2].
constexpr float kExp2R[6] = {0.6931471824645996f,   0.24022650718688965f,
                             0.055503569543361664f, 0.009618056938052177f,
                             0.0013390866806730628f, 0.00015461447765119374f};

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

// x^p lane-wise for x > 0 (including subnormals, +Inf and NaN) and p > 0; x == 0
// is left to the caller (grad_power maps g == 0 to 0 anyway).
template <class V>
GP_INLINE typename V::F pow_nonneg(typename V::F x, Exponent power) {
  const typename V::F p = V::set1(power.hi);
  using F = typename V::F;
  F e, m;
  V::frexp(x, e, m);
  const typename V::M big = V::gt(m, V::set1(1.41421356f));
  m = V::select(big, V::mul(m, V::set1(0.5f)), m);
  e = V::select(big, V::add(e, V::set1(1.0f)), e);

  const F t = V::sub(m, V::set1(1.0f));       // exact
  const F tq = V::mul(t, horner<V>(kLog2Q, t));  // log2(m), |tq| <= 1/2
  F pe_hi, pe_lo;
  V::two_prod(p, e, pe_hi, pe_lo);  // p.hi * e == pe_hi + pe_lo exactly
  pe_lo = V::fma(V::set1(power.lo), e, pe_lo);
  const F k = V::round(V::fma(p, tq, pe_hi));
  const F f = V::fma(p, tq, V::add(V::sub(pe_hi, k), pe_lo));  // y - k, in [-1/2, 1/2]
  const F r = V::fma(f, horner<V>(kExp2R, f), V::set1(1.0f));
  return V::select(V::not_finite(x), x, V::ldexp(r, k));  // NaN and +Inf pass through
}

// phi_p(g) = sign(g) * (|g| + eps)^p lane-wise: phi(0) = 0, NaN stays NaN, +-Inf stay +-Inf.
template <class V, bool kPow>
GP_INLINE typename V::F grad_power(typename V::F g, Exponent p, typename V::F eps) {
  using F = typename V::F;
  const typename V::I sign_mask = V::set1_i(int32_t(0x80000000u));
  const F a = V::add(V::as_float(V::and_i(V::as_int(g), V::set1_i(0x7fffffff))), eps);
  const F mag = kPow ? pow_nonneg<V>(a, p) : a;
  const F signed_mag = V::as_float(V::or_i(V::as_int(mag), V::and_i(V::as_int(g), sign_mask)));
  return V::select(V::eq(g, V::set1(0.0f)), V::set1(0.0f), signed_mag);
}

}  // namespace
}  // namespace gradpower
