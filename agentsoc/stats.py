"""Paired tests and the one standard-error convention every report and bench script uses.

Two methods (or two rounds, or two iterations) scored on the same held-out problems are compared
problem by problem. Only the *discordant* problems carry information: ``b`` that only A got right
and ``c`` that only B got right. Under "A and B are equally good" each discordant problem is a fair
coin, so the exact two-sided McNemar test is a binomial test of ``b`` out of ``b + c`` at 1/2 —
exact at the small n of a CPU run, where the χ² approximation and a z = Δ/SE rule of thumb are not
(Base vs Ours in the committed comparison: z = 1.79, exact p = 0.14).

The wording follows the p-value and nothing else: :func:`verdict` says "shown" only at p < 0.05.
"""

from __future__ import annotations

import math

#: the significance level below which prose may say "shown"
ALPHA = 0.05

#: stated once in every report (and by bench/critic_effect.py), so a reader can recompute any figure
SE_CONVENTION = (
    "Standard errors use one convention: the population standard deviation over √n — √(p(1−p)/n) for "
    "an accuracy p on n problems (the paper's), √(var(d)/n) for a paired difference d (var with n in "
    "the denominator). Paired p-values are exact two-sided McNemar tests on the problems only one side "
    f"got right; a difference is called *shown* at p < {ALPHA:g} and *a trend* otherwise."
)


def binomial_tail(k: int, n: int) -> float:
    """P(X ≤ k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic, one division)."""
    if k < 0:
        return 0.0
    return sum(math.comb(n, i) for i in range(min(k, n) + 1)) / (1 << n)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts ``b`` (only A right) and ``c``
    (only B right): twice the smaller binomial tail, capped at 1; 1.0 when nothing is discordant."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * binomial_tail(min(b, c), n))


def verdict(p: float, diff: float) -> str:
    """The word the prose may use: "shown" only at p < 0.05, "a trend" for a nonzero difference
    otherwise, "no difference" when the two sides solved equally many problems."""
    if p < ALPHA:
        return "shown"
    return "a trend" if diff != 0 else "no difference"


def format_p(p: float) -> str:
    """Two significant figures, never "0.00": ``p = 0.14``, ``p = 0.0078``, ``p < 0.0001``."""
    if p < 1e-4:
        return "p < 0.0001"
    if p >= 0.995:
        return "p = 1.0"
    return f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def paired_text(diff: float, se: float, b: int, c: int) -> str:
    """``+3.33 ± 11.04 (+6/−5, p = 1.0)``: a paired difference in points ± its SE, the discordant
    counts (only A right / only B right) and the exact McNemar p-value."""
    return f"{100 * diff:+.2f} ± {100 * se:.2f} (+{b}/−{c}, {format_p(mcnemar_exact(b, c))})"


def paired_se(b: int, c: int, n: int) -> float:
    """SE of the mean per-problem difference (A − B) when ``b`` problems give +1, ``c`` give −1 and
    the other n − b − c give 0, in the convention above (population variance over n)."""
    if n <= 0:
        return 0.0
    mean = (b - c) / n
    return math.sqrt(max((b + c) / n - mean * mean, 0.0) / n)
