"""backends.ray_jobs against a REAL local Ray instance on this machine's CPU (no GPU, no cluster).

One instance serves the module (started by the first test that needs it, stopped at the end); the
jobs are ``python -c`` one-liners that append lines to a file, so "exactly once" is a line count.
The last test kills the instance's head and so starts a second one.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.job_submission")

from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.lock import RunLock
from agentsoc.types import JobState
from backends.ray_jobs import (
    JobLostError,
    LocalInstance,
    RayJobs,
    _instance_pids,
    _kill_instance,
    run_id,
    submission_id,
)

pytestmark = pytest.mark.ray

PY = shlex.quote(sys.executable)
ROOT = Path(__file__).resolve().parents[1]


def job(out: Path, *, sleep: float = 2.0, tag: str = "run", fail: bool = False) -> str:
    """A shell command: append ``start <tag>`` to ``out``, sleep, append ``end <tag>`` (or fail)."""
    code = (
        f"import sys, time; f = open({str(out)!r}, 'a'); f.write('start {tag}\\n'); f.flush(); "
        f"time.sleep({sleep}); "
        + ("print('about to fail', flush=True); sys.exit('boom: bad input')" if fail else f"f.write('end {tag}\\n')")
    )
    return f"{PY} -c {shlex.quote(code)}"


def wait_for(jobs: RayJobs, key: str, *, attempt: int = 1, timeout: float = 90.0) -> tuple[JobState, str]:
    deadline = time.monotonic() + timeout
    while True:
        state, message = jobs.status(key, attempt=attempt)
        if state.terminal:
            return state, message
        assert time.monotonic() < deadline, f"{key} still {state}: {message}"
        time.sleep(0.3)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The run directory of the module's local Ray instance; the instance is stopped at the end."""
    d = tmp_path_factory.mktemp("ray-run")
    # if this session dies before the finally below (a CI timeout's SIGKILL), the instance's own
    # watchdog stops it a minute after: its starter is gone and no job runs
    jobs = RayJobs(d, num_cpus=4, num_gpus=0, idle_timeout_s=60)
    atexit.register(RayJobs(d).stop_local)  # an interrupted session (Ctrl-C, a crash in teardown)
    try:
        jobs.connect()
        yield d
    finally:
        record = d / "ray-instance.json"
        instance = LocalInstance(**json.loads(record.read_text())) if record.exists() else None
        RayJobs(d).stop_local()
        if instance is not None:
            assert _instance_pids(instance) == [], "processes of the local Ray instance outlived stop_local()"


@pytest.fixture
def jobs(state_dir: Path) -> RayJobs:
    return RayJobs(state_dir)


def test_submission_ids_are_deterministic_url_safe_per_attempt_and_per_run() -> None:
    key, run = "run 1/iter-0/agent-2/critic", "0123456789abcdef0123456789abcdef"
    assert submission_id(run, key) == submission_id(run, key, 1)
    assert submission_id(run, key, 1) != submission_id(run, key, 2)
    assert submission_id(run, key, 2).endswith("-a2")
    assert submission_id(run, key, 2, requeue=3).endswith("-a2-q3")
    assert all(c.isalnum() or c in "._-" for c in submission_id(run, key))
    assert submission_id(run, "a/b") != submission_id(run, "a_b")  # same slug, told apart by the hash
    other = "f" * 32  # another run directory with the same recipe: the same key, another job
    assert submission_id(other, key) != submission_id(run, key)
    with pytest.raises(ValueError):
        submission_id(run, key, 0)


def test_the_run_id_is_made_once_and_read_back(tmp_path: Path) -> None:
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(run_id(tmp_path / "run"))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results[0]) == 32  # racing first uses agree on one id
    assert RayJobs(tmp_path / "run").run == results[0] and RayJobs(tmp_path / "other").run != results[0]
    (tmp_path / "run" / "ray-run-id").write_text("garbage")
    with pytest.raises(FatalBackendError, match="holds no run id"):
        run_id(tmp_path / "run")


def test_local_instance_is_recorded_and_reconnected(state_dir: Path) -> None:
    record = (state_dir / "ray-instance.json").read_text()
    again = RayJobs(state_dir)
    assert again.connect().startswith("http://127.0.0.1:")
    assert (state_dir / "ray-instance.json").read_text() == record  # reconnected, not restarted


def test_job_runs_to_success_and_the_same_key_is_adopted(jobs: RayJobs, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    first = jobs.submit("run/iter-0/agent-0/generator", job(out), num_gpus=0, num_cpus=1)
    assert not first.adopted
    again = jobs.submit("run/iter-0/agent-0/generator", job(out), num_gpus=0, num_cpus=1)
    assert again.adopted and again.submission_id == first.submission_id
    assert wait_for(jobs, "run/iter-0/agent-0/generator")[0] is JobState.SUCCEEDED
    assert jobs.submit("run/iter-0/agent-0/generator", job(out), num_gpus=0, num_cpus=1).adopted
    time.sleep(0.5)
    assert lines(out) == ["start run", "end run"]


def test_racing_submissions_of_one_key_run_it_once(jobs: RayJobs, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    results = []

    def submit() -> None:
        results.append(jobs.submit("run/race", job(out, sleep=0.5), num_gpus=0, num_cpus=1))

    threads = [threading.Thread(target=submit) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.adopted for r in results) == [False, True, True, True]
    assert wait_for(jobs, "run/race")[0] is JobState.SUCCEEDED
    assert lines(out) == ["start run", "end run"]


def test_failing_job_reports_failed_with_its_log_tail_and_retries_under_a_new_attempt(
    jobs: RayJobs, tmp_path: Path
) -> None:
    out = tmp_path / "out.txt"
    jobs.submit("run/flaky", job(out, sleep=0, tag="a1", fail=True), num_gpus=0, num_cpus=1)
    state, message = wait_for(jobs, "run/flaky")
    assert state is JobState.FAILED
    assert "exit code 1" in message and "boom: bad input" in message.splitlines()[-1]
    assert jobs.logs_tail("run/flaky", lines=2).splitlines() == ["about to fail", "boom: bad input"]
    retry = jobs.submit("run/flaky", job(out, sleep=0, tag="a2"), num_gpus=0, num_cpus=1, attempt=2)
    assert not retry.adopted and retry.submission_id.endswith("-a2")
    assert wait_for(jobs, "run/flaky", attempt=2)[0] is JobState.SUCCEEDED
    assert jobs.status("run/flaky", attempt=1)[0] is JobState.FAILED  # each attempt keeps its own record
    assert lines(out) == ["start a1", "start a2", "end a2"]


def test_job_the_local_instance_can_never_run_is_refused(jobs: RayJobs, tmp_path: Path) -> None:
    with pytest.raises(FatalBackendError, match=r"needs 1 GPU\(s\) but the local Ray instance has 0"):
        jobs.submit("run/gpu", job(tmp_path / "out.txt"), num_gpus=1, num_cpus=1)
    state, message = jobs.status("run/gpu")
    assert state is JobState.FAILED and "never submitted" in message


CRASHING_SUBMITTER = """
import sys, time
from backends.ray_jobs import RayJobs
RayJobs(sys.argv[1]).submit("run/crash", sys.argv[2], num_gpus=0, num_cpus=1)
print("SUBMITTED", flush=True)
time.sleep(120)
"""


def test_crash_right_after_submit_then_a_new_client_adopts_the_job(state_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHING_SUBMITTER, str(state_dir), job(out, sleep=10)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "SUBMITTED"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed = RayJobs(state_dir)
    assert resumed.status("run/crash")[0] in (JobState.QUEUED, JobState.RUNNING)  # it outlived its submitter
    assert resumed.submit("run/crash", job(out, sleep=10), num_gpus=0, num_cpus=1).adopted
    assert wait_for(resumed, "run/crash")[0] is JobState.SUCCEEDED
    assert lines(out) == ["start run", "end run"]


def test_unreachable_cluster_address_is_one_clear_line(tmp_path: Path) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    address = f"http://127.0.0.1:{port}"
    with pytest.raises(FatalBackendError) as err:
        RayJobs(tmp_path, address=address).connect()
    message = str(err.value)
    assert "\n" not in message and address in message and "ray_address" in message
    assert RayJobs(tmp_path, address=address).stop_local() is False  # never stops a cluster


def test_jobs_of_a_dead_instance_are_reported_lost_never_rerun(state_dir: Path, tmp_path: Path) -> None:
    """Runs last: it kills the module's instance (as a crash of the head would), so the next
    submission starts a new one."""
    jobs = RayJobs(state_dir)
    out = tmp_path / "out.txt"
    jobs.submit("run/doomed", job(out, sleep=60, tag="a1"), num_gpus=0, num_cpus=1)
    deadline = time.monotonic() + 60
    while lines(out) != ["start a1"]:
        assert time.monotonic() < deadline, jobs.status("run/doomed")
        time.sleep(0.2)
    old = LocalInstance(**json.loads((state_dir / "ray-instance.json").read_text()))
    os.kill(old.pid, signal.SIGKILL)  # the head dies; its agents and the job's process linger

    # the caller learns within moments (the dying head's dashboard may answer "running" a little longer)
    deadline, status = time.monotonic() + 10, (JobState.RUNNING, "")
    while status[0] is not JobState.FAILED:
        assert status[0] is JobState.RUNNING and time.monotonic() < deadline, status
        time.sleep(0.2)
        with contextlib.suppress(TransientBackendError):  # what the caller's retry layer absorbs
            status = jobs.status("run/doomed")
    assert "is gone" in status[1] and "submit attempt 2" in status[1]

    assert _instance_pids(old) == []  # reported lost only once it cannot be training any more
    assert not (state_dir / "ray-instance.json").exists()

    with pytest.raises(JobLostError, match="submit attempt 2"):  # never the same id twice
        jobs.submit("run/doomed", job(out, sleep=0, tag="a1"), num_gpus=0, num_cpus=1)
    retry = jobs.submit("run/doomed", job(out, sleep=0, tag="a2"), num_gpus=0, num_cpus=1, attempt=2)
    assert not retry.adopted  # on a new instance, started for it
    assert LocalInstance(**json.loads((state_dir / "ray-instance.json").read_text())).instance != old.instance
    assert wait_for(jobs, "run/doomed", attempt=2)[0] is JobState.SUCCEEDED
    assert jobs.status("run/doomed")[0] is JobState.FAILED
    assert lines(out) == ["start a1", "start a2", "end a2"]


IDLE_STARTER = """
import sys
from backends.ray_jobs import RayJobs
RayJobs(sys.argv[1], num_cpus=1, num_gpus=0, idle_timeout_s=1).connect()
"""


@pytest.mark.slow
def test_an_idle_instance_stops_itself_once_no_agentsoc_process_holds_the_run(tmp_path: Path) -> None:
    """The starter exits at once (as a crashed or finished run would); while the run directory's
    lock is held (a resumed run) the instance stays, and once it is released it stops itself."""
    run_dir = tmp_path / "run"
    lock = RunLock(run_dir)
    lock.acquire()
    subprocess.run([sys.executable, "-c", IDLE_STARTER, str(run_dir)], check=True, cwd=ROOT, timeout=300)
    instance = LocalInstance(**json.loads((run_dir / "ray-instance.json").read_text()))
    try:
        time.sleep(12)  # two watch intervals past the idle timeout: held, so it stays
        assert (run_dir / "ray-instance.json").exists() and _instance_pids(instance)
        lock.release()
        deadline = time.monotonic() + 120
        while (run_dir / "ray-instance.json").exists() or _instance_pids(instance):
            assert time.monotonic() < deadline, (run_dir / "ray-watch.log").read_text()
            time.sleep(1)
        assert "stopped the instance after 1 s" in (run_dir / "ray-watch.log").read_text()
    finally:
        lock.release()
        _kill_instance(instance, grace_s=0)
