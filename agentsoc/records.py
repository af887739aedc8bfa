"""Typed records of a run: what each iteration measured and what it trained on.

The society writes them, the CLI and the report read them, and the run store keeps them; no
consumer digs in a dict for a string key (``"label_accuracy"``, ``"wall_s/eval"``), so a renamed or
missing field is a type error, not a silently empty table cell.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.transcript import AgentSlot
from agentsoc.types import Job, JobState

#: the timed stages of an iteration: its training debate, its fine-tuning jobs, its held-out debate
Stage = Literal["train", "finetune", "eval"]
Role = Literal["generator", "critic"]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Score(_Record):
    """Accuracy over ``n`` problems and its standard error √(p(1−p)/n)."""

    accuracy: float
    se: float
    n: int

    def __str__(self) -> str:
        return f"{100 * self.accuracy:.2f} ± {100 * self.se:.2f}"


class EvalScores(_Record):
    """Accuracy of one held-out evaluation, against ground truth.

    ``debate`` is the final-round vote (the method's prediction); ``rounds[m]`` the vote over the
    round-m answers (``rounds[0]`` is the Majority baseline of the current agents — debate does not
    always beat voting, so both are reported); ``single_agent`` the single answers of single agents
    in round 0, averaged over agents (the Base baseline of the current agents).
    """

    debate: Score
    rounds: tuple[Score, ...]
    single_agent: Score


class Diversity(_Record):
    """How different the agents of one evaluation are (:mod:`agentsoc.diversity`); a metric that was
    not measured is ``None`` and ``notes`` says why, so it never reads as a measured 0."""

    agents: int
    consensus: float | None = None
    answer_diversity: float | None = None
    consensus_round_0: float | None = None
    embedding_dissimilarity: float | None = None
    embedder: str | None = None
    likelihood_nll: float | None = None
    kl: float | None = None
    scored_problems: int | None = None
    notes: tuple[str, ...] = ()


class DatasetRecord(_Record):
    """One agent's training set for one role in one iteration, and how it was made."""

    iteration: int
    agent: int
    role: Role
    size: int
    #: the exported JSONL, relative to the run directory
    path: str
    #: critic sets only: |D^C−| (started wrong, corrected), |D^C+| available and drawn
    critic_minus: int | None = None
    critic_plus_available: int | None = None
    critic_plus_used: int | None = None


class IterationRecord(_Record):
    """Everything one iteration of a run measured (iteration 0: the base society)."""

    iteration: int
    scores: EvalScores | None = None
    #: how often the training vote (the pseudo-label) matched ground truth — diagnostics only
    label_accuracy: Score | None = None
    #: the models that were evaluated
    slots: tuple[AgentSlot, ...] = ()
    #: wall-clock seconds per stage, measured by the session that did that stage's work
    wall_s: dict[Stage, float] = Field(default_factory=dict)
    diversity: Diversity | None = None
    #: STaR: rationalized examples added per agent
    rationalized: tuple[int, ...] | None = None
    datasets: tuple[DatasetRecord, ...] = ()
    #: the fine-tuning jobs of this iteration (every attempt), with what max_seq_len cut or left out
    jobs: tuple[Job, ...] = ()

    def lost_examples(self) -> tuple[int, int, int]:
        """(examples, cut, left out) over the iteration's succeeded jobs that report them."""
        done = [j for j in self.jobs if j.state is JobState.SUCCEEDED and j.examples is not None]
        return (
            sum(j.examples or 0 for j in done),
            sum(j.truncated or 0 for j in done),
            sum(j.dropped or 0 for j in done),
        )
