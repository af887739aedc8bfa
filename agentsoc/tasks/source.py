"""Where a benchmark's problems come from: local files or a Hugging Face dataset, one option set for all.

GSM8K, MATH and MMLU take the same data options (:class:`DataOptions`) and load the same way
(:class:`DataSource`); each task only says how a file or a dataset row becomes a :class:`Problem`.

The paper's splits (algorithm.md §4.1), which the shipped recipes follow:

- 500 training and 500 held-out problems per dataset, drawn with the recipe's seed (the GPT-3.5
  GSM8K rows: 1,000 held-out problems, ``n_test = 1000``);
- GSM8K: training problems from the ``train`` split, held-out ones from ``test``
  (``hf_split = "train"``, ``hf_test_split = "test"``);
- MATH: both sets from MATH's *test* split, levels 1-3 (``levels = [1, 2, 3]``; Table 6 and Fig. 11
  use all levels), as the reference code did; one shuffled pool gives train first, then test;
- MMLU (Table 7): both sets from the ``test`` split of all 57 subjects (``cais/mmlu``, config ``all``).

The draw is ours (Python's ``random.Random(seed)`` over the de-duplicated pool), not the reference's
``random.seed(0)`` shuffle of the sorted MATH files, so the problems are the same *kind* as the
paper's, not the same 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from agentsoc.options import OptionProblem, OptionsError
from agentsoc.tasks import hub
from agentsoc.tasks.base import DataError, Problem, Split
from agentsoc.tasks.files import split
from agentsoc.tasks.options import resolve_path

#: ``(location, record)`` pairs, from a JSONL file or from dataset rows
Records = Iterable[tuple[str, dict[str, Any]]]


class DataOptions(BaseModel):
    """Local files (``path``, ``test_path``) or a Hugging Face dataset (``hf_*``): exactly one of the two.

    ``path``/``test_path``: the problems, and optionally separate held-out problems (relative to the
    recipe's folder). ``hf_dataset``: a hub id such as ``openai/gsm8k``, or a local folder in the hub
    layout (starting with ``/``, ``./``, ``../`` or ``~``); ``hf_config``: a config name, or a list of
    them whose rows are joined (``EleutherAI/hendrycks_math`` has one per subject); ``hf_split``: the
    problems' split; ``hf_test_split``: optional separate held-out split; ``hf_revision``: the
    repository commit, required for hub ids so that a rerun reads the same rows.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = None
    test_path: Path | None = None
    hf_dataset: str | None = None
    hf_config: str | tuple[str, ...] | None = None
    hf_split: str = "train"
    hf_test_split: str | None = None
    hf_revision: str | None = None

    @field_validator("hf_config")
    @classmethod
    def _check_config(cls, config: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(config, tuple) and not config:
            raise ValueError("expected a config name or a non-empty list of them")
        return config

    def problems(self) -> list[OptionProblem]:
        """What is wrong with the combination of options (each field alone is already valid)."""
        hub_only = ("hf_config", "hf_split", "hf_test_split", "hf_revision")
        hub_fields = [f for f in hub_only if f in self.model_fields_set]
        if self.path is not None and self.hf_dataset is not None:
            return [OptionProblem("hf_dataset", "give either 'path' (local files) or 'hf_dataset', not both")]
        if self.path is None and self.hf_dataset is None:
            return [OptionProblem("path", "missing; give a local file, or 'hf_dataset' for a Hugging Face dataset")]
        if self.path is not None:
            return [OptionProblem(f, "only applies with 'hf_dataset'") for f in hub_fields]
        if self.test_path is not None:
            return [OptionProblem("test_path", "only applies with 'path'; use 'hf_test_split' with 'hf_dataset'")]
        if self.hf_dataset is not None and not _is_local(self.hf_dataset) and not self.hf_revision:
            return [
                OptionProblem(
                    "hf_revision",
                    f"missing; pin the commit of {self.hf_dataset!r} so that every run reads the same rows",
                )
            ]
        return []

    def source(self, task: str, base_dir: Path | None) -> DataSource:
        """The data source these options name; local paths resolve against ``base_dir`` and must exist."""
        if problems := self.problems():
            raise OptionsError(f"task '{task}'", problems)
        if self.path is not None:
            train = FilePool(resolve_path(task, "path", self.path, base_dir))
            test = FilePool(resolve_path(task, "test_path", self.test_path, base_dir)) if self.test_path else None
            return DataSource(task, train, test)
        assert self.hf_dataset is not None  # problems() allows exactly one source
        dataset = self.hf_dataset
        if _is_local(dataset):
            folder = Path(dataset).expanduser()
            dataset = str(resolve_path(task, "hf_dataset", folder, base_dir).resolve())
        configs: tuple[str | None, ...] = (
            (self.hf_config,) if isinstance(self.hf_config, str) or self.hf_config is None else self.hf_config
        )

        def pool(split_name: str) -> HubPool:
            return HubPool(tuple(hub.HubSplit(dataset, c, split_name, self.hf_revision) for c in configs))

        return DataSource(task, pool(self.hf_split), pool(self.hf_test_split) if self.hf_test_split else None)


def _is_local(dataset: str) -> bool:
    return dataset.startswith(("/", "./", "../", "~"))


@dataclass(frozen=True)
class FilePool:
    """Problems in a local file (or a folder of them, for MMLU's CSVs)."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HubPool:
    """Problems in cached dataset splits, one per config, joined in order."""

    parts: tuple[hub.HubSplit, ...]

    def __str__(self) -> str:
        return " + ".join(str(p) for p in self.parts)


@dataclass(frozen=True)
class Reader:
    """How one task turns its data into problems: a local file, or records (dataset rows)."""

    task: str
    from_file: Callable[[Path], list[Problem]]
    from_rows: Callable[[Records], list[Problem]]

    def read(self, pool: FilePool | HubPool) -> list[Problem]:
        if isinstance(pool, FilePool):
            return self.from_file(pool.path)
        return [p for part in pool.parts for p in self.from_rows(hub.read_rows(self.task, part))]


@dataclass(frozen=True)
class DataSource:
    """A task's problems and, optionally, separate held-out problems."""

    task: str
    train: FilePool | HubPool
    test: FilePool | HubPool | None = None

    def hub_splits(self) -> list[hub.HubSplit]:
        """The dataset splits to fetch (none for local files)."""
        return [p for pool in (self.train, self.test) if isinstance(pool, HubPool) for p in pool.parts]

    def load(self, reader: Reader, n_train: int, n_test: int, seed: int) -> Split:
        """Seeded, disjoint train/held-out problems (:func:`agentsoc.tasks.files.split`)."""
        train_pool = reader.read(self.train)
        test_pool = reader.read(self.test) if self.test is not None else None
        return split(
            self.task,
            train_pool,
            str(self.train),
            n_train,
            n_test,
            seed,
            test_pool=test_pool,
            test_source=str(self.test) if self.test is not None else None,
        )


def load_split(reader: Reader, data: DataSource | None, n_train: int, n_test: int, seed: int) -> Split:
    """``data.load``; a task built without data (only to parse answers) cannot load problems."""
    if data is None:
        raise DataError(f"task '{reader.task}': no data source; give the option 'path' or 'hf_dataset'")
    return data.load(reader, n_train, n_test, seed)


class RecordTask:
    """A task whose problems are records of one data source, read by one :class:`Reader`
    (GSM8K, MMLU): what those tasks share is construction and loading, not parsing."""

    name: str

    def __init__(self, data: DataSource | None = None) -> None:
        self.data = data

    def reader(self) -> Reader:
        raise NotImplementedError

    def load(self, n_train: int, n_test: int, seed: int) -> Split:
        return load_split(self.reader(), self.data, n_train, n_test, seed)
