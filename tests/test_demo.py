"""The demo recipe ships inside the package and --quick shrinks it to a smoke run."""

from __future__ import annotations

from pathlib import Path

from agentsoc.cli import demo_recipe
from agentsoc.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_demo_recipe_is_packaged_and_the_same_as_the_repo_one() -> None:
    full = demo_recipe(quick=False)
    assert full == load_recipe(ROOT / "recipes" / "arithmetic-local.toml").model_copy(update={"base_dir": Path(".")})
    assert full.backend.name == "local" and full.society.agents == 3 and full.society.summarize
    assert full.finetune.iterations >= 2


def test_quick_demo_is_smaller_and_named_apart() -> None:
    full, quick = demo_recipe(quick=False), demo_recipe(quick=True)
    assert quick.name == full.name + "-quick"
    assert quick.task.n_train < full.task.n_train and quick.task.n_test < full.task.n_test
    assert quick.finetune.iterations == 1
    assert quick.society == full.society  # same method, fewer problems
