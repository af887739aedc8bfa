"""Accuracy ± standard error of majority-voted answers on held-out problems.

An unparseable answer, or a problem where no agent gave one, counts as wrong: the reference
evaluator silently dropped such problems, shrinking the denominator and inflating accuracy.
SE is √(p(1−p)/n), the population standard deviation of the 0/1 vector over √n, as the paper
reports it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from agentsoc.debate import Transcript


class Score(BaseModel):
    model_config = ConfigDict(frozen=True)

    accuracy: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.2f} ± {100 * self.se:.2f}"


def score(correct: Sequence[bool]) -> Score:
    """Accuracy and its standard error over a 0/1 vector."""
    n = len(correct)
    if n == 0:
        return Score(accuracy=0.0, se=0.0, n=0)
    p = sum(correct) / n
    return Score(accuracy=p, se=math.sqrt(p * (1 - p) / n), n=n)


def _right(answer: str | None, truth: str | None, is_equivalent: Callable[[str, str], bool]) -> bool:
    return answer is not None and truth is not None and is_equivalent(answer, truth)


def evaluate(transcripts: Sequence[Transcript], is_equivalent: Callable[[str, str], bool]) -> dict[str, Score]:
    """Every accuracy a debate yields, against ground truth.

    ``debate``: the final-round vote (the method's prediction); ``round_<m>``: the vote over round-m
    answers (``round_0`` is the Majority baseline of the current agents — debate does not always
    beat voting, so both are reported); ``agent_round_0``: single answers of single agents,
    averaged over agents (the Base baseline of the current agents).
    """
    if not transcripts:
        return {}
    out: dict[str, Score] = {
        "debate": score([_right(t.vote.answer, t.problem.answer, is_equivalent) for t in transcripts])
    }
    rounds = len(transcripts[0].round_votes)
    for m in range(rounds):
        out[f"round_{m}"] = score(
            [_right(t.round_votes[m].answer, t.problem.answer, is_equivalent) for t in transcripts]
        )
    out["agent_round_0"] = score(
        [_right(a.first, t.problem.answer, is_equivalent) for t in transcripts for a in t.agents]
    )
    return out
