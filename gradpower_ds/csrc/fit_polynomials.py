"""Regenerates the tables and polynomial coefficients in fast_power.h (a developer tool, not imported).

    python gradpower_ds/csrc/fit_polynomials.py

log2: m in [1, 2) falls in one of 8 equal intervals (the top 3 mantissa bits);
c_i is 1/m at the interval's middle, rounded to fp32, and L_i = -log2(c_i)
rounded to fp32; r = m * c_i - 1 then lies in [-RMAX, RMAX] and
log2(1 + r) = r * Q(r). exp2: 2^(j/8) rounded to fp32 for j = 0..7, and
2^f = 1 + f * R(f) for |f| <= 1/16 (plus slack for the rounding of y).
Each fit is a Chebyshev least-squares fit (near-minimax) of the smooth factor,
evaluated in high precision with mpmath, converted to monomial coefficients and
rounded to fp32; the printed error is that of the fp32-rounded polynomial.
"""

import mpmath as mp
import numpy as np
from numpy.polynomial import chebyshev, polynomial

mp.mp.dps = 40
TABLE = 8
LOG2_DEGREE, EXP2_DEGREE = 3, 2


def fit(func, lo: float, hi: float, degree: int) -> np.ndarray:
    """fp32 monomial coefficients of a degree-`degree` fit of func on [lo, hi]."""
    n = 6000
    xs = np.cos(np.pi * (np.arange(n) + 0.5) / n) * (hi - lo) / 2 + (lo + hi) / 2
    xs = xs[np.abs(xs) > 1e-9]
    ys = np.array([float(func(mp.mpf(x))) for x in xs])
    series = chebyshev.Chebyshev.fit(xs, ys, degree, domain=[lo, hi])
    return series.convert(kind=polynomial.Polynomial, domain=[-1, 1], window=[-1, 1]).coef.astype(np.float32)


def floats(values) -> str:
    return ", ".join(f"{float(v):.9e}f" for v in values)


def main() -> None:
    c = np.array([1 / (1 + (i + 0.5) / TABLE) for i in range(TABLE)], dtype=np.float32)
    logs = np.array([-float(mp.log(mp.mpf(float(ci)), 2)) for ci in c], dtype=np.float32)
    rmax = max(max(abs((1 + i / TABLE) * float(c[i]) - 1), abs((1 + (i + 1) / TABLE) * float(c[i]) - 1))
               for i in range(TABLE))
    q = fit(lambda t: mp.log(1 + t) / mp.log(2) / t, -rmax, rmax, LOG2_DEGREE)
    t = np.linspace(-rmax, rmax, 400001)
    err = np.abs(t * polynomial.polyval(t, q.astype(np.float64)) - np.log1p(t) / np.log(2)).max()
    table_err = max(abs(float(logs[i]) + float(mp.log(mp.mpf(float(c[i])), 2))) for i in range(TABLE))
    print(f"kLog2C: {floats(c)}")
    print(f"kLog2L (max abs rounding {table_err:.2g}): {floats(logs)}")
    print(f"kLog2Q (r in +-{rmax:.4f}, max abs error {err:.2g}): {floats(q)}")

    fmax = 0.5 / TABLE + 1e-3
    r = fit(lambda f: (mp.power(2, f) - 1) / f, -fmax, fmax, EXP2_DEGREE)
    f = np.linspace(-fmax, fmax, 400001)
    err = (np.abs(1 + f * polynomial.polyval(f, r.astype(np.float64)) - np.exp2(f)) / np.exp2(f)).max()
    powers = np.array([float(mp.power(2, mp.mpf(j) / TABLE)) for j in range(TABLE)], dtype=np.float32)
    print(f"kExp2T: {floats(powers)}")
    print(f"kExp2R (f in +-{fmax:.4f}, max rel error {err:.2g}): {floats(r)}")


if __name__ == "__main__":
    main()
