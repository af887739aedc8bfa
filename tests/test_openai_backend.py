"""The OpenAI backend against the fake server: error mapping, training-set checks, preflight,
adopt-before-create, upload reuse, job polling, the Batch API path, and prices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fakes import FakeOpenAI, fake_openai

import backends
from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.pricing import format_usd, training_cost, usage_cost
from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message, Sampling, Usage
from backends.openai import OpenAIBackend, create
from backends.openai_files import RecordDir
from backends.options import OpenAIOptions

__all__ = ["fake_openai"]

MODEL = "gpt-4o-mini-2024-07-18"
KEY = "demo/abcd1234/iter-1/agent-0/generator"
LABELS = {"run": "demo", "iteration": "1", "agent": "0", "role": "generator"}


@pytest.fixture
async def backend(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OpenAIBackend]:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    b = create(OpenAIOptions(base_url=fake_openai.base_url, timeout_s=0.5), tmp_path)
    yield b
    await b.aclose()


def examples(n: int = 12) -> list[ChatExample]:
    return [
        ChatExample(
            messages=(
                Message(role="user", content=f"What is {i}+{i}*2?"),
                Message(role="assistant", content=f"The answer is \\boxed{{{3 * i}}}.", weight=1),
            )
        )
        for i in range(n)
    ]


def ask(text: str = "What is 3+4*5?") -> list[Message]:
    return [Message(role="user", content=text)]


async def test_complete_returns_text_usage_and_finish_reason(backend: OpenAIBackend) -> None:
    out = await backend.complete(MODEL, ask(), Sampling(seed=7, max_tokens=64))
    assert "\\boxed{" in out.text
    assert out.usage.prompt_tokens > 0 and out.usage.completion_tokens > 0
    assert out.finish_reason == "stop" and out.model == MODEL
    again = await backend.complete(MODEL, ask(), Sampling(seed=7, max_tokens=64))
    assert again == out  # deterministic by seed


@pytest.mark.parametrize(
    ("fault", "needle"), [("429", "HTTP 429"), ("500", "HTTP 500"), ("malformed", "malformed"), ("drop", "connection")]
)
async def test_transient_faults_map_to_transient_errors(
    backend: OpenAIBackend, fake_openai: FakeOpenAI, fault: str, needle: str
) -> None:
    fake_openai.configure(fault_rate=1.0, fault_kinds=(fault,))
    with pytest.raises(TransientBackendError, match=needle) as info:
        await backend.complete(MODEL, ask(), Sampling(seed=1))
    assert MODEL in str(info.value) and "chat.completions.create" in str(info.value)
    if fault == "429":
        assert info.value.retry_after == pytest.approx(0.02)  # retry-after-ms wins over retry-after


async def test_slow_response_is_a_transient_timeout(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(fault_rate=1.0, fault_kinds=("slow",), slow_s=1.0)
    with pytest.raises(TransientBackendError, match="timed out"):
        await backend.complete(MODEL, ask(), Sampling(seed=1))


async def test_bad_key_is_fatal_and_scrubbed(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-secret-key-9876543210"
    monkeypatch.setenv("MY_KEY", wrong)
    b = create(OpenAIOptions(base_url=fake_openai.base_url, api_key_env="MY_KEY"), tmp_path)
    with pytest.raises(FatalBackendError) as info:
        await b.complete(MODEL, ask(), Sampling(seed=1))
    text = str(info.value)
    assert "HTTP 401" in text and MODEL in text and wrong not in text and "***" in text
    assert wrong not in repr(b)
    await b.aclose()


async def test_unknown_model_is_fatal(backend: OpenAIBackend) -> None:
    with pytest.raises(FatalBackendError, match=r"HTTP 404.*does not exist"):
        await backend.complete("gpt-9-imaginary", ask(), Sampling(seed=1))


def test_options_are_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown option 'temprature'"):
        backends.create("openai", {"temprature": 1}, tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        create(OpenAIOptions(), tmp_path)


async def test_cannot_score(backend: OpenAIBackend) -> None:
    assert not backend.capabilities.score
    assert backend.capabilities.finetune and backend.capabilities.min_finetune_examples == 10
    with pytest.raises(FatalBackendError, match="cannot score"):
        await backend.score("gpt-4o-mini", ask(), "x")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (examples(9), "9 training examples, OpenAI requires at least 10"),
        (
            [*examples(11), ChatExample(messages=(Message(role="user", content="no answer"),))],
            "example 11 has no assistant message",
        ),
        (
            [
                *examples(11),
                ChatExample(
                    messages=(Message(role="user", content="q"), Message(role="assistant", content="x" * 400_000))
                ),
            ],
            "over gpt-4o-mini-2024-07-18's limit",
        ),
    ],
)
async def test_training_set_is_validated_before_spending(
    backend: OpenAIBackend, fake_openai: FakeOpenAI, data: list[ChatExample], needle: str
) -> None:
    with pytest.raises(FatalBackendError, match=needle) as info:
        await backend.submit_finetune(MODEL, data, FinetuneSpec(metadata=LABELS), key=KEY)
    assert "agent 0" in str(info.value) and "role generator" in str(info.value) and KEY in str(info.value)
    assert fake_openai.state.uploads == 0 and not fake_openai.state.jobs


async def test_shut_down_model_is_refused_with_one_clear_error(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(FatalBackendError) as info:
        await backend.submit_finetune("gpt-3.5-turbo-0125", examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    text = str(info.value)
    assert "gpt-3.5-turbo-0125 was shut down on 2026-10-23" in text and "local recipe" in text
    with pytest.raises(FatalBackendError, match="does not exist"):
        await backend.submit_finetune("gpt-2-gone", examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    assert fake_openai.state.uploads == 0


async def test_no_jobs_after_openai_cut_off(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    import datetime as dt

    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=fake_openai.state.api_key, base_url=fake_openai.base_url, max_retries=0)
    b = OpenAIBackend(client, run_dir=tmp_path, secret="x", today=dt.date(2027, 2, 1))
    with pytest.raises(FatalBackendError, match="stopped new fine-tuning jobs on 2027-01-06"):
        await b.submit_finetune(MODEL, examples(), FinetuneSpec(), key=KEY)
    await b.aclose()


async def test_refused_creation_quotes_openai(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(refuse_finetune="Fine-tuning is not available for this organization")
    with pytest.raises(FatalBackendError) as info:
        await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    assert '"Fine-tuning is not available for this organization"' in str(info.value)
    assert "HTTP 403" in str(info.value) and "agent 0" in str(info.value)


async def test_upload_is_reused_after_a_crash_before_job_creation(
    backend: OpenAIBackend, fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    fake_openai.configure(refuse_finetune="temporarily refused")
    with pytest.raises(FatalBackendError):
        await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    assert fake_openai.state.uploads == 1
    fake_openai.configure(refuse_finetune=None)
    again = create(OpenAIOptions(base_url=fake_openai.base_url), tmp_path)  # a new process, same run dir
    job = await again.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    assert fake_openai.state.uploads == 1 and job.state is JobState.QUEUED
    recorded = RecordDir(tmp_path / "openai" / "uploads").get(KEY)
    assert recorded and recorded["file_id"] == fake_openai.state.jobs[job.id]["training_file"]
    # the training file keeps per-message weights
    line = json.loads(next(iter(fake_openai.state.files.values()))["bytes"].decode().splitlines()[0])
    assert line["messages"][1]["weight"] == 1
    await again.aclose()


async def test_adopt_before_create(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    spec = FinetuneSpec(metadata=LABELS)
    first = await backend.submit_finetune(MODEL, examples(), spec, key=KEY)
    second = await backend.submit_finetune(MODEL, examples(), spec, key=KEY)
    assert first.id == second.id
    assert fake_openai.state.jobs_created == {("1", "0", "generator"): 1}
    created = fake_openai.state.jobs[first.id]
    assert created["hyperparameters"] == {"n_epochs": 2, "batch_size": 1, "learning_rate_multiplier": 1.0}
    assert created["metadata"]["agentsoc_key"] == KEY and created["metadata"]["role"] == "generator"


async def test_lost_create_response_is_adopted_not_duplicated(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    spec = FinetuneSpec(metadata=LABELS)
    await backend.submit_finetune(MODEL, examples(), spec, key=KEY)  # warms the connection and the records
    other = KEY.replace("agent-0", "agent-1")
    labels = {**LABELS, "agent": "1"}
    # the server creates the job, then the connection drops before the client reads the answer
    fake_openai.configure(fault_rate=1.0, fault_kinds=("drop",), fault_only="POST /v1/fine_tuning/jobs")
    with pytest.raises(TransientBackendError):
        await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=labels), key=other)
    assert fake_openai.state.jobs_created[("1", "1", "generator")] == 1
    fake_openai.configure(fault_rate=0.0)
    adopted = await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=labels), key=other)
    assert fake_openai.state.jobs_created[("1", "1", "generator")] == 1
    assert fake_openai.state.jobs[adopted.id]["metadata"]["agentsoc_key"] == other


async def test_poll_maps_states_events_and_result(backend: OpenAIBackend, fake_openai: FakeOpenAI) -> None:
    job = await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    states = []
    while not job.state.terminal:
        job = await backend.poll_finetune(job)
        states.append(job.state)
    assert states == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]
    assert job.result is not None and job.result.startswith(f"ft:{MODEL}:agentsoc:i1-a0-generator:")
    assert job.trained_tokens and job.events[-1] == "info: The job has successfully completed"
    out = await backend.complete(job.result, ask(), Sampling(seed=3))
    assert "\\boxed{" in out.text


async def test_failed_job_quotes_openai_and_a_new_submit_replaces_it(
    backend: OpenAIBackend, fake_openai: FakeOpenAI
) -> None:
    fake_openai.configure(fail_jobs=True, job_polls=1)
    job = await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    while not job.state.terminal:
        job = await backend.poll_finetune(job)
    assert job.state is JobState.FAILED
    assert job.error == 'OpenAI says: "Training file contains toxic content" [invalid_training_file]'
    assert not job.retryable  # a rejected file fails the same way again: the society does not resubmit it
    fake_openai.configure(fail_jobs=False)
    retry = await backend.submit_finetune(MODEL, examples(), FinetuneSpec(metadata=LABELS), key=KEY)
    assert retry.id != job.id and fake_openai.state.jobs_created[("1", "0", "generator")] == 2


async def test_batch_path_equals_online_path(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    online = create(OpenAIOptions(base_url=fake_openai.base_url), tmp_path / "a")
    batched = create(
        OpenAIOptions(base_url=fake_openai.base_url, batch=True, batch_window_s=0.05, batch_poll_s=0.01), tmp_path / "b"
    )
    requests = [(ask(f"What is {i}+{i}*3?"), Sampling(seed=s)) for i in range(5) for s in range(3)]
    via_batch = await asyncio.gather(*(batched.complete(MODEL, m, s) for m, s in requests))
    via_online = await asyncio.gather(*(online.complete(MODEL, m, s) for m, s in requests))
    assert via_batch == via_online
    assert len(fake_openai.state.batches) == 1 and fake_openai.state.batch_uploads == 1
    (recorded,) = RecordDir(tmp_path / "b" / "openai" / "batches").all().values()
    assert len(recorded["custom_ids"]) == len(requests)
    assert recorded["batch_id"] == next(iter(fake_openai.state.batches))
    await online.aclose()
    await batched.aclose()


async def test_restarted_process_adopts_its_pending_batch(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    options = OpenAIOptions(base_url=fake_openai.base_url, batch=True, batch_window_s=0.02, batch_poll_s=0.01)
    first = create(options, tmp_path)
    await fake_openai.kill_with_batches_pending(
        first, (first.complete(MODEL, ask(), Sampling(seed=s)) for s in range(4)), 1
    )
    second = create(options, tmp_path)
    outs = await asyncio.gather(*(second.complete(MODEL, ask(), Sampling(seed=s)) for s in range(4)))
    assert len(fake_openai.state.batches) == 1 and fake_openai.state.batch_uploads == 1
    assert all("\\boxed{" in o.text for o in outs)
    await second.aclose()


def test_prices() -> None:
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000)
    assert usage_cost("gpt-4o-mini-2024-07-18", usage) == pytest.approx(0.75)
    assert usage_cost("gpt-4o-mini", usage, batch=True) == pytest.approx(0.375)
    assert usage_cost("ft:gpt-4o-mini-2024-07-18:org::abc", usage) == pytest.approx(1.5)
    assert training_cost("gpt-4o-mini-2024-07-18", 2_000_000) == pytest.approx(6.0)
    assert usage_cost("Qwen/Qwen2.5-7B-Instruct", usage) is None
    assert format_usd(None) == "unknown" and format_usd(0.756) == "$0.76"
