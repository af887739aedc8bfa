"""Cross-cutting behaviour as Backends that wrap a Backend (DESIGN §3).

Composed once per run by :func:`compose`, outermost first::

    Cached → Metered → Retrying → Limited → the real backend

* the cache answers first, so a resumed run sends nothing it already paid for;
* metering sits below the cache, so it counts only calls that reached the backend;
* retries sit outside the limiter, so a call sleeping in back-off does not hold a slot;
* the limiter is the one semaphore that bounds calls in flight.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import random
from collections.abc import Sequence

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from agentsoc.backend import Backend, TransientBackendError
from agentsoc.store import RunStore
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs

#: The stage a call belongs to (``iter-1/train``); set by the society, read by the meter.
current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("agentsoc_stage", default="other")


class _Wrapper:
    """Forwards everything to ``inner``; subclasses override what they change."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.name = inner.name
        self.capabilities = inner.capabilities

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        return await self.inner.complete(model, messages, sampling)

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        return await self.inner.submit_finetune(base, examples, spec, key=key)

    async def poll_finetune(self, job: Job) -> Job:
        return await self.inner.poll_finetune(job)

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        return await self.inner.score(model, messages, response)

    async def release(self, models: Sequence[ModelRef]) -> None:
        await self.inner.release(models)

    async def aclose(self) -> None:
        await self.inner.aclose()


def call_key(backend: str, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> str:
    """The cache key of a call: backend, model, every message and every sampling field.

    The seed is part of ``sampling`` and is derived per agent, round and sample by the debate, so
    agents sharing a prompt never share a cache entry (ecosystem.md finding 4).
    """
    payload = {
        "backend": backend,
        "model": model,
        "messages": [m.model_dump(exclude={"weight"}) for m in messages],
        "sampling": sampling.model_dump(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class Cached(_Wrapper):
    """Answers repeated calls from the run store; a cached call costs nothing and is not resent.

    A call without a seed is still cached: within a run every call the core makes is seeded.
    """

    def __init__(self, inner: Backend, store: RunStore) -> None:
        super().__init__(inner)
        self.store = store

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        key = call_key(self.name, model, messages, sampling)
        hit = self.store.get_call(key)
        if hit is not None:
            return hit.model_copy(update={"cached": True})
        out = await self.inner.complete(model, messages, sampling)
        request = json.dumps({"model": model, "n_messages": len(messages), "sampling": sampling.model_dump()})
        self.store.put_call(key, self.name, model, request, out)
        return out


class Metered(_Wrapper):
    """Adds each paid call's tokens to the run's usage table, per stage and model."""

    def __init__(self, inner: Backend, store: RunStore) -> None:
        super().__init__(inner)
        self.store = store

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        out = await self.inner.complete(model, messages, sampling)
        self.store.add_usage(current_stage.get(), model, out.usage.prompt_tokens, out.usage.completion_tokens)
        return out


class Limited(_Wrapper):
    """At most ``limit`` calls in flight. The semaphore is created inside the running loop."""

    def __init__(self, inner: Backend, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        return self._sem

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        async with self._semaphore():
            return await self.inner.complete(model, messages, sampling)

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        async with self._semaphore():
            return await super().score(model, messages, response)


class Retrying(_Wrapper):
    """The single retry layer: transient errors only, exponential back-off with full jitter,
    the server's Retry-After honoured, a bounded number of attempts."""

    def __init__(self, inner: Backend, *, max_attempts: int = 6, max_backoff_s: float = 30.0, base_s: float = 0.5):
        super().__init__(inner)
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.base_s = base_s

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        hint = getattr(exc, "retry_after", None)
        if isinstance(hint, int | float) and hint >= 0:
            return min(float(hint), self.max_backoff_s)
        cap = min(self.max_backoff_s, self.base_s * 2 ** (state.attempt_number - 1))
        return random.uniform(0, cap)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientBackendError),
            reraise=True,
        )

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        async for attempt in self._retrying():
            with attempt:
                return await self.inner.complete(model, messages, sampling)
        raise AssertionError("unreachable")  # pragma: no cover

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        # Safe to retry only because submit_finetune adopts an existing job with the same key.
        async for attempt in self._retrying():
            with attempt:
                return await self.inner.submit_finetune(base, examples, spec, key=key)
        raise AssertionError("unreachable")  # pragma: no cover

    async def poll_finetune(self, job: Job) -> Job:
        async for attempt in self._retrying():
            with attempt:
                return await self.inner.poll_finetune(job)
        raise AssertionError("unreachable")  # pragma: no cover

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        async for attempt in self._retrying():
            with attempt:
                return await super().score(model, messages, response)
        raise AssertionError("unreachable")  # pragma: no cover


def compose(
    backend: Backend,
    store: RunStore | None,
    *,
    concurrency: int = 8,
    max_attempts: int = 6,
    max_backoff_s: float = 30.0,
) -> Backend:
    """The run's backend stack (see the module docstring for the order and why)."""
    stacked: Backend = Retrying(Limited(backend, concurrency), max_attempts=max_attempts, max_backoff_s=max_backoff_s)
    if store is not None:
        stacked = Cached(Metered(stacked, store), store)
    return stacked
