"""The scale-out path for real, on this CPU: a local Ray instance runs real TRL jobs on the bundled model.

- ``test_killed_run_adopts_its_ray_job``: the agentsoc process is SIGKILLed while a training job runs;
  the job goes on in Ray, and ``--resume`` adopts it by its key — one submission, one training run,
  the same adapter. Chat goes to the fake vLLM server (fast); training is real.
- ``test_two_iterations_on_real_vllm_ray_and_trl``: recipes/arithmetic-vllm.toml, shrunk, runs two
  iterations end to end with a real vLLM CPU server (``make vllm-env``) started by the backend.

Both need the bundled model, torch, TRL and Ray (CI installs them); the second also needs
.venv-vllm. Each skips, saying why, when something is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fakes import FakeVllm, fake_vllm
from fakes.fake_vllm import BASE_MODEL

from agentsoc.records import IterationRecord
from agentsoc.store import RunStore
from agentsoc.types import JobState

__all__ = ["fake_vllm"]

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [pytest.mark.ray, pytest.mark.torch, pytest.mark.slow]


def _needs_scale_stack() -> None:
    for module in ("ray", "trl", "torch", "peft", "llama_cpp"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (make install-scale)")
    from backends import bundled

    try:
        bundled.resolve_model_path(None, bundled.DEFAULT_MODEL)
    except Exception as e:  # any reason the bundled model is unavailable skips
        pytest.skip(f"the bundled model is not available: {e}")


def shrunk_recipe(tmp_path: Path, **backend_options: Any) -> Path:
    """recipes/arithmetic-vllm.toml with a few problems: minutes on 2 cores, not an hour."""
    recipe = tomllib.loads((ROOT / "recipes/arithmetic-vllm.toml").read_text())
    recipe["task"].update(n_train=4, n_test=3)
    recipe["selection"]["min_examples"] = 1
    recipe["sampling"]["max_tokens"] = 64
    recipe["backend"]["options"].update(backend_options)
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def journal(run_dir: Path) -> Counter[str]:
    """Submissions sent to Ray, per job key (one line per submission, written before it is sent)."""
    lines = (run_dir / "ray-submissions.jsonl").read_text().splitlines()
    return Counter(json.loads(line)["key"] for line in lines if line.strip())


def cli(recipe: Path, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    log = (run_dir.parent / f"{run_dir.name}-{len(list(run_dir.parent.glob('*.log')))}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run_dir), "--quiet", *extra],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def stop_ray(run_dir: Path) -> None:
    from backends.ray_jobs import RayJobs

    RayJobs(run_dir).stop_local()


def test_killed_run_adopts_its_ray_job(fake_vllm: FakeVllm, tmp_path: Path) -> None:
    _needs_scale_stack()
    recipe = shrunk_recipe(tmp_path, serve=False, base_url=fake_vllm.base_url)
    data = tomllib.loads(recipe.read_text())
    data["finetune"]["iterations"] = 1
    recipe.write_text(tomli_w.dumps(data))
    run_dir = tmp_path / "run"
    first = cli(recipe, run_dir)
    try:
        deadline = time.monotonic() + 900
        # wait until a training job is really training (its log has a step), then kill agentsoc
        while not any(
            (d / "out" / "train.log").is_file() and (d / "out" / "train.log").stat().st_size
            for d in (run_dir / "adapters").glob("*")
        ):
            assert first.poll() is None, (run_dir.parent / "run-0.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training job started"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)
        first.wait()
        running = journal(run_dir)
        assert running, "the killed run had submitted jobs"
        resumed = cli(recipe, run_dir, "--resume")
        assert resumed.wait(timeout=1800) == 0, (run_dir.parent / "run-1.log").read_text()[-3000:]
        store = RunStore.open(run_dir)
        try:
            jobs = store.jobs()
            records: list[IterationRecord] = store.iterations()
        finally:
            store.close()
        assert jobs and all(j.state is JobState.SUCCEEDED for j in jobs)
        sent = journal(run_dir)
        assert set(sent.values()) == {1}, f"a job was submitted to Ray twice: {sent}"
        assert set(sent) == {j.key for j in jobs}
        for j in jobs:  # one training run per job: one result, trained once
            result = json.loads((Path(j.result.split("+adapter:")[1]).parent / "result.json").read_text())
            assert result["steps"] >= 1
        assert [r.iteration for r in records] == [0, 1] and records[1].scores is not None
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
        stop_ray(run_dir)


@pytest.mark.vllm
def test_two_iterations_on_real_vllm_ray_and_trl(tmp_path: Path) -> None:
    _needs_scale_stack()
    if not VLLM_PYTHON.exists():
        pytest.skip(f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)")
    recipe = shrunk_recipe(tmp_path, python=str(VLLM_PYTHON))
    run_dir = tmp_path / "run"
    try:
        run = cli(recipe, run_dir)
        assert run.wait(timeout=3600) == 0, (tmp_path / "run-0.log").read_text()[-4000:]
    finally:
        stop_ray(run_dir)
    store = RunStore.open(run_dir)
    try:
        records = store.iterations()
        jobs = store.jobs()
        calls = store.count_calls()
    finally:
        store.close()
    assert [r.iteration for r in records] == [0, 1, 2] and all(r.scores is not None for r in records)
    assert jobs and all(j.state is JobState.SUCCEEDED for j in jobs)
    assert set(journal(run_dir).values()) == {1}
    # the finetuned agents answered through their own adapters on the one server
    log = (run_dir / "vllm-server.log").read_text()
    assert "--enable-lora" in log and "load_lora_adapter" in log
    served = {m for r in records[1:] for s in r.slots for m in (s.generator, s.critic)}
    assert any("+adapter:" in m for m in served)
    assert calls > 0 and not any(p.name == "adapters" for p in tmp_path.iterdir())  # adapters stay in the run dir
    assert BASE_MODEL in (run_dir / "recipe.toml").read_text()
