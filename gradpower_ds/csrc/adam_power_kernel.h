// One fused pass of AdamPower over a contiguous fp32 chunk, written once
// against simd.h:
//   g = phi_p(grad * grad_scale); [Adam: g += wd * w]; [AdamW: w *= 1 - lr * wd]
//   m = m + (1 - beta1) * (g - m); v = beta2 * v + (1 - beta2) * g * g
//   w -= step_size * m / (sqrt(v) / sqrt(bias_correction2) + eps)
// optionally also writing the new w as bf16 or fp16 into a second buffer (the
// low-precision model copy that ZeRO-Offload keeps), so no extra pass over
// memory is needed. The operation order follows torch.optim.AdamW.
#pragma once

#include <cstdint>

#include "fast_power.h"

namespace gradpower {

// How param and grad are stored: fp32, or (as DeepSpeedCPUAdam takes them) both bf16 or both fp16,
// updated in fp32 registers with fp32 moments and rounded back in place.
enum class Dtype : int { kFP32 = 0, kBF16 = 1, kFP16 = 2 };
// The low-precision copy of an fp32 param's new weights, if any (codes as Dtype's).
enum class CopyOut : int { kNone = 0, kBF16 = 1, kFP16 = 2 };

struct AdamPowerArgs {
  void* param;       // n elements of the param dtype
  const void* grad;  // n elements of the param dtype
  float* exp_avg;
  float* exp_avg_sq;
  void* copy_out;  // bf16/fp16 destination or nullptr
  int64_t n;
  // Per-step scalars, computed once in double precision by the caller.
  float one_minus_beta1, beta2, one_minus_beta2, eps;
  float l2;                   // Adam (L2) weight decay added to the powered grad; 0 for AdamW
  float decay;                // AdamW multiplicative decay 1 - lr * wd; 1 for Adam
  float step_size;            // lr / bias_correction1
  float inv_bias_corr2_sqrt;  // 1 / sqrt(bias_correction2)
  float power_eps;
  double power;
  // The grads' multiplier (a wrapper's unscale/clip coefficient, folded into this pass); 1 leaves them as they are.
  float grad_scale;
};

namespace {

// Round-to-nearest-even fp32 -> bf16 bits in the low half of each int32 lane.
template <class V>
GP_INLINE typename V::I to_bf16_bits(typename V::F x) {
  const typename V::I b = V::as_int(x);
  const typename V::I lsb = V::and_i(V::template srl_i<16>(b), V::set1_i(1));
  const typename V::I rounded =
      V::template srl_i<16>(V::add_i(b, V::add_i(lsb, V::set1_i(0x7fff))));
  const typename V::I quiet_nan = V::or_i(V::template srl_i<16>(b), V::set1_i(0x40));
  return V::as_int(V::select(V::is_nan(x), V::as_float(quiet_nan), V::as_float(rounded)));
}

// Software prefetch of the four input streams, kPrefetchAhead elements (2 KB)
// ahead. The hardware prefetchers alone leave the loads exposed once the power
// adds compute to the loop; with this the fused step runs at memory speed.
// (Prefetches never fault, so running past the end of a buffer is harmless.)
constexpr int64_t kPrefetchAhead = 512;
constexpr int64_t kLine = 16;  // fp32 elements per 64-byte cache line

// Elements of `bytes` bytes each.
GP_INLINE void prefetch_streams(const AdamPowerArgs& a, int64_t i, int bytes) {
  __builtin_prefetch(static_cast<const char*>(a.param) + (i + kPrefetchAhead) * bytes, 1, 3);
  __builtin_prefetch(static_cast<const char*>(a.grad) + (i + kPrefetchAhead) * bytes, 0, 3);
  __builtin_prefetch(a.exp_avg + i + kPrefetchAhead, 1, 3);
  __builtin_prefetch(a.exp_avg_sq + i + kPrefetchAhead, 1, 3);
}

// W lanes of element i of a buffer stored as kD, widened to fp32 (exactly), and back (rounded to nearest even).
template <class V, Dtype kD>
GP_INLINE typename V::F load_fp32(const void* base, int64_t i) {
  if constexpr (kD == Dtype::kFP32) return V::load(static_cast<const float*>(base) + i);
  else if constexpr (kD == Dtype::kBF16) return V::load_bf16(static_cast<const uint16_t*>(base) + i);
  else return V::load_fp16(static_cast<const Half*>(base) + i);
}

template <class V, Dtype kD>
GP_INLINE void store_fp32(void* base, int64_t i, typename V::F x) {
  if constexpr (kD == Dtype::kFP32) V::store(static_cast<float*>(base) + i, x);
  else if constexpr (kD == Dtype::kBF16) V::store_u16(static_cast<uint16_t*>(base) + i, to_bf16_bits<V>(x));
  else V::store_fp16(static_cast<Half*>(base) + i, x);
}

// The step's scalars broadcast once per chunk (so the hot loop reloads nothing).
template <class V>
struct Broadcast {
  typename V::F one_minus_beta1, beta2, one_minus_beta2, eps, l2, decay, neg_step_size, inv_bias_corr2_sqrt, power_eps,
      grad_scale;
  Exponent power;
  GP_INLINE explicit Broadcast(const AdamPowerArgs& a)
      : one_minus_beta1(V::set1(a.one_minus_beta1)), beta2(V::set1(a.beta2)),
        one_minus_beta2(V::set1(a.one_minus_beta2)), eps(V::set1(a.eps)), l2(V::set1(a.l2)),
        decay(V::set1(a.decay)), neg_step_size(V::set1(-a.step_size)),
        inv_bias_corr2_sqrt(V::set1(a.inv_bias_corr2_sqrt)), power_eps(V::set1(a.power_eps)),
        grad_scale(V::set1(a.grad_scale)), power(a.power) {}
};

// W lanes of the gradient at element i, widened to fp32 and multiplied by grad_scale (x * 1 is x, bit for bit).
template <class V, Dtype kD>
GP_INLINE typename V::F load_grad(const Broadcast<V>& c, const void* g, int64_t i) {
  return V::mul(load_fp32<V, kD>(g, i), c.grad_scale);
}

// Updates W lanes of element i (param stored as kParam, the copy-out as kCopy) with the powered gradient pg.
template <class V, Dtype kParam, CopyOut kCopy>
GP_INLINE void adam_lanes(const Broadcast<V>& c, void* __restrict w, typename V::F pg, float* __restrict m,
                          float* __restrict v, void* __restrict out, int64_t i) {
  using F = typename V::F;
  const F w0 = load_fp32<V, kParam>(w, i), m0 = V::load(m + i), v0 = V::load(v + i);
  const F g = V::fma(c.l2, w0, pg);
  const F m1 = V::fma(c.one_minus_beta1, V::sub(g, m0), m0);
  const F v1 = V::add(V::mul(c.beta2, v0), V::mul(V::mul(c.one_minus_beta2, g), g));
  const F denom = V::add(V::mul(V::sqrt(v1), c.inv_bias_corr2_sqrt), c.eps);
  const F w1 = V::add(V::mul(w0, c.decay), V::div(V::mul(c.neg_step_size, m1), denom));
  V::store(m + i, m1);
  V::store(v + i, v1);
  store_fp32<V, kParam>(w, i, w1);
  if constexpr (kCopy != CopyOut::kNone) store_fp32<V, static_cast<Dtype>(kCopy)>(out, i, w1);
}

// Elements [begin, end) in blocks of kBlock: phi over the block's gradient into
// an L1-resident buffer, then Adam over the block reading it. Two short
// dependency chains per vector instead of one long one keep the out-of-order
// core fed (the fused chain, phi then sqrt and div, is ~150 cycles deep).
// The tail: full vectors with V, the remainder with Scalar.
constexpr int64_t kBlock = 256;

template <class V, bool kPow, bool kEps, Dtype kParam, CopyOut kCopy>
GP_INLINE void adam_power_chunk(const AdamPowerArgs& a, int64_t begin, int64_t end) {
  static_assert(kParam == Dtype::kFP32 || kCopy == CopyOut::kNone, "a 16-bit param is its own copy");
  void* __restrict w = a.param;
  const void* __restrict g = a.grad;
  float* __restrict m = a.exp_avg;
  float* __restrict v = a.exp_avg_sq;
  void* __restrict out = a.copy_out;
  constexpr int kBytes = kParam == Dtype::kFP32 ? 4 : 2;
  const Broadcast<V> vec(a);
  const Broadcast<Scalar> one(a);
  // Without power or power_eps phi is the identity: Adam reads the gradient itself.
  constexpr bool kIdentity = !kPow && !kEps;
  alignas(64) float powered[kBlock];
  int64_t i = begin;
  for (; i + kBlock <= end; i += kBlock) {
    if constexpr (!kIdentity)
      for (int64_t j = 0; j < kBlock; j += V::W)
        V::store(powered + j,
                 grad_power<V, kPow, kEps>(load_grad<V, kParam>(vec, g, i + j), vec.power, vec.power_eps));
    for (int64_t j = 0; j < kBlock; j += kLine) {  // one prefetch per cache line of each fp32 stream
      prefetch_streams(a, i + j, kBytes);
      for (int64_t k = j; k < j + kLine; k += V::W)
        adam_lanes<V, kParam, kCopy>(vec, w,
                                     kIdentity ? load_grad<V, kParam>(vec, g, i + k) : V::load(powered + k),
                                     m, v, out, i + k);
    }
  }
  for (; i + V::W <= end; i += V::W)
    adam_lanes<V, kParam, kCopy>(
        vec, w, grad_power<V, kPow, kEps>(load_grad<V, kParam>(vec, g, i), vec.power, vec.power_eps), m, v, out, i);
  for (; i < end; ++i)
    adam_lanes<Scalar, kParam, kCopy>(
        one, w, grad_power<Scalar, kPow, kEps>(load_grad<Scalar, kParam>(one, g, i), one.power, one.power_eps),
        m, v, out, i);
}

// The optimizer's memory traffic with no arithmetic to speak of (read w, g, m,
// v; write w, m, v: 28 bytes/element), prefetched the same way: the bandwidth
// roofline for benchmarks.
template <class V>
GP_INLINE void stream_probe_lanes(const AdamPowerArgs& a, int64_t i) {
  const float* grad = static_cast<const float*>(a.grad);
  float* param = static_cast<float*>(a.param);
  const typename V::F g = V::load(grad + i);
  const typename V::F m = V::add(V::load(a.exp_avg + i), g);
  const typename V::F v = V::add(V::load(a.exp_avg_sq + i), g);
  V::store(a.exp_avg + i, m);
  V::store(a.exp_avg_sq + i, v);
  V::store(param + i, V::add(V::load(param + i), v));
}

template <class V>
GP_INLINE void stream_probe_chunk(const AdamPowerArgs& a, int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + kLine <= end; i += kLine) {
    prefetch_streams(a, i, 4);
    for (int64_t j = i; j < i + kLine; j += V::W) stream_probe_lanes<V>(a, j);
  }
  for (; i + V::W <= end; i += V::W) stream_probe_lanes<V>(a, i);
  for (; i < end; ++i) stream_probe_lanes<Scalar>(a, i);
}

template <class V, bool kPow, bool kEps>
GP_INLINE void grad_power_chunk(const float* in, float* out, int64_t begin, int64_t end, double p,
                                float eps) {
  int64_t i = begin;
  const Exponent power(p);
  const typename V::F eps_v = V::set1(eps);
  for (; i + V::W <= end; i += V::W) V::store(out + i, grad_power<V, kPow, kEps>(V::load(in + i), power, eps_v));
  for (; i < end; ++i) out[i] = grad_power<Scalar, kPow, kEps>(in[i], power, eps);
}

}  // namespace
}  // namespace gradpower
