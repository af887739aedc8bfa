"""A run keeps going: failed jobs are retried under new attempts (transient) or reported at once
(permanent) with every job's true state stored; a problem whose calls used up their retries does not
stop the stage, and gets one more round at its end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import mock_recipe

from agentsoc import tasks
from agentsoc.backend import JobFailedError, RetriesExhaustedError, TransientBackendError
from agentsoc.config import recipe_from_dict
from agentsoc.society import Society
from agentsoc.types import Completion, JobState, Message, ModelRef, Sampling
from backends.mock import MockBackend

ROOT = Path(__file__).resolve().parents[1]


def jobs_by_attempt(society: Society) -> Counter[str]:
    return Counter("retry" if "#attempt-" in j.key else "first" for j in society.store.jobs())


async def test_a_transiently_failed_job_is_retried_under_a_new_attempt_in_the_same_run(tmp_path: Path) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"finetune.iterations": 1}))
    backend = MockBackend(state_dir=tmp_path / "server", polls_to_finish=1, flaky_jobs=2)
    async with Society(recipe, run_dir=tmp_path / "run", backend=backend, task=tasks.create("arithmetic", {})) as soc:
        await soc.run()
        jobs = soc.store.jobs()
        failed = [j for j in jobs if j.state is JobState.FAILED]
        assert len(failed) == 2 and all(j.retryable and "server_error" in (j.error or "") for j in failed)
        retried = {j.key.split("#")[0] for j in jobs if "#attempt-2" in j.key}
        assert retried == {j.key for j in failed}  # each failed job, once more, under its own key
        assert all(j.state is JobState.SUCCEEDED for j in jobs if j not in failed)


async def test_a_permanent_failure_is_not_retried_and_every_job_ends_in_its_true_state(tmp_path: Path) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"finetune.iterations": 1}))
    backend = MockBackend(state_dir=tmp_path / "server", polls_to_finish=1, fail_jobs=True)
    soc = Society(recipe, run_dir=tmp_path / "run", backend=backend, task=tasks.create("arithmetic", {}))
    async with soc:
        with pytest.raises(JobFailedError, match="failed permanently \\(not retried\\): simulated failure"):
            await soc.run()
        jobs = soc.store.jobs()
    assert len(jobs) == 6 and all(j.state is JobState.FAILED and not j.retryable for j in jobs)  # none left "queued"
    assert not any("#attempt-" in j.key for j in jobs)


def test_resume_with_more_job_attempts_retries_a_job_that_failed(write_recipe: Any, tmp_path: Path) -> None:
    def run(**overrides: Any) -> subprocess.CompletedProcess[str]:
        recipe = write_recipe(f"r{len(overrides)}.toml", **{"finetune.iterations": 1, **overrides})
        args = ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--resume", "--quiet"]
        return subprocess.run([sys.executable, "-m", "agentsoc.cli", *args], capture_output=True, text=True, cwd=ROOT)

    options = {"state_dir": "server", "flaky_jobs": 6}
    first = run(**{"backend.max_job_attempts": 1, "backend.options": options})
    assert first.returncode == 1 and "failed 1 times (backend.max_job_attempts)" in first.stderr
    assert "--resume" in first.stderr
    again = run(**{"backend.max_job_attempts": 2, "backend.options": options, "backend.concurrency": 3})
    assert again.returncode == 0, again.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", "jobs", str(tmp_path / "run"), "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    states = Counter((j["key"].endswith("#attempt-2"), j["state"]) for j in json.loads(listed))
    assert states == {(False, "failed"): 6, (True, "succeeded"): 6}


class Flaky(MockBackend):
    """The mock, with calls that fail transiently: every round-0 answer to a problem in ``bad`` fails its
    first ``times`` attempts."""

    def __init__(self, bad: Sequence[str], times: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.bad = list(bad)
        self.times = times
        self.failed: Counter[tuple[str, int | None]] = Counter()

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        for b in self.bad:
            if len(messages) == 1 and b in messages[0].content and self.failed[(b, sampling.seed)] < self.times:
                self.failed[(b, sampling.seed)] += 1
                raise TransientBackendError(f"injected 503 for {b}")
        return await super().complete(model, messages, sampling)


async def test_problems_that_used_up_their_retries_get_one_more_round_at_the_end_of_the_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"finetune.iterations": 0, "backend.max_attempts": 2}))
    task = tasks.create("arithmetic", {})
    questions = [p.question for p in task.load(20, 20, 0).test[:3]]
    backend = Flaky(questions, times=2, state_dir=tmp_path / "server")  # both attempts of the first round fail
    async with Society(recipe, run_dir=tmp_path / "run", backend=backend, task=task, progress=False) as soc:
        scores = await soc.evaluate(0)
        assert scores is not None and scores.debate.n == 20  # every problem finished, in one invocation
    assert "3 problem(s) used up their retries; trying them once more" in caplog.text


async def test_a_stage_that_still_fails_stops_with_what_to_do(tmp_path: Path) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"finetune.iterations": 0, "backend.max_attempts": 2}))
    task = tasks.create("arithmetic", {})
    question = task.load(20, 20, 0).test[0].question
    backend = Flaky([question], times=10, state_dir=tmp_path / "server")
    async with Society(recipe, run_dir=tmp_path / "run", backend=backend, task=task, progress=False) as soc:
        with pytest.raises(RetriesExhaustedError, match=r"iter-0/eval: 1 of 20 problems still failed.*--resume"):
            await soc.evaluate(0)
        assert len(soc.store.transcripts("iter-0/eval")) == 19  # the others are saved
