"""The whole multiagent-finetuning loop on the OpenAI backend against the fake server:
faults change nothing but the wall time, a killed run resumes its jobs instead of paying twice,
and the API key never lands anywhere."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fakes import FakeOpenAI, fake_openai

from agentsoc.config import recipe_from_dict
from agentsoc.society import Society

__all__ = ["fake_openai"]

ROOT = Path(__file__).resolve().parents[1]


def loop_recipe(base_url: str, **backend: Any) -> dict[str, Any]:
    """3 agents, 2 rounds, 2 iterations on 20 + 20 arithmetic problems; fast polling, short back-off."""
    return {
        "name": "openai-loop",
        "seed": 0,
        "task": {"name": "arithmetic", "n_train": 20, "n_test": 20},
        "backend": {
            "name": "openai",
            "concurrency": 16,
            "poll_interval_s": 0.01,
            "max_attempts": 12,
            "max_backoff_s": 0.05,
            "options": {"base_url": base_url, "timeout_s": 0.5},
            **backend,
        },
        "society": {"agents": 3, "rounds": 2, "models": ["gpt-4o-mini-2024-07-18"]},
        "selection": {"min_examples": 10},
        "finetune": {"iterations": 2},
    }


async def run_loop(server: FakeOpenAI, run_dir: Path, **backend: Any) -> list[dict[str, Any] | None]:
    recipe = recipe_from_dict(loop_recipe(server.base_url, **backend))
    async with Society.from_recipe(recipe, run_dir=run_dir, progress=False) as soc:
        results = await soc.run()
    return [r.scores.model_dump() if r.scores else None for r in results]


def leaks(secret: str, root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


async def test_faults_change_nothing_and_each_job_is_created_once(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    clean = await run_loop(fake_openai, tmp_path / "clean")
    clean_jobs = dict(fake_openai.state.jobs_created)

    faulty = FakeOpenAI(api_key=fake_openai.state.api_key, fault_rate=0.2, fault_seed=1, slow_s=0.8).start()
    try:
        noisy = await run_loop(faulty, tmp_path / "faulty")
        assert noisy == clean
        assert set(faulty.state.faults_injected) == {"429", "500", "slow", "malformed", "drop"}
        assert dict(faulty.state.jobs_created) == clean_jobs
        assert set(clean_jobs.values()) == {1}
        assert {it for it, _, _ in clean_jobs} == {"1", "2"}
    finally:
        faulty.stop()
    assert not leaks(fake_openai.state.api_key, tmp_path)


async def test_forty_percent_faults_complete_in_one_invocation(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default retry budget (6 attempts) exhausts on ~0.4% of calls at a 40% fault rate; the run
    still finishes in one go (a second round at the end of each stage), with one upload per dataset
    and one job per agent, role and iteration."""
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    clean = await run_loop(fake_openai, tmp_path / "clean")
    faulty = FakeOpenAI(api_key=fake_openai.state.api_key, fault_rate=0.4, fault_seed=7, slow_s=0.8).start()
    try:
        noisy = await run_loop(faulty, tmp_path / "faulty", max_attempts=6)
        assert noisy == clean
        st = faulty.state
        assert sum(st.faults_injected.values()) > 500
        assert set(st.jobs_created.values()) == {1} and len(st.jobs_created) == len(fake_openai.state.jobs_created)
        assert st.uploads == len(st.jobs_created)  # one file per dataset
    finally:
        faulty.stop()


async def test_batch_mode_completes_two_iterations_with_a_batch_per_model(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    options = {"base_url": fake_openai.base_url, "timeout_s": 0.5, "batch": True, "batch_window_s": 0.05}
    results = await run_loop(fake_openai, tmp_path / "run", concurrency=200, options={**options, "batch_poll_s": 0.01})
    assert len(results) == 3 and all(r is not None for r in results)
    models_per_batch = [set(b["_models"]) for b in fake_openai.state.batches.values()]
    assert all(len(m) == 1 for m in models_per_batch)  # the Batch API refuses mixed models
    assert len({m for ms in models_per_batch for m in ms}) > 1  # finetuned agents: several models
    assert all(b["status"] == "completed" for b in fake_openai.state.batches.values())


async def test_a_job_that_failed_on_the_server_is_resubmitted_under_a_new_attempt(
    fake_openai: FakeOpenAI, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", fake_openai.state.api_key)
    fake_openai.configure(flaky_jobs=2)
    assert len(await run_loop(fake_openai, tmp_path / "run")) == 3
    keys = [j["metadata"]["agentsoc_key"] for j in fake_openai.state.jobs.values()]
    retried = [k for k in keys if "#attempt-2" in k]
    assert len(retried) == 2 and all(k.split("#")[0] in keys for k in retried)


def _cli(recipe: Path, run_dir: Path, key: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OPENAI_API_KEY": key, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run_dir), "--quiet", *extra],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def test_killed_run_resumes_its_jobs_without_new_uploads_or_jobs(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    key = fake_openai.state.api_key
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(loop_recipe(fake_openai.base_url)))
    run_dir = tmp_path / "run"
    fake_openai.configure(hold_jobs=True)  # jobs stay "running" until the first process is dead

    first = _cli(recipe, run_dir, key, tmp_path / "first.log")
    deadline = time.monotonic() + 60
    while sum(fake_openai.state.jobs_created.values()) == 0:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no fine-tuning job was created"
        time.sleep(0.05)
    time.sleep(1.0)  # let every job of the iteration be created and polled a few times
    assert fake_openai.state.active_jobs() > 0
    first.send_signal(signal.SIGKILL)
    first.wait()
    jobs_before = dict(fake_openai.state.jobs_created)
    # a kill between an upload and its job leaves a file without a job (yet): the resumed run reuses it
    assert fake_openai.state.uploads >= sum(jobs_before.values())

    fake_openai.configure(hold_jobs=False)
    second = _cli(recipe, run_dir, key, tmp_path / "second.log", "--resume")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    after = dict(fake_openai.state.jobs_created)
    assert {k: v for k, v in after.items() if k[0] == "1"} == jobs_before  # iteration 1: polled, not resubmitted
    assert set(after.values()) == {1}
    assert fake_openai.state.uploads == sum(after.values())  # one upload per job, none repeated
    assert "debate (final vote)" in (tmp_path / "second.log").read_text()

    assert not leaks(key, tmp_path), "the API key leaked into the run directory or the logs"


def fine_tune_files(server: FakeOpenAI) -> Counter[str]:
    """How many uploaded fine-tune files hold each distinct training set."""
    return Counter(
        hashlib.sha256(f["bytes"]).hexdigest() for f in server.state.files.values() if f["purpose"] == "fine-tune"
    )


def test_killed_during_uploads_leaves_one_file_per_dataset(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    """SIGKILL while the server holds files whose upload answers are still on their way (the client
    never recorded them): the resumed run finds them instead of uploading the datasets again."""
    key = fake_openai.state.api_key
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(loop_recipe(fake_openai.base_url)))
    run_dir = tmp_path / "run"
    fake_openai.configure(respond_late={"POST /v1/files": 30.0})

    first = _cli(recipe, run_dir, key, tmp_path / "first.log")
    deadline = time.monotonic() + 90
    while fake_openai.state.uploads < 3:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "no training file was uploaded"
        time.sleep(0.05)
    time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert sum(fake_openai.state.jobs_created.values()) == 0  # every upload answer was still pending

    fake_openai.configure(respond_late={})
    second = _cli(recipe, run_dir, key, tmp_path / "second.log", "--resume")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    jobs = sum(fake_openai.state.jobs_created.values())
    per_dataset = fine_tune_files(fake_openai)
    assert set(per_dataset.values()) == {1}, per_dataset
    assert len(per_dataset) == jobs == fake_openai.state.uploads
    assert not leaks(key, tmp_path)


def test_bad_key_fails_fast_without_leaking_it(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    wrong = "sk-definitely-not-the-right-key-42"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(loop_recipe(fake_openai.base_url)))
    proc = _cli(recipe, tmp_path / "run", wrong, tmp_path / "out.log")
    assert proc.wait(timeout=60) == 1
    text = (tmp_path / "out.log").read_text()
    assert "HTTP 401" in text and "gpt-4o-mini-2024-07-18" in text
    assert f"Bearer {wrong}" in fake_openai.state.seen_auth  # the server did see (and echo) it
    assert not leaks(wrong, tmp_path)
