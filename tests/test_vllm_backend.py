"""The vllm backend against the fake vLLM server: adapters loaded once, reloaded after a server
restart without losing the call, unloaded when released; clear errors; serve = true with a stand-in
server process; jobs adopted from their result marker. The real vLLM + Ray + TRL path is
tests/test_vllm_e2e.py (marked ``vllm``)."""

from __future__ import annotations

import asyncio
import json
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeVllm, fake_vllm
from fakes.fake_vllm import BASE_MODEL, write_adapter

import backends
from agentsoc.backend import FatalBackendError, ModelNotFoundError, TransientBackendError
from agentsoc.config import RecipeError, recipe_from_dict
from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message, Sampling
from backends.options import VllmOptions
from backends.refs import adapter_ref
from backends.vllm import OUT, VllmBackend, adapter_name

__all__ = ["fake_vllm"]

ROOT = Path(__file__).resolve().parents[1]
ASK = [Message(role="user", content="What is 3+4*5?")]


@pytest.fixture
async def backend(fake_vllm: FakeVllm, tmp_path: Path) -> AsyncIterator[VllmBackend]:
    b = VllmBackend(VllmOptions(base_url=fake_vllm.base_url, model=BASE_MODEL), tmp_path, base_model=tmp_path)
    yield b
    await b.aclose()


async def test_base_and_adapters_chat_with_one_load_each(
    backend: VllmBackend, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    base = await backend.complete(BASE_MODEL, ASK, Sampling(seed=1))
    assert base.model == BASE_MODEL and "\\boxed{" in base.text
    refs = [adapter_ref(BASE_MODEL, write_adapter(tmp_path / f"agent-{n}" / "peft", "mock:0.9")) for n in range(3)]
    outs = await asyncio.gather(*(backend.complete(r, ASK, Sampling(seed=s)) for r in refs for s in range(4)))
    assert [o.model for o in outs] == [r for r in refs for _ in range(4)]  # the reference, not the served name
    names = [adapter_name(str(tmp_path / f"agent-{n}" / "peft")) for n in range(3)]
    assert dict(fake_vllm.state.loads) == {name: 1 for name in names}  # 12 calls, concurrent: one load each
    assert all(name.startswith(f"agent-{n}-") for n, name in enumerate(names))


async def test_a_restarted_server_gets_its_adapter_again_and_the_call_is_not_lost(
    backend: VllmBackend, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    ref = adapter_ref(BASE_MODEL, write_adapter(tmp_path / "a", "mock:0.9"))
    first = await backend.complete(ref, ASK, Sampling(seed=3))
    fake_vllm.restart()  # the server forgot every adapter; the backend still thinks it is loaded
    again = await backend.complete(ref, ASK, Sampling(seed=3))
    assert again.text == first.text  # same adapter, same seed: the same answer
    name = adapter_name(str(tmp_path / "a"))
    assert fake_vllm.state.loads[name] == 2
    chats = [r.status for r in fake_vllm.state.requests if r.route == "chat"]
    assert chats == [200, 404, 200]  # the 404 was answered by a reload, not passed on


async def test_released_adapters_are_unloaded_and_load_again_if_needed(
    backend: VllmBackend, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    old, new = (adapter_ref(BASE_MODEL, write_adapter(tmp_path / n, "mock:0.9")) for n in ("old", "new"))
    await backend.complete(old, ASK, Sampling(seed=1))
    await backend.complete(new, ASK, Sampling(seed=1))
    await backend.release([old, BASE_MODEL])
    assert dict(fake_vllm.state.unloads) == {adapter_name(str(tmp_path / "old")): 1}
    assert set(fake_vllm.state.adapters) == {adapter_name(str(tmp_path / "new"))}
    await backend.release([old])  # nothing loaded under that name any more: no request
    assert sum(fake_vllm.state.unloads.values()) == 1


async def test_unreadable_adapter_and_unknown_base_are_clear_errors(
    backend: VllmBackend, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    with pytest.raises(FatalBackendError, match=r"cannot read adapter .*/missing.*shared disk"):
        await backend.complete(adapter_ref(BASE_MODEL, tmp_path / "missing"), ASK, Sampling(seed=1))
    with pytest.raises(ModelNotFoundError, match="llama-9"):
        await backend.complete("llama-9", ASK, Sampling(seed=1))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(FatalBackendError, match="refused adapter"):  # vLLM's 500 for a broken adapter: no retry
        await backend.complete(adapter_ref(BASE_MODEL, broken), ASK, Sampling(seed=1))


async def test_server_faults_are_transient_and_name_the_url(
    backend: VllmBackend, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    fake_vllm.fail_next("chat", 503)
    with pytest.raises(TransientBackendError):
        await backend.complete(BASE_MODEL, ASK, Sampling(seed=1))
    fake_vllm.stop()
    with pytest.raises(TransientBackendError, match=r"127\.0\.0\.1"):
        await backend.complete(adapter_ref(BASE_MODEL, write_adapter(tmp_path / "a")), ASK, Sampling(seed=1))


async def test_more_adapters_than_max_loras_warns_once(
    fake_vllm: FakeVllm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b = VllmBackend(VllmOptions(base_url=fake_vllm.base_url, max_loras=2), tmp_path, base_model=tmp_path)
    try:
        for n in range(4):
            await b.complete(adapter_ref(BASE_MODEL, write_adapter(tmp_path / str(n))), ASK, Sampling(seed=1))
    finally:
        await b.aclose()
    err = capsys.readouterr().err
    assert err.count("--max-loras") == 1 and "take turns" in err


# --------------------------------------------------------------------------- serve = true


def shim(tmp_path: Path) -> Path:
    """An 'interpreter' that runs the fake server with the arguments the backend gives vLLM."""
    path = tmp_path / "vllm-env" / "bin" / "python"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests/fakes/vllm_server_main.py"} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


async def test_serve_starts_the_server_logs_to_the_run_dir_and_stops_it(tmp_path: Path) -> None:
    opts = VllmOptions(serve=True, python=str(shim(tmp_path)), served_model_name=BASE_MODEL, startup_timeout_s=30)
    b = VllmBackend(opts, tmp_path, base_model=model_folder(tmp_path))
    assert b.server is not None
    out = await asyncio.gather(*(b.complete(BASE_MODEL, ASK, Sampling(seed=s)) for s in range(3)))
    assert all("\\boxed{" in o.text for o in out)
    log = (tmp_path / "vllm-server.log").read_text()
    assert "--enable-lora --max-loras 6 --max-lora-rank 8" in log and log.count("serving") == 1  # started once
    await b.aclose()
    assert not b.server.running


async def test_a_server_that_does_not_come_up_is_one_error_with_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_FAIL", "RuntimeError: Failed to infer device type")
    opts = VllmOptions(serve=True, python=str(shim(tmp_path)), startup_timeout_s=30)
    b = VllmBackend(opts, tmp_path, base_model=model_folder(tmp_path))
    with pytest.raises(FatalBackendError, match=r"(?s)exited with code 1.*Failed to infer device type"):
        await b.complete(BASE_MODEL, ASK, Sampling(seed=1))
    await b.aclose()
    missing = VllmBackend(
        VllmOptions(serve=True, python=str(tmp_path / "nowhere/bin/python")), tmp_path, base_model=tmp_path
    )
    with pytest.raises(FatalBackendError, match="make vllm-env"):
        await missing.complete(BASE_MODEL, ASK, Sampling(seed=1))
    await missing.aclose()


def test_options_are_checked_when_the_recipe_loads() -> None:
    data: dict[str, Any] = {
        "name": "v",
        "task": {"name": "arithmetic"},
        "backend": {"name": "vllm", "options": {"base_url": "http://127.0.0.1:1/v1", "max_lora": 8}},
        "society": {"models": [BASE_MODEL]},
    }
    with pytest.raises(RecipeError, match=r"backend\.options\.max_lora: unknown option \(did you mean 'max_loras'\?\)"):
        recipe_from_dict(data, source="v.toml")
    assert isinstance(backends.parse("vllm", {"serve": True}), VllmOptions)


# --------------------------------------------------------------------------- jobs


class FakeJobs:
    """Stands in for backends.ray_jobs.RayJobs: records submissions, answers a scripted state."""

    local = True

    def __init__(self) -> None:
        self.submitted: list[tuple[str, str]] = []
        self.state = (JobState.RUNNING, "running")
        self.stopped = False

    def submit(self, key: str, entrypoint: str, **_: Any) -> Any:
        self.submitted.append((key, entrypoint))
        return type("RayJob", (), {"submission_id": f"sid-{len(self.submitted)}"})()

    def status(self, key: str, **_: Any) -> tuple[JobState, str]:
        return self.state

    def stop_local(self) -> bool:
        self.stopped = True
        return True


EXAMPLES = [
    ChatExample(messages=(Message(role="user", content="2+2?"), Message(role="assistant", content="4", weight=1)))
] * 3


async def test_jobs_are_submitted_once_and_adopted_from_their_result_marker(
    backend: VllmBackend, tmp_path: Path
) -> None:
    jobs = FakeJobs()
    backend.jobs = jobs  # type: ignore[assignment]
    key = "run/fp/iter-1/agent-0/generator"
    job = await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key=key)
    assert job.state is JobState.QUEUED and len(jobs.submitted) == 1
    assert "-m backends.trl_train" in jobs.submitted[0][1]
    job_dir = backend.job_dir(key)
    assert json.loads((job_dir / "job.json").read_text())["output_dir"] == OUT
    (job_dir / OUT).mkdir()
    (job_dir / OUT / "train.log").write_text(json.dumps({"step": 3, "total": 4, "loss": 1.0}) + "\n")
    polled = await backend.poll_finetune(job)
    assert polled.state is JobState.RUNNING and polled.progress == pytest.approx(0.75)
    # the job finishes: its marker names the adapter
    (job_dir / OUT / "result.json").write_text(json.dumps({"output": str(job_dir / OUT / "peft"), "steps": 4}))
    done = await backend.poll_finetune(polled)
    assert done.state is JobState.SUCCEEDED and done.result == adapter_ref(BASE_MODEL, job_dir / OUT / "peft")
    # a resumed run submits again: the marker answers, Ray is not asked
    again = await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key=key)
    assert again.result == done.result and len(jobs.submitted) == 1
    # continued finetuning: the next iteration trains from this adapter
    await backend.submit_finetune(done.result or "", EXAMPLES, FinetuneSpec(), key=key + "-next")
    job_input = json.loads((backend.job_dir(key + "-next") / "job.json").read_text())
    assert job_input["init_adapter"] == str(job_dir / OUT / "peft")


async def test_a_job_that_fails_or_exits_without_its_marker_is_failed(backend: VllmBackend) -> None:
    jobs = FakeJobs()
    backend.jobs = jobs  # type: ignore[assignment]
    job = await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key="k")
    jobs.state = (JobState.FAILED, "Job entrypoint command failed with exit code 3\nlast log lines:\nout of memory")
    failed = await backend.poll_finetune(job)
    assert failed.state is JobState.FAILED and failed.error and "out of memory" in failed.error
    jobs.state = (JobState.SUCCEEDED, "Job finished successfully.")
    odd = await backend.poll_finetune(job)
    assert odd.state is JobState.FAILED and odd.error and "without result.json" in odd.error


async def test_lora_rank_above_the_server_limit_and_full_finetuning_without_serve_are_refused(
    backend: VllmBackend,
) -> None:
    with pytest.raises(FatalBackendError, match="max_lora_rank"):
        await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(lora_r=16), key="k")
    with pytest.raises(FatalBackendError, match="method = 'full' needs serve = true"):
        await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(method="full"), key="k")


async def test_a_fully_finetuned_model_gets_a_server_of_its_own_until_released(tmp_path: Path) -> None:
    opts = VllmOptions(serve=True, python=str(shim(tmp_path)), served_model_name=BASE_MODEL, startup_timeout_s=30)
    b = VllmBackend(opts, tmp_path, base_model=model_folder(tmp_path))
    b.jobs = FakeJobs()  # type: ignore[assignment]
    try:
        job = await b.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(method="full", lora_r=64), key="full-job")
        out = b.job_dir("full-job") / OUT
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text("{}")
        (out / "result.json").write_text(json.dumps({"method": "full", "output": str(out / "model")}))
        done = await b.poll_finetune(job)
        assert done.result == f"{BASE_MODEL}+model:{out / 'model'}"
        reply = await b.complete(done.result, ASK, Sampling(seed=1))
        assert reply.model == done.result and "\\boxed{" in reply.text
        ((server, _),) = b._full.values()
        assert server.running and server.lora is None and server.port != (b.server.port if b.server else None)
        await b.release([done.result])
        assert not server.running and not b._full
    finally:
        await b.aclose()
