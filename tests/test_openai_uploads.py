"""Exactly one uploaded training file per dataset, whatever kills the process and wherever (issue 10
item 3): concurrent uploads each keep their record, and a file uploaded by a process that died
before recording it (or that never heard the answer) is found on the server instead of uploaded
again. A "kill" here is the process's end at an injected point: its tasks cancelled or an injected
exception, its backend closed, and a new backend on the same run directory taking over."""

from __future__ import annotations

import asyncio
import hashlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fakes import FakeOpenAI, fake_openai

import backends.openai_files
from agentsoc.backend import BackendError
from agentsoc.types import ChatExample, FinetuneSpec, Job, Message
from backends.openai import OpenAIBackend, create
from backends.options import OpenAIOptions

__all__ = ["fake_openai"]

MODEL = "gpt-4o-mini-2024-07-18"
N_JOBS = 12  # 3 agents x 2 roles x 2 iterations, as in the issue


class Killed(BaseException):
    """The process dies here (a BaseException, so no ``except Exception`` on the way swallows it)."""


def key(i: int) -> str:
    return f"run/fp/iter-{i // 6 + 1}/agent-{i % 3}/{('generator', 'critic')[i // 3 % 2]}"


def dataset(i: int) -> list[ChatExample]:
    return [
        ChatExample(
            messages=(
                Message(role="user", content=f"job {i}: what is {j}+{j}*2?"),
                Message(role="assistant", content=f"\\boxed{{{3 * j}}}", weight=1),
            )
        )
        for j in range(10)
    ]


def spec(i: int) -> FinetuneSpec:
    return FinetuneSpec(metadata={"iteration": str(i // 6 + 1), "agent": str(i % 3)})


def files_per_dataset(server: FakeOpenAI) -> Counter[str]:
    """How many fine-tune files hold each distinct training set."""
    return Counter(
        hashlib.sha256(f["bytes"]).hexdigest() for f in server.state.files.values() if f["purpose"] == "fine-tune"
    )


NewProcess = Callable[[], OpenAIBackend]


@pytest.fixture
def new_process(fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> NewProcess:
    """A factory of backends on one run directory: each call is a fresh process's backend."""
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    return lambda: create(OpenAIOptions(base_url=fake_openai.base_url, timeout_s=10), tmp_path)


async def submit_all(b: OpenAIBackend, n: int = N_JOBS) -> list[Job]:
    return list(await asyncio.gather(*(b.submit_finetune(MODEL, dataset(i), spec(i), key=key(i)) for i in range(n))))


async def finish(make: NewProcess, server: FakeOpenAI) -> None:
    """The resumed run: every job submitted again, from a new process; one file per dataset."""
    server.configure(fault_rate=0.0, respond_late={}, refuse_finetune=None)
    b = make()
    jobs = await submit_all(b)
    await b.aclose()
    per_dataset = files_per_dataset(server)
    assert len(per_dataset) == N_JOBS and set(per_dataset.values()) == {1}, per_dataset
    files = {fid for fid, f in server.state.files.items() if f["purpose"] == "fine-tune"}
    assert {server.state.jobs[j.id]["training_file"] for j in jobs} == files


async def test_concurrent_uploads_each_keep_their_record(new_process: NewProcess, fake_openai: FakeOpenAI) -> None:
    """Killed after all 12 uploads and before any job: the resumed run uploads nothing."""
    fake_openai.configure(refuse_finetune="not now")  # every upload finishes, then job creation fails
    b = new_process()
    outcomes = await asyncio.gather(
        *(b.submit_finetune(MODEL, dataset(i), spec(i), key=key(i)) for i in range(N_JOBS)), return_exceptions=True
    )
    assert all(isinstance(o, BackendError) for o in outcomes)
    assert fake_openai.state.uploads == N_JOBS
    await b.aclose()
    await finish(new_process, fake_openai)
    assert fake_openai.state.uploads == N_JOBS


async def test_killed_while_the_answers_to_uploads_are_on_their_way(
    new_process: NewProcess, fake_openai: FakeOpenAI
) -> None:
    """The server stored every file; the process dies before any answer arrives."""
    fake_openai.configure(respond_late={"POST /v1/files": 5.0})
    b = new_process()
    tasks = [asyncio.create_task(b.submit_finetune(MODEL, dataset(i), spec(i), key=key(i))) for i in range(N_JOBS)]
    async with asyncio.timeout(20):
        while fake_openai.state.uploads < N_JOBS:
            await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await b.aclose()
    await finish(new_process, fake_openai)


async def test_upload_answers_lost(new_process: NewProcess, fake_openai: FakeOpenAI) -> None:
    """The server stored each file, the connection dropped before its answer: a retry finds the file."""
    fake_openai.configure(fault_rate=1.0, fault_kinds=("drop",), fault_only="POST /v1/files")
    b = new_process()
    outcomes = await asyncio.gather(
        *(b.submit_finetune(MODEL, dataset(i), spec(i), key=key(i)) for i in range(N_JOBS)), return_exceptions=True
    )
    assert all(isinstance(o, BackendError) for o in outcomes) and fake_openai.state.uploads == N_JOBS
    fake_openai.configure(fault_rate=0.0)
    jobs = await submit_all(b)  # the same process retries (as the retry wrapper would)
    await b.aclose()
    assert len(jobs) == N_JOBS
    await finish(new_process, fake_openai)


@pytest.mark.parametrize("at", ["before the record", "after the record", "after half the jobs"])
async def test_killed_at_a_point_of_the_upload(
    new_process: NewProcess, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch, at: str
) -> None:
    writes = 0
    real_write = backends.openai_files.write_atomic

    def write(path: Path, data: str | bytes) -> None:
        """Upload records are .json files in the state dir (the training copies are .jsonl)."""
        nonlocal writes
        if path.suffix == ".json":
            writes += 1
            if at == "before the record" and writes > N_JOBS // 2:
                raise Killed
        real_write(path, data)
        if at == "after the record" and path.suffix == ".json" and writes > N_JOBS // 2:
            raise Killed

    monkeypatch.setattr(backends.openai_files, "write_atomic", write)
    b = new_process()
    if at == "after half the jobs":
        await submit_all(b, N_JOBS // 2)
    else:
        with pytest.raises(Killed):
            for i in range(N_JOBS):  # one after the other: the kill lands on a known upload
                await b.submit_finetune(MODEL, dataset(i), spec(i), key=key(i))
    await b.aclose()
    monkeypatch.setattr(backends.openai_files, "write_atomic", real_write)
    await finish(new_process, fake_openai)
