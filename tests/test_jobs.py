"""The job runner: one retry layer for calls, attempts for jobs, nothing submitted twice."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pytest

from agentsoc.backend import JobFailedError, TransientBackendError
from agentsoc.jobs import JobRunner, loss_summary
from agentsoc.store import RunStore
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, Message, ModelRef
from agentsoc.wrappers import Retrying
from backends.mock import MockBackend

EXAMPLES = [ChatExample(messages=(Message(role="user", content="1+1"), Message(role="assistant", content="2")))]


class RefusingSubmits(MockBackend):
    """Every submission fails the way a flaky provider fails (a 503)."""

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        self.submissions += 1
        raise TransientBackendError("injected 503 on submit")


def runner(backend: MockBackend, store: RunStore, **kw: object) -> JobRunner:
    # the run's stack: the call-level retry layer (3 attempts) must not multiply the job runner's tries
    wrapped = Retrying(backend, max_attempts=3, base_s=0.0, notify=lambda _: None)
    settings: dict[str, object] = {
        "max_job_attempts": 4,
        "poll_interval_s": 0.0,
        "max_active": None,
        "max_backoff_s": 0.01,
        **kw,
    }
    return JobRunner(wrapped, store, **settings)  # type: ignore[arg-type]


class RefusingSome(MockBackend):
    """The first ``times`` submissions fail the way a flaky provider fails (a 503)."""

    def __init__(self, times: int) -> None:
        super().__init__(polls_to_finish=1)
        self.times = times
        self.tries = 0

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        self.tries += 1
        if self.tries <= self.times:
            raise TransientBackendError("injected 503 on submit")
        return await super().submit_finetune(base, examples, spec, key=key)


async def test_a_failing_submission_is_retried_by_one_layer_only(tmp_path: Path) -> None:
    backend = RefusingSubmits()
    store = RunStore.open(tmp_path)
    try:
        with pytest.raises(TransientBackendError, match=r"job_patience_s.*--resume"):
            # a patience shorter than any back-off: exactly one try, not the call layer's 3 (nor 3 x anything)
            await runner(backend, store, job_patience_s=0.0).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    assert backend.submissions == 1


async def test_a_submission_that_fails_a_while_goes_through_within_its_patience(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = RefusingSome(times=9)  # more tries than the call layer's 3: the job runner's budget is time
    store = RunStore.open(tmp_path)
    try:
        job = await runner(backend, store, job_patience_s=60.0).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    assert job.state is JobState.SUCCEEDED and backend.tries == 10 and backend.submissions == 1
    told = [r.getMessage() for r in caplog.records if "retrying for up to" in r.getMessage()]
    assert len(told) == 1 and "submitting r/k failed (injected 503 on submit)" in told[0]  # at once, once


async def test_a_failed_job_is_resubmitted_as_a_new_attempt_and_each_is_stored(tmp_path: Path) -> None:
    backend = MockBackend(flaky_jobs=1, polls_to_finish=1)
    store = RunStore.open(tmp_path)
    try:
        job = await runner(backend, store).run("r/iter-1/agent-0/generator", "mock:0.5", EXAMPLES, FinetuneSpec())
        keys = [j.key for j in store.jobs()]
    finally:
        store.close()
    assert job.state is JobState.SUCCEEDED and job.key.endswith("#attempt-2")
    assert keys == ["r/iter-1/agent-0/generator", "r/iter-1/agent-0/generator#attempt-2"]


async def test_a_permanent_failure_is_not_retried(tmp_path: Path) -> None:
    backend = MockBackend(fail_jobs=True, polls_to_finish=1)
    store = RunStore.open(tmp_path)
    try:
        with pytest.raises(JobFailedError):
            await runner(backend, store).run("r/iter-1/agent-0/critic", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    assert backend.submissions == 1


async def test_a_stored_job_is_polled_not_submitted_again(tmp_path: Path) -> None:
    backend = MockBackend(polls_to_finish=1)
    store = RunStore.open(tmp_path)
    try:
        first = await runner(backend, store).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
        again = await runner(backend, store).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    assert backend.submissions == 1 and again.result == first.result


def test_the_loss_summary_names_the_first_and_last_loss() -> None:
    job = Job(key="r/iter-1/agent-0/generator", backend="x", id="j", base="b", losses=(2.5, 1.25, 0.5))
    assert loss_summary(job) == "r/iter-1/agent-0/generator: loss 2.500 → 0.500 over 3 logged steps"


async def test_a_finished_job_is_told_in_one_line_as_it_finishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agentsoc")
    store = RunStore.open(tmp_path)
    try:
        await runner(MockBackend(polls_to_finish=1), store).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "agentsoc.jobs"]
    assert len(lines) == 1 and lines[0].startswith("r/k: loss ") and "logged steps" in lines[0]


class FailingPolls(MockBackend):
    """Polls fail ``times`` times in a row (a provider's status endpoint down for a while)."""

    def __init__(self, times: int) -> None:
        super().__init__(polls_to_finish=1)
        self.times = times
        self.poll_calls = 0

    async def poll_finetune(self, job: Job) -> Job:
        self.poll_calls += 1
        if self.poll_calls <= self.times:
            raise TransientBackendError("injected 503 on poll")
        return await super().poll_finetune(job)


async def test_a_poll_that_used_up_its_retries_does_not_fail_the_job(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FailingPolls(times=7)  # more than the call layer's 3 tries: polling goes on, the job is not lost
    store = RunStore.open(tmp_path)
    try:
        job = await runner(backend, store).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
    finally:
        store.close()
    assert job.state is JobState.SUCCEEDED and backend.submissions == 1
    assert sum("retrying for up to" in r.getMessage() for r in caplog.records) == 1  # told once, at once


async def test_polls_failing_past_the_patience_stop_the_run_with_the_job_recorded(tmp_path: Path) -> None:
    backend = FailingPolls(times=10**6)
    store = RunStore.open(tmp_path)
    try:
        with pytest.raises(TransientBackendError, match=r"job_patience_s.*--resume"):
            await runner(backend, store, job_patience_s=0.05).run("r/k", "mock:0.5", EXAMPLES, FinetuneSpec())
        assert store.get_job("r/k") is not None
    finally:
        store.close()
