"""MATH (Hendrycks et al.): competition problems; the answer is the last ``\\boxed{}`` of a solution.

Prompts are MAFT's own (algorithm.md §2.3), typos kept because they produced the reported numbers.
The reference uses levels 1-3 of the MATH test split; ``levels`` selects them from any copy: a JSONL
file, or the hub's ``EleutherAI/hendrycks_math`` (one config per subject, same fields).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import field_validator

from agentsoc.options import parse_options
from agentsoc.prompts import PromptSet
from agentsoc.tasks import math_equiv
from agentsoc.tasks.attribution import quoted_spans, within
from agentsoc.tasks.base import DataError, Problem, Split
from agentsoc.tasks.boxed import last_boxed
from agentsoc.tasks.files import read_records, stable_id, text_field
from agentsoc.tasks.source import DataOptions, DataSource, Reader, Records, load_split
from agentsoc.tasks.summary import SUMMARIZER_BLOCK, SUMMARIZER_PREFIX, SUMMARIZER_SUFFIX, summary_message

NAME = "math"

#: MAFT's MATH prompts, verbatim from ``original_gen.py`` (algorithm.md §2.3)
PRESET = PromptSet(
    round0="Can you solve the following math problem? {question} Provide a bullet point summary of your reasoning. "
    "Your final answer should be a single answer, in the form \\boxed{answer}, at the end of your response.",
    debate_prefix="Here is are solution from other agents: ",
    debate_block="\n\n One agent response: {other_response}",
    debate_suffix="\n\n Using each response as additional advice, can you give an updated bullet by bullet answer to "
    "{question}? Your final answer should be be in the form \\boxed{answer} given at the end of your response.",
    self_only="Can you double check that your answer is correct? Please reiterate your answer, with your final answer "
    "a single answer of the form \\boxed{answer} at the end of your response.",
    summarizer_prefix=SUMMARIZER_PREFIX,
    summarizer_block=SUMMARIZER_BLOCK,
    summarizer_suffix=SUMMARIZER_SUFFIX,
    summary_message=summary_message(
        "Your final answer should be be in the form \\boxed{answer} given at the end of your response."
    ),
)

_LEVEL = re.compile(r"^Level\s*(\d)$")


class Options(DataOptions):
    """The data options (JSONL, a JSON list or a dataset) and ``levels``: e.g. ``[1, 2, 3]`` (default: all)."""

    levels: tuple[int, ...] | None = None

    @field_validator("levels")
    @classmethod
    def _check_levels(cls, levels: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if levels is not None and (not levels or any(not 1 <= level <= 5 for level in levels)):
            raise ValueError("expected a non-empty list of levels between 1 and 5")
        return levels


class MathTask:
    """MATH problems; answers are LaTeX, compared by normal form and then by sympy."""

    name = NAME

    def __init__(self, data: DataSource | None = None, levels: tuple[int, ...] | None = None) -> None:
        self.data = data
        self.levels = levels
        self.prompts = PRESET

    def load(self, n_train: int, n_test: int, seed: int) -> Split:
        def from_file(path: Path) -> list[Problem]:
            return read_problems(path, self.levels)

        def from_rows(records: Records) -> list[Problem]:
            return problems_from_records(records, self.levels)

        return load_split(Reader(NAME, from_file, from_rows), self.data, n_train, n_test, seed)

    def parse_answer(self, text: str) -> str | None:
        """The agent's own last ``\\boxed{}``: a critic's restatement of another agent's box ("Agent 2's
        \\boxed{20} is incorrect", "Agent 1 concluded \\boxed{5}, but ...") is skipped, unless the reply
        has no box of its own ("Both agents got \\boxed{5}, and I agree." adopts 5)."""
        quoted = quoted_spans(text)
        boxed = last_boxed(text, skip=lambda position: within(quoted, position))
        if boxed is None:
            boxed = last_boxed(text)
        normal = math_equiv.normalize(boxed) if boxed is not None else ""
        return normal or None

    def is_equivalent(self, a: str, b: str) -> bool:
        return math_equiv.is_equivalent(a, b)


def read_problems(path: Path, levels: tuple[int, ...] | None = None) -> list[Problem]:
    """The problems of a MATH file at the given levels; the ground truth is the solution's last box."""
    return problems_from_records(read_records(path), levels)


def problems_from_records(records: Records, levels: tuple[int, ...] | None = None) -> list[Problem]:
    """Problems at the given levels from MATH records (file lines or ``EleutherAI/hendrycks_math`` rows)."""
    problems = []
    for location, record in records:
        question = text_field(record, "problem", location)
        solution = text_field(record, "solution", location)
        level = _level(record, location, required=levels is not None)
        if levels is not None and _level_number(level) not in levels:
            continue
        boxed = last_boxed(solution)
        answer = math_equiv.normalize(boxed) if boxed is not None else ""
        if not answer:
            raise DataError(f"{location}: field 'solution': no \\boxed{{...}} answer")
        fields = {"level": level, "type": str(record.get("type", ""))}
        problems.append(Problem(id=stable_id(NAME, question), question=question, answer=answer, fields=fields))
    return problems


def _level(record: dict[str, Any], location: str, *, required: bool) -> str:
    """The ``level`` field as ``"Level 3"``; some MATH copies store the bare number."""
    value = record.get("level")
    if isinstance(value, int) and not isinstance(value, bool):
        return f"Level {value}"
    if value is None and not required:
        return ""
    return text_field(record, "level", location)


def _level_number(level: str) -> int | None:
    """``"Level 3"`` -> 3; MATH also has ``"Level ?"``, which no ``levels`` filter selects."""
    match = _LEVEL.match(level.strip())
    return int(match[1]) if match else None


def create(options: Mapping[str, Any], base_dir: Path | None = None) -> MathTask:
    """The task from recipe options; relative paths resolve against ``base_dir``."""
    opts = parse_options(f"task '{NAME}'", Options, options)
    return MathTask(opts.source(NAME, base_dir), opts.levels)
