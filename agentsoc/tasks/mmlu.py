"""MMLU: four-option multiple choice, from the Hendrycks CSVs (no header: question, A, B, C, D, answer)
or from the hub's ``cais/mmlu`` (rows: ``question``, ``choices`` (four), ``answer`` (0-3), ``subject``).

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

from agentsoc.options import parse_options
from agentsoc.prompts import PromptSet
from agentsoc.tasks.attribution import quoted_spans, within
from agentsoc.tasks.base import DataError, Problem
from agentsoc.tasks.boxed import last_boxed
from agentsoc.tasks.files import stable_id
from agentsoc.tasks.source import DataOptions, Reader, Records, RecordTask
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

#: an explicit statement ("the answer is B", "Answer: **(C)**", "The correct answer is option D") or a choice
#: ("I'd go with D) 42 kg", "I choose (B)", "Both agents chose B"): the strongest evidence after a closing "(X)"
_STATED = re.compile(
    r"(?:(?i:\banswer\b)(?:[^\n.]{0,30}?\b(?i:is|was|would\s+be|should\s+be)\b|\s*[*_]*\s*:)[\s*_:]*"
    r"|\b(?i:go(?:es)?\s+with|went\s+with|ch(?:oose|ooses|ose)|pick(?:s|ed)?|select(?:s|ed)?|opt(?:s|ed)?\s+for"
    r"|settle[sd]?\s+on|vote[sd]?\s+for)\s+[*_]*)"
    r"(?:(?i:option|choice|letter)\s*[*_]*)?"
    r"(?:\(([A-Da-d])\)|\b([A-D])\b(?![-'’]\w))"
)
#: a rejected option: "(A)" right after a negation ("..., not scurvy (A)", "rather than (B)") names an option
#: the agent rules out, not its answer
_NEGATED = re.compile(
    r"\b(?:not|never|rather\s+than|instead\s+of|unlike|except|excluding|eliminat\w*|rul(?:e|es|ed|ing)\s+out)"
    r"(?:\s+(?!but\b|so\b|and\b)[\w'’,-]+){0,4}\s*\Z",
    re.IGNORECASE,
)
#: the requested form "(X)"
_PARENS = re.compile(r"\(([A-Da-d])\)")
#: the requested form closing the response, as the prompt asks: the agent's final statement
_CLOSING = re.compile(r"\(([A-Da-d])\)[\s*_.!)\]]*\Z")
#: a bare letter closing the response after a colon, comma, bold marker or line start ("...: B", "**C**");
#: a plain space is not enough, or "a lack of vitamin D." would vote D
_TRAILING = re.compile(r"(?:^|[:,]|\*\*)\s*([A-D])[).]?[*\s.]*\Z", re.MULTILINE)
_LETTERS = ("A", "B", "C", "D")


class MmluTask(RecordTask):
    """MMLU questions; the answer is a letter A-D."""

    name = NAME
    prompts = PRESET

    def reader(self) -> Reader:
        return Reader(NAME, read_problems, problems_from_records)

    def parse_answer(self, text: str) -> str | None:
        """The letter the agent gives as its own, last; a letter it only quotes from another agent as a last resort.

        An agent that only restates others ("Both agents chose B, and I agree.") adopts what it quotes.
        """
        return _final_letter(text, quoted_spans(text)) or _final_letter(text, [])

    def is_equivalent(self, a: str, b: str) -> bool:
        return a.strip().upper() == b.strip().upper()


def _final_letter(text: str, quoted: list[range]) -> str | None:
    """The letter ``text`` states outside the ``quoted`` ranges.

    Order: an "(X)" closing the response, as the prompt asks; the last "answer is X" or "I choose X";
    ``\\boxed{X}``; the last "(X)"; a bare letter closing the response. An "(X)" after a negation ("not
    scurvy (A)") is an option ruled out and never counts.
    """
    closing = _CLOSING.search(text)
    if closing and not within(quoted, closing.start()) and not _rejected(text, closing.start()):
        return closing[1].upper()
    stated = [m for m in _STATED.finditer(text) if not within(quoted, m.start())]
    if stated:
        return (stated[-1][1] or stated[-1][2]).upper()
    boxed = last_boxed(text, skip=lambda position: within(quoted, position))
    if boxed is not None and boxed.strip("() ").upper() in _LETTERS:
        return boxed.strip("() ").upper()
    parens = [m for m in _PARENS.finditer(text) if not within(quoted, m.start()) and not _rejected(text, m.start())]
    if parens:
        return parens[-1][1].upper()
    trailing = _TRAILING.search(text)
    return trailing[1] if trailing and not within(quoted, trailing.start(1)) else None


def _rejected(text: str, position: int) -> bool:
    """Whether the "(X)" at ``position`` follows a negation in its clause: an option ruled out."""
    return _NEGATED.search(text, max(0, position - 80), position) is not None


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
            problems.append(_problem(question, [a, b, c, d], letter.strip().upper()))
    return problems


def problems_from_records(records: Records) -> list[Problem]:
    """Problems from dataset rows: ``cais/mmlu``'s (``question``, ``choices``, ``answer`` 0-3 or a letter)."""
    problems = []
    for location, record in records:
        question = record.get("question")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{location}: field 'question': expected a non-empty string, got {question!r:.60}")
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) for c in choices):
            raise DataError(f"{location}: field 'choices': expected a list of 4 strings, got {choices!r:.80}")
        problems.append(_problem(question, choices, _letter(record.get("answer"), location)))
    return problems


def _letter(answer: object, location: str) -> str:
    """``cais/mmlu`` stores the answer as a class index 0-3; other copies as the letter."""
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
        return _LETTERS[answer]
    if isinstance(answer, str) and answer.strip().upper() in _LETTERS:
        return answer.strip().upper()
    raise DataError(f"{location}: field 'answer': expected 0-3 or A-D, got {answer!r:.40}")


def _problem(question: str, options: list[str], letter: str) -> Problem:
    # the id hashes the question and its options exactly as the CSV reader always has, so a problem keeps
    # its id whichever copy of MMLU it came from
    return Problem(
        id=stable_id(NAME, "\n".join([question, *options])),
        question=question,
        answer=letter,
        fields=dict(zip(("a", "b", "c", "d"), options, strict=True)),
    )


def create(options: Mapping[str, Any], base_dir: Path | None = None) -> MmluTask:
    """The task from recipe options; relative paths resolve against ``base_dir``."""
    return MmluTask(parse_options(f"task '{NAME}'", DataOptions, options).source(NAME, base_dir))
