"""No run directory that only a hand can fix (issue 20, items 2, 3 and 5): a run that stopped before
its first call (a recipe error found late, such as an unknown model) may be started again with the
corrected recipe; a directory holding a recipe but an empty store, or no store, is refused in one
line; ``--run-dir afile/sub`` (a parent that is a file) is one line, not a ``FileExistsError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import cli
from agentsoc.store import RunStore

SMALL = {"finetune.iterations": 0, "task.n_train": 3, "task.n_test": 3}


def write(path: Path, **overrides: Any) -> Path:
    path.write_text(tomli_w.dumps(mock_recipe(**{**SMALL, **overrides})))
    return path


def one_line(capsys: pytest.CaptureFixture[str], argv: list[str], code: int = 2) -> str:
    capsys.readouterr()
    assert cli.main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_a_run_dir_under_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("x")
    err = one_line(capsys, ["run", str(write(tmp_path / "r.toml")), "--run-dir", str(tmp_path / "afile" / "sub")])
    assert f"{tmp_path / 'afile'} is a file" in err and "--run-dir" in err
    assert (tmp_path / "afile").read_text() == "x"


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_that_never_made_a_call_may_start_again_with_a_corrected_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], resume: bool
) -> None:
    """Before: the corrected recipe could neither start ("not empty") nor resume ("society.models differ")."""
    run_dir = tmp_path / "run"
    wrong = write(tmp_path / "wrong.toml", **{"society.models": ["mock:abc"]})
    assert cli.main(["run", str(wrong), "--run-dir", str(run_dir), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'mock:abc'" in err and (run_dir / "run.sqlite").exists()
    fixed = write(tmp_path / "fixed.toml")
    assert cli.main(["run", str(fixed), "--run-dir", str(run_dir), "--quiet", *(["--resume"] if resume else [])]) == 0
    assert "mock:abc" not in (run_dir / "recipe.toml").read_text()  # the directory records the recipe it ran
    store = RunStore.open(run_dir, readonly=True)
    try:
        assert store.has_work() and store.iteration(0).scores is not None
    finally:
        store.close()


def test_a_run_that_did_work_is_still_bound_to_its_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(write(tmp_path / "a.toml")), "--run-dir", str(run_dir), "--quiet"]) == 0
    other = write(tmp_path / "b.toml", seed=5)
    assert "not empty; pass --resume" in one_line(capsys, ["run", str(other), "--run-dir", str(run_dir)])
    err = one_line(capsys, ["run", str(other), "--run-dir", str(run_dir), "--resume"])
    assert "different recipe (these fields differ: seed)" in err


def test_an_empty_store_is_refused_without_resume_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Before: "not empty; pass --resume" — and with --resume the run silently started afresh."""
    run_dir = tmp_path / "run"
    recipe = write(tmp_path / "r.toml")
    assert cli.main(["run", str(recipe), "--run-dir", str(run_dir), "--quiet"]) == 0
    for stale in run_dir.glob("run.sqlite-*"):
        stale.unlink()
    (run_dir / "run.sqlite").write_bytes(b"")
    err = one_line(capsys, ["run", str(recipe), "--run-dir", str(run_dir)])
    assert "empty run database (0 bytes)" in err


def test_a_recipe_without_its_store_is_named_as_a_lost_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    recipe = write(tmp_path / "r.toml")
    assert cli.main(["run", str(recipe), "--run-dir", str(run_dir), "--quiet"]) == 0
    for db in run_dir.glob("run.sqlite*"):
        db.unlink()
    err = one_line(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--resume"])
    assert "holds a run's recipe.toml but no run.sqlite" in err and "another --run-dir" in err
