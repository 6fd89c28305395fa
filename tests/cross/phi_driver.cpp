// Test-only driver (tests/test_native_adam_power_aarch64.py): the native kernel's phi on its scalar path, built for
// aarch64 and run under qemu-user. Reads N fp32 values from IN, writes phi_p(x) (power_eps EPS) to OUT.
//   phi_driver IN OUT N P EPS
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "adam_power_kernel.h"

int main(int argc, char** argv) {
  if (argc != 6) return 2;
  const long n = std::atol(argv[3]);
  const double p = std::atof(argv[4]);
  const float eps = static_cast<float>(std::atof(argv[5]));
  std::vector<float> in(n), out(n);
  FILE* f = std::fopen(argv[1], "rb");
  if (!f || std::fread(in.data(), sizeof(float), n, f) != static_cast<size_t>(n)) return 3;
  std::fclose(f);
  using gradpower::Scalar;
  if (eps != 0.0f)
    gradpower::grad_power_chunk<Scalar, true, true>(in.data(), out.data(), 0, n, p, eps);
  else
    gradpower::grad_power_chunk<Scalar, true, false>(in.data(), out.data(), 0, n, p, eps);
  f = std::fopen(argv[2], "wb");
  if (!f || std::fwrite(out.data(), sizeof(float), n, f) != static_cast<size_t>(n)) return 4;
  std::fclose(f);
  return 0;
}
