"""The whole loop on the mock backend: what lands in the run directory, and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import mock_recipe

from agentsoc import tasks
from agentsoc.config import recipe_from_dict
from agentsoc.records import IterationRecord
from agentsoc.society import Society
from agentsoc.store import RunStore
from backends.mock import MockBackend, MockBrain, _last_number


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", *args], capture_output=True, text=True, env=full_env, timeout=120
    )


def records(run_dir: Path) -> list[IterationRecord]:
    store = RunStore.open(run_dir)
    try:
        return store.iterations()
    finally:
        store.close()


def without_timings(records: list[IterationRecord]) -> list[IterationRecord]:
    """Iteration records less the stage wall times, which differ between any two runs."""
    return [r.model_copy(update={"wall_s": {}}) for r in records]


async def test_full_mock_run_stores_everything(write_recipe: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    async with Society.from_recipe(write_recipe(), run_dir=run_dir, progress=False) as soc:
        results = await soc.run()
        store = soc.store
        assert [r.iteration for r in results] == [0, 1, 2]
        # every transcript: 20 held-out problems x 3 evaluations + 20 training problems x 2 iterations
        assert {p: len(store.transcripts(p)) for p in store.phases()} == {
            "iter-0/eval": 20,
            "iter-1/eval": 20,
            "iter-1/train": 20,
            "iter-2/eval": 20,
            "iter-2/train": 20,
        }
        jobs = store.jobs()
        assert len(jobs) == 12 and all(j.state.value == "succeeded" and j.result for j in jobs)
        assert len(store.datasets()) == 12
        final_slots = results[-1].slots
        # each agent has its own generator and critic, and iteration 2 continued from iteration 1
        assert len({s.generator for s in final_slots} | {s.critic for s in final_slots}) == 6
        first = {j.key.split("/", 2)[2]: j for j in jobs}
        assert first["iter-2/agent-0/generator"].base == first["iter-1/agent-0/generator"].result
    for it in (1, 2):
        for n in range(3):
            for role in ("generator", "critic"):
                lines = (run_dir / f"iter-{it}/data/agent-{n}-{role}.jsonl").read_text().splitlines()
                assert lines and all("messages" in json.loads(line) for line in lines)
        assert len((run_dir / f"iter-{it}/debate.jsonl").read_text().splitlines()) == 20
    assert (run_dir / "iter-0/eval.jsonl").exists() and (run_dir / "recipe.toml").exists()
    m = records(run_dir)
    assert [r.iteration for r in m] == [0, 1, 2] and all(r.scores is not None and len(r.scores.rounds) == 2 for r in m)
    # selection by the vote concentrates right answers: the generators' training data is more often
    # right than the agents were (a selection that ignored the vote, or kept the losers, would not be)
    brain = MockBrain()
    right = [
        brain.truth(ex["messages"][0]["content"]) == _last_number(ex["messages"][-1]["content"])
        for n in range(3)
        for ex in map(json.loads, _lines(run_dir, n, "generator"))
    ]
    assert m[0].scores is not None and sum(right) / len(right) > m[0].scores.single_agent.accuracy + 0.1
    # every stage's wall time, per iteration
    assert set(results[0].wall_s) == {"eval"} and set(results[2].wall_s) == {"train", "finetune", "eval"}
    assert all(v > 0 for r in results for v in r.wall_s.values())
    # a rerun with nothing left to do keeps the times of the session that did the work
    async with Society.from_recipe(write_recipe(), run_dir=run_dir, resume=True, progress=False) as soc:
        again = await soc.run()
    assert [r.wall_s for r in again] == [r.wall_s for r in results]


async def test_sharing_and_no_critic_switches(write_recipe: Any, tmp_path: Path) -> None:
    # the paper's single-agent FT: ONE model, trained on every agent's generator and critic data,
    # answers for every agent in every round
    recipe = write_recipe(**{"finetune.share": "all", "finetune.iterations": 1})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "single", progress=False) as soc:
        results = await soc.run()
        (job,) = soc.store.jobs()
        sizes = sum(d.size for d in soc.store.datasets(1))
    assert job.key.endswith("/agent-all/model")
    assert {m for s in results[-1].slots for m in (s.generator, s.critic)} == {job.result}
    examples = [ln for n in range(3) for r in ("generator", "critic") for ln in _lines(tmp_path / "single", n, r)]
    assert len(examples) == sizes > 0
    # one generator and one critic, each shared by the agents
    recipe = write_recipe("roles.toml", **{"finetune.share": "agents", "finetune.iterations": 1})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "roles", progress=False) as soc:
        results = await soc.run()
        keys = sorted(j.key.rsplit("/", 2)[1] + "/" + j.key.rsplit("/", 1)[1] for j in soc.store.jobs())
    assert keys == ["agent-all/critic", "agent-all/generator"]
    assert len({s.generator for s in results[-1].slots}) == 1 and len({s.critic for s in results[-1].slots}) == 1
    recipe = write_recipe("nc.toml", **{"society.critic": False, "finetune.iterations": 1})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "nocritic", progress=False) as soc:
        results = await soc.run()
        assert all(j.key.endswith("generator") for j in soc.store.jobs())
        t = next(iter(soc.store.transcripts("iter-1/eval").values()))
    assert all(a.models[0] == a.models[1] for a in t.agents)


def _lines(run_dir: Path, agent: int, role: str) -> list[str]:
    return (run_dir / f"iter-1/data/agent-{agent}-{role}.jsonl").read_text().splitlines()


def test_rerun_of_finished_run_sends_nothing(write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe()
    run_dir = tmp_path / "run"
    assert run_cli("run", str(recipe), "--run-dir", str(run_dir), "--quiet").returncode == 0
    calls = (run_dir / "server/calls.log").read_text().count("\n")
    again = run_cli("run", str(recipe), "--run-dir", str(run_dir), "--resume", "--quiet")
    assert again.returncode == 0, again.stderr
    assert (run_dir / "server/calls.log").read_text().count("\n") == calls
    refused = run_cli("run", str(recipe), "--run-dir", str(run_dir))
    assert refused.returncode == 2 and "--resume" in refused.stderr


@pytest.mark.parametrize("hook", [("AGENTSOC_MOCK_DIE_AFTER_CALLS", "150"), ("AGENTSOC_MOCK_DIE_AFTER_POLLS", "3")])
def test_kill_and_resume_matches_uninterrupted_run(write_recipe: Any, tmp_path: Path, hook: tuple[str, str]) -> None:
    recipe = write_recipe()
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    assert run_cli("run", str(recipe), "--run-dir", str(clean), "--quiet").returncode == 0

    killed = run_cli("run", str(recipe), "--run-dir", str(crashed), "--quiet", env=dict([hook]))
    assert killed.returncode == -signal.SIGKILL
    resumed = run_cli("run", str(recipe), "--run-dir", str(crashed), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr

    assert without_timings(records(crashed)) == without_timings(records(clean))
    sent = (crashed / "server/calls.log").read_text().split()
    assert len(sent) == len(set(sent)), "a call was sent twice"
    assert len(sent) == len((clean / "server/calls.log").read_text().split())
    submitted = Counter((crashed / "server/submissions.log").read_text().split())
    assert len(submitted) == 12 and set(submitted.values()) == {1}, "a job was submitted twice"


class CountingMock(MockBackend):
    """Tracks how many jobs are submitted and not yet finished at any moment."""

    def __init__(self) -> None:
        super().__init__(polls_to_finish=3)
        self.active: set[str] = set()
        self.peak = 0

    async def submit_finetune(self, base, examples, spec, *, key):  # type: ignore[no-untyped-def]
        job = await super().submit_finetune(base, examples, spec, key=key)
        self.active.add(job.id)
        self.peak = max(self.peak, len(self.active))
        return job

    async def poll_finetune(self, job):  # type: ignore[no-untyped-def]
        polled = await super().poll_finetune(job)
        if polled.state.terminal:
            self.active.discard(polled.id)
        return polled


async def test_active_jobs_are_capped_and_backend_minimum_is_respected(tmp_path: Path) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"backend.max_active_jobs": 2, "finetune.iterations": 1}))
    backend = CountingMock()
    soc = Society(
        recipe, run_dir=tmp_path / "capped", backend=backend, task=tasks.create("arithmetic", {}), progress=False
    )
    async with soc:
        await soc.run()
        assert len(soc.store.jobs()) == 6
    assert backend.peak == 2

    strict = CountingMock()
    strict.capabilities = strict.capabilities.model_copy(update={"min_finetune_examples": 10_000})
    soc = Society(
        recipe, run_dir=tmp_path / "strict", backend=strict, task=tasks.create("arithmetic", {}), progress=False
    )
    async with soc:
        results = await soc.run()
        assert soc.store.jobs() == []
    assert results[-1].slots == results[0].slots  # nobody was finetuned
