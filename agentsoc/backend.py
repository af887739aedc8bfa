"""The Backend protocol: the only door between the core and a model.

A backend turns chat messages into completions and training examples into fine-tuning jobs.
Everything cross-cutting (caching, retries, concurrency limits, metering) is a wrapper that is
itself a Backend (see :mod:`agentsoc.wrappers`), so no backend re-implements it.

Errors: a backend raises :class:`TransientBackendError` for failures that the same request may
survive (429, 5xx, timeouts, dropped connections) and :class:`FatalBackendError` for those it
cannot (bad request, auth, unknown model, a job the provider refuses). Only the retry wrapper
retries, and only transient errors — one retry layer, never nested (DESIGN §3).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs

Capability = Literal["score", "finetune"]


class BackendError(Exception):
    """Base class of errors raised by backends."""


class TransientBackendError(BackendError):
    """A failure that retrying the same call may fix. ``retry_after`` is the server's hint, in s."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalBackendError(BackendError):
    """A failure that retrying cannot fix; the message names the model and the call."""


class JobFailedError(BackendError):
    """A fine-tuning job ended failed or cancelled; the message quotes the provider's reason."""

    def __init__(self, job: Job, reason: str) -> None:
        super().__init__(reason)
        self.job = job


@runtime_checkable
class Backend(Protocol):
    """What every model provider implements.

    ``submit_finetune`` must be idempotent under ``key``: a second call with the same key returns
    the job created by the first (adopt-before-create), because a resumed run calls it again.
    """

    name: str

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion: ...

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job: ...

    async def poll_finetune(self, job: Job) -> Job: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ScoringBackend(Backend, Protocol):
    """Optional capability: log-probabilities of a given response (for diversity metrics)."""

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs: ...


def supports(backend: object, capability: Capability) -> bool:
    """Whether ``backend`` (looking through wrappers) offers ``capability``.

    Wrappers expose ``inner``; a wrapper always has a ``score`` method, so asking the wrapper
    itself would lie about what the model behind it can do.
    """
    inner = getattr(backend, "inner", None)
    if inner is not None:
        return supports(inner, capability)
    if capability == "score":
        return callable(getattr(backend, "score", None))
    return bool(getattr(backend, "can_finetune", True))


def backend_attribute(backend: object, name: str, default: int) -> int:
    """A backend's declared limit (e.g. ``min_finetune_examples``), looking through wrappers."""
    inner = getattr(backend, "inner", None)
    if inner is not None:
        return backend_attribute(inner, name, default)
    value = getattr(backend, name, default)
    return int(value) if isinstance(value, int) else default
