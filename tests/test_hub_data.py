"""Hugging Face datasets, the users' way: ``agentsoc data fetch RECIPE`` reads hub-layout datasets through
``datasets.load_dataset`` into the agentsoc cache, and a run reads that cache with no network at all.

No hub is reachable from the tests: each dataset is built here with ``datasets`` itself, as parquet files in
the hub's layout (a README whose YAML lists the configs and their splits' files, like ``openai/gsm8k``'s), and
the recipe names the folder where it would name ``openai/gsm8k``. From ``load_dataset`` on, the code path is
the one a user's fetch takes.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agentsoc import cli, tasks
from agentsoc.config import load_recipe
from agentsoc.datafetch import fetch_recipe, hub_splits
from agentsoc.tasks.hub import HubSplit, NotFetched, cache_root

datasets = pytest.importorskip("datasets")


def write_hub_dataset(folder: Path, configs: dict[str, dict[str, list[dict[str, Any]]]], features: Any = None) -> Path:
    """``folder`` in the hub layout: ``<config>/<split>-00000-of-00001.parquet`` and a README listing them."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (folder / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=features).to_parquet(
                str(folder / config / f"{split}-00000-of-00001.parquet")
            )
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (folder / "README.md").write_text("\n".join([*card, "---", ""]), encoding="utf-8")
    return folder


def gsm8k_rows(start: int, n: int) -> list[dict[str, Any]]:
    return [
        {"question": f"Tom has {i} apples and buys 2 more. How many?", "answer": f"{i}+2={i + 2}\n#### {i + 2:,}"}
        for i in range(start, start + n)
    ]


def math_rows(subject: str, n: int) -> list[dict[str, Any]]:
    return [
        {
            "problem": f"({subject}) Compute ${i}+1$.",
            "level": f"Level {i % 5 + 1}",
            "type": subject.title(),
            "solution": f"We add: ${i}+1=\\boxed{{{i + 1}}}$.",
        }
        for i in range(n)
    ]


def mmlu_rows(n: int) -> list[dict[str, Any]]:
    return [
        {
            "question": f"Which number is {i % 4}?",
            "subject": "elementary_mathematics",
            "choices": [str(k) for k in range(4)],
            "answer": i % 4,
        }
        for i in range(n)
    ]


def write_recipe(folder: Path, task: str, options: str, n_train: int, n_test: int) -> Path:
    path = folder / f"{task}-hub.toml"
    path.write_text(
        f"""name = "{task}-hub"
seed = 0
[task]
name = "{task}"
n_train = {n_train}
n_test = {n_test}
options = {{ {options} }}
[backend]
name = "mock"
[society]
models = ["mock:0.5"]
""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("AGENTSOC_DATA_DIR", str(folder))
    return folder


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Any connection attempt fails the test (and is recorded): reading the cache must not try one."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == [], f"something tried the network: {attempts}"


def test_gsm8k_fetch_then_load_offline(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = write_hub_dataset(
        tmp_path / "openai__gsm8k",
        {"main": {"train": gsm8k_rows(0, 40), "test": gsm8k_rows(1000, 30)}, "socratic": {"train": gsm8k_rows(0, 3)}},
    )
    options = f'hf_dataset = "{hub}", hf_config = "main", hf_split = "train", hf_test_split = "test"'
    recipe = write_recipe(tmp_path, "gsm8k", options, n_train=20, n_test=25)

    assert cli.main(["data", "fetch", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "split train): 40 rows fetched into" in out and "split test): 30 rows fetched into" in out
    assert "task 'gsm8k' has 20 training and 25 held-out problems (seed 0)" in out
    assert all(p.cache_file().is_file() and cache in p.cache_file().parents for p in hub_splits(load_recipe(recipe)))

    # the run side: no network, the same problems every time, train from train and held-out from test
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a: pytest.fail("a cached read opened a connection"))
        task = tasks.create("gsm8k", load_recipe(recipe).task.options, base_dir=tmp_path)
        split = task.load(20, 25, seed=0)
        again = task.load(20, 25, seed=0)
    assert split == again
    assert len(split.train) == 20 and len(split.test) == 25
    assert all(int(p.answer or "") < 1000 for p in split.train) and all(int(p.answer or "") > 1000 for p in split.test)
    assert split.test[0].answer == str(int(split.test[0].question.split()[2]) + 2)  # "#### 1,002" -> "1002"
    assert task.load(20, 25, seed=1).train != split.train


def test_math_joins_subject_configs_and_filters_levels(tmp_path: Path, cache: Path) -> None:
    hub = write_hub_dataset(
        tmp_path / "hendrycks_math",
        {"algebra": {"test": math_rows("algebra", 30)}, "geometry": {"test": math_rows("geometry", 30)}},
    )
    options = f'hf_dataset = "{hub}", hf_config = ["algebra", "geometry"], hf_split = "test", levels = [1, 2, 3]'
    recipe = load_recipe(write_recipe(tmp_path, "math", options, n_train=18, n_test=18))
    assert len(hub_splits(recipe)) == 2
    lines: list[str] = []
    assert fetch_recipe(recipe, say=lines.append) == 2
    task = tasks.create("math", recipe.task.options, base_dir=tmp_path)
    split = task.load(18, 18, seed=0)
    problems = split.train + split.test
    assert {p.fields["level"] for p in problems} <= {"Level 1", "Level 2", "Level 3"}
    # levels 1-3 of 2 x 30 rows: 36 problems, all of them used, from both subjects
    assert len({p.question for p in problems}) == 36
    assert {p.fields["type"] for p in problems} == {"Algebra", "Geometry"}
    assert all(task.is_equivalent(p.answer or "", str(int(p.question.split("$")[1][:-2]) + 1)) for p in problems)
    # a local folder has no revision: fetching again reads it again (its files may have changed)
    assert fetch_recipe(recipe, say=lines.append) == 2


def test_mmlu_rows_with_class_label_answers(tmp_path: Path, cache: Path) -> None:
    features = datasets.Features(
        {
            "question": datasets.Value("string"),
            "subject": datasets.Value("string"),
            "choices": datasets.Sequence(datasets.Value("string")),
            "answer": datasets.ClassLabel(names=["A", "B", "C", "D"]),
        }
    )
    rows = mmlu_rows(4) + [{**r, "question": f"Q{i}: {r['question']}"} for i, r in enumerate(mmlu_rows(40))]
    hub = write_hub_dataset(tmp_path / "cais__mmlu", {"all": {"test": rows, "dev": mmlu_rows(5)}}, features)
    recipe = load_recipe(
        write_recipe(tmp_path, "mmlu", f'hf_dataset = "{hub}", hf_config = "all", hf_split = "test"', 20, 20)
    )
    fetch_recipe(recipe, say=lambda line: None)
    split = tasks.create("mmlu", recipe.task.options, base_dir=tmp_path).load(20, 20, seed=0)
    for p in split.train + split.test:
        number = p.question.rsplit(" ", 1)[-1].rstrip("?")
        assert p.fields[p.answer.lower() if p.answer else ""] == number
    assert "".join(sorted(split.train[0].fields)) == "abcd"


def test_a_pinned_split_is_fetched_once_and_cached_rows_are_the_fetched_ones(tmp_path: Path, cache: Path) -> None:
    hub = write_hub_dataset(tmp_path / "gsm", {"main": {"train": gsm8k_rows(0, 12)}})
    part = HubSplit(str(hub), "main", "train", "abc123")
    from agentsoc.tasks.hub import fetch

    path, rows, fresh = fetch(part)
    assert (rows, fresh) == (12, True) and path.parent.parent.name == "abc123"
    assert [json.loads(line)["question"] for line in path.read_text().splitlines()] == [
        r["question"] for r in gsm8k_rows(0, 12)
    ]
    assert fetch(part)[1:] == (12, False)  # a pinned revision never changes: no second download
    assert fetch(part, force=True)[1:] == (12, True)
    assert not list(path.parent.glob(".*.tmp"))


def test_run_without_the_data_says_which_command_fetches_it(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str], no_network: list[object]
) -> None:
    options = 'hf_dataset = "openai/gsm8k", hf_config = "main", hf_revision = "740312a", hf_test_split = "test"'
    recipe = write_recipe(tmp_path, "gsm8k", options, n_train=5, n_test=5)
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: task 'gsm8k': dataset openai/gsm8k (config main, split train, revision 740312a)")
    assert err.endswith(f"fetch it on a machine with network first: agentsoc data fetch {recipe}")
    assert str(cache) in err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_dry_run_without_the_data_estimates_anyway(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    options = 'hf_dataset = "openai/gsm8k", hf_config = "main", hf_revision = "740312a"'
    recipe = write_recipe(tmp_path, "gsm8k", options, n_train=5, n_test=5)
    assert cli.main(["run", str(recipe), "--dry-run"]) == 0
    assert "data not found: typical 240-character problems" in capsys.readouterr().out


def test_not_fetched_is_a_data_error_naming_the_cache(cache: Path) -> None:
    part = HubSplit("cais/mmlu", "all", "test", "c30699e")
    with pytest.raises(NotFetched, match=r"dataset cais/mmlu \(config all, split test, revision c30699e\)"):
        tasks.create(
            "mmlu", {"hf_dataset": "cais/mmlu", "hf_config": "all", "hf_split": "test", "hf_revision": "c30699e"}
        ).load(1, 1, 0)
    assert cache_root() == cache and part.cache_file().is_relative_to(cache)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hf_dataset": "openai/gsm8k"}, "task 'gsm8k': option 'hf_revision': missing; pin the commit of"),
        ({"path": "a.jsonl", "hf_dataset": "openai/gsm8k"}, "option 'hf_dataset': give either 'path'"),
        ({"path": "a.jsonl", "hf_config": "main"}, "option 'hf_config': only applies with 'hf_dataset'"),
        ({"path": "a.jsonl", "hf_split": "test"}, "option 'hf_split': only applies with 'hf_dataset'"),
        ({"hf_dataset": "x/y", "hf_revision": "1", "test_path": "t.jsonl"}, "'test_path': only applies with 'path'"),
        ({"hf_dataset": "x/y", "hf_revision": "1", "hf_config": []}, "'hf_config': Value error, expected a"),
        ({"hf_dataset": "./missing", "hf_split": "test"}, "option 'hf_dataset': no such file or directory"),
        ({"hf_dataset": "x/y", "hf_revision": "1", "hf_splt": "test"}, "unknown option 'hf_splt' (did you mean"),
    ],
)  # fmt: skip
def test_bad_data_options_are_one_line_naming_the_option(tmp_path: Path, options: dict[str, Any], message: str) -> None:
    (tmp_path / "a.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        tasks.create("gsm8k", options, base_dir=tmp_path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fetch_errors_are_one_line(tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub = write_hub_dataset(tmp_path / "gsm", {"main": {"train": gsm8k_rows(0, 3)}})
    recipe = write_recipe(tmp_path, "gsm8k", f'hf_dataset = "{hub}", hf_config = "socratic"', 1, 1)
    assert cli.main(["data", "fetch", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not fetch dataset" in err and "socratic" in err
    small = write_recipe(tmp_path, "gsm8k", f'hf_dataset = "{hub}", hf_config = "main"', 2, 2)
    assert cli.main(["data", "fetch", str(small)]) == 2
    assert "has 3 distinct problems, fewer than n_train + n_test = 2 + 2" in capsys.readouterr().err


def test_fetch_without_the_datasets_library_names_the_extra(
    tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentsoc.tasks.base import DataError
    from agentsoc.tasks.hub import fetch

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed: `import datasets` raises
    with pytest.raises(DataError, match=r"needs the 'datasets' library: install the data extra"):
        fetch(HubSplit("openai/gsm8k", "main", "train", "740312a"))
