"""What the command line tells a person and a machine: only JSON on stdout with ``--json``, a resume
command that can be pasted after Ctrl-C (``run`` and ``demo``), a small sample called too small to
judge, ``--version``, help for every argument, and a README that installs from the repository."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import cli
from agentsoc.config import recipe_from_dict
from agentsoc.society import Society

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_RUN = Society.run


def test_json_stdout_is_only_json_even_with_messages_that_used_to_precede_it(tmp_path: Path) -> None:
    """The new user's case: min_examples above the dataset sizes logs 'not finetuned' during the run."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1, "selection.min_examples": 1000})))
    done = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "not finetuned" in done.stderr
    records = json.loads(done.stdout)
    assert [r["iteration"] for r in records] == [0, 1]


def test_json_survives_prints_and_c_level_writes_to_stdout(
    monkeypatch: pytest.MonkeyPatch, capfd: Any, write_recipe: Any, tmp_path: Path
) -> None:
    """A library's print() and a write to file descriptor 1 (C code, a child process) during the run land
    on stderr; stdout is exactly the JSON document."""
    original = Society.run

    async def noisy(self: Society, *args: Any, **kwargs: Any) -> Any:
        print("a library's print")
        os.write(1, b"a C library's write\n")
        subprocess.run([sys.executable, "-c", "print('a child process')"], check=True)
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(Society, "run", noisy)
    assert (
        cli.main(["run", str(write_recipe(**{"finetune.iterations": 0})), "--run-dir", str(tmp_path / "r"), "--json"])
        == 0
    )
    out, err = capfd.readouterr()
    assert json.loads(out)[0]["iteration"] == 0
    assert "a library's print" in err and "a C library's write" in err and "a child process" in err


def test_compare_json_stdout_is_only_json(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1, "task.n_train": 8, "task.n_test": 8})))
    cmd = [sys.executable, "-m", "agentsoc.cli", "compare", str(recipe), "--methods", "ours,majority"]
    cmd += ["--out", str(tmp_path / "cmp"), "--json", "--no-plots"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert [r["method"] for r in json.loads(done.stdout)] == ["ours", "majority"]


def interrupt(monkeypatch: pytest.MonkeyPatch) -> None:
    async def stopped(self: Society, *args: Any, **kwargs: Any) -> Any:
        await self.evaluate(0)  # some work finished, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(Society, "run", stopped)


def resume_hint(err: str) -> list[str]:
    line = next(x for x in err.splitlines() if "resume with: " in x)
    return shlex.split(line.split("resume with: ", 1)[1])


def test_ctrl_c_prints_a_command_that_resumes_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "my recipes"  # a space: the hint must quote it
    folder.mkdir()
    recipe = folder / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"name": "hinted", "finetune.iterations": 1})))
    monkeypatch.chdir(tmp_path)
    interrupt(monkeypatch)
    assert cli.main(["run", str(recipe), "--quiet"]) == 130
    argv = resume_hint(capsys.readouterr().err)
    # the recipe path as given, the run directory the run really used (its default), --resume
    assert argv == ["agentsoc", "run", str(recipe), "--run-dir", "runs/hinted", "--resume"]
    assert (tmp_path / "runs" / "hinted" / "run.sqlite").exists()
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert cli.main([*argv[1:], "--quiet"]) == 0  # pasted: it continues and finishes
    assert "resume with" not in capsys.readouterr().err


def test_demo_prints_a_resume_command_too(monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    # the demo's recipe on the mock backend: the hint, not the bundled model, is under test
    monkeypatch.setattr(cli, "demo_recipe", lambda quick: recipe_from_dict(mock_recipe(name=f"demo-{quick}")))
    interrupt(monkeypatch)
    assert cli.main(["demo", "--quick", "--quiet"]) == 130
    argv = resume_hint(capsys.readouterr().err)
    assert argv == ["agentsoc", "demo", "--quick", "--run-dir", "runs/demo-True"]
    monkeypatch.setattr(Society, "run", ORIGINAL_RUN)  # the demo's recipe stays on the mock backend
    assert cli.main([*argv[1:], "--quiet"]) == 0
    assert (tmp_path / "runs" / "demo-True" / "run.sqlite").exists()


def test_small_sample_is_called_too_small_to_judge(capsys: Any, write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe(**{"task.n_test": 5, "finetune.iterations": 0})
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "± 0.00" not in out and "/5, too few to judge)" in out
    assert "only 5 held-out problems: too few to judge" in out


def test_large_sample_keeps_its_standard_error(capsys: Any, write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe(**{"task.n_test": 20, "finetune.iterations": 0})
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "too few" not in out and re.search(r"\d+\.\d\d ± \d+\.\d\d", out)


def test_version(capsys: Any) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"agentsoc {metadata.version('agentsoc')}"


def test_every_argument_of_every_command_has_help() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {"agentsoc": parser, **sub.choices}
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, p in parsers.items()
        for a in p._actions
        if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not (a.help or "").strip()
    ]
    assert missing == []
    assert set(sub.choices) >= {"run", "demo", "jobs", "report", "compare", "view"}
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert all(helps.get(name) for name in sub.choices), helps


def test_readme_has_the_quick_demo_as_a_command_and_installs_from_the_repository() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line.strip() for line in readme.splitlines()]
    assert "make quick" in commands or ".venv/bin/agentsoc demo --quick" in commands
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^quick:.*\n(\t.*\n)*\t\$\(VENV\)/bin/agentsoc demo --quick", makefile, re.M)
    # agentsoc is not published on an index: no `pip install agentsoc[...]` / `pip install agentsoc`
    assert not re.search(r"pip install ['\"]?agentsoc\b", readme)
    assert re.search(r"pip install (-e )?['\"]?\.(\[|['\"]|\s|$)", readme, re.M)


def test_long_work_is_shown_per_model_call_per_iteration_and_per_job(tmp_path: Path) -> None:
    """The quick demo sat at '0/3' for eight minutes: progress counts model calls (with tokens/s and an
    ETA), each stage's bar stays on screen, each iteration's table is printed when it is known (before
    the next iteration's work), and each finished job says its loss in one line."""
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 2})))
    done = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    err = done.stderr.replace("\r", "\n")
    # 20 held-out problems x (3 agents x 2 rounds + 3 summaries) = 180 calls, counted one by one
    finals = [line for line in err.splitlines() if line.startswith("debate iter-0/eval: 100%")]
    assert finals and "180/180" in finals[-1] and "call" in finals[-1] and "tok/s" in finals[-1]
    assert re.search(r"debate iter-0/eval:\s+\d+%.*<\d\d:\d\d", err)  # an ETA while it runs
    # iteration 0's table reaches the screen before iteration 1's first job ends, iteration 1's before 2's
    first_table, first_job = err.index("\niter "), err.index("/iter-1/agent-")
    assert first_table < first_job and err.index("\niter ", first_table + 1) < err.index("/iter-2/agent-")
    job_line = r"^agentsoc: t/\w+/iter-\d/agent-\d/\w+: loss \d\.\d{3} → \d\.\d{3} over \d+ logged steps$"
    losses = re.findall(job_line, err, re.M)
    assert len(losses) == 12  # 3 agents x 2 roles x 2 iterations, one line each
