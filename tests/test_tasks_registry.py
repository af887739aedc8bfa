"""The task registry: names, creation by name, the Task protocol, option and path handling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentsoc.tasks import Task, create, names


def test_names() -> None:
    assert names() == ["arithmetic", "gsm8k", "math", "mmlu"]


def test_unknown_task_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown task 'gsm9k'; choose one of arithmetic, gsm8k, math, mmlu"):
        create("gsm9k", {})


def test_every_task_satisfies_the_protocol(tmp_path: Path) -> None:
    (tmp_path / "g.jsonl").write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n", encoding="utf-8")
    (tmp_path / "m.jsonl").write_text(json.dumps({"problem": "p", "solution": "\\boxed{1}"}) + "\n", encoding="utf-8")
    (tmp_path / "q.csv").write_text("q,a,b,c,d,A\n", encoding="utf-8")
    options = {"arithmetic": {}, "gsm8k": {"path": "g.jsonl"}, "math": {"path": "m.jsonl"}, "mmlu": {"path": "q.csv"}}
    for name in names():
        task = create(name, options[name], base_dir=tmp_path)
        assert isinstance(task, Task)
        assert task.name == name
        assert len(task.load(n_train=1, n_test=0, seed=0).train) == 1


def test_relative_paths_resolve_against_base_dir_and_absolute_paths_stay(tmp_path: Path) -> None:
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    data = tmp_path / "g.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n", encoding="utf-8")
    assert create("gsm8k", {"path": "../g.jsonl"}, base_dir=recipe_dir).load(1, 0, 0).train[0].answer == "1"
    assert create("gsm8k", {"path": str(data)}, base_dir=recipe_dir).load(1, 0, 0).train[0].answer == "1"


def test_options_must_be_well_typed() -> None:
    with pytest.raises(ValueError, match="task 'gsm8k': option 'path': "):
        create("gsm8k", {"path": 3})


def test_negative_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_train and n_test must be >= 0"):
        create("arithmetic", {}).load(n_train=-1, n_test=0, seed=0)
