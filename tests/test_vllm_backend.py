"""The vllm backend against the fake vLLM server: adapters loaded once, reloaded after a server
restart without losing the call, unloaded when released; clear errors; serve = true with a stand-in
server process; jobs adopted from their result marker. The real vLLM + Ray + TRL path is
tests/test_vllm_e2e.py (marked ``vllm``)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import pytest
from fakes import FakeVllm, fake_vllm
from fakes.fake_vllm import BASE_MODEL, write_adapter

import backends
from agentsoc.backend import FatalBackendError, ModelNotFoundError, TransientBackendError
from agentsoc.config import RecipeError, recipe_from_dict
from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message, Sampling
from backends.job_folder import JobInput, JobResult, write_result
from backends.options import SocietyShape, VllmOptions
from backends.refs import adapter_ref
from backends.vllm import OUT, VllmBackend, adapter_name, create
from backends.vllm_server import free_port

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
    fake_vllm: FakeVllm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = VllmBackend(VllmOptions(base_url=fake_vllm.base_url, max_loras=2), tmp_path, base_model=tmp_path)
    try:
        for n in range(4):
            await b.complete(adapter_ref(BASE_MODEL, write_adapter(tmp_path / str(n))), ASK, Sampling(seed=1))
    finally:
        await b.aclose()
    err = caplog.text
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


def finish(job_dir: Path, method: Literal["lora", "full"], output: Path) -> None:
    """What the training job writes last: its result marker (backends.job_folder)."""
    counts = {"examples": 3, "examples_trained": 3, "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0}
    result = JobResult(method=method, output=str(output), steps=4, losses=[1.0], trained_tokens=9, seconds=1, **counts)
    write_result(job_dir, JobInput.read(job_dir), result)


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
    finish(job_dir, "lora", job_dir / OUT / "peft")
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
        finish(b.job_dir("full-job"), "full", out / "model")
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


# --------------------------------------------------------------------------- issue 16: scale-out readiness


def test_adapters_are_named_by_iteration_agent_and_role(backend: VllmBackend) -> None:
    peft = backend.job_dir("arithmetic-vllm/234b85f8/iter-2/agent-1/critic") / OUT / "peft"
    name = adapter_name(str(peft))
    assert name.startswith("iter-2_agent-1_critic-") and "out" not in name.split("-")[0]
    other = adapter_name(str(backend.job_dir("arithmetic-vllm/234b85f8/iter-2/agent-1/generator") / OUT / "peft"))
    assert other.startswith("iter-2_agent-1_generator-") and other != name


def test_max_loras_defaults_to_every_agent_and_role_of_the_society(fake_vllm: FakeVllm, tmp_path: Path) -> None:
    opts = VllmOptions(base_url=fake_vllm.base_url)
    assert VllmBackend(opts, tmp_path, base_model=tmp_path, society=SocietyShape(agents=5, roles=2)).max_loras == 10
    assert VllmBackend(opts, tmp_path, base_model=tmp_path, society=SocietyShape(agents=3, roles=1)).max_loras == 3
    explicit = VllmOptions(base_url=fake_vllm.base_url, max_loras=4)
    assert VllmBackend(explicit, tmp_path, base_model=tmp_path, society=SocietyShape(5, 2)).max_loras == 4


async def test_jobs_run_the_nodes_python_with_our_code_shipped_and_sharded_jobs_under_accelerate(
    fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    launch_command_parser = pytest.importorskip("accelerate.commands.launch").launch_command_parser

    seen: list[dict[str, Any]] = []

    class Recording(FakeJobs):
        def submit(self, key: str, entrypoint: str, **kwargs: Any) -> Any:
            seen.append({"entrypoint": entrypoint, **kwargs})
            return super().submit(key, entrypoint)

    for options, sharded in (
        (VllmOptions(num_gpus=1), False),
        (VllmOptions(num_gpus=2, accelerate_config="fsdp"), True),
    ):
        b = VllmBackend(options.model_copy(update={"base_url": fake_vllm.base_url}), tmp_path, base_model=tmp_path)
        b.jobs = Recording()  # type: ignore[assignment]
        try:
            await b.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key=f"k{sharded}")
        finally:
            await b.aclose()
        argv = seen[-1]["entrypoint"].split()
        assert argv[0] == "python" and argv[-3:-1] == ["-m", "backends.trl_train"]  # the node's interpreter
        assert {Path(m).name for m in seen[-1]["py_modules"]} == {"agentsoc", "backends"}
        if sharded:
            args = launch_command_parser().parse_args(argv[3:])
            assert args.num_processes == 2 and args.use_fsdp and args.mixed_precision == "bf16" and args.module
        else:
            assert "accelerate.commands.launch" not in argv


async def test_a_queued_job_says_what_it_waits_for_and_a_permanent_failure_names_the_fix(
    backend: VllmBackend,
) -> None:
    jobs = FakeJobs()
    backend.jobs = jobs  # type: ignore[assignment]
    job = await backend.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key="q")
    jobs.state = (JobState.QUEUED, "queued since 12:00:00: waiting for 1 GPU(s) and 1 CPU(s) to be free")
    queued = await backend.poll_finetune(job)
    assert queued.state is JobState.QUEUED and "waiting for 1 GPU(s)" in queued.events[-1]
    jobs.state = (JobState.FAILED, "Job entrypoint command failed with exit code 3\nlast log lines:\nout of memory")
    failed = await backend.poll_finetune(job)
    assert not failed.retryable and failed.error and "lower finetune.spec.batch_size" in failed.error
    jobs.state = (JobState.FAILED, "Job entrypoint command failed with exit code 1\nlast log lines:\nnode died")
    assert (await backend.poll_finetune(job)).retryable


async def test_a_failed_job_does_not_keep_the_local_ray_instance_up(
    fake_vllm: FakeVllm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="backends")
    b = VllmBackend(VllmOptions(base_url=fake_vllm.base_url), tmp_path, base_model=tmp_path)
    jobs = FakeJobs()
    b.jobs = jobs  # type: ignore[assignment]
    await b.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key="failed")
    jobs.state = (JobState.FAILED, "exit code 1")
    await b.aclose()
    assert jobs.stopped and "still run" not in caplog.text
    running = VllmBackend(VllmOptions(base_url=fake_vllm.base_url), tmp_path / "r", base_model=tmp_path)
    still = FakeJobs()
    running.jobs = still  # type: ignore[assignment]
    await running.submit_finetune(BASE_MODEL, EXAMPLES, FinetuneSpec(), key="running")
    await running.aclose()
    assert not still.stopped and "1 training job(s) still run" in caplog.text


#: the backend's start-up check refuses to start without Ray (its training jobs run on it)
needs_ray = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (make install-scale)"
)


@needs_ray
def test_endpoints_and_paths_are_checked_at_start_up_in_seconds(fake_vllm: FakeVllm, tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    ok = VllmOptions(base_url=fake_vllm.base_url, model=str(folder), served_model_name=BASE_MODEL)
    assert isinstance(create(ok, tmp_path / "run"), VllmBackend)
    started = time.monotonic()
    cases = [
        (ok.model_copy(update={"model": str(tmp_path / "nowhere")}), r"model = .*nowhere.* not a folder here"),
        (ok.model_copy(update={"model": str(tmp_path)}), "has no config.json"),
        (ok.model_copy(update={"served_model_name": "llama-9"}), f"serves {BASE_MODEL}, not 'llama-9'"),
        (ok.model_copy(update={"ray_address": f"http://127.0.0.1:{free_port()}"}), "Ray is unreachable"),
    ]
    for options, message in cases:
        with pytest.raises(FatalBackendError, match=message):
            create(options, tmp_path / "run")
    fake_vllm.stop()
    with pytest.raises(FatalBackendError, match=r"no server answers at backend\.options\.base_url"):
        create(ok, tmp_path / "run")
    assert time.monotonic() - started < 60  # seconds, not a debate's worth of timeouts


@needs_ray
async def test_a_recipe_gives_the_backend_its_society_shape(fake_vllm: FakeVllm, tmp_path: Path) -> None:
    from agentsoc.config import create_backend

    folder = model_folder(tmp_path)
    options = {"base_url": fake_vllm.base_url, "model": str(folder), "served_model_name": BASE_MODEL}
    data: dict[str, Any] = {
        "name": "v",
        "task": {"name": "arithmetic"},
        "backend": {"name": "vllm", "options": options},
        "society": {"agents": 4, "models": [BASE_MODEL]},
    }
    backend = create_backend(recipe_from_dict(data, source="v.toml"), tmp_path / "run")
    assert isinstance(backend, VllmBackend) and backend.max_loras == 8  # 4 agents x (generator, critic)
    await backend.aclose()
