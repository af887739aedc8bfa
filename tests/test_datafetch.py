"""``agentsoc data fetch``: which splits a recipe needs (zero-shot transfer's evaluation task included), and the
command a run without its data names — for ``run`` and for ``compare`` over several recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentsoc import cli
from agentsoc.config import load_recipe
from agentsoc.datafetch import fetch_command, hub_splits
from agentsoc.tasks.hub import HubSplit

ROOT = Path(__file__).resolve().parents[1]

GSM8K = 'hf_dataset = "openai/gsm8k", hf_config = "main", hf_revision = "740312a", hf_test_split = "test"'
MATH = 'hf_dataset = "EleutherAI/hendrycks_math", hf_config = ["algebra", "geometry"], hf_split = "test", '
MATH += 'hf_revision = "21a5633", levels = [1, 2, 3]'


def recipe_file(folder: Path, name: str, task: str, options: str, evaluation: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f"""name = "{name}"
[task]
name = "{task}"
n_train = 5
n_test = 5
options = {{ {options} }}
[backend]
name = "mock"
[society]
models = ["mock:0.5"]
{evaluation}""",
        encoding="utf-8",
    )
    return path


def test_a_recipe_needs_its_task_splits_and_its_transfer_tasks(tmp_path: Path) -> None:
    transfer = f'[evaluation.task]\nname = "gsm8k"\nn_train = 1\nn_test = 5\noptions = {{ {GSM8K} }}\n'
    recipe = load_recipe(recipe_file(tmp_path, "math-to-gsm8k", "math", MATH, transfer))
    assert hub_splits(recipe) == [
        HubSplit("EleutherAI/hendrycks_math", "algebra", "test", "21a5633"),
        HubSplit("EleutherAI/hendrycks_math", "geometry", "test", "21a5633"),
        HubSplit("openai/gsm8k", "main", "train", "740312a"),
        HubSplit("openai/gsm8k", "main", "test", "740312a"),
    ]
    same = f'[evaluation.task]\nname = "gsm8k"\nn_train = 5\nn_test = 9\noptions = {{ {GSM8K} }}\n'
    assert len(hub_splits(load_recipe(recipe_file(tmp_path, "gsm", "gsm8k", GSM8K, same)))) == 2  # no repeats


@pytest.mark.parametrize(
    "name", ["math-gpt35", "math-gpt4o-mini", "math-mistral-vllm", "gsm8k-gpt35", "gsm8k-llama3-vllm"]
)
def test_the_paper_recipes_name_a_pinned_dataset(name: str) -> None:
    parts = hub_splits(load_recipe(ROOT / "recipes" / f"{name}.toml"))
    assert parts and all(p.revision and len(p.revision) == 40 for p in parts)
    if name.startswith("math"):  # MATH's test split, every subject (levels are filtered after reading)
        assert {p.split for p in parts} == {"test"} and len(parts) == 7
    else:  # GSM8K: train problems from train, held-out ones from test
        assert [(p.config, p.split) for p in parts] == [("main", "train"), ("main", "test")]


def test_generated_data_needs_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["data", "fetch", "arithmetic-mock"]) == 0
    out = capsys.readouterr().out
    assert "no Hugging Face datasets to fetch" in out and "has 60 training and 60 held-out problems" in out


def test_fetch_command_quotes_paths() -> None:
    assert fetch_command("recipes/x.toml") == "agentsoc data fetch recipes/x.toml"
    assert fetch_command(["a b.toml", "c.toml"]) == "agentsoc data fetch 'a b.toml' c.toml"


def test_compare_without_the_data_names_every_recipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AGENTSOC_DATA_DIR", str(tmp_path / "empty-cache"))
    first = recipe_file(tmp_path, "gsm-a", "gsm8k", GSM8K)
    second = recipe_file(tmp_path, "gsm-b", "gsm8k", GSM8K)
    code = cli.main(
        ["compare", str(first), str(second), "--methods", "base", "--out", str(tmp_path / "out"), "--quiet"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(f"agentsoc data fetch {first} {second}")
