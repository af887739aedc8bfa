"""Fine-tuning jobs run to their end: submitted (or adopted) by key, recorded, polled, retried.

Two kinds of failure, each handled in exactly one place:

* a *job call* that fails (a 5xx on submit or poll) is retried here and nowhere else (the backend's
  call-level retry layer lets job calls pass): with back-off, the server's Retry-After honoured,
  until the call has failed for ``backend.job_patience_s``. A time budget, not a count: a
  submission is several requests (adopt, upload, create), each of which may fail, and it is safe to
  repeat (the backend adopts a job by its key), so what a person needs bounded is the time before
  the run gives up — and the first failure is told at once, while the retries go on;
* a *job* that fails (the provider's worker died) is resubmitted as a new attempt under
  ``<key>#attempt-<k>``, up to ``backend.max_job_attempts``; a failure the backend marks
  permanent (a file the provider rejects) is reported at once.

Every job is stored under its key the moment the backend returns it, before it is awaited, so a
resumed run polls it (or the backend adopts it by key) instead of paying for it again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay

from agentsoc.backend import Backend, JobFailedError, TransientBackendError
from agentsoc.store import RunStore
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, ModelRef
from agentsoc.wrappers import backoff

log = logging.getLogger(__name__)

T = TypeVar("T")

#: share of a job's examples that max_seq_len may cut or leave out before the run says so
LOST_WARNING = 0.05


class JobRunner:
    """Runs the jobs of one run against one backend, at most ``max_active`` at once."""

    def __init__(
        self,
        backend: Backend,
        store: RunStore,
        *,
        max_job_attempts: int,
        poll_interval_s: float,
        max_active: int | None,
        job_patience_s: float = 600.0,
        max_backoff_s: float = 30.0,
        on_update: Callable[[Job], None] | None = None,
    ) -> None:
        self.backend = backend
        self.store = store
        self.max_job_attempts = max_job_attempts
        self.poll_interval_s = poll_interval_s
        self.job_patience_s = job_patience_s
        self.max_backoff_s = max_backoff_s
        self._active = asyncio.Semaphore(max_active) if max_active else None
        self._on_update = on_update

    def pending(self, keys: Sequence[str]) -> bool:
        """Whether any of ``keys`` has never been submitted (so running them is work, not adoption)."""
        return any(self.store.get_job(k) is None for k in keys)

    async def run(self, key: str, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec) -> Job:
        """The job ``key`` run to success, resubmitted under a new attempt while its failures are
        transient; attempts are counted across resumed runs (each is a stored job of its own)."""
        if self._active is None:
            return await self._run(key, base, examples, spec)
        async with self._active:
            return await self._run(key, base, examples, spec)

    async def _run(self, key: str, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec) -> Job:
        limit = self.max_job_attempts
        for attempt in range(1, limit + 1):
            attempt_key = key if attempt == 1 else f"{key}#attempt-{attempt}"
            job = await self._await(attempt_key, base, examples, spec)
            if job.state is JobState.SUCCEEDED and job.result is not None:
                _report_finished(job, spec.max_seq_len)
                return job
            reason = job.error or f"job ended {job.state.value} without a model"
            if not job.retryable:
                raise JobFailedError(
                    job, f"fine-tuning job {job.id} for {attempt_key} failed permanently (not retried): {reason}"
                )
            if attempt < limit:
                log.warning("fine-tuning job %s failed (%s); attempt %d", attempt_key, reason, attempt + 1)
        raise JobFailedError(
            job,
            f"fine-tuning job {job.id} for {key} failed {limit} times (backend.max_job_attempts): {reason}; "
            "finished work is saved: raise backend.max_job_attempts and run the same command with --resume",
        )

    async def _await(self, key: str, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec) -> Job:
        """Submit (or find) the job ``key`` and poll it until it ends."""
        job = self.store.get_job(key)
        if job is None:
            job = await self._patiently(
                f"submitting {key}", functools.partial(self.backend.submit_finetune, base, examples, spec, key=key)
            )
            self.store.put_job(job)  # recorded before it is awaited: a crash from here on resumes it
            self._notify(job)
        while not job.state.terminal:
            await asyncio.sleep(self.poll_interval_s)
            polled = await self._patiently(
                f"polling job {job.id} of {key}", functools.partial(self.backend.poll_finetune, job)
            )
            if polled != job:
                self.store.put_job(polled)
                self._notify(polled)
            job = polled
        return job

    async def _patiently(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call`` retried on transient errors until it has failed for ``job_patience_s``.

        ``call`` must be an async function (a ``functools.partial`` of one), not a lambda returning
        a coroutine: tenacity tells the two apart and would hand back the coroutine unawaited."""

        def tell(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            if state.attempt_number == 1:
                log.warning("%s failed (%s); retrying for up to %.0f s", what, exc, self.job_patience_s)

        retrying = AsyncRetrying(
            stop=stop_after_delay(self.job_patience_s),
            wait=functools.partial(backoff, base_s=0.5, max_s=self.max_backoff_s),
            retry=retry_if_exception_type(TransientBackendError),
            before_sleep=tell,
            reraise=True,
        )
        try:
            return await retrying(call)
        except TransientBackendError as e:
            raise TransientBackendError(
                f"{what} kept failing for {self.job_patience_s:.0f} s (backend.job_patience_s): {e}; "
                "finished work is saved: run the same command with --resume"
            ) from e

    def _notify(self, job: Job) -> None:
        if self._on_update is not None:
            self._on_update(job)


def loss_summary(job: Job) -> str:
    """One line per finished job: the loss it started and ended at (what a person checks first)."""
    if not job.losses:
        return f"{job.key}: trained ({job.examples or '?'} examples)"
    first, last = job.losses[0], job.losses[-1]
    return f"{job.key}: loss {first:.3f} → {last:.3f} over {len(job.losses)} logged steps"


def _report_finished(job: Job, max_seq_len: int) -> None:
    log.info("%s", loss_summary(job))
    if not job.examples:
        return
    lost = (job.truncated or 0) + (job.dropped or 0)
    if lost / job.examples > LOST_WARNING:
        log.warning(
            "%s: max_seq_len %d cut %d and left out %d of %d training examples; raise finetune.spec.max_seq_len",
            job.key,
            max_seq_len,
            job.truncated or 0,
            job.dropped or 0,
            job.examples,
        )
