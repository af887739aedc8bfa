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

from agentsoc.records import EvalScores, Score
from agentsoc.transcript import Transcript


def score(correct: Sequence[bool]) -> Score:
    """Accuracy and its standard error over a 0/1 vector."""
    n = len(correct)
    if n == 0:
        return Score(accuracy=0.0, se=0.0, n=0)
    p = sum(correct) / n
    return Score(accuracy=p, se=math.sqrt(p * (1 - p) / n), n=n)


def _right(answer: str | None, truth: str | None, is_equivalent: Callable[[str, str], bool]) -> bool:
    return answer is not None and truth is not None and is_equivalent(answer, truth)


def evaluate(transcripts: Sequence[Transcript], is_equivalent: Callable[[str, str], bool]) -> EvalScores | None:
    """Every accuracy a debate yields, against ground truth (see :class:`EvalScores`); ``None``
    when there is nothing to score."""
    if not transcripts:
        return None
    rounds = len(transcripts[0].round_votes)
    return EvalScores(
        debate=score([_right(t.vote.answer, t.problem.answer, is_equivalent) for t in transcripts]),
        rounds=tuple(
            score([_right(t.round_votes[m].answer, t.problem.answer, is_equivalent) for t in transcripts])
            for m in range(rounds)
        ),
        single_agent=score([_right(a.first, t.problem.answer, is_equivalent) for t in transcripts for a in t.agents]),
    )


def correctness(transcripts: Sequence[Transcript], is_equivalent: Callable[[str, str], bool]) -> dict[str, bool]:
    """Per problem id: whether the final vote was right (the input of a paired comparison)."""
    return {t.problem.id: _right(t.vote.answer, t.problem.answer, is_equivalent) for t in transcripts}


class PairedScore(BaseModel):
    """Accuracy of method A minus method B on the same problems, with the SE of that difference.

    Pairing removes the between-problem variance both methods share: the SE of the mean of the
    per-problem differences d_i = a_i − b_i, √(var(d)/n) (population variance, as :func:`score`),
    is much smaller than √(SE_a² + SE_b²) when the two methods get mostly the same problems right.
    """

    model_config = ConfigDict(frozen=True)

    diff: float
    se: float
    n: int
    #: problems only A got right / only B got right
    a_only: int
    b_only: int

    def __str__(self) -> str:
        return f"{100 * self.diff:+.2f} ± {100 * self.se:.2f}"


def paired(a: dict[str, bool], b: dict[str, bool]) -> PairedScore:
    """Paired difference A − B over the problems both were evaluated on."""
    common = sorted(set(a) & set(b))
    n = len(common)
    if n == 0:
        return PairedScore(diff=0.0, se=0.0, n=0, a_only=0, b_only=0)
    d = [int(a[k]) - int(b[k]) for k in common]
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / n
    return PairedScore(
        diff=mean, se=math.sqrt(var / n), n=n, a_only=sum(x == 1 for x in d), b_only=sum(x == -1 for x in d)
    )
