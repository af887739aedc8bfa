"""The Task protocol: problems, prompts and the answer semantics of one benchmark."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.prompts import PromptSet


class Problem(BaseModel):
    """One problem. ``answer`` is the ground truth, used only by evaluation and STaR — never by
    the data selection of multiagent finetuning, which trusts the vote."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    question: str
    answer: str | None = None
    #: extra template fields (MMLU options ``a``..``d``, MATH ``level``/``type``)
    fields: dict[str, str] = Field(default_factory=dict)

    def template_fields(self) -> dict[str, str]:
        return {"question": self.question, **self.fields}


class Split(BaseModel):
    """Training and held-out problems; disjoint by construction (checked on creation)."""

    model_config = ConfigDict(frozen=True)

    train: tuple[Problem, ...]
    test: tuple[Problem, ...]

    def model_post_init(self, __context: object) -> None:
        train_q = {p.question for p in self.train}
        overlap = [p.id for p in self.test if p.question in train_q]
        if overlap:
            raise DataError(f"held-out problems overlap the training problems: {overlap[:5]}")


class DataError(ValueError):
    """Bad input data; the message names the file, line and field."""


@runtime_checkable
class Task(Protocol):
    name: str
    prompts: PromptSet

    def load(self, n_train: int, n_test: int, seed: int) -> Split:
        """Seeded, disjoint train/held-out problems."""
        ...

    def parse_answer(self, text: str) -> str | None:
        """The normalised final answer in a response, or ``None`` when there is none (no vote)."""
        ...

    def is_equivalent(self, a: str, b: str) -> bool:
        """Whether two *parsed* answers mean the same thing (symmetric)."""
        ...
