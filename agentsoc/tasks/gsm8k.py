"""GSM8K: grade-school word problems (``question``, ``answer`` ending in ``#### <number>``).

From a JSONL file or from the hub (``openai/gsm8k``, config ``main``), whose rows have the same fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentsoc.options import parse_options
from agentsoc.prompts import PromptSet
from agentsoc.tasks import numeric
from agentsoc.tasks.base import DataError, Problem
from agentsoc.tasks.files import read_records, stable_id, text_field
from agentsoc.tasks.source import DataOptions, Reader, Records, RecordTask
from agentsoc.tasks.summary import SUMMARIZER_BLOCK, SUMMARIZER_PREFIX, SUMMARIZER_SUFFIX, summary_message

NAME = "gsm8k"
_ANSWER_SENTENCE = (
    "Your final answer should be a single numerical number, in the form \\boxed{answer}, at the end of your response."
)

#: Du et al.'s GSM prompts (algorithm.md §2.5, trailing space of round 0 kept) plus the §12 summary reconstruction
PRESET = PromptSet(
    round0="Can you solve the following math problem? {question} Explain your reasoning. " + _ANSWER_SENTENCE + " ",
    debate_prefix="These are the solutions to the problem from other agents: ",
    debate_block="\n\n One agent solution: ```{other_response}```",
    debate_suffix="\n\n Using the solutions from other agents as additional information, can you provide your answer "
    "to the math problem? \n The original math problem is {question}. " + _ANSWER_SENTENCE,
    self_only="Can you double check that your answer is correct. Please reiterate your answer, with your final answer "
    "a single numerical number, in the form \\boxed{answer}.",
    summarizer_prefix=SUMMARIZER_PREFIX,
    summarizer_block=SUMMARIZER_BLOCK,
    summarizer_suffix=SUMMARIZER_SUFFIX,
    summary_message=summary_message(_ANSWER_SENTENCE),
)

_GROUND_TRUTH = re.compile(r"####\s*(?P<number>[-−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?)\s*$")


class Gsm8kTask(RecordTask):
    """GSM8K word problems; answers are numbers, compared with tolerance."""

    name = NAME
    prompts = PRESET

    def reader(self) -> Reader:
        return Reader(NAME, read_problems, problems_from_records)

    def parse_answer(self, text: str) -> str | None:
        return numeric.parse_number(text)

    def is_equivalent(self, a: str, b: str) -> bool:
        return numeric.is_equivalent(a, b)


def read_problems(path: Path) -> list[Problem]:
    """Every problem of a GSM8K JSONL file; the ground truth is the number after ``####``."""
    return problems_from_records(read_records(path))


def problems_from_records(records: Records) -> list[Problem]:
    """Problems from GSM8K records (file lines or ``openai/gsm8k`` rows)."""
    problems = []
    for location, record in records:
        question = text_field(record, "question", location)
        answer = text_field(record, "answer", location)
        match = _GROUND_TRUTH.search(answer.strip())
        if not match:
            raise DataError(f"{location}: field 'answer': no final '#### <number>' line")
        truth = numeric.canonical_number(match["number"])
        problems.append(Problem(id=stable_id(NAME, question), question=question, answer=truth))
    return problems


def create(options: Mapping[str, Any], base_dir: Path | None = None) -> Gsm8kTask:
    """The task from recipe options; relative paths resolve against ``base_dir``."""
    return Gsm8kTask(parse_options(f"task '{NAME}'", DataOptions, options).source(NAME, base_dir))
