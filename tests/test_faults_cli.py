"""Every bad input in one line, and SIGTERM handled like Ctrl-C (issue 20, items 3, 4 and 6): a seed
numpy cannot take, ``temperature = nan``, a recipe that is not UTF-8, ``--run-dir ""``, one agent or a
huge society (warned, with the dry run's cost), ``report`` on a read-only folder, and a SIGTERM that
stops the run in seconds, releases its lock and prints the resume command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import cli
from agentsoc.config import RecipeError, load_recipe, recipe_from_dict, recipe_warnings
from agentsoc.lock import RunLock

ROOT = Path(__file__).resolve().parents[1]


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


# -- recipe values ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 10**23, 2**32])
def test_a_seed_outside_numpys_range_is_one_line(seed: int) -> None:
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(mock_recipe(seed=seed), source="r.toml")
    assert str(info.value) == "r.toml: seed: must be a whole number from 0 to 4294967295 (numpy's seed range)"


def test_the_largest_seed_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    overrides = {"seed": 2**32 - 1, "finetune.iterations": 0, "task.n_train": 2, "task.n_test": 2}
    recipe.write_text(tomli_w.dumps(mock_recipe(**overrides)))
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0


@pytest.mark.parametrize("field", ["sampling.temperature", "evaluation.temperature", "sampling.top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_number_that_is_not_finite_is_named_as_such(field: str, value: float) -> None:
    """Before: ``temperature = nan`` was refused with "Input should be less than or equal to 2"."""
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(mock_recipe(**{field: value}), source="r.toml")
    assert str(info.value) == f"r.toml: {field}: must be a finite number, not {value}"


def test_a_recipe_that_is_not_utf8_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_bytes(tomli_w.dumps(mock_recipe()).encode() + b'# caf\xe9 in Latin-1\nname = "t"\n')
    with pytest.raises(RecipeError, match=rf"{recipe}: not UTF-8 text \(byte \d+ is 0xe9\); save it as UTF-8"):
        load_recipe(recipe)
    err = one_line(capsys, ["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert "not UTF-8" in err and not (tmp_path / "run").exists()


def test_an_empty_run_dir_says_so(write_recipe: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: ``--run-dir ""`` was the current directory, refused as "run directory . is not empty"."""
    with pytest.raises(SystemExit) as info:
        cli.main(["run", str(write_recipe()), "--run-dir", ""])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--run-dir" in err and "is empty" in err and "not empty" not in err


# -- warnings ---------------------------------------------------------------------------------------
def test_one_agent_is_warned_no_debate_no_vote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    small = {"society.agents": 1, "society.models": ["mock:0.5"], "task.n_train": 2, "task.n_test": 2}
    recipe.write_text(tomli_w.dumps(mock_recipe(**small, **{"finetune.iterations": 0})))
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: society.agents = 1: one agent has no debate and no majority vote" in err
    assert recipe_warnings(recipe_from_dict(mock_recipe())) == []  # the paper's 3: quiet


def test_a_huge_society_is_warned_with_the_dry_runs_cost() -> None:
    openai = {
        "backend.name": "openai",
        "backend.options": {},
        "society.agents": 100_000,
        "society.models": ["gpt-4o-mini-2024-07-18"],
    }
    [line] = recipe_warnings(recipe_from_dict(mock_recipe(**openai)))
    assert line.startswith("society.agents = 100000: far beyond the paper's 3")
    # 20 + 20 problems, 2 iterations: eval 20 + 2 x (train 20 + eval 20) = 100 debates of 100000 x 3 calls
    assert "30,000,000 chat calls, $" in line
    mock = recipe_warnings(recipe_from_dict(mock_recipe(**{"society.agents": 11, "society.models": ["mock:0.5"]})))
    assert len(mock) == 1 and "chat calls" in mock[0]


# -- report on a read-only folder -------------------------------------------------------------------
@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary folder an unprivileged user can enter (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="agentsoc-faults-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_report_on_a_read_only_folder_does_not_say_resume(public_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a folder read-only for the CLI")
    recipe = public_tmp / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 0, "task.n_train": 2, "task.n_test": 2})))
    run_dir = public_tmp / "run"
    assert cli.main(["run", str(recipe), "--run-dir", str(run_dir), "--quiet"]) == 0
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    cmd = [sys.executable, "-m", "agentsoc.cli", "report", str(run_dir), "--no-plots"]
    if os.geteuid() == 0:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            p.chmod(0o755)
    err = done.stderr.strip()
    assert done.returncode == 2 and err.count("\n") == 0 and "Traceback" not in err, err
    assert "--resume" not in err and "then run agentsoc report again" in err


# -- SIGTERM ----------------------------------------------------------------------------------------
def test_sigterm_stops_the_run_like_ctrl_c(tmp_path: Path) -> None:
    """Before: SIGTERM ended the process at once, silently (exit -15), with no resume command."""
    recipe = tmp_path / "r.toml"
    small = {"task.n_train": 6, "task.n_test": 6, "finetune.iterations": 1, "backend.concurrency": 1}
    recipe.write_text(
        tomli_w.dumps(mock_recipe(**small, **{"backend.options": {"state_dir": "server", "latency_s": 0.3}}))
    )
    run_dir = tmp_path / "run"
    log = tmp_path / "out.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run_dir), "--quiet"],
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while "run directory:" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # some calls in flight
        assert proc.poll() is None, log.read_text()
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
        stopped_in = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "terminated (SIGTERM) — finished work is saved" in text
    assert f"resume with: agentsoc run {recipe} --run-dir {run_dir} --resume" in text
    assert stopped_in < 30
    lock = RunLock(run_dir)
    lock.acquire()  # released: another process may take the run at once
    lock.release()
    # and the resume command continues it to the end (faster: latency and concurrency may change on resume)
    recipe.write_text(tomli_w.dumps(mock_recipe(**{**small, "backend.concurrency": 8})))
    done = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
