"""The cross-cutting wrappers, each on its own."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import RecordingBackend

from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.store import RunStore
from agentsoc.types import Completion, Message, ModelRef, Sampling
from agentsoc.wrappers import Cached, Limited, Metered, Retrying, compose, current_stage

HELLO = [Message(role="user", content="hello")]


def counter_reply(model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> str:
    return f"seed {sampling.seed}"


async def test_cache_is_keyed_by_seed_not_request_alone(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path)
    inner = RecordingBackend(counter_reply)
    cached = Cached(inner, store)
    a = await cached.complete("m", HELLO, Sampling(seed=1))
    b = await cached.complete("m", HELLO, Sampling(seed=2))  # same prompt, another agent's seed
    again = await cached.complete("m", HELLO, Sampling(seed=1))
    assert a.text == "seed 1" and b.text == "seed 2"
    assert again.text == "seed 1" and again.cached
    assert len(inner.calls) == 2
    # survives reopening: a resumed run pays nothing
    store.close()
    store2 = RunStore.open(tmp_path)
    fresh = RecordingBackend(counter_reply)
    assert (await Cached(fresh, store2).complete("m", HELLO, Sampling(seed=2))).text == "seed 2"
    assert fresh.calls == []


class Flaky(RecordingBackend):
    def __init__(self, failures: list[Exception]) -> None:
        super().__init__(counter_reply)
        self.failures = failures

    async def complete(self, model, messages, sampling):  # type: ignore[no-untyped-def]
        if self.failures:
            self.calls.append((model, tuple(messages), sampling))
            raise self.failures.pop(0)
        return await super().complete(model, messages, sampling)


async def test_retry_transient_honours_retry_after_and_gives_up() -> None:
    inner = Flaky([TransientBackendError("429", retry_after=0.01), TransientBackendError("500")])
    out = await Retrying(inner, max_attempts=3, base_s=0.001).complete("m", HELLO, Sampling(seed=0))
    assert out.text == "seed 0" and len(inner.calls) == 3
    inner = Flaky([TransientBackendError("500")] * 5)
    with pytest.raises(TransientBackendError):
        await Retrying(inner, max_attempts=2, base_s=0.001).complete("m", HELLO, Sampling())
    assert len(inner.calls) == 2


async def test_fatal_errors_are_not_retried() -> None:
    inner = Flaky([FatalBackendError("401 for model m")])
    with pytest.raises(FatalBackendError):
        await Retrying(inner, max_attempts=5, base_s=0.001).complete("m", HELLO, Sampling())
    assert len(inner.calls) == 1


async def test_limiter_bounds_calls_in_flight() -> None:
    in_flight = peak = 0

    class Slow(RecordingBackend):
        async def complete(self, model, messages, sampling):  # type: ignore[no-untyped-def]
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.005)
            in_flight -= 1
            return await super().complete(model, messages, sampling)

    limited = Limited(Slow(counter_reply), 3)
    await asyncio.gather(*(limited.complete("m", HELLO, Sampling(seed=i)) for i in range(20)))
    assert peak == 3


async def test_meter_counts_only_paid_calls_per_stage(tmp_path: Path) -> None:
    store = RunStore.open(tmp_path)
    backend = compose(RecordingBackend(counter_reply), store, concurrency=2)
    token = current_stage.set("iter-1/train")
    await backend.complete("m", HELLO, Sampling(seed=1))
    await backend.complete("m", HELLO, Sampling(seed=1))  # cache hit: not metered
    current_stage.reset(token)
    assert store.usage() == [
        {"stage": "iter-1/train", "model": "m", "calls": 1, "prompt_tokens": 1, "completion_tokens": 1}
    ]
    assert not backend.capabilities.score
    with pytest.raises(FatalBackendError, match="cannot score"):
        await Metered(RecordingBackend(counter_reply), store).score("m", HELLO, "x")


class Overloaded(RecordingBackend):
    """Answers 429 with Retry-After to the first call of seed 0, and records when each call started."""

    def __init__(self, retry_after: float | None, fail_first: int = 1) -> None:
        super().__init__(counter_reply)
        self.retry_after = retry_after
        self.fail_first = fail_first
        self.started: list[tuple[int | None, float]] = []

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        self.started.append((sampling.seed, time.monotonic()))
        if len(self.started) <= self.fail_first:
            raise TransientBackendError("HTTP 429", retry_after=self.retry_after)
        return await super().complete(model, messages, sampling)


async def test_retry_after_pauses_every_call_not_only_the_one_that_got_it() -> None:
    inner = Overloaded(retry_after=0.4)
    backend = Retrying(inner, max_attempts=3, base_s=0.001)
    first = asyncio.create_task(backend.complete("m", HELLO, Sampling(seed=0)))
    await asyncio.sleep(0.05)  # the 429 has arrived
    t0 = time.monotonic()
    others = await asyncio.gather(*(backend.complete("m", HELLO, Sampling(seed=s)) for s in range(1, 4)))
    assert all(o.text.startswith("seed") for o in [await first, *others])
    later = [t for seed, t in inner.started if seed != 0]
    assert min(later) - t0 >= 0.3  # the other calls waited for the server's moment too


async def test_an_error_rate_spike_backs_off_the_whole_backend() -> None:
    inner = Overloaded(retry_after=None, fail_first=Retrying.WINDOW)  # no hint: every call fails at first
    backend = Retrying(inner, max_attempts=10, base_s=0.2, max_backoff_s=1.0)
    await asyncio.gather(*(backend.complete("m", HELLO, Sampling(seed=s)) for s in range(Retrying.WINDOW)))
    starts = sorted(t for _, t in inner.started)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert max(gaps) >= 0.35  # one shared pause (2 x base_s), not only each call's own jittered wait
