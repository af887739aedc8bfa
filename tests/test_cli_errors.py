"""Bad input: one clear line naming file/line/field, a non-zero exit, and no run directory left behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agentsoc.cli import main


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def test_misspelled_recipe_field(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(**{"society.agnets": 3})
    err = fails(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert str(recipe) in err and "society.agnets: unknown field" in err
    assert not (tmp_path / "run").exists()


def test_wrong_type_names_field(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(**{"sampling.temperature": "hot"})
    err = fails(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert "sampling.temperature" in err


def test_unknown_backend(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = write_recipe(**{"backend.name": "opneai"})
    err = fails(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert "'opneai'" in err and "mock" in err
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_line(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "gsm.jsonl"
    good = [json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"}) for i in range(10)]
    data.write_text("\n".join([*good[:4], '{"question": "broken", "answer": ', *good[4:]]) + "\n")
    recipe = write_recipe(
        **{"task.name": "gsm8k", "task.options": {"path": "gsm.jsonl"}, "task.n_train": 4, "task.n_test": 4}
    )
    err = fails(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert "gsm.jsonl:5" in err
    assert not (tmp_path / "run").exists()


def test_missing_field_in_jsonl(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "q"}) + "\n")
    recipe = write_recipe(**{"task.name": "gsm8k", "task.options": {"path": str(data)}})
    err = fails(capsys, "run", str(recipe), "--run-dir", str(tmp_path / "run"))
    assert "gsm.jsonl:1" in err and "answer" in err


def test_existing_run_dir_untouched(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "precious.txt").write_text("keep me")
    err = fails(capsys, "run", str(write_recipe()), "--run-dir", str(run_dir))
    assert "not empty" in err
    assert [p.name for p in run_dir.iterdir()] == ["precious.txt"]


def test_resume_with_another_recipe_is_refused(
    write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", str(write_recipe(**{"finetune.iterations": 0})), "--run-dir", str(run_dir), "--quiet"]) == 0
    other = write_recipe("other.toml", **{"finetune.iterations": 0, "seed": 5})
    capsys.readouterr()
    err = fails(capsys, "run", str(other), "--run-dir", str(run_dir), "--resume")
    assert "different recipe" in err


def test_jobs_command(write_recipe: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    assert main(["run", str(write_recipe(**{"finetune.iterations": 1})), "--run-dir", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["jobs", str(run_dir), "--json"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert len(jobs) == 6 and {j["state"] for j in jobs} == {"succeeded"}
    assert main(["jobs", str(tmp_path / "nope")]) == 2
