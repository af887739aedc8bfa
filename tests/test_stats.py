"""Exact paired tests, one SE convention everywhere, and committed prose that follows its numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agentsoc.evaluate import paired
from agentsoc.stats import SE_CONVENTION, binomial_tail, format_p, mcnemar_exact, paired_se, paired_text, verdict

ROOT = Path(__file__).resolve().parents[1]
COMPARE = ROOT / "docs" / "results" / "arithmetic-compare"


def bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mcnemar_exact_by_hand() -> None:
    # Base vs Ours in the committed comparison: 5 vs 12 discordant problems
    assert mcnemar_exact(5, 12) == pytest.approx(2 * sum(math.comb(17, k) for k in range(6)) / 2**17)
    assert mcnemar_exact(5, 12) == pytest.approx(0.1435, abs=1e-4)
    assert mcnemar_exact(12, 5) == mcnemar_exact(5, 12)  # two-sided: symmetric
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)  # 5-0 is NOT significant at 0.05
    assert mcnemar_exact(4, 4) == 1.0 and mcnemar_exact(3, 2) == 1.0  # capped at 1
    assert mcnemar_exact(0, 0) == 1.0  # nothing discordant, nothing to say
    assert binomial_tail(-1, 5) == 0.0 and binomial_tail(5, 5) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_mcnemar_exact_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(5, 12), (8, 3), (1, 7), (0, 9), (20, 14), (40, 61), (7, 7)]:
        assert mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)


def test_the_word_follows_the_p_value() -> None:
    assert verdict(0.049, 0.1) == "shown"
    assert verdict(0.05, 0.1) == "a trend"  # "shown" only strictly below 0.05
    assert verdict(0.14, -0.233) == "a trend"  # Base vs Ours: z = 1.79, not shown
    assert verdict(1.0, 0.0) == "no difference"
    assert format_p(0.1435) == "p = 0.14" and format_p(0.00781) == "p = 0.0078"
    assert format_p(1.0) == "p = 1.0" and format_p(3e-6) == "p < 0.0001"
    assert paired_text(-0.2333, 0.1307, 5, 12) == "-23.33 ± 13.07 (+5/−12, p = 0.14)"
    assert "√(p(1−p)/n)" in SE_CONVENTION and "McNemar" in SE_CONVENTION and "0.05" in SE_CONVENTION


def test_one_se_convention_in_evaluate_stats_and_critic_effect() -> None:
    a = {str(i): i % 3 != 0 for i in range(30)}
    b = {str(i): i % 5 != 0 for i in range(30)}
    d = paired(a, b)
    assert d.se == pytest.approx(paired_se(d.a_only, d.b_only, d.n))
    line = bench("critic_effect").paired_test(a, b)
    assert f"± {100 * d.se:.1f} " in line  # the same SE, not the n − 1 one
    assert f"{100 * d.diff:+.1f} ±" in line and format_p(mcnemar_exact(d.a_only, d.b_only)) in line


def test_recheck_recovers_the_quoted_counts_exactly() -> None:
    recheck = bench("recheck_compare")
    for _, diff, se, n in recheck.QUOTED_SAMPLE_SD:
        b, c = recheck.recover(diff, se, n)
        assert round(100 * (b - c) / n, 1) == diff and round(100 * recheck.sample_sd_se(b, c, n), 1) == se
    assert recheck.recover(-20.0, 8.8, 30) == (1, 7)


def test_committed_comparison_prose_follows_its_statistics() -> None:
    """Every method's p-value vs Ours, recomputed from compare.json, is quoted in the results README,
    and the README says "shown" of no difference whose p is 0.05 or more."""
    meta = json.loads((COMPARE / "compare.json").read_text())
    readme = (COMPARE / "README.md").read_text()
    for m in meta["methods"]:
        vs = m["vs_reference"]
        if vs is None:
            continue
        p = mcnemar_exact(vs["a_only"], vs["b_only"])
        assert p >= 0.05  # nothing in this run beats or loses to Ours significantly
        assert f"{vs['a_only']}/{vs['b_only']}" in readme and format_p(p) in readme, m["method"]
    assert "clearly worse" not in readme
    recheck = bench("recheck_compare")
    for _, diff, se, n in recheck.QUOTED_SAMPLE_SD:  # the figures critic_effect printed, retested
        b, c = recheck.recover(diff, se, n)
        assert f"{abs(diff):.1f} ± {100 * paired_se(b, c, n):.1f}" in readme
        assert format_p(mcnemar_exact(b, c)) in readme
    for sentence in re.split(r"(?<=[.!?])\s+", readme):
        low = sentence.lower()
        # the definition ("Shown" means ...) and negations are not claims
        if not re.search(r"\bshown\b", low) or '"shown"' in low or "not shown" in low or "nothing" in low:
            continue
        ps = [float(x) for x in re.findall(r"p = (0\.\d+)", sentence)]
        assert ps and all(p < 0.05 for p in ps), sentence


def test_recheck_script_runs_on_the_committed_folder() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "recheck_compare.py"), str(COMPARE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    base = "Base - Multiagent FT (Ours): -23.3 ± 13.1 points (z = -1.79), 5/12 discordant, exact McNemar p = 0.14"
    assert base + " -> a trend" in done.stdout
    assert "8/3 discordant, exact McNemar p = 0.23 -> a trend" in done.stdout  # the round-0 gain
