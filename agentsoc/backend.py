"""The Backend protocol: the only door between the core and a model.

A backend turns chat messages into completions and training examples into fine-tuning jobs.
Everything cross-cutting (caching, retries, concurrency limits, metering) is a wrapper that is
itself a Backend (see :mod:`agentsoc.wrappers`), so no backend re-implements it.

Errors: a backend raises :class:`TransientBackendError` for failures that the same request may
survive (429, 5xx, timeouts, dropped connections) and :class:`FatalBackendError` for those it
cannot (bad request, auth, unknown model, a job the provider refuses). Only the retry wrapper
retries, and only transient errors — one retry layer, never nested (DESIGN §3).

What a backend can do (finetune, score, its job limits) is :class:`Capabilities` data on the
backend, never discovered by probing it. A backend that talks to an endpoint may also implement
:class:`Checked` (``check``): the society calls it through :func:`probe` before the first stage, so a
wrong URL or a refused key is one line in seconds instead of minutes of silent retries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs


class Capabilities(BaseModel):
    """What a backend can do, declared as data (in the spirit of pydantic-ai's ``ModelProfile``).

    The core reads this instead of probing a backend for attributes, and wrappers forward their
    inner backend's value, so the answer is the same whichever layer is asked.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``submit_finetune`` trains models (an inference-only backend raises instead)
    finetune: bool = False
    #: the smallest training set a job accepts (OpenAI: 10); smaller sets keep their model
    min_finetune_examples: int = Field(default=1, ge=1)
    #: ``score`` returns teacher-forced log-probabilities (likelihood and KL diversity metrics)
    score: bool = False
    #: fine-tuning jobs the backend runs at once (None: no limit of its own); the society never
    #: has more in flight than this or the recipe's ``backend.max_active_jobs``
    max_active_jobs: int | None = Field(default=None, ge=1)
    #: finetuned models are adapters served on one loaded base, so ``release`` frees something
    adapters: bool = False
    #: chat calls wait in a provider-side queue (OpenAI's Batch API), not on a connection: the
    #: concurrency limit does not hold them back, so a whole debate round goes into one batch
    queued: bool = False


class BackendError(Exception):
    """Base class of errors raised by backends."""


class TransientBackendError(BackendError):
    """A failure that retrying the same call may fix. ``retry_after`` is the server's hint, in s."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FatalBackendError(BackendError):
    """A failure that retrying cannot fix; the message names the model and the call."""


class ModelNotFoundError(FatalBackendError):
    """The server does not know the model a call named (HTTP 404): a wrong name or URL, a model that
    was shut down, or an adapter a restarted server forgot — which a backend may load again."""


class RetriesExhaustedError(BackendError):
    """A stage could not finish: some of its calls failed transiently even after every retry and a
    second round at the end of the stage. Finished work is saved; ``--resume`` continues."""


class JobFailedError(BackendError):
    """A fine-tuning job ended failed or cancelled; the message quotes the provider's reason."""

    def __init__(self, job: Job, reason: str) -> None:
        super().__init__(reason)
        self.job = job


def cannot_score(backend: str) -> FatalBackendError:
    """The error ``score`` raises on a backend whose ``capabilities.score`` is false."""
    return FatalBackendError(f"backend {backend!r} cannot score responses (no log-probabilities)")


@runtime_checkable
class Backend(Protocol):
    """What every model provider implements.

    ``submit_finetune`` must be idempotent under ``key``: a second call with the same key returns
    the job created by the first (adopt-before-create), because a resumed run calls it again.
    ``score`` is part of the protocol; a backend without log-probabilities declares
    ``capabilities.score = False`` and raises :func:`cannot_score`. ``release`` says which models
    the society will not call again (an older iteration's), so a backend serving adapters can
    unload them; the others ignore it.
    """

    name: str
    capabilities: Capabilities

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion: ...

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs: ...

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job: ...

    async def poll_finetune(self, job: Job) -> Job: ...

    async def release(self, models: Sequence[ModelRef]) -> None: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Checked(Protocol):
    """An optional part of a backend: a quick start-up check of its endpoint.

    ``check`` raises :class:`FatalBackendError` (one line: the URL, what failed, what to do) when the
    endpoint cannot serve ``models`` at all — unreachable, the key refused, a model it does not
    have — and returns quietly otherwise, a busy (429/5xx) server included: retries handle those.
    It is a separate protocol so that backends with nothing to reach (mock, in-process llama.cpp)
    need no method; :func:`probe` is the default no-op path for them.
    """

    async def check(self, models: Sequence[ModelRef]) -> None: ...


async def probe(backend: Backend, models: Sequence[ModelRef]) -> None:
    """Check ``backend``'s endpoint for ``models`` if it implements :class:`Checked`; else nothing."""
    if isinstance(backend, Checked):
        await backend.check(models)
