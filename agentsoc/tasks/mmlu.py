"""MMLU: four-option multiple choice from the Hendrycks CSVs (no header: question, A, B, C, D, answer).

Du et al.'s prompts (algorithm.md §2.6) ask for the answer "in the form (X)"; the parser accepts that
and the other ways models state a letter, but never a letter that is part of a word. In debate rounds
>= 1 the agent's own final statement wins: a critic quotes the other agents ("one agent's answer is (A)
... I conclude (C)"), so statements inside such quotes (:mod:`agentsoc.tasks.attribution`) do not count,
and an "(X)" that closes the response beats an "answer is" phrase earlier on.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from agentsoc.options import parse_options
from agentsoc.prompts import PromptSet
from agentsoc.tasks.attribution import quoted_spans, within
from agentsoc.tasks.base import DataError, Problem, Split
from agentsoc.tasks.boxed import last_boxed
from agentsoc.tasks.files import load_files, stable_id
from agentsoc.tasks.options import resolve_path
from agentsoc.tasks.summary import SUMMARIZER_BLOCK, SUMMARIZER_PREFIX, SUMMARIZER_SUFFIX, summary_message

NAME = "mmlu"
_ANSWER_SENTENCE = "Put your answer in the form (X) at the end of your response."

#: Du et al.'s MMLU prompts (algorithm.md §2.6) plus the §12 summary reconstruction
PRESET = PromptSet(
    round0="Can you answer the following question as accurately as possible? {question}: A) {a}, B) {b}, C) {c}, "
    "D) {d} Explain your answer, putting the answer in the form (X) at the end of your response.",
    debate_prefix="These are the solutions to the problem from other agents: ",
    debate_block="\n\n One agent solution: ```{other_response}```",
    debate_suffix="\n\n Using the reasoning from other agents as additional advice, can you give an updated answer? "
    "Examine your solution and that other agents step by step. " + _ANSWER_SENTENCE,
    self_only="Can you double check that your answer is correct. Put your final answer in the form (X) at the end of "
    "your response.",
    summarizer_prefix=SUMMARIZER_PREFIX,
    summarizer_block=SUMMARIZER_BLOCK,
    summarizer_suffix=SUMMARIZER_SUFFIX,
    summary_message=summary_message(_ANSWER_SENTENCE),
)

#: an explicit statement ("the answer is B", "Answer: **(C)**"): the strongest evidence
_STATED = re.compile(
    r"(?i:\banswer\b)(?:[^\n.]{0,30}?\b(?i:is|was|would\s+be|should\s+be)\b|\s*[*_]*\s*:)[\s*_:]*"
    r"(?:\(([A-Da-d])\)|\b([A-D])\b(?![-'’]\w))"
)
#: the requested form "(X)"
_PARENS = re.compile(r"\(([A-Da-d])\)")
#: the requested form closing the response, as the prompt asks: the agent's final statement
_CLOSING = re.compile(r"\(([A-Da-d])\)[\s*_.!)\]]*\Z")
#: a bare letter closing the response after a colon, comma, bold marker or line start ("...: B", "**C**");
#: a plain space is not enough, or "a lack of vitamin D." would vote D
_TRAILING = re.compile(r"(?:^|[:,]|\*\*)\s*([A-D])[).]?[*\s.]*\Z", re.MULTILINE)
_LETTERS = ("A", "B", "C", "D")


class Options(BaseModel):
    """``path``/``test_path``: a CSV file or a directory of them (all ``*.csv`` inside, sorted)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path
    test_path: Path | None = None


class MmluTask:
    """MMLU questions; the answer is a letter A-D."""

    name = NAME

    def __init__(self, path: Path, test_path: Path | None = None) -> None:
        self.path = path
        self.test_path = test_path
        self.prompts = PRESET

    def load(self, n_train: int, n_test: int, seed: int) -> Split:
        return load_files(NAME, read_problems, self.path, self.test_path, n_train, n_test, seed)

    def parse_answer(self, text: str) -> str | None:
        """The letter the agent gives as its own, last; a letter it only quotes from another agent as a last resort.

        An agent that only restates others ("Both agents chose B, and I agree.") adopts what it quotes.
        """
        return _final_letter(text, quoted_spans(text)) or _final_letter(text, [])

    def is_equivalent(self, a: str, b: str) -> bool:
        return a.strip().upper() == b.strip().upper()


def _final_letter(text: str, quoted: list[range]) -> str | None:
    """The letter ``text`` states outside the ``quoted`` ranges.

    Order: an "(X)" closing the response, as the prompt asks; the last "answer is X"; ``\\boxed{X}``; the
    last "(X)"; a bare letter closing the response.
    """
    closing = _CLOSING.search(text)
    if closing and not within(quoted, closing.start()):
        return closing[1].upper()
    stated = [m for m in _STATED.finditer(text) if not within(quoted, m.start())]
    if stated:
        return (stated[-1][1] or stated[-1][2]).upper()
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip("() ").upper() in _LETTERS:
        return boxed.strip("() ").upper()
    parens = [m for m in _PARENS.finditer(text) if not within(quoted, m.start())]
    if parens:
        return parens[-1][1].upper()
    trailing = _TRAILING.search(text)
    return trailing[1] if trailing and not within(quoted, trailing.start(1)) else None


def read_problems(path: Path) -> list[Problem]:
    """Every question of a CSV file, or of each ``*.csv`` in a directory (sorted by name)."""
    files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no *.csv files")
    return [problem for file in files for problem in _read_csv(file)]


def _read_csv(path: Path) -> list[Problem]:
    problems = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        start = 1
        for row in reader:
            location = f"{path}:{start}"
            start = reader.line_num + 1  # a quoted field may span lines; report where the row begins
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != 6:
                raise DataError(f"{location}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
            question, a, b, c, d, letter = row
            if letter.strip().upper() not in _LETTERS:
                raise DataError(f"{location}: column 'answer': expected A, B, C or D, got {letter!r}")
            problems.append(
                Problem(
                    id=stable_id(NAME, "\n".join(row[:5])),
                    question=question,
                    answer=letter.strip().upper(),
                    fields={"a": a, "b": b, "c": c, "d": d},
                )
            )
    return problems


def create(options: Mapping[str, Any], base_dir: Path | None = None) -> MmluTask:
    """The task from recipe options; relative paths resolve against ``base_dir``."""
    opts = parse_options(f"task '{NAME}'", Options, options)
    test_path = resolve_path(NAME, "test_path", opts.test_path, base_dir) if opts.test_path else None
    return MmluTask(resolve_path(NAME, "path", opts.path, base_dir), test_path)
