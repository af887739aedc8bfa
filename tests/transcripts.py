"""Hand-built transcripts for the evaluation and diversity tests (no backend involved)."""

from __future__ import annotations

from collections.abc import Sequence

from agentsoc.tasks.base import Problem
from agentsoc.transcript import AgentTrace, Transcript
from agentsoc.types import Message
from agentsoc.vote import majority_vote


def eq(a: str, b: str) -> bool:
    return a == b


def make_transcript(
    pid: str,
    truth: str | None,
    answers: Sequence[Sequence[str | None]],
    texts: Sequence[Sequence[str]] | None = None,
    models: Sequence[str] | None = None,
) -> Transcript:
    """``answers[n][m]``: agent n's parsed answer in round m; ``texts`` the responses (default: from answers)."""
    rounds = len(answers[0])
    traces = []
    for n, agent_answers in enumerate(answers):
        messages: list[Message] = []
        for m, a in enumerate(agent_answers):
            text = texts[n][m] if texts else f"The answer is {a}."
            messages += [Message(role="user", content=f"Q{pid} round {m}"), Message(role="assistant", content=text)]
        model = models[n] if models else f"mock:0.{n + 1}"
        traces.append(
            AgentTrace(agent=n, messages=tuple(messages), answers=tuple(agent_answers), models=(model,) * rounds)
        )
    votes = tuple(majority_vote([a[m] for a in answers], eq, seed=0, problem_id=f"{pid}:{m}") for m in range(rounds))
    return Transcript(
        problem=Problem(id=pid, question=f"Q{pid}", answer=truth),
        phase="test",
        agents=tuple(traces),
        vote=votes[-1],
        round_votes=votes,
    )
