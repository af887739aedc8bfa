"""The local fine-tuning job queue: places job folders on this machine, persisted like a remote API's.

Every job is a job folder (:mod:`backends.job_folder`) at ``root/<key slug>/``; one worker thread
trains one job at a time by starting the trainer on the folder (``python -m backends.hf JOB_DIR``,
:class:`Subprocess`) and waiting for it to exit. Nothing passes between the queue and the trainer
but the folder: progress is read from its ``train.log``, the outcome from its ``result.json`` (or
the exit code and the one line the trainer printed). The queue's own record of a job — state,
events, timestamps — is ``state.json`` beside the inputs.

``submit`` with a key that already has a folder adopts it: a succeeded job is returned as it is
(its adapter is reused after a process restart); a failed one stays failed (submit under a new key
to retry); a queued or running one that no worker of this process owns is done if its result is
there (the process died after the trainer finished), and otherwise trains again **from scratch**
(no mid-job checkpoints: a job is a few minutes of CPU). A trainer process dies with the process
that started it (``PR_SET_PDEATHSIG``), so a killed run leaves no job training behind.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.atomic import write_atomic
from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, ModelRef
from backends.job_folder import (
    PERMANENT_EXITS,
    JobInput,
    JobResult,
    key_slug,
    read_progress,
    read_result,
    write_inputs,
)
from backends.refs import adapter_ref, split_ref
from backends.vllm_server import _die_with_parent

STATE_FILE = "state.json"


class Launcher(Protocol):
    """Trains one job folder to its end: ``(exit code, the one line the trainer reported)``."""

    def __call__(self, job_dir: Path) -> tuple[int, str]: ...

    def stop(self) -> None:
        """End the job in flight, if it can be ended (called from another thread)."""


class Subprocess:
    """``python -m <module> JOB_DIR`` in a process of its own (one job = one process)."""

    def __init__(self, module: str, env: dict[str, str] | None = None) -> None:
        self.module = module
        self.env = env or {}
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._stopping = False

    def __call__(self, job_dir: Path) -> tuple[int, str]:
        # the package's own folder on the path: the job runs whatever the working directory is
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        with self._lock:
            if self._stopping:
                return -signal.SIGTERM, "stopped before it started"
            self._proc = proc = subprocess.Popen(
                [sys.executable, "-m", self.module, str(job_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        _, err = proc.communicate()
        with self._lock:
            self._proc = None
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        if proc.returncode < 0:
            name = signal.Signals(-proc.returncode).name
            return proc.returncode, f"the training process was killed by {name} (out of memory?)"
        return proc.returncode, lines[-1] if lines else ""

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()


class JobRecord(BaseModel):
    """A job's record in the queue: the :class:`Job` the API answers with, plus what only the queue
    keeps (the longer event log and the timestamps)."""

    model_config = ConfigDict(extra="forbid")

    job: Job
    #: the last 50 events (a Job carries the last 20)
    log: list[str] = Field(default_factory=list)
    created_at: float = Field(default_factory=time.time)
    finished_at: float | None = None

    def update(self, **changes: Any) -> None:
        self.job = self.job.model_copy(update=changes)

    def to_job(self) -> Job:
        return self.job.model_copy(update={"events": tuple(self.log[-20:])})


class LocalJobs:
    """Fine-tuning jobs persisted under ``root``, placed one at a time by a worker thread."""

    def __init__(self, root: Path, launch: Launcher, *, backend_name: str = "local") -> None:
        self.root = root
        self.launch = launch
        self.backend_name = backend_name
        self._records: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._enqueued: set[str] = set()
        self._closing = False

    def job_dir(self, key: str) -> Path:
        return self.root / key_slug(key)

    # ---- persistence

    def _save(self, rec: JobRecord) -> None:
        write_atomic(self.job_dir(rec.job.key) / STATE_FILE, rec.model_dump_json(indent=2))

    def _load(self, key: str) -> JobRecord | None:
        path = self.job_dir(key) / STATE_FILE
        if not path.is_file():
            return None
        return JobRecord.model_validate_json(path.read_text())

    def _event(self, rec: JobRecord, text: str) -> None:
        rec.log.append(f"{time.strftime('%H:%M:%S')} {text}")
        del rec.log[:-50]

    # ---- API

    def submit(
        self, job: JobInput, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, key: str
    ) -> Job:
        """Queue the job ``key`` (training ``base`` as ``job`` says), or adopt the one already there."""
        with self._lock:
            rec = self._records.get(key) or self._load(key)
            if rec is not None:
                self._records[key] = rec
                self._adopt(rec)
                return rec.to_job()
            d = self.job_dir(key)
            write_inputs(d, job, examples, spec)
            rec = JobRecord(job=Job(key=key, backend=self.backend_name, id=f"local-{d.name}", base=base))
            self._event(rec, f"queued: {len(examples)} examples")
            self._records[key] = rec
            self._save(rec)
            self._enqueue(key)
            return rec.to_job()

    def poll(self, job: Job) -> Job:
        with self._lock:
            rec = self._records.get(job.key) or self._load(job.key)
            if rec is None:
                raise FatalBackendError(f"no local fine-tuning job with key {job.key!r} under {self.root}")
            self._records[job.key] = rec
            # a resumed run polls the jobs it recorded without submitting them again
            self._adopt(rec)
            out = rec.to_job()
        if out.state is JobState.RUNNING:
            progress, steps = read_progress(self.job_dir(job.key))
            out = out.model_copy(update={"progress": progress or 0.0, "events": (*out.events, *steps)[-20:]})
        return out

    def _adopt(self, rec: JobRecord) -> None:
        """An unfinished job that no worker of this process owns: its process is gone. Done if the
        trainer wrote its result before that; otherwise train it again from scratch with the inputs
        saved in its folder (caller holds the lock)."""
        job = rec.job
        if job.state not in (JobState.QUEUED, JobState.RUNNING) or job.key in self._enqueued or self._closing:
            return
        result = read_result(self.job_dir(job.key))
        if result is not None:
            self._succeed(rec, result, "adopted a job that finished while its run was down")
            return
        rec.update(state=JobState.QUEUED, progress=0.0)
        self._event(rec, "adopted an unfinished job after a restart; training restarts from scratch")
        self._save(rec)
        self._enqueue(job.key)

    def _enqueue(self, key: str) -> None:
        if self._closing:
            return  # a closed queue starts nothing: the job waits on disk for the next run to adopt it
        self._enqueued.add(key)
        self._queue.put(key)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="agentsoc-local-train", daemon=True)
            self._worker.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop placing jobs and end the one in flight: it stays ``running`` on disk, and a resumed
        run trains it again."""
        if self._worker is not None and self._worker.is_alive():
            with self._lock:
                self._closing = True
            self._queue.put(None)
            self.launch.stop()
            self._worker.join(timeout)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until every queued job has finished (tests, benchmarks)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                busy = bool(self._enqueued)
            if not busy:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("local fine-tuning jobs still running")
            time.sleep(0.1)

    # ---- worker

    def _work(self) -> None:
        while True:
            key = self._queue.get()
            if key is None:
                return
            try:
                self._run(key)
            finally:
                with self._lock:
                    self._enqueued.discard(key)

    def _run(self, key: str) -> None:
        with self._lock:
            rec = self._records[key]
            rec.update(state=JobState.RUNNING, progress=0.0)
            self._event(rec, "running")
            self._save(rec)
        started = time.perf_counter()
        try:
            code, line = self.launch(self.job_dir(key))
        except Exception as exc:  # the trainer could not even start (no interpreter, no memory to fork)
            code, line = 1, f"could not start the trainer: {type(exc).__name__}: {exc}"
        with self._lock:
            if self._closing and code != 0:
                return  # stopped by close(): still "running" on disk, so a resumed run trains it again
            try:
                result = read_result(self.job_dir(key)) if code == 0 else None
            except Exception as exc:  # an unreadable result: the job did not do its work
                code, line = 1, f"{type(exc).__name__}: {exc}"
                result = None
            if result is not None:
                self._succeed(rec, result, f"succeeded in {time.perf_counter() - started:.0f} s")
                return
            error = line or f"the trainer exited with code {code} and said nothing"
            if code == 0:
                error = f"the trainer exited without writing its result: {error}"
            rec.update(state=JobState.FAILED, error=error, retryable=code not in PERMANENT_EXITS)
            rec.finished_at = time.time()
            self._event(rec, f"failed (exit code {code})")
            self._save(rec)

    def _succeed(self, rec: JobRecord, result: JobResult, event: str) -> None:
        """Record a finished job (caller holds the lock): its model is the GGUF twin of the adapter."""
        name, _ = split_ref(rec.job.base)
        _, steps = read_progress(self.job_dir(rec.job.key))
        rec.log.extend(steps)
        rec.update(state=JobState.SUCCEEDED, result=adapter_ref(name, result.adapter_gguf or result.output))
        rec.update(**result.job_fields())
        rec.finished_at = time.time()
        self._event(rec, event)
        self._save(rec)
