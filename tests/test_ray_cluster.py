"""A simulated two-node Ray cluster on this machine (issue 16): what a first real cluster would meet.

A head and a worker, each with its own temp dir, declaring fake GPUs (``--num-gpus``; Ray hands out
device ids without any CUDA), started in a working directory that is not the driver's, with a
short RAY_JOB_START_TIMEOUT_SECONDS as on a cluster whose head nobody tuned. Two run directories
run the shrunk ``arithmetic-vllm`` recipe against it at once: ``serve = true`` with a stand-in vLLM
server whose GPU is reserved in Ray (``server_num_gpus = 1``: a hold pinned to the driver's node,
the head, which has 3 fake GPUs; the worker has 1), ``num_gpus = 1`` jobs, 12 jobs on the 2 GPUs
left — one of them on the head, beside the held ones. The jobs' interpreter is a fake trainer that
records where Ray placed it (tests/fakes/fake_trainer.py); a real TRL job on Ray is
tests/test_vllm_e2e.py.

Shown: no collision (each run trains its own 6 jobs, once, under its own submission ids), queued
jobs wait (they say so, and jobs Ray gave up on are queued again, never failed or retried as a new
attempt), the servers' devices are never given to a job while held, and nothing is left running —
the cluster itself is stopped by its processes' marker even if the test is interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fakes.fake_vllm import BASE_MODEL

pytest.importorskip("ray.job_submission")

from agentsoc.store import RunStore
from agentsoc.types import JobState
from backends.job_folder import key_slug
from backends.ray_jobs import INSTANCE_ENV, LocalInstance, _free_ports, _instance_pids, _kill_instance, _uses_dir

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 8  # a job waiting longer is failed by Ray: the backend must queue it again


@dataclass
class Cluster:
    dashboard: str
    marker: LocalInstance  #: finds every process of both nodes (they inherit INSTANCE_ENV)
    cwd: Path


def _cluster_pids(marker: LocalInstance) -> list[int]:
    """Every process of both nodes: the marker in its environment, or (Ray's processes that rename
    themselves and so hide it) a working directory or open file under the cluster's folder — the
    nodes were started there and keep their temp dirs there."""
    base = str(Path(marker.temp_dir).parent)
    me, found = os.getpid(), set(_instance_pids(marker))
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and _uses_dir(int(entry), base):
            found.add(int(entry))
    return sorted(found)


def _stop(marker: LocalInstance) -> None:
    _kill_instance(marker, grace_s=0.0)
    deadline = time.monotonic() + 15
    while (pids := _cluster_pids(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    shutil.rmtree(Path(marker.temp_dir).parent, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    base = Path(tempfile.mkdtemp(prefix="agentsoc-tc-"))  # short: Ray's socket paths live under it
    cwd = base / "cwd"
    cwd.mkdir()
    instance = uuid.uuid4().hex
    gcs, dashboard, client, agent, agent2 = _free_ports(5)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({INSTANCE_ENV: instance, "RAY_USAGE_STATS_ENABLED": "0"})
    env["RAY_JOB_START_TIMEOUT_SECONDS"] = str(START_TIMEOUT_S)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats"]
    common = ["--object-store-memory", str(80 * 2**20), "--num-cpus", "4"]
    head = subprocess.Popen(
        [*ray, "--head", "--port", str(gcs), "--temp-dir", str(base / "h"), "--dashboard-host", "127.0.0.1",
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
         "--dashboard-agent-listen-port", str(agent), "--num-gpus", "3", *common],
        cwd=cwd, env=env, stdout=(base / "head.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    marker = LocalInstance(instance, head.pid, str(base / "h"), f"http://127.0.0.1:{dashboard}", gcs, time.time())
    atexit.register(_stop, marker)  # an interrupted session still stops it
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a CI timeout's SIGTERM runs atexit
    try:
        _wait_for_nodes(marker.dashboard_url, 1, base)
        subprocess.Popen(
            [*ray, "--address", f"127.0.0.1:{gcs}", "--temp-dir", str(base / "w"), "--num-gpus", "1",
             "--dashboard-agent-listen-port", str(agent2), *common],
            cwd=cwd, env=env, stdout=(base / "worker.log").open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        _wait_for_nodes(marker.dashboard_url, 2, base)
        yield Cluster(marker.dashboard_url, marker, cwd)
    finally:
        _stop(marker)
        signal.signal(signal.SIGTERM, previous)
        assert _cluster_pids(marker) == [], "processes of the simulated cluster outlived the test"


def _wait_for_nodes(dashboard: str, n: int, base: Path) -> None:
    from ray.util.state import list_nodes

    deadline = time.monotonic() + 240
    while True:
        with contextlib.suppress(Exception):
            if sum(node.state == "ALIVE" for node in list_nodes(address=dashboard)) >= n:
                return
        logs = " | ".join(p.read_text(errors="replace")[-500:] for p in base.glob("*.log"))
        assert time.monotonic() < deadline, f"the simulated cluster did not come up with {n} node(s): {logs}"
        time.sleep(1)


def _shim(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _recipe(tmp_path: Path, dashboard: str, placements: Path) -> Path:
    recipe = tomllib.loads((ROOT / "recipes/arithmetic-vllm.toml").read_text())
    recipe["task"].update(n_train=4, n_test=3)
    recipe["selection"]["min_examples"] = 1
    recipe["sampling"]["max_tokens"] = 64
    recipe["finetune"]["iterations"] = 1
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    server = _shim(
        tmp_path / "vllm-env" / "bin" / "python",
        'echo "fake vLLM env CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"\n'
        f'exec {sys.executable} {ROOT / "tests/fakes/vllm_server_main.py"} "$@"\n',
    )
    trainer = _shim(
        tmp_path / "train-env" / "bin" / "python",
        f'exec {sys.executable} {ROOT / "tests/fakes/fake_trainer.py"} {placements} "$@"\n',
    )
    recipe["backend"]["options"] = {
        "serve": True,
        "python": str(server),
        "model": str(model),
        "served_model_name": BASE_MODEL,
        "startup_timeout_s": 120,
        "ray_address": dashboard,
        "num_gpus": 1,
        "num_cpus": 1,
        "server_num_gpus": 1,
        "job_python": str(trainer),
    }
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    return path


def _journal(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "ray-submissions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _queued_messages(run_dir: Path, seen: set[str]) -> None:
    """What a poll says about this run's jobs right now (the progress output's source)."""
    from backends.ray_jobs import RayJobs

    if not _journal(run_dir):  # nothing submitted yet (and never make the run's files before it does)
        return
    recipe = tomllib.loads((run_dir / "recipe.toml").read_text())
    jobs = RayJobs(run_dir, address=recipe["backend"]["options"]["ray_address"])
    for key in {e["key"] for e in _journal(run_dir)}:
        with contextlib.suppress(Exception):
            state, message = jobs.status(key)
            if state is JobState.QUEUED:
                seen.add(message.split(":")[0].split(" since")[0])


def test_two_runs_of_one_recipe_share_a_two_node_cluster(cluster: Cluster, tmp_path: Path) -> None:
    placements = tmp_path / "placements.jsonl"
    recipe = _recipe(tmp_path, cluster.dashboard, placements)
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONUNBUFFERED="1", FAKE_TRAIN_S="6")  # one run alone: 6 jobs, 2 GPUs, 3 waves > 8 s
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "agentsoc.cli", "run", str(recipe), "--run-dir", str(run), "--quiet"],
            cwd=ROOT,
            env=env,
            stdout=(tmp_path / f"{run.name}.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        for run in runs
    ]
    said: set[str] = set()
    try:
        deadline = time.monotonic() + 1500
        while any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "the two runs did not finish"
            for run in runs:
                _queued_messages(run, said)
            time.sleep(2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = {run.name: (tmp_path / f"{run.name}.log").read_text(errors="replace") for run in runs}
    assert [p.returncode for p in procs] == [0, 0], {k: v[-3000:] for k, v in logs.items()}

    # -- no collision: each run trained its own six jobs, once, under ids of its own
    journals = {run.name: _journal(run) for run in runs}
    run_ids = {name: {e["run"] for e in entries} for name, entries in journals.items()}
    assert all(len(ids) == 1 for ids in run_ids.values()) and run_ids["run-a"] != run_ids["run-b"]
    sids = {name: {e["id"] for e in entries} for name, entries in journals.items()}
    assert not sids["run-a"] & sids["run-b"]
    trained = [json.loads(line) for line in placements.read_text().splitlines()]
    for run in runs:
        store = RunStore.open(run)
        try:
            jobs = store.jobs()
        finally:
            store.close()
        assert len(jobs) == 6 and all(j.state is JobState.SUCCEEDED for j in jobs), [j.error for j in jobs]
        assert not any("#attempt-" in j.key for j in jobs), "waiting in Ray's queue burnt an attempt"
        mine = [t for t in trained if t["job_dir"].startswith(str(run) + os.sep)]
        assert len(mine) == len({t["job_dir"] for t in mine}) == 6  # every job trained exactly once
    # our code travelled with the jobs (py_modules), and they ran outside the driver's tree
    assert all(not t["code"].startswith(str(ROOT)) and Path(t["cwd"]) != ROOT for t in trained)

    # -- queued jobs wait: 12 jobs on 2 GPUs said they were queued, and outlived Ray's start timeout
    assert "queued" in said, said
    requeued = [e for entries in journals.values() for e in entries if e["requeue"] > 0]
    assert requeued, f"no job waited longer than {START_TIMEOUT_S} s, so the requeue path went unused"

    # -- the servers' GPUs: held in Ray for each run's whole life, never given to a job meanwhile
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    holds = [j for j in client.list_jobs() if (j.metadata or {}).get("agentsoc_hold")]
    assert len(holds) == 2 and all(str(h.status) in ("STOPPED", "SUCCEEDED") for h in holds), [
        (h.status, h.message) for h in holds
    ]
    held = []
    for h in holds:
        hold_log = client.get_job_logs(str(h.submission_id))
        found = re.search(r"^AGENTSOC_HOLD CUDA_VISIBLE_DEVICES=(\S+)$", hold_log, re.M)
        assert found, h
        devices = found[1]
        held.append((h.driver_node_id, devices, (h.start_time or 0) / 1000, (h.end_time or 0) / 1000))
    for run in runs:  # each server ran on the device its run's hold got
        server_log = (run / "vllm-server.log").read_text()
        assert any(f"CUDA_VISIBLE_DEVICES={d}\n" in server_log for _, d, _, _ in held)
    for run in runs:
        last = {}  # the submission that ran: each key's last (highest requeue) id in this run's journal
        for e in sorted(journals[run.name], key=lambda e: e["requeue"]):
            last[str(run / "adapters" / key_slug(e["key"]))] = e["id"]
        for t in (t for t in trained if t["job_dir"] in last):
            node = client.get_job_info(last[t["job_dir"]]).driver_node_id
            for h_node, h_dev, h_start, h_end in held:
                overlap = t["start"] < h_end and t["end"] > h_start
                assert not (node == h_node and t["devices"] == h_dev and overlap), (t, held)

    # -- nothing left running: no job of ours pending or running, no process from this test's files
    both = run_ids["run-a"] | run_ids["run-b"]
    ours = [j for j in client.list_jobs() if (j.metadata or {}).get("agentsoc_run") in both]
    assert ours and all(str(j.status) in ("SUCCEEDED", "STOPPED", "FAILED") for j in ours)
    leftover = _pids_mentioning(str(tmp_path))
    assert leftover == [], f"processes of the runs outlived them: {leftover}"


def _pids_mentioning(text: str) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            with contextlib.suppress(OSError):
                if text in Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(entry))
    return out
