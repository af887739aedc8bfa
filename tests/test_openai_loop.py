"""The whole multiagent-finetuning loop on the OpenAI backend against the fake server:
faults change nothing but the wall time, a killed run resumes its jobs instead of paying twice,
and the API key never lands anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


async def run_loop(server: FakeOpenAI, run_dir: Path) -> list[dict[str, Any] | None]:
    recipe = recipe_from_dict(loop_recipe(server.base_url))
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
    uploads_before = fake_openai.state.uploads
    assert uploads_before == sum(jobs_before.values())

    fake_openai.configure(hold_jobs=False)
    second = _cli(recipe, run_dir, key, tmp_path / "second.log", "--resume")
    assert second.wait(timeout=120) == 0, (tmp_path / "second.log").read_text()
    after = dict(fake_openai.state.jobs_created)
    assert {k: v for k, v in after.items() if k[0] == "1"} == jobs_before  # iteration 1: polled, not resubmitted
    assert set(after.values()) == {1}
    assert fake_openai.state.uploads == sum(after.values())  # one upload per job, none repeated
    assert "debate (final vote)" in (tmp_path / "second.log").read_text()

    assert not leaks(key, tmp_path), "the API key leaked into the run directory or the logs"


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
