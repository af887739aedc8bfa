"""``agentsoc run recipes/arithmetic-tinker.toml`` (shrunk) against the fake Tinker service: the real
CLI in a subprocess, the real ``tinker`` SDK, faults on the wire, a SIGKILL during training and
``--resume``.

What must hold: two iterations complete; every job trains exactly its plan, except that a kill may
repeat at most one checkpoint interval (``save_every`` steps) of each job it interrupted; the key is
nowhere in the run directory or the process's output.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

pytest.importorskip("tinker")
from fakes.fake_tinker import DEFAULT_MODELS, FAKE_API_KEY, FakeTinker, Faults, ServedModel
from test_tinker_backend import arithmetic_sampler, build_tokenizer

from agentsoc.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SAVE_EVERY = 2

pytestmark = pytest.mark.slow  # real subprocess runs with the SDK's own back-off: ~10 s and ~90 s


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def shrunk_recipe(tmp: Path, fake: FakeTinker, tokenizer_dir: Path) -> Path:
    """The shipped recipe, shrunk to seconds and pointed at the fake (everything else as shipped)."""
    recipe: dict[str, Any] = tomllib.loads((ROOT / "recipes/arithmetic-tinker.toml").read_text())
    recipe["task"].update(n_train=10, n_test=6)
    recipe["backend"].update(poll_interval_s=0.05, concurrency=16)
    recipe["backend"]["options"].update(
        base_url=fake.base_url, tokenizer=str(tokenizer_dir), save_every=SAVE_EVERY, chat_template_kwargs={}
    )
    recipe["sampling"]["max_tokens"] = 64
    recipe["finetune"]["spec"].update(batch_size=1, epochs=2)
    path = tmp / "arithmetic-tinker.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def start(recipe: Path, run_dir: Path, *, resume: bool) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TINKER_API_KEY": FAKE_API_KEY, "TINKER_TELEMETRY": "0"}
    args = [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run_dir), "--quiet"]
    return subprocess.Popen(
        [*args, *(["--resume"] if resume else [])],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def steps_per_job(fake: FakeTinker) -> dict[str, int]:
    """Optimizer steps the fake applied per job (every run the backend opens is tagged with its job)."""
    out: dict[str, int] = defaultdict(int)
    with fake.state.lock:
        for run in fake.state.runs.values():
            out[(run.user_metadata or {}).get("agentsoc_job", "?")] += len(run.optim_params)
    return dict(out)


def planned_steps(run_dir: Path) -> dict[str, int]:
    jobs = run_dir / "tinker" / "jobs"
    return {d.name: json.loads((d / "progress.json").read_text())["total"] for d in jobs.iterdir()}


def assert_no_key(run_dir: Path, output: bytes) -> None:
    assert FAKE_API_KEY.encode() not in output
    for f in run_dir.rglob("*"):
        if f.is_file():
            assert FAKE_API_KEY.encode() not in f.read_bytes(), f"the key leaked into {f}"


def assert_two_iterations(run_dir: Path) -> None:
    store = RunStore.open(run_dir, readonly=True)
    try:
        records = store.iterations()
    finally:
        store.close()
    assert [r.iteration for r in records][-1] == 2, records


@pytest.fixture
def faulty(tokenizer_dir: Path) -> Iterator[FakeTinker]:
    sampler, decode = arithmetic_sampler(tokenizer_dir)
    faults = Faults(rate=0.2, kinds=("429", "500", "503", "drop", "drop_after"), seed=1, retry_after_s=0.05)
    with FakeTinker(sampler=sampler, decode=decode, faults=faults, long_poll_s=0.2) as fake:
        yield fake


def test_a_shrunk_run_with_faults_and_a_kill_during_training_resumes_and_pays_little_twice(
    faulty: FakeTinker, tokenizer_dir: Path, tmp_path: Path
) -> None:
    fake = faulty
    recipe = shrunk_recipe(tmp_path, fake, tokenizer_dir)
    run_dir = tmp_path / "run"
    fake.configure(delays={"forward_backward": 0.1})  # slow enough to land the kill inside training
    proc = start(recipe, run_dir, resume=False)
    deadline = time.monotonic() + 600
    while fake.state.saves["training"] < 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0].decode()[-3000:]
    proc.send_signal(signal.SIGKILL)
    first_out = proc.communicate(timeout=60)[0]
    assert steps_per_job(fake), "the kill came before any training"

    fake.configure(delays={})
    resumed = start(recipe, run_dir, resume=True)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out.decode()[-4000:]

    assert_two_iterations(run_dir)
    with fake.state.lock:
        faults = sum(fake.state.faults_injected.values())
        requests = sum(fake.state.requests.values())
    assert faults > 0.1 * requests  # the faults were really there
    planned, trained = planned_steps(run_dir), steps_per_job(fake)
    assert set(trained) == set(planned)
    for job, total in planned.items():
        # a kill repeats the steps since the job's last *recorded* save: at most one interval (the
        # save of step k may be in flight, unrecorded, when the kill lands)
        assert total <= trained[job] <= total + SAVE_EVERY, (job, total, trained[job])
    assert_no_key(run_dir, first_out + out)


def test_a_kill_after_the_jobs_finished_adopts_them_and_trains_nothing_again(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    sampler, decode = arithmetic_sampler(tokenizer_dir)
    with FakeTinker(sampler=sampler, decode=decode, long_poll_s=0.2) as fake:
        recipe = shrunk_recipe(tmp_path, fake, tokenizer_dir)
        run_dir = tmp_path / "run"
        proc = start(recipe, run_dir, resume=False)
        deadline = time.monotonic() + 600
        # the first iteration's 6 jobs have all saved their sampler weights: kill before they are used
        while fake.state.saves["sampler"] < 6 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        with fake.state.lock:
            runs_before = len(fake.state.runs)
        steps_before = steps_per_job(fake)
        resumed = start(recipe, run_dir, resume=True)
        out, _ = resumed.communicate(timeout=900)
        assert resumed.returncode == 0, out.decode()[-4000:]
        assert_two_iterations(run_dir)
        after = steps_per_job(fake)
        planned = planned_steps(run_dir)
        with fake.state.lock:
            sampled = {s.model_path for s in fake.state.samples if s.model_path}
            sampler_paths = {p for p, c in fake.state.checkpoints.items() if c.kind == "sampler"}
    assert runs_before >= 6
    # the finetuned agents were sampled from their own checkpoints (iterations 1 and 2 debate on them)
    assert sampled and sampled <= sampler_paths and len(sampled) >= 6
    # the finished jobs were adopted: not one more step for any job that had finished before the kill
    finished_before = [job for job, steps in steps_before.items() if steps == planned[job]]
    assert len(finished_before) >= 6  # the first iteration's jobs had all trained when the kill landed
    for job in finished_before:
        assert after[job] == steps_before[job]
    assert all(after[j] == planned[j] for j in planned)  # no kill during training here: nothing repeated


@pytest.mark.parametrize(
    ("key", "model", "served", "words"),
    [
        ("tml-wrong-key", "Qwen/Qwen3-8B", None, "the key in TINKER_API_KEY was refused"),
        (FAKE_API_KEY, "acme/NoSuchModel-8B", None, "unknown base model 'acme/NoSuchModel-8B'"),
        (FAKE_API_KEY, "Qwen/Qwen3-8B", ServedModel("Qwen/Qwen3-8B", trainable=False), "does not serve"),
    ],
)
def test_start_up_errors_are_one_line_before_any_paid_call(
    tokenizer_dir: Path, tmp_path: Path, key: str, model: str, served: ServedModel | None, words: str
) -> None:
    with FakeTinker(models=[served] if served else DEFAULT_MODELS) as fake:
        recipe = shrunk_recipe(tmp_path, fake, tokenizer_dir)
        data = tomllib.loads(recipe.read_text())
        data["society"]["models"] = [model]
        recipe.write_text(tomli_w.dumps(data))
        env = {**os.environ, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}
        args = [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        with fake.state.lock:
            paid = {r: fake.state.requests[r] for r in ("create_model", "asample", "forward_backward")}
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert key not in done.stderr + done.stdout
    assert paid == {"create_model": 0, "asample": 0, "forward_backward": 0}
