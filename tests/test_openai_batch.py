"""The Batch API path once agents are finetuned (issue 10 item 2): one batch per model, the server's
own error surfaced with the model named, and a batch whose creation answer was lost found again by
its metadata tag instead of being created (and billed) twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from fakes import FakeOpenAI, fake_openai
from openai import AsyncOpenAI

from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.types import Completion, Message, Sampling
from agentsoc.wrappers import Retrying
from backends.openai import create
from backends.options import OpenAIOptions

__all__ = ["fake_openai"]

BASE = "gpt-4o-mini-2024-07-18"
#: a second model, as after the first fine-tuning iteration (agents then call their own models)
OTHER = "agent-a"


def ask(i: int) -> list[Message]:
    return [Message(role="user", content=f"What is {i}+{i}*3?")]


def options(server: FakeOpenAI, **extra: float) -> OpenAIOptions:
    return OpenAIOptions(base_url=server.base_url, batch=True, batch_window_s=0.05, batch_poll_s=0.01, **extra)


@pytest.fixture(autouse=True)
def _key(fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)


def calls(models: tuple[str, ...] = (BASE, OTHER)) -> list[tuple[str, list[Message], Sampling]]:
    return [(m, ask(i), Sampling(seed=s)) for m in models for i in range(3) for s in range(2)]


async def online(
    server: FakeOpenAI, tmp_path: Path, requests: list[tuple[str, list[Message], Sampling]]
) -> list[Completion]:
    b = create(OpenAIOptions(base_url=server.base_url), tmp_path / "online")
    try:
        return list(await asyncio.gather(*(b.complete(m, msgs, s) for m, msgs, s in requests)))
    finally:
        await b.aclose()


def batch_models(server: FakeOpenAI) -> list[set[str]]:
    """The models named in each batch's input file, in creation order."""
    out = []
    for batch in sorted(server.state.batches.values(), key=lambda b: b["id"]):
        data = server.state.files[batch["input_file_id"]]["bytes"].decode()
        out.append({json.loads(line)["body"]["model"] for line in data.splitlines() if line.strip()})
    return out


async def test_fake_refuses_a_batch_that_mixes_models(fake_openai: FakeOpenAI) -> None:
    """The fake behaves like the Batch API: one model per batch, else ``failed`` with ``model_mismatch``."""
    client = AsyncOpenAI(api_key=fake_openai.state.api_key, base_url=fake_openai.base_url, max_retries=0)
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": {"model": m, "messages": []}}
        for i, m in enumerate((BASE, OTHER))
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = await client.files.create(file=("in.jsonl", data), purpose="batch")
    created = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"k": "v"}
    )
    batch = await client.batches.retrieve(created.id)
    assert batch.status == "failed" and batch.output_file_id is None and batch.errors and batch.errors.data
    error = batch.errors.data[0]
    assert error.code == "model_mismatch" and error.line == 2 and OTHER in (error.message or "")
    listed = [b async for b in client.batches.list(limit=1)]  # pages of one: the cursor works
    assert [b.id for b in listed] == [created.id] and listed[0].metadata == {"k": "v"}
    await client.close()


async def test_finetuned_agents_get_one_batch_per_model(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    requests = calls()
    b = create(options(fake_openai), tmp_path / "batch")
    via_batch = await asyncio.gather(*(b.complete(m, msgs, s) for m, msgs, s in requests))
    await b.aclose()
    assert sorted(map(sorted, batch_models(fake_openai))) == [[OTHER], [BASE]]
    assert all(batch["status"] == "completed" for batch in fake_openai.state.batches.values())
    assert list(via_batch) == await online(fake_openai, tmp_path, requests)


async def test_a_failed_batch_reports_the_servers_error_and_the_model(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    fake_openai.configure(fail_batches=("invalid_request", "The input file contains a line the API cannot read"))
    b = create(options(fake_openai), tmp_path)
    with pytest.raises(FatalBackendError) as info:
        await b.complete(OTHER, ask(1), Sampling(seed=1))
    text = str(info.value)
    assert "The input file contains a line the API cannot read" in text and OTHER in text
    assert "no result" not in text
    await b.aclose()


async def test_a_failed_batch_is_not_created_again_by_a_retry(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """A batch that failed validation fails the same way every time: a retry (or a resumed run)
    reports it again instead of uploading a new file for another doomed batch."""
    fake_openai.configure(fail_batches=("invalid_request", "The input file contains a line the API cannot read"))
    b = Retrying(create(options(fake_openai), tmp_path), max_attempts=4, base_s=0.01)
    for _ in range(2):
        with pytest.raises(FatalBackendError, match="cannot read"):
            await b.complete(BASE, ask(1), Sampling(seed=1))
    again = create(options(fake_openai), tmp_path)  # a resumed run
    with pytest.raises(FatalBackendError, match="cannot read"):
        await again.complete(BASE, ask(1), Sampling(seed=1))
    assert len(fake_openai.state.batches) == 1 and fake_openai.state.batch_uploads == 1
    await b.aclose()
    await again.aclose()


async def test_lost_create_response_is_found_again_through_the_retry_layer(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    requests = calls()
    # the server creates the first batch, then the connection drops before the client reads the answer
    fake_openai.configure(fault_rate=1.0, fault_kinds=("drop",), fault_only="POST /v1/batches", fault_limit=1)
    b = Retrying(create(options(fake_openai), tmp_path / "batch"), max_attempts=6, base_s=0.01)
    via_batch = await asyncio.gather(*(b.complete(m, msgs, s) for m, msgs, s in requests))
    await b.aclose()
    assert fake_openai.state.faults_injected["drop"] == 1
    assert sorted(map(sorted, batch_models(fake_openai))) == [[OTHER], [BASE]]  # no second, billed batch
    assert list(via_batch) == await online(fake_openai, tmp_path, requests)


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "new-process"])
async def test_lost_create_response_is_adopted_for_any_part_of_its_requests(
    fake_openai: FakeOpenAI, tmp_path: Path, restart: bool
) -> None:
    requests = calls((BASE,))
    fake_openai.configure(fault_rate=1.0, fault_kinds=("drop",), fault_only="POST /v1/batches")
    b = create(options(fake_openai), tmp_path)
    failed = await asyncio.gather(*(b.complete(m, msgs, s) for m, msgs, s in requests), return_exceptions=True)
    assert all(isinstance(e, TransientBackendError) for e in failed)
    assert len(fake_openai.state.batches) == 1  # the server did create it
    fake_openai.configure(fault_rate=0.0)
    if restart:
        await b.aclose()
        b = create(options(fake_openai), tmp_path)
    # the retries need not come back together: one alone first, then the rest
    first = await b.complete(*requests[0])
    rest = await asyncio.gather(*(b.complete(m, msgs, s) for m, msgs, s in requests[1:]))
    await b.aclose()
    assert len(fake_openai.state.batches) == 1 and fake_openai.state.batch_uploads == 1
    assert [first, *rest] == await online(fake_openai, tmp_path, requests)


async def test_pending_batches_of_several_models_are_each_recorded(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """Two batches created at once (one per model) are both found by a restarted process."""
    first = create(options(fake_openai), tmp_path)
    await fake_openai.kill_with_batches_pending(first, (first.complete(m, msgs, s) for m, msgs, s in calls()), 2)
    second = create(options(fake_openai), tmp_path)
    outs = await asyncio.gather(*(second.complete(m, msgs, s) for m, msgs, s in calls()))
    await second.aclose()
    assert len(fake_openai.state.batches) == 2 and fake_openai.state.batch_uploads == 2
    assert list(outs) == await online(fake_openai, tmp_path, calls())
