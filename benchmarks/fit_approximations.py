"""Fit the piecewise polynomials of mpc/approx_tables.py and print the module's tables.

    python benchmarks/fit_approximations.py > /tmp/tables.py   # then review and paste

For each function f (sigmoid, tanh, and the bounded corrections silu(x) - relu(x)
and gelu(x) - relu(x)): symmetric breakpoints 0, +-b1, +-b2, +-L (7 comparisons),
a degree-6 polynomial in t = x / T (T a power of two >= L) on each of the 6
segments, and the constant asymptotes beyond +-L.  Each segment's polynomial is
the least-squares fit on 400 Chebyshev nodes (close to minimax); the breakpoints
are searched on a 1/8 grid to minimise the largest of
  - the fit error on the segment (dense grid of 4001 points),
  - plus the rounding floor sum_j |c_j| 4 2^-31 (powers of t are computed at
    31 fractional bits, each with an error below a few units),
  - and the asymptote error |f(x) - f(+-inf)| beyond +-L.
The coefficients are printed with repr (round-trip exact), so the tables are
reproducible and identical at every party.  Needs scipy (erf) only here.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.special import erf, expit

DEGREE = 6
NODES = 400
FLOOR = 4 * 2.0**-31


def _phi(x):
    return 0.5 * (1 + erf(x / np.sqrt(2)))


FUNCTIONS = {
    # name: (f, T, left asymptote, right asymptote, candidate L)
    "sigmoid": (expit, 16.0, 0.0, 1.0, (11.0, 12.0, 13.0, 14.0)),
    "tanh": (np.tanh, 8.0, -1.0, 1.0, (5.5, 6.0, 6.5, 7.0, 7.5)),
    "silu": (lambda x: x * expit(x) - np.maximum(x, 0), 16.0, 0.0, 0.0, (12.0, 13.0, 14.0, 15.0)),
    "gelu": (lambda x: x * _phi(x) - np.maximum(x, 0), 8.0, 0.0, 0.0, (4.5, 5.0, 5.5, 6.0)),
    "gelu_tanh": (
        lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))) - np.maximum(x, 0),
        8.0, 0.0, 0.0, (4.5, 5.0, 5.5, 6.0),
    ),
}


def fit(f, a: float, b: float, T: float) -> tuple[np.ndarray, float]:
    k = np.arange(NODES)
    xs = (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (k + 0.5) / NODES)
    coeffs, *_ = np.linalg.lstsq(np.vander(xs / T, DEGREE + 1, increasing=True), f(xs), rcond=None)
    grid = np.linspace(a, b, 4001)
    err = np.abs(np.polynomial.polynomial.polyval(grid / T, coeffs) - f(grid)).max()
    return coeffs, float(err + np.abs(coeffs).sum() * FLOOR)


def search(name: str) -> tuple[float, list[float], list[np.ndarray]]:
    f, T, left, right, limits = FUNCTIONS[name]
    best = None
    for L in limits:
        tails = np.linspace(-400, -L, 4000), np.linspace(L, 400, 4000)
        asym = max(np.abs(f(tails[0]) - left).max(), np.abs(f(tails[1]) - right).max())
        for b1, b2 in itertools.combinations(np.arange(0.125, L, 0.125), 2):
            breaks = [-L, -b2, -b1, 0.0, b1, b2, L]
            fits = [fit(f, a, b, T) for a, b in zip(breaks[:-1], breaks[1:])]
            err = max([asym] + [e for _, e in fits])
            if best is None or err < best[0]:
                best = (err, breaks, [c for c, _ in fits])
    return best


def main() -> None:
    for name in FUNCTIONS:
        err, breaks, coeffs = search(name)
        _, T, left, right, _ = FUNCTIONS[name]
        print(f"{name.upper()} = PiecewisePoly(")
        print(f"    fit_error={err:.3g},")
        print(f"    name={name!r}, scale={T!r}, left={left!r}, right={right!r},")
        print(f"    breaks=({', '.join(repr(float(b)) for b in breaks)}),")
        print("    coeffs=(")
        for c in coeffs:
            print(f"        ({', '.join(repr(float(v)) for v in c)}),")
        print("    ),")
        print(")")


if __name__ == "__main__":
    main()
