"""Arithmetic (Du et al.): generated expressions such as ``3+15*2+7-4*11``, exact integer answers.

Generation mirrors the reference (algorithm.md §2.4): one ``numpy.random.RandomState(seed)`` draws
``randint(low, high, size=k)`` per problem, so the default pattern and seed 0 give Du et al.'s
problems. Train problems come first, then held-out ones that differ from every training expression.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from agentsoc.options import parse_options
from agentsoc.prompts import PromptSet
from agentsoc.tasks import numeric
from agentsoc.tasks.base import DataError, Problem, Split
from agentsoc.tasks.files import stable_id
from agentsoc.tasks.summary import SUMMARIZER_BLOCK, SUMMARIZER_PREFIX, SUMMARIZER_SUFFIX, summary_message

NAME = "arithmetic"
_ANSWER_SENTENCE = "Make sure to state your answer at the end of the response."

#: Du et al.'s arithmetic prompts (algorithm.md §2.4) plus the §12 summary reconstruction
PRESET = PromptSet(
    round0="What is the result of {question}? " + _ANSWER_SENTENCE,
    debate_prefix="These are the recent/updated opinions from other agents: ",
    debate_block="\n\n One agent response: ```{other_response}```",
    debate_suffix="\n\n Use these opinions carefully as additional advice, can you provide an updated answer? "
    + _ANSWER_SENTENCE,
    self_only="Can you verify that your answer is correct. Please reiterate your answer, making sure to state your "
    "answer at the end of the response.",
    summarizer_prefix=SUMMARIZER_PREFIX,
    summarizer_block=SUMMARIZER_BLOCK,
    summarizer_suffix=SUMMARIZER_SUFFIX,
    summary_message=summary_message(_ANSWER_SENTENCE),
)

_PATTERN = re.compile(r"[a-z](?:[-+*][a-z])*")


class Options(BaseModel):
    """``pattern``: operands are the letters a..z, operators ``+ - *``; numbers in ``[low, high)``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str = "a+b*c+d-e*f"
    low: int = 0
    high: int = 30

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, pattern: str) -> str:
        if not _PATTERN.fullmatch(pattern):
            raise ValueError("expected letters a..z joined by + - * (e.g. 'a+b*c+d-e*f')")
        return pattern

    @model_validator(mode="after")
    def _check_range(self) -> Options:
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be greater than low ({self.low})")
        return self


class ArithmeticTask:
    """Generated arithmetic problems; answers are integers, compared numerically."""

    name = NAME

    def __init__(self, options: Options) -> None:
        self.options = options
        self.prompts = PRESET
        # operands in order of first appearance; a repeated letter reuses its value
        self._letters = list(dict.fromkeys(ch for ch in options.pattern if ch.isalpha()))

    def load(self, n_train: int, n_test: int, seed: int) -> Split:
        if n_train < 0 or n_test < 0:
            raise DataError(f"task '{NAME}': n_train and n_test must be >= 0, got {n_train} and {n_test}")
        space = (self.options.high - self.options.low) ** len(self._letters)
        if n_train + n_test > space:
            raise DataError(
                f"task '{NAME}': pattern {self.options.pattern!r} with numbers in "
                f"[{self.options.low}, {self.options.high}) has only {space} distinct problems, "
                f"fewer than n_train + n_test = {n_train + n_test}"
            )
        rng = np.random.RandomState(seed)
        seen: set[str] = set()
        train = self._draw(rng, n_train, seen)
        test = self._draw(rng, n_test, seen)
        return Split(train=tuple(train), test=tuple(test))

    def parse_answer(self, text: str) -> str | None:
        return numeric.parse_number(text)

    def is_equivalent(self, a: str, b: str) -> bool:
        return numeric.is_equivalent(a, b)

    def _draw(self, rng: np.random.RandomState, count: int, seen: set[str]) -> list[Problem]:
        problems: list[Problem] = []
        while len(problems) < count:
            values = rng.randint(self.options.low, self.options.high, size=len(self._letters))
            expression = self._render(dict(zip(self._letters, (int(v) for v in values), strict=True)))
            if expression in seen:
                continue
            seen.add(expression)
            problems.append(
                Problem(id=stable_id("arith", expression), question=expression, answer=str(evaluate(expression)))
            )
        return problems

    def _render(self, values: dict[str, int]) -> str:
        return "".join(str(values[ch]) if ch.isalpha() else ch for ch in self.options.pattern)


def evaluate(expression: str) -> int:
    """The integer value of ``+ - *`` arithmetic over integer literals, without ``eval``."""
    return _eval(ast.parse(expression, mode="eval").body)


def _eval(node: ast.expr) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
    raise ValueError(f"unsupported arithmetic: {ast.unparse(node)}")


def create(options: Mapping[str, Any], base_dir: Path | None = None) -> ArithmeticTask:
    """The task from recipe options (``base_dir`` is unused: nothing is read from disk)."""
    return ArithmeticTask(parse_options(f"task '{NAME}'", Options, options))
