// Native CPU AdamPower: OpenMP over tiles, SIMD width chosen at run time.
//
// The kernels in adam_power_kernel.h are written once against simd.h and
// instantiated three times below, inside wrappers compiled for AVX-512,
// AVX2+FMA+F16C and baseline x86-64. The library itself is built for baseline
// x86-64, so one build runs on any x86-64 CPU; `Isa::kAuto` picks the widest
// set the CPU (and OS) supports, and tests can force a narrower one. On other
// targets (aarch64) only the scalar instantiation exists (simd.h's GP_X86).
//
// Buffers arrive as raw addresses, by keyword only. Python's one caller,
// gradpower_ds/ops/native_adam_power.py, checks each tensor behind an address (CPU,
// dtype, contiguous, exactly n elements) before handing it over; this file
// trusts the addresses and checks only the codes and sizes it is given.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "adam_power_kernel.h"

namespace py = pybind11;

namespace gradpower {
namespace {

enum class Isa : int { kAuto = -1, kScalar = 0, kAVX2 = 1, kAVX512 = 2 };

constexpr int64_t kTile = 1 << 16;  // elements per OpenMP work item (~1.8 MB of traffic)

bool cpu_has(Isa isa) {
#if GP_X86
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAVX512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             cpu_has(Isa::kAVX2);
    case Isa::kAVX2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default:
      return true;
  }
#else
  return isa == Isa::kScalar;  // not x86: the scalar path only
#endif
}

Isa best_isa() {
  if (cpu_has(Isa::kAVX512)) return Isa::kAVX512;
  if (cpu_has(Isa::kAVX2)) return Isa::kAVX2;
  return Isa::kScalar;
}

Isa resolve(int requested) {
  const Isa isa = static_cast<Isa>(requested);
  if (isa == Isa::kAuto) return best_isa();
  if (isa != Isa::kScalar && isa != Isa::kAVX2 && isa != Isa::kAVX512)
    throw std::invalid_argument("unknown ISA code " + std::to_string(requested));
  if (!cpu_has(isa))
    throw std::invalid_argument("this CPU does not support the requested ISA (code " +
                                std::to_string(requested) + ")");
  return isa;
}

// One wrapper per (ISA, kernel), each compiled for its ISA; template arguments
// select the variant (power or not, power_eps or not, param dtype, copy-out dtype).
#define GP_DEFINE_ISA_WRAPPERS(SUFFIX, V, TARGET)                                             \
  template <bool kPow, bool kEps, Dtype kParam, CopyOut kCopy>                                \
  TARGET GP_FLATTEN void adam_##SUFFIX(const AdamPowerArgs& a, int64_t b, int64_t e) {        \
    adam_power_chunk<V, kPow, kEps, kParam, kCopy>(a, b, e);                                  \
  }                                                                                           \
  template <bool kPow, bool kEps>                                                             \
  TARGET GP_FLATTEN void power_##SUFFIX(const float* in, float* out, int64_t b, int64_t e,    \
                                        double p, float eps) {                                \
    grad_power_chunk<V, kPow, kEps>(in, out, b, e, p, eps);                                   \
  }                                                                                           \
  TARGET GP_FLATTEN void probe_##SUFFIX(const AdamPowerArgs& a, int64_t b, int64_t e) {       \
    stream_probe_chunk<V>(a, b, e);                                                           \
  }

#if GP_X86
GP_DEFINE_ISA_WRAPPERS(avx512, Avx512, GP_TARGET_AVX512)
GP_DEFINE_ISA_WRAPPERS(avx2, Avx2, GP_TARGET_AVX2)
#endif
GP_DEFINE_ISA_WRAPPERS(scalar, Scalar, )

using AdamChunkFn = void (*)(const AdamPowerArgs&, int64_t, int64_t);
using PowerChunkFn = void (*)(const float*, float*, int64_t, int64_t, double, float);

// Turns run-time choices into template arguments: fn(std::integral_constant<T, v>{}).
template <typename Fn>
auto with_bool(bool value, Fn&& fn) {
  return value ? fn(std::true_type{}) : fn(std::false_type{});
}

// The (param dtype, copy-out) pairs the kernel has: an fp32 param with or without a bf16/fp16 copy, or a
// bf16/fp16 param (its own copy).
template <typename Fn>
auto with_layout(Dtype param, CopyOut copy, Fn&& fn) {
  using P = Dtype;
  using C = CopyOut;
  if (param == P::kBF16) return fn(std::integral_constant<P, P::kBF16>{}, std::integral_constant<C, C::kNone>{});
  if (param == P::kFP16) return fn(std::integral_constant<P, P::kFP16>{}, std::integral_constant<C, C::kNone>{});
  switch (copy) {
    case C::kBF16: return fn(std::integral_constant<P, P::kFP32>{}, std::integral_constant<C, C::kBF16>{});
    case C::kFP16: return fn(std::integral_constant<P, P::kFP32>{}, std::integral_constant<C, C::kFP16>{});
    default: return fn(std::integral_constant<P, P::kFP32>{}, std::integral_constant<C, C::kNone>{});
  }
}

AdamChunkFn adam_for(Isa isa, bool pow, bool eps, Dtype param, CopyOut copy) {
  return with_bool(pow, [&](auto kPow) {
    return with_bool(eps, [&](auto kEps) {
      return with_layout(param, copy, [&](auto kParam, auto kCopy) -> AdamChunkFn {
        switch (isa) {
#if GP_X86
          case Isa::kAVX512: return &adam_avx512<kPow(), kEps(), kParam(), kCopy()>;
          case Isa::kAVX2: return &adam_avx2<kPow(), kEps(), kParam(), kCopy()>;
#endif
          default: return &adam_scalar<kPow(), kEps(), kParam(), kCopy()>;
        }
      });
    });
  });
}

PowerChunkFn power_for(Isa isa, bool pow, bool eps) {
  return with_bool(pow, [&](auto kPow) {
    return with_bool(eps, [&](auto kEps) -> PowerChunkFn {
      switch (isa) {
#if GP_X86
        case Isa::kAVX512: return &power_avx512<kPow(), kEps()>;
        case Isa::kAVX2: return &power_avx2<kPow(), kEps()>;
#endif
        default: return &power_scalar<kPow(), kEps()>;
      }
    });
  });
}

AdamChunkFn probe_for(Isa isa) {
  switch (isa) {
#if GP_X86
    case Isa::kAVX512: return &probe_avx512;
    case Isa::kAVX2: return &probe_avx2;
#endif
    default: return &probe_scalar;
  }
}

// Runs fn(begin, end) over [0, n) in tiles on `threads` OpenMP threads.
template <typename Fn>
void parallel_tiles(int64_t n, int threads, Fn&& fn) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < tiles; ++t) fn(t * kTile, std::min(n, (t + 1) * kTile));
}

void* as_ptr(uintptr_t address) { return reinterpret_cast<void*>(address); }

void check_size(int64_t n) {
  if (n < 0) throw std::invalid_argument("element count n must be >= 0, got " + std::to_string(n));
}

void adam_power_step(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, int param_dtype,
                     uintptr_t copy_out, int copy_dtype, int64_t n, float one_minus_beta1,
                     float beta2, float one_minus_beta2, float eps, float l2, float decay,
                     float step_size, float inv_bias_corr2_sqrt, double power, float power_eps,
                     float grad_scale, int isa_code, int threads) {
  check_size(n);
  AdamPowerArgs a{as_ptr(param), as_ptr(grad), static_cast<float*>(as_ptr(exp_avg)),
                  static_cast<float*>(as_ptr(exp_avg_sq)), as_ptr(copy_out), n, one_minus_beta1, beta2,
                  one_minus_beta2, eps, l2, decay, step_size, inv_bias_corr2_sqrt, power_eps, power, grad_scale};
  const Dtype dtype = static_cast<Dtype>(param_dtype);
  if (dtype != Dtype::kFP32 && dtype != Dtype::kBF16 && dtype != Dtype::kFP16)
    throw std::invalid_argument("unknown param dtype code " + std::to_string(param_dtype));
  const CopyOut copy = static_cast<CopyOut>(copy_dtype);
  if (copy != CopyOut::kNone && copy != CopyOut::kBF16 && copy != CopyOut::kFP16)
    throw std::invalid_argument("unknown copy-out dtype code " + std::to_string(copy_dtype));
  if (copy != CopyOut::kNone && dtype != Dtype::kFP32)
    throw std::invalid_argument("a bf16/fp16 param is its own copy: copy_dtype must be 0");
  if (copy != CopyOut::kNone && copy_out == 0 && n > 0)
    throw std::invalid_argument("copy-out dtype given without a copy-out buffer");
  const Isa isa = resolve(isa_code);
  const AdamChunkFn fn = adam_for(isa, power != 1.0, power_eps != 0.0f, dtype, copy);
  py::gil_scoped_release release;
  parallel_tiles(n, threads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void stream_probe(uintptr_t param, uintptr_t grad, uintptr_t exp_avg, uintptr_t exp_avg_sq, int64_t n,
                  int isa_code, int threads) {
  check_size(n);
  AdamPowerArgs a{};
  a.param = as_ptr(param);
  a.grad = as_ptr(grad);
  a.exp_avg = static_cast<float*>(as_ptr(exp_avg));
  a.exp_avg_sq = static_cast<float*>(as_ptr(exp_avg_sq));
  const AdamChunkFn fn = probe_for(resolve(isa_code));
  py::gil_scoped_release release;
  parallel_tiles(n, threads, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

void grad_power_into(uintptr_t in, uintptr_t out, int64_t n, double power, float power_eps,
                     int isa_code, int threads) {
  check_size(n);
  const Isa isa = resolve(isa_code);
  const PowerChunkFn fn = power_for(isa, power != 1.0, power_eps != 0.0f);
  const float* src = static_cast<const float*>(as_ptr(in));
  float* dst = static_cast<float*>(as_ptr(out));
  py::gil_scoped_release release;
  parallel_tiles(n, threads, [&](int64_t b, int64_t e) { fn(src, dst, b, e, power, power_eps); });
}

}  // namespace
}  // namespace gradpower

// The installed module is gradpower_ds._native_adam_power; a just-in-time build
// (ops/builder.py, via torch.utils.cpp_extension) names it TORCH_EXTENSION_NAME.
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _native_adam_power
#endif

// Every function takes keyword arguments only (py::kw_only), so a call names
// each address and scalar it passes; buffers are addresses of contiguous
// arrays of n elements (fp32; bf16/fp16 for copy_out and 16-bit params and grads), checked by the caller.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gradpower;
  m.doc() =
      "Fused GradPower + Adam(W) CPU kernel. Call it through gradpower_ds.ops.native_adam_power, which checks "
      "every tensor behind an address; the optimizer built on it is gradpower_ds.CPUAdamPower.";
  m.def("adam_power_step", &adam_power_step,
        "One fused phi_p + Adam(W) step in place over n elements at param and exp_avg, exp_avg_sq (fp32), "
        "reading grad (multiplied by grad_scale first); param and grad are both fp32, bf16 or fp16 (param_dtype "
        "0, 1, 2; 16-bit ones are updated in fp32 and rounded back) and, for fp32 params, copy_dtype 1 (bf16) "
        "or 2 (fp16) also writes the new weights to copy_out (0: none).",
        py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("param_dtype"), py::arg("copy_out"), py::arg("copy_dtype"), py::arg("n"), py::arg("one_minus_beta1"),
        py::arg("beta2"), py::arg("one_minus_beta2"), py::arg("eps"), py::arg("l2"),
        py::arg("decay"), py::arg("step_size"), py::arg("inv_bias_corr2_sqrt"), py::arg("power"),
        py::arg("power_eps"), py::arg("grad_scale"), py::arg("isa"), py::arg("threads"));
  m.def("grad_power", &grad_power_into, "dst = phi_p(src) over n fp32 elements (dst may be src).",
        py::kw_only(), py::arg("src"), py::arg("dst"), py::arg("n"), py::arg("power"), py::arg("power_eps"),
        py::arg("isa"), py::arg("threads"));
  m.def("stream_probe", &stream_probe,
        "The optimizer's 28 B/element memory traffic without its arithmetic (bandwidth roofline).",
        py::kw_only(), py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"),
        py::arg("n"), py::arg("isa"), py::arg("threads"));
  m.def("best_isa", [] { return static_cast<int>(best_isa()); },
        "Widest ISA code this CPU supports: 2 = AVX-512, 1 = AVX2, 0 = scalar.");
  m.def("cpu_supports", [](int code) { return code < 0 || cpu_has(static_cast<Isa>(code)); },
        "Whether this CPU supports the ISA code.", py::kw_only(), py::arg("isa"));
#ifdef GP_SOURCE_HASH
  // builder.load() compares it with the sources beside it, so a stale build is never used.
  m.attr("SOURCE_HASH") = GP_SOURCE_HASH;
#endif
}
