"""What a debate is made of and what it leaves behind: the agents' slots, each agent's trace, and
the transcript of one problem.

These are pure records (the run store keeps them, selection and evaluation read them), so they
live apart from the debate's logic: the store and the cache wrapper depend on this module, not on
the debate.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from agentsoc.tasks.base import Problem
from agentsoc.types import Message, ModelRef, Usage
from agentsoc.vote import Vote


class AgentSlot(BaseModel):
    """The two models of one agent: generator (round 0) and critic (rounds ≥ 1)."""

    model_config = ConfigDict(frozen=True)

    index: int
    generator: ModelRef
    critic: ModelRef


class AgentTrace(BaseModel):
    """One agent's side of a debate: its whole conversation and its parsed answer per round."""

    model_config = ConfigDict(frozen=True)

    agent: int
    messages: tuple[Message, ...]
    answers: tuple[str | None, ...]
    models: tuple[ModelRef, ...]

    @property
    def final(self) -> str | None:
        return self.answers[-1]

    @property
    def first(self) -> str | None:
        return self.answers[0]

    def response(self, round_: int) -> str:
        return self.messages[2 * round_ + 1].content


class Transcript(BaseModel):
    """Everything one debate produced for one problem."""

    model_config = ConfigDict(frozen=True)

    problem: Problem
    phase: str
    agents: tuple[AgentTrace, ...]
    #: summaries[m-1][n] is the summary agent n received in round m (empty without summarization)
    summaries: tuple[tuple[str, ...], ...] = ()
    vote: Vote
    #: the vote over round-m answers, for every round (accuracy per round, DESIGN §4)
    round_votes: tuple[Vote, ...] = ()
    usage: Usage = Usage()
