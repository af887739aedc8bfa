"""The report of a stored mock run and of a compare folder: markdown tables and real PNGs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mock_recipe

from agentsoc.baselines import compare
from agentsoc.config import recipe_from_dict
from agentsoc.report import MOCK_BANNER, ReportError, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cmp")
    rec = recipe_from_dict(mock_recipe(**{"finetune.iterations": 2}), base_dir=Path("."))
    asyncio.run(compare(rec, ["ours", "debate", "majority", "single_agent_ft", "single_agent_ft_no_debate"], out))
    return out


def assert_real_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000, path
    pixels = mpimg.imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 20  # not a blank canvas


def test_compare_report_has_table1_and_plots(compare_dir: Path) -> None:
    path = render(compare_dir)
    text = path.read_text()
    assert path == compare_dir / "report.md"
    assert MOCK_BANNER in text
    assert "| Method | arithmetic |" in text
    for label in ("Multiagent FT (Ours)", "Debate", "Majority", "Single-agent FT", "Single-agent FT w/o debate"):
        assert f"| {label} |" in text
    assert "**" in text.split("| Method |", 1)[1].split("\n\n", 1)[0]  # best in bold
    assert "Δ vs ours (paired)" in text
    assert "embedding dissimilarity" in text and "Embedding dissimilarity computed with" in text
    assert "generator examples per agent" in text and "prompt tokens" in text
    for name in ("accuracy_over_iterations", "diversity_over_iterations", "accuracy_vs_diversity"):
        png = compare_dir / "plots" / f"{name}.png"
        assert_real_png(png)
        assert f"(plots/{name}.png)" in text


def test_run_report_per_iteration(compare_dir: Path) -> None:
    run_dir = compare_dir / "ours"
    text = render(run_dir).read_text()
    assert "| iter | debate (final vote) | vote round 0 | vote round 1 | single agent |" in text
    assert "\n| 2 | " in text
    assert_real_png(run_dir / "plots" / "accuracy_over_iterations.png")
    assert_real_png(run_dir / "plots" / "diversity_over_iterations.png")


def test_report_without_plots_and_without_matplotlib(compare_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = compare_dir / "debate"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"agentsoc\[plot\]"):
        render(run_dir)
    text = render(run_dir, plots=False).read_text()
    assert "## Plots" not in text and "| iter |" in text


def test_report_cli(compare_dir: Path, tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "report", str(compare_dir / "majority"), "--no-plots"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert (compare_dir / "majority" / "report.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "neither a run directory" in bad.stderr


def test_compare_cli(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    import tomli_w

    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1, "task.n_test": 10})))
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentsoc.cli",
            "compare",
            str(recipe),
            "--methods",
            "ours,base",
            "--out",
            str(out),
            "--quiet",
            "--no-plots",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "Multiagent FT (Ours)" in done.stdout and "Base" in done.stdout
    assert (out / "report.md").exists() and (out / "compare.json").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "compare", str(recipe), "--methods", "ours,nope", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError):
        render(tmp_path / "empty")


def test_table1_over_several_tasks(tmp_path: Path) -> None:
    out = tmp_path / "all"
    for name, pattern in (("hard", "a+b*c+d-e*f"), ("easy", "a+b")):
        rec = recipe_from_dict(
            mock_recipe(
                name=name,
                **{"finetune.iterations": 0, "task.n_test": 8, "task.options": {"pattern": pattern}},
            ),
            base_dir=Path("."),
        )
        asyncio.run(compare(rec, ["debate", "majority"], out / name))
    text = render(out, plots=False).read_text()
    assert "| Method | arithmetic (easy) | arithmetic (hard) |" in text
    assert "| Debate |" in text and "| Majority |" in text and "(easy/report.md)" in text
    assert (out / "easy" / "report.md").exists() and (out / "hard" / "report.md").exists()
