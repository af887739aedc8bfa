"""Value types shared by the core and every backend.

They are frozen pydantic models so that they can be hashed into cache keys, stored as JSON in
the run store and validated at the boundary with a precise error. Nothing here knows about a
particular provider: a backend translates these into its own SDK's shapes.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: An opaque model identifier that only the backend that issued it understands
#: (``gpt-4o-mini-2024-07-18``, ``ft:gpt-4o-mini:org::abc``, ``qwen2.5-0.5b+adapter:/path``).
#: The core passes it around and stores it but never parses it.
ModelRef = str

Role = Literal["system", "user", "assistant"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Strict(_Frozen):
    """A recipe section: ``temperature = "1"`` or ``seed = true`` is an error, never a silent cast."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class Message(_Frozen):
    """One chat message.

    ``weight`` is the training-loss weight of an assistant message (OpenAI's chat fine-tuning
    format calls it the same). ``None`` means "trainer default" (train on it); ``0`` masks it out.
    It is ignored at inference time.
    """

    role: Role
    content: str
    weight: float | None = None


class Sampling(_Strict):
    """Decoding parameters of one call.

    The core derives ``seed`` from (run, iteration, phase, problem, agent, round, sample), so two
    agents never share a seed even when their prompts are identical. That is what keeps the call
    cache from collapsing the society into one voice (DESIGN §3).
    """

    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    max_tokens: int = Field(default=1024, gt=0)
    seed: int | None = None


class Usage(_Frozen):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
        )


class Completion(_Frozen):
    """The text a model returned, with its token usage.

    ``cached`` is set by the cache wrapper when the text came from the run store rather than
    from the backend, so metering can count only calls that were paid for.
    """

    text: str
    usage: Usage = Usage()
    model: ModelRef = ""
    finish_reason: str | None = None
    cached: bool = False


class ChatExample(_Frozen):
    """One training conversation in OpenAI chat fine-tuning shape (per-message ``weight``)."""

    messages: tuple[Message, ...]

    def to_openai(self) -> dict[str, Any]:
        out: list[dict[str, Any]] = []
        for m in self.messages:
            d: dict[str, Any] = {"role": m.role, "content": m.content}
            if m.role == "assistant" and m.weight is not None:
                d["weight"] = int(m.weight) if float(m.weight).is_integer() else m.weight
            out.append(d)
        return {"messages": out}


Scheduler = Literal["constant", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"]

#: ``finetune.spec.preset`` values: named sets of defaults (explicit fields in the recipe still win)
SPEC_PRESETS: dict[str, dict[str, Any]] = {
    # the paper's open-model training (algorithm.md §6, ft.sh): full finetuning, lr 1e-5, 2 epochs,
    # cosine with 3% warmup, no weight decay, 2048-token sequences. The paper's effective batch of
    # 192 gives 1-3 optimizer steps on a few hundred examples per agent; 4 x 4 = 16 gives a few dozen.
    "paper-open-full": {
        "method": "full",
        "learning_rate": 1e-5,
        "epochs": 2,
        "lr_scheduler": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "max_seq_len": 2048,
        "batch_size": 4,
        "gradient_accumulation_steps": 4,
    },
}


class FinetuneSpec(_Strict):
    """Training knobs of one fine-tuning job, in one place (TRL-style).

    Backends use the subset they understand: OpenAI maps ``epochs``/``batch_size``/
    ``learning_rate_multiplier``; the local and TRL trainers use ``learning_rate``, the scheduler
    fields, ``lora_*`` and ``method``. The defaults are the paper's OpenAI hyperparameters (2 epochs,
    batch 1, LR×1) and a constant learning rate; ``preset = "paper-open-full"`` gives the paper's
    open-model training (:data:`SPEC_PRESETS`).
    """

    #: a name from :data:`SPEC_PRESETS` whose values fill every field the recipe does not set
    preset: Literal["paper-open-full"] | None = None

    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=1, ge=1)
    learning_rate_multiplier: float = Field(default=1.0, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    method: Literal["lora", "full"] = "lora"
    lora_r: int = Field(default=8, ge=1)
    lora_alpha: int = Field(default=16, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    max_seq_len: int = Field(default=1024, ge=16)
    #: micro-batches per optimizer step (effective batch = batch_size × this)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    lr_scheduler: Scheduler = "constant"
    #: linear warmup, as a fraction of all optimizer steps
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    suffix: str | None = None
    seed: int = 0
    #: Free-form labels (run, iteration, agent, role) a backend may attach to the job.
    metadata: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            defaults = SPEC_PRESETS.get(str(data["preset"]))
            if defaults is not None:
                return {**defaults, **data}
        return data


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class Job(_Frozen):
    """A fine-tuning job as the core sees it, whatever runs it.

    ``key`` is the core's idempotency key (``<run>/iter-<l>/agent-<n>/<role>``); ``id`` is the
    backend's own id. ``result`` is the new model once ``state`` is ``succeeded``.
    """

    key: str
    backend: str
    id: str
    base: ModelRef
    state: JobState = JobState.QUEUED
    result: ModelRef | None = None
    error: str | None = None
    progress: float | None = None
    events: tuple[str, ...] = ()
    trained_tokens: int | None = None
    #: training examples of the job; of them, how many had their trained span cut by max_seq_len and
    #: how many were left out (nothing to train within it) — None where the backend cannot tell
    examples: int | None = None
    truncated: int | None = None
    dropped: int | None = None
    #: the training loss at each logged step, where the backend reports it: the one-line summary a
    #: finished job prints, and the curve in the report and the run browser
    losses: tuple[float, ...] = ()
    #: for a failed job: whether submitting it again may succeed (a server error) or not (a file the
    #: provider rejects, nothing to train); the society retries only the former
    retryable: bool = True


class TokenLogprobs(_Frozen):
    """Per-token log-probabilities of a given response under a model (teacher-forced).

    ``top`` optionally holds, per position, the model's top-k alternatives (token → logprob);
    it is what the KL-between-agents diversity metric needs.
    """

    tokens: tuple[str, ...]
    logprobs: tuple[float, ...]
    top: tuple[dict[str, float], ...] | None = None
