"""Soak: the shipped mock recipe killed (SIGKILL) at 24 random points, each time resumed, ends with
the same results as an uninterrupted run, no answered-and-stored model call sent again (a kill at an
arbitrary instant may cost the one call whose answer had not been committed yet) and no job
submitted twice.

The kill points mix three kinds, drawn with a fixed seed: after the N-th model call of a session, at
the N-th poll of a fine-tuning job (inside the fine-tuning window), and after a wall-clock delay
(which also lands in start-up and right after the run directory is created).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from agentsoc.records import IterationRecord
from agentsoc.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
KILLS = 24

pytestmark = pytest.mark.slow


def start(run_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agentsoc.cli",
            "run",
            "arithmetic-mock",
            "--run-dir",
            str(run_dir),
            "--resume",
            "--quiet",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def results(run_dir: Path) -> tuple[list[IterationRecord], dict[str, dict[str, str]]]:
    store = RunStore.open(run_dir, readonly=True)
    try:
        records = [r.model_copy(update={"wall_s": {}}) for r in store.iterations()]
        transcripts = {p: {k: t.model_dump_json() for k, t in store.transcripts(p).items()} for p in store.phases()}
        return records, transcripts
    finally:
        store.close()


def kill_chain(run_dir: Path, rng: random.Random, kinds: Counter[str]) -> int:
    """Kill one run again and again at random points until an invocation finishes by itself; the
    first kill lands right after the run directory is created. Returns how many kills were timed."""
    proc = start(run_dir, {})
    while not (run_dir / "run.sqlite").exists() and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
        kinds["created"] += 1
    assert proc.wait(timeout=300) in (0, -signal.SIGKILL)
    timed = 0
    while True:
        kind = rng.choice(["calls", "polls", "time"])
        env: dict[str, str] = {}
        if kind == "calls":
            env["AGENTSOC_MOCK_DIE_AFTER_CALLS"] = str(rng.randint(1, 300))
        elif kind == "polls":
            env["AGENTSOC_MOCK_DIE_AFTER_POLLS"] = str(rng.randint(1, 8))
        proc = start(run_dir, env)
        if kind == "time":
            time.sleep(rng.uniform(0.2, 2.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                timed += 1
        code = proc.wait(timeout=300)
        assert code in (0, -signal.SIGKILL), proc.stderr.read() if proc.stderr else ""
        if code == 0:
            return timed
        kinds[kind] += 1


def test_kills_at_random_points_change_nothing(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    done = start(clean, {})
    assert done.wait(timeout=300) == 0, done.stderr.read() if done.stderr else ""
    expected = results(clean)
    clean_calls = (clean / "mock-server" / "calls.log").read_text().split()

    rng = random.Random(20261202)
    kinds: Counter[str] = Counter()
    chains = 0
    while sum(kinds.values()) < KILLS:
        crashed = tmp_path / f"crashed-{chains}"
        timed = kill_chain(crashed, rng, kinds)
        chains += 1
        assert results(crashed) == expected
        server = crashed / "mock-server"
        sent = (server / "calls.log").read_text().split()
        # A kill before a call is sent or while a job is polled resends nothing. A kill at an
        # arbitrary instant can land after the server answered a call and before the answer was
        # committed to the store: that one call is paid again, as it would be on any API without
        # idempotency keys. Nothing else may be.
        assert len(sent) - len(set(sent)) <= timed, "a model call whose answer was stored was sent again"
        assert set(sent) == set(clean_calls)
        submitted = Counter((server / "submissions.log").read_text().split())
        assert len(submitted) == 12 and set(submitted.values()) == {1}, "a job was submitted twice"
    # every kind of point was hit: right after creation, mid-debate, inside the fine-tuning window, any time
    assert kinds["created"] >= 1 and kinds["calls"] >= 3 and kinds["polls"] >= 3 and kinds["time"] >= 3, kinds
