"""Regenerates the polynomial coefficients in fast_power.h (a developer tool, not imported).

    python gradpower_ds/csrc/fit_polynomials.py

Each fit is a Chebyshev least-squares fit (near-minimax) of the smooth factor,
evaluated in high precision with mpmath, converted to monomial coefficients and
rounded to fp32; the printed error is that of the fp32-rounded polynomial.
"""

import mpmath as mp
import numpy as np
from numpy.polynomial import chebyshev, polynomial

mp.mp.dps = 40


def fit(func, lo: float, hi: float, degree: int) -> np.ndarray:
    """fp32 monomial coefficients of a degree-`degree` fit of func on [lo, hi]."""
    n = 6000
    xs = np.cos(np.pi * (np.arange(n) + 0.5) / n) * (hi - lo) / 2 + (lo + hi) / 2
    xs = xs[np.abs(xs) > 1e-7]
    ys = np.array([float(func(mp.mpf(x))) for x in xs])
    series = chebyshev.Chebyshev.fit(xs, ys, degree, domain=[lo, hi])
    return series.convert(kind=polynomial.Polynomial, domain=[-1, 1], window=[-1, 1]).coef.astype(np.float32)


def main() -> None:
    q = fit(lambda t: mp.log(1 + t) / mp.log(2) / t, -0.25, 0.5, 8)  # log2(1 + t) = t * Q(t)
    t = np.linspace(-0.25, 0.5, 400001)
    err = np.abs(t * polynomial.polyval(t, q.astype(np.float64)) - np.log1p(t) / np.log(2)).max()
    print(f"kLog2Q (max abs error {err:.2g}):", ", ".join(f"{c:.9e}f" for c in q))

    r = fit(lambda f: (mp.power(2, f) - 1) / f, -0.5, 0.5, 5)  # 2^f = 1 + f * R(f)
    f = np.linspace(-0.5, 0.5, 400001)
    err = (np.abs(1 + f * polynomial.polyval(f, r.astype(np.float64)) - np.exp2(f)) / np.exp2(f)).max()
    print(f"kExp2R (max rel error {err:.2g}):", ", ".join(f"{c:.9e}f" for c in r))


if __name__ == "__main__":
    main()
