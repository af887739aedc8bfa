"""Problems of the environment (not of agentsoc) are one line naming the path and what to do:
a corrupt or truncated database, a read-only run directory, a full disk, a data path that is a
directory or not UTF-8, a run directory that is a file, a closed pipe. Bugs keep their traceback."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import cli
from agentsoc.tasks import gsm8k

ROOT = Path(__file__).resolve().parents[1]


#: the unprivileged user the read-only checks run as (root writes anywhere)
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def run_cli(*args: str, user: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; ``user``: as the unprivileged user, with the environment of :func:`as_user`."""
    cmd = [sys.executable, "-m", "agentsoc.cli", *args]
    env = None
    if user is not None:
        env = user
        if os.geteuid() == 0:
            cmd = [*NOBODY, *cmd]
            cwd = Path(user["AGENTSOC_TEST_CWD"])
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def as_user() -> Iterator[dict[str, str]]:
    """The environment in which the unprivileged user can run this checkout's CLI.

    A clone in a directory other users cannot enter (under /root, a ``mktemp -d``) is not importable by
    that user, so the packages are copied to a folder everyone can read and put first on PYTHONPATH. The
    interpreter and its installed dependencies must be readable too; where they are not (a .venv inside
    such a clone), the test skips and says so — it cannot copy an environment."""
    env = dict(os.environ)
    if os.geteuid() != 0:
        yield env
        return
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a directory read-only for the CLI")
    folder = Path(tempfile.mkdtemp(prefix="agentsoc-user-"))
    try:
        for package in ("agentsoc", "backends"):
            shutil.copytree(ROOT / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
        for p in [folder, *folder.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        env["PYTHONPATH"] = str(folder)
        env["AGENTSOC_TEST_CWD"] = str(folder)
        probe = subprocess.run(
            [*NOBODY, sys.executable, "-c", "import agentsoc.cli"],
            capture_output=True, text=True, timeout=120, cwd=folder, env=env,
        )  # fmt: skip
        if probe.returncode != 0:
            why = (probe.stderr.strip().splitlines() or ["no output"])[-1]
            pytest.skip(
                f"the unprivileged user (uid 65534) cannot run {sys.executable} with its dependencies ({why}): "
                "the Python environment lives where other users cannot read it; put the checkout (or its "
                "virtual environment) in a directory others can enter to run this test"
            )
        yield env
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def public_tmp() -> Iterator[Path]:
    """A temporary folder an unprivileged user can enter (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="agentsoc-env-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def finished_run(folder: Path) -> tuple[Path, Path]:
    recipe = folder / "recipe.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1, "task.n_train": 6, "task.n_test": 6})))
    run_dir = folder / "run"
    done = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--quiet")
    assert done.returncode == 0, done.stderr
    return recipe, run_dir


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    err = done.stderr.strip()
    assert done.returncode == 2 and "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_corrupt_or_truncated_database_is_one_line(public_tmp: Path) -> None:
    recipe, run_dir = finished_run(public_tmp)
    db = run_dir / "run.sqlite"
    for name in ("run.sqlite-wal", "run.sqlite-shm"):
        (run_dir / name).unlink(missing_ok=True)
    db.write_bytes(db.read_bytes()[:100])  # truncated mid-header
    for args in (("jobs", str(run_dir)), ("run", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet")):
        err = one_line_error(run_cli(*args))
        assert str(db) in err and "corrupt or truncated" in err


def test_read_only_finished_run_lists_its_jobs_and_refuses_to_run_in_one_line(
    public_tmp: Path, as_user: dict[str, str]
) -> None:
    recipe, run_dir = finished_run(public_tmp)
    for p in [run_dir, *run_dir.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        jobs = run_cli("jobs", str(run_dir), user=as_user)
        assert jobs.returncode == 0, jobs.stderr
        rows = jobs.stdout.strip().splitlines()[2:]
        assert len(rows) >= 2 and all(" succeeded " in r for r in rows)
        refused = one_line_error(run_cli("run", str(recipe), "--run-dir", str(run_dir), "--resume", user=as_user))
        assert str(run_dir) in refused
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            p.chmod(0o755)


def test_disk_full_is_one_line_with_the_file(monkeypatch: pytest.MonkeyPatch, capsys: Any, write_recipe: Any) -> None:
    def full(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/iter-1/debate.jsonl")

    monkeypatch.setattr(cli, "_execute", full)
    assert cli.main(["run", str(write_recipe())]) == 2
    err = capsys.readouterr().err
    assert "No space left on device: /runs/x/iter-1/debate.jsonl; free some space" in err and "--resume" in err


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, write_recipe: Any) -> None:
    def bug(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "_execute", bug)
    with pytest.raises(ValueError, match="invariant"):
        cli.main(["run", str(write_recipe())])


def test_run_dir_that_is_a_file_and_data_path_that_is_a_directory(tmp_path: Path, write_recipe: Any) -> None:
    (tmp_path / "taken").write_text("x")
    err = one_line_error(run_cli("run", str(write_recipe()), "--run-dir", str(tmp_path / "taken")))
    assert "is a file" in err
    (tmp_path / "data").mkdir()
    recipe = tmp_path / "g.toml"
    recipe.write_text(
        tomli_w.dumps(mock_recipe(**{"task.name": "gsm8k", "task.options": {"path": str(tmp_path / "data")}}))
    )
    err = one_line_error(run_cli("run", str(recipe), "--run-dir", str(tmp_path / "g")))
    assert f"{tmp_path / 'data'}: is a directory" in err
    assert not (tmp_path / "g").exists()  # nothing was created for a recipe that cannot run


def test_non_utf8_data_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "gsm.jsonl"
    path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    task = gsm8k.create({"path": str(path)})
    with pytest.raises(gsm8k.DataError, match=rf"{path}:2: not UTF-8 text"):
        task.load(1, 1, 0)


def test_dry_run_into_a_closed_pipe_exits_quietly() -> None:
    cmd = f"{sys.executable} -m agentsoc.cli run recipes/math-gpt4o-mini.toml --dry-run | head -1"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and done.stderr == "" and done.stdout.count("\n") == 1
