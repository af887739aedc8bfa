"""The report of a stored mock run and of a compare folder: markdown tables and real PNGs."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import mock_recipe

from agentsoc.baselines import compare
from agentsoc.config import recipe_from_dict
from agentsoc.report import MOCK_BANNER, ReportError, render
from agentsoc.store import RunStore

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


def test_run_report_shows_every_job_with_its_loss(compare_dir: Path) -> None:
    run_dir = compare_dir / "ours"
    store = RunStore.open(run_dir, readonly=True)
    try:
        jobs = store.jobs()
    finally:
        store.close()
    text = render(run_dir).read_text()
    assert jobs and "| job | state | examples | logged steps | loss (first → last) |" in text
    for j in jobs:  # each job's row carries its own first and last loss, as stored
        assert f"| {j.key.split('/', 2)[-1]} | succeeded | {j.examples} | {len(j.losses)} | " in text
        assert f"{j.losses[0]:.3f} → {j.losses[-1]:.3f}" in text
    assert_real_png(run_dir / "plots" / "training_loss.png")
    assert "(plots/training_loss.png)" in text


def test_report_without_plots_and_without_matplotlib(compare_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = compare_dir / "debate"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ReportError, match=r"pip install -e '\.\[plot\]'"):
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
    assert re.search(r"\(\+\d+/−\d+, p [=<] [\d.]+\)", done.stdout)  # the paired Δ with its exact p-value
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


def test_reports_give_exact_paired_tests_in_one_stated_convention(compare_dir: Path) -> None:
    from agentsoc.stats import SE_CONVENTION, format_p, mcnemar_exact
    from agentsoc.store import RunStore
    from agentsoc.tasks import create

    text = render(compare_dir, plots=False).read_text()
    assert text.count(SE_CONVENTION) == 1  # stated once per document
    table = text.split("| Method |", 1)[1].split("\n\n", 1)[0]
    assert table.count(", p = ") + table.count(", p < ") == 4  # every method but the reference
    # recount the iteration-2 debate round of Ours from its stored transcripts, independently
    store = RunStore.open(compare_dir / "ours", readonly=True)
    try:
        transcripts = list(store.transcripts("iter-2/eval").values())
    finally:
        store.close()
    eq = create("arithmetic", {}).is_equivalent

    def right(answer: str | None, truth: str | None) -> bool:
        return answer is not None and truth is not None and eq(answer, truth)

    final = [right(t.vote.answer, t.problem.answer) for t in transcripts]
    first = [right(t.round_votes[0].answer, t.problem.answer) for t in transcripts]
    b = sum(f and not r for f, r in zip(final, first, strict=True))
    c = sum(r and not f for f, r in zip(final, first, strict=True))
    section = text.split("## Paired tests", 1)[1].split("\n## ", 1)[0]
    row = next(ln for ln in section.splitlines() if "final vote, iter 2 − round-0 vote, iter 2" in ln)
    assert row.startswith("| Multiagent FT (Ours) |")
    assert f"| {b} / {c} | {format_p(mcnemar_exact(b, c))} |" in row
    assert "round-0 vote, iter 2 − round-0 vote, iter 0" in section  # what finetuning does
    assert "final vote, iter 2 − final vote, iter 0" in section
    run_text = render(compare_dir / "ours", plots=False).read_text()
    assert SE_CONVENTION in run_text and "### Paired tests" in run_text and row.split("|", 2)[2] in run_text


def test_a_report_without_its_task_data_renders_and_says_why(
    compare_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentsoc.tasks
    from agentsoc.tasks.base import DataError

    def gone(*_: object, **__: object) -> None:
        raise DataError("task 'arithmetic': option 'path': no such file or directory: /moved/data.jsonl")

    monkeypatch.setattr(agentsoc.tasks, "create", gone)
    text = render(compare_dir / "ours", plots=False).read_text()
    assert "paired tests left out: the evaluation task cannot be built here" in text and "/moved/data.jsonl" in text
    assert "| iter | debate (final vote) |" in text  # the rest of the report is still there


def test_bench_scripts_read_a_stored_comparison(compare_dir: Path) -> None:
    """critic_effect prints the transitions and the same paired tests as the report; kl_from_base
    scores Figure 8's drift through the run's own backend."""
    root = Path(__file__).resolve().parents[1]
    effect = subprocess.run(
        [sys.executable, str(root / "bench" / "critic_effect.py"), str(compare_dir)], capture_output=True, text=True
    )
    assert effect.returncode == 0, effect.stderr
    ours2 = next(ln for ln in effect.stdout.splitlines() if ln.startswith("ours") and "iter 2" in ln)
    assert "right->wrong" in ours2 and "wrong->right" in ours2 and "discordant" in ours2
    report = render(compare_dir / "ours", plots=False).read_text()
    row = next(ln for ln in report.splitlines() if "final vote, iter 2 − round-0 vote, iter 2" in ln)
    b, c = row.split("|")[4].strip().split(" / ")
    assert f"{b}/{c} discordant" in ours2  # one convention, one count, in both tools
    kl = subprocess.run(
        [sys.executable, str(root / "bench" / "kl_from_base.py"), str(compare_dir / "ours"), "--problems", "3"],
        capture_output=True,
        text=True,
    )
    assert kl.returncode == 0, kl.stderr
    rows = [ln.split() for ln in kl.stdout.splitlines()[1:]]
    assert {r[0] for r in rows} == {"iter-0", "iter-1", "iter-2"}
    assert all(float(r[3]) == 0.0 for r in rows if r[0] == "iter-0")  # the base model itself
    assert any(float(r[3]) > 0 for r in rows if r[0] == "iter-2")
