"""A damaged run database is refused in one line, never taken for a new run (issue 20, items 2 and 3):
a 0-byte ``run.sqlite`` (every paid call would be made again, silently) and garbage in the middle of
the file with its header intact (a ``sqlite3.DatabaseError`` traceback on ``--resume``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import cli
from agentsoc.store import RunStore, StoreError


@pytest.fixture
def finished(tmp_path: Path) -> tuple[Path, Path]:
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1})))
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(recipe), "--run-dir", str(run_dir), "--quiet"]) == 0
    return recipe, run_dir


def one_line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_an_empty_store_is_refused_not_restarted(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, run_dir = finished
    db = run_dir / "run.sqlite"
    for stale in run_dir.glob("run.sqlite-*"):
        stale.unlink()
    db.write_bytes(b"")
    for argv in (("run", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet"), ("jobs", str(run_dir))):
        err = one_line(capsys, *argv)
        assert f"{db}: empty run database (0 bytes)" in err and "another --run-dir" in err
    assert db.stat().st_size == 0  # nothing was written into it: the run was not started afresh
    with pytest.raises(StoreError, match="empty run database"):
        RunStore.open(run_dir)


def test_garbage_inside_the_store_is_one_line_on_resume_and_report(
    finished: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    recipe, run_dir = finished
    db = run_dir / "run.sqlite"
    size = db.stat().st_size
    assert size > 64 * 1024  # the garbage below lands well after the 100-byte header
    rng = random.Random(1)
    with db.open("r+b") as f:
        for k in range(1, 8):
            f.seek(size * k // 8)
            f.write(bytes(rng.randrange(256) for _ in range(4096)))
    err = one_line(capsys, "run", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet")
    assert f"{db}: corrupt or truncated run database" in err and "new --run-dir" in err
    err = one_line(capsys, "report", str(run_dir), "--no-plots")
    assert f"{db}: corrupt or truncated run database" in err
