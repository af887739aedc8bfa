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
import collections
import contextvars
import hashlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from agentsoc.backend import Backend, TransientBackendError, probe
from agentsoc.store import RunStore
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs

T = TypeVar("T")
log = logging.getLogger(__name__)

#: A function that shows one line to the person running agentsoc (see :func:`tell`).
Notify = Callable[[str], None]

#: The stage a call belongs to (``iter-1/train``); set by the society, read by the meter.
current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("agentsoc_stage", default="other")


def tell(line: str) -> None:
    """A warning for the person running agentsoc (the command line shows it above the progress bars)."""
    log.warning("%s", line)


def backoff(state: RetryCallState, *, base_s: float, max_s: float) -> float:
    """The wait before the next try, for every retry policy of the project: the server's
    Retry-After when it gave one, else exponential back-off with full jitter, both capped."""
    exc = state.outcome.exception() if state.outcome is not None else None
    hint = exc.retry_after if isinstance(exc, TransientBackendError) else None
    if isinstance(hint, int | float) and hint >= 0:
        return min(float(hint), max_s)
    return random.uniform(0, min(max_s, base_s * 2 ** (state.attempt_number - 1)))


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

    async def check(self, models: Sequence[ModelRef]) -> None:
        # straight through, never retried or queued: a start-up probe must answer in seconds
        await probe(self.inner, models)

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
    ``shared`` are other runs' stores (read-only) that answer the identical calls they already
    paid for: ``compare`` runs its methods on one base model with the same seeds, so every
    method's base-model debates would otherwise be paid again. A shared answer is copied into
    this run's store, so the run directory stays complete on its own.
    """

    def __init__(self, inner: Backend, store: RunStore, shared: Sequence[RunStore] = ()) -> None:
        super().__init__(inner)
        self.store = store
        self.shared = list(shared)

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        key = call_key(self.name, model, messages, sampling)
        hit = self.store.get_call(key)
        if hit is not None:
            return hit.model_copy(update={"cached": True})
        request = json.dumps({"model": model, "n_messages": len(messages), "sampling": sampling.model_dump()})
        for other in self.shared:
            hit = other.get_call(key)
            if hit is not None:
                self.store.put_call(key, self.name, model, request, hit)
                return hit.model_copy(update={"cached": True})
        out = await self.inner.complete(model, messages, sampling)
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
    """At most ``limit`` calls in flight. The semaphore is created inside the running loop.

    A backend whose calls wait in a provider-side queue (``capabilities.queued``: the Batch API)
    is not limited: a call holding a slot while its batch waits hours would cap every batch at
    ``limit`` requests (226 batches of ~7 requests were measured at concurrency 16); the batcher
    sizes batches by what the Batch API allows instead.
    """

    def __init__(self, inner: Backend, limit: int) -> None:
        super().__init__(inner)
        self.limit = limit
        self._sem: asyncio.Semaphore | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.limit)
        return self._sem

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        if self.capabilities.queued:
            return await self.inner.complete(model, messages, sampling)
        async with self._semaphore():
            return await self.inner.complete(model, messages, sampling)

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        async with self._semaphore():
            return await super().score(model, messages, response)


class Retrying(_Wrapper):
    """The single retry layer: transient errors only, exponential back-off with full jitter, the
    server's Retry-After honoured, a bounded number of attempts — and back-off on the whole backend.

    A server that says when to come back (Retry-After) or fails most recent calls is overloaded as a
    whole: every call then waits for the same moment instead of each retrying on its own timer and
    keeping the pressure up. Calls waiting here hold no concurrency slot (the limiter is inside).

    A failing backend is named at once: the first transient failure is told (``notify``) the moment
    it happens — "retrying (attempt 1 of 6): … connection refused at http://…" — and later ones at
    most once every ``NOTIFY_EVERY_S`` seconds with a count, so a dead endpoint is reported in
    seconds while the retries go on, and a flaky one does not flood the terminal.
    """

    #: recent outcomes watched for an error-rate spike, and the failing share that counts as one
    WINDOW = 40
    SPIKE = 0.5
    #: seconds between two "retrying" lines; the failures in between are counted into the next one
    NOTIFY_EVERY_S = 60.0

    def __init__(
        self,
        inner: Backend,
        *,
        max_attempts: int = 6,
        max_backoff_s: float = 30.0,
        base_s: float = 0.5,
        notify: Notify = tell,
    ):
        super().__init__(inner)
        self.max_attempts = max_attempts
        self.max_backoff_s = max_backoff_s
        self.base_s = base_s
        self.notify = notify
        self._told_at: float | None = None  # time.monotonic() of the last "retrying" line
        self._untold = 0  # transient failures since then
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=self.WINDOW)
        self._spikes = 0  # consecutive spikes: the shared pause doubles with each
        self._paused_until = 0.0  # time.monotonic() before which no call starts

    def _wait(self, state: RetryCallState) -> float:
        return backoff(state, base_s=self.base_s, max_s=self.max_backoff_s)

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=retry_if_exception_type(TransientBackendError),
            before_sleep=self._tell,
            reraise=True,
        )

    def _tell(self, state: RetryCallState) -> None:
        """Name a transient failure that will be retried: the first at once, later ones summarised."""
        exc = state.outcome.exception() if state.outcome is not None else None
        now = time.monotonic()
        self._untold += 1
        if self._told_at is not None and now - self._told_at < self.NOTIFY_EVERY_S:
            return
        more = f" ({self._untold - 1} more failed calls since the last report)" if self._untold > 1 else ""
        self.notify(f"retrying (attempt {state.attempt_number} of {self.max_attempts}): {exc}{more}")
        self._told_at, self._untold = now, 0

    def _record(self, ok: bool, retry_after: float | None = None) -> None:
        """Count an outcome; pause every call when the server asks to, or when most calls fail."""
        self._outcomes.append(ok)
        now = time.monotonic()
        if retry_after is not None and retry_after > 0:
            self._paused_until = max(self._paused_until, now + min(retry_after, self.max_backoff_s))
        failing = self._outcomes.count(False) / len(self._outcomes)
        if not ok and len(self._outcomes) >= self.WINDOW // 2 and failing >= self.SPIKE:
            self._spikes += 1
            pause = min(self.max_backoff_s, self.base_s * 2**self._spikes)
            self._paused_until = max(self._paused_until, now + pause)
            self._outcomes.clear()  # judge the next window afresh
        elif ok:
            self._spikes = 0

    async def _attempts(self, call: Callable[[], Awaitable[T]]) -> T:
        async for attempt in self._retrying():
            with attempt:
                delay = self._paused_until - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                try:
                    out = await call()
                except TransientBackendError as e:
                    self._record(False, e.retry_after)
                    raise
                self._record(True)
                return out
        raise AssertionError("unreachable")  # pragma: no cover

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        return await self._attempts(lambda: self.inner.complete(model, messages, sampling))

    # Job calls (submit_finetune, poll_finetune) pass straight through: agentsoc.jobs retries them,
    # by a time budget rather than a count (a submission is several requests, idempotent by key).

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        return await self._attempts(lambda: self.inner.score(model, messages, response))


def compose(
    backend: Backend,
    store: RunStore | None,
    *,
    concurrency: int = 8,
    max_attempts: int = 6,
    max_backoff_s: float = 30.0,
    shared: Sequence[RunStore] = (),
    notify: Notify = tell,
) -> Backend:
    """The run's backend stack (see the module docstring for the order and why)."""
    stacked: Backend = Retrying(
        Limited(backend, concurrency), max_attempts=max_attempts, max_backoff_s=max_backoff_s, notify=notify
    )
    if store is not None:
        stacked = Cached(Metered(stacked, store), store, shared)
    return stacked
