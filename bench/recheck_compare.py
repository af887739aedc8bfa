"""Recompute the paired tests behind a committed comparison's prose from the committed files alone.

A committed ``compare`` folder keeps ``compare.json`` and ``report.md``, not the run directories.
``compare.json`` holds every method's discordant counts against the reference, which is all an exact
McNemar test needs. The few paired figures that ``bench/critic_effect.py`` printed from the run
directories (round-0 vote across iterations, final vs round-0 vote) survive only as "Δ ± SE" in the
results README; with n known, a difference d = (b − c)/n and its SE fix b + c, so the discordant
counts are recovered exactly and checked to reproduce the quoted figures before they are used.

    .venv/bin/python bench/recheck_compare.py docs/results/arithmetic-compare
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from agentsoc.stats import SE_CONVENTION, format_p, mcnemar_exact, paired_se, verdict

#: paired figures the committed README quoted from bench/critic_effect.py before it used the one SE
#: convention (it then divided the variance by n − 1): (what, Δ in points, SE in points, n)
QUOTED_SAMPLE_SD = (
    ("Ours round-0 vote, iter 3 - iter 0", 16.7, 10.8, 30),
    ("round-0 vote at iter 3, Ours - Single-agent FT", 16.7, 13.6, 30),
    ("Ours final vote - round-0 vote, iter 3", -20.0, 8.8, 30),
)


def sample_sd_se(b: int, c: int, n: int) -> float:
    """SE of the mean difference with the variance divided by n − 1 (the old critic_effect convention)."""
    mean = (b - c) / n
    return math.sqrt(((b + c) - n * mean * mean) / (n - 1) / n)


def recover(diff_pts: float, se_pts: float, n: int) -> tuple[int, int]:
    """The one (b, c) with (b − c)/n and its sample-SD SE rounding to the quoted figures."""
    found = []
    for b in range(n + 1):
        for c in range(n + 1 - b):
            if round(100 * (b - c) / n, 1) == diff_pts and round(100 * sample_sd_se(b, c, n), 1) == se_pts:
                found.append((b, c))
    if len(found) != 1:
        raise SystemExit(f"cannot recover the counts of {diff_pts:+} ± {se_pts} (n={n}) uniquely: {found}")
    return found[0]


def line(what: str, b: int, c: int, n: int) -> str:
    diff = (b - c) / n
    se = paired_se(b, c, n)
    p = mcnemar_exact(b, c)
    z = diff / se if se else 0.0
    return (
        f"{what}: {100 * diff:+.1f} ± {100 * se:.1f} points (z = {z:.2f}), {b}/{c} discordant, "
        f"exact McNemar {format_p(p)} -> {verdict(p, diff)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    args = ap.parse_args()
    print(SE_CONVENTION)
    meta = json.loads((args.compare_dir / "compare.json").read_text(encoding="utf-8"))
    ref = next(m["label"] for m in meta["methods"] if m["method"] == meta["reference"])
    print(f"\nfinal vote after each method's last iteration, vs {ref} (compare.json):")
    for m in meta["methods"]:
        s = m["score"]
        acc = f"{100 * s['accuracy']:.1f} ± {100 * s['se']:.1f} (n={s['n']})"
        vs = m["vs_reference"]
        if vs is None:
            print(f"  {m['label']}: {acc}")
            continue
        b, c, n = vs["a_only"], vs["b_only"], vs["n"]
        assert abs(paired_se(b, c, n) - vs["se"]) < 1e-12, "compare.json's SE is not in the one convention"
        print(f"  {m['label']}: {acc}; " + line(f"{m['label']} - {ref}", b, c, n))
    print("\npaired figures quoted from bench/critic_effect.py (counts recovered, then retested):")
    for what, diff_pts, se_pts, n in QUOTED_SAMPLE_SD:
        b, c = recover(diff_pts, se_pts, n)
        print(f"  quoted {diff_pts:+.1f} ± {se_pts} -> " + line(what, b, c, n))


if __name__ == "__main__":
    main()
