"""The local fine-tuning job queue: jobs that run on this machine, persisted like a remote API's.

One worker thread runs one job at a time (the ``local`` backend's runner hands each job to a
long-lived training subprocess, :class:`backends.local.TrainProcess`); every job lives in
``run_dir/local-jobs/<safe key>/`` (``state.json``, ``examples.jsonl``, ``spec.json``,
``train.log`` with the loss per step, ``peft/``, ``adapter.gguf``). ``submit`` with a key that
already has a directory adopts it: a succeeded job is returned as it is (its adapter is reused
after a process restart); a failed one stays failed (submit under a new key to retry); a
queued or running one whose process is gone restarts training **from scratch** (no mid-job
checkpoints: a job is a few minutes of CPU).
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.atomic import write_atomic
from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, Message, ModelRef


def safe_key(key: str) -> str:
    """A directory name for a job key: readable, and unique thanks to a short hash."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[:80] or "job"
    return f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


class PermanentJobError(Exception):
    """A job that would fail the same way again (its input is at fault, not the machine)."""


def permanent(exc: BaseException) -> bool:
    """Whether a failed job's error says that training it again would fail again: bad input (nothing
    to train, a malformed example, an adapter that cannot be converted) — unlike a worker that died
    or ran out of memory."""
    return isinstance(exc, PermanentJobError | FatalBackendError | ValueError)


class JobRecord(BaseModel):
    """A job's on-disk record: the :class:`Job` the API answers with, plus what only the queue keeps
    (the longer event log and the timestamps)."""

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


#: run one job: (job dir, base ref, examples, spec, step callback, event callback) -> result ModelRef
Runner = Callable[[Path, ModelRef, list[ChatExample], FinetuneSpec, Callable[[int, int, float], None]], ModelRef]


class LocalJobs:
    """Fine-tuning jobs persisted under ``root``, run one at a time by a worker thread."""

    def __init__(self, root: Path, runner: Runner, *, backend_name: str = "local") -> None:
        self.root = root
        self.runner = runner
        self.backend_name = backend_name
        self._records: dict[str, JobRecord] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._enqueued: set[str] = set()

    def job_dir(self, key: str) -> Path:
        return self.root / safe_key(key)

    # ---- persistence

    def _save(self, rec: JobRecord) -> None:
        write_atomic(self.job_dir(rec.job.key) / "state.json", rec.model_dump_json(indent=2))

    def _load(self, key: str) -> JobRecord | None:
        path = self.job_dir(key) / "state.json"
        if not path.is_file():
            return None
        return JobRecord.model_validate_json(path.read_text())

    def _event(self, rec: JobRecord, text: str) -> None:
        rec.log.append(f"{time.strftime('%H:%M:%S')} {text}")
        del rec.log[:-50]

    # ---- API

    def submit(self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, key: str) -> Job:
        with self._lock:
            rec = self._records.get(key) or self._load(key)
            if rec is not None:
                self._records[key] = rec
                self._restart_orphan(rec)
                return rec.to_job()
            d = self.job_dir(key)
            d.mkdir(parents=True, exist_ok=True)
            with (d / "examples.jsonl").open("w") as f:
                for ex in examples:
                    f.write(json.dumps(ex.to_openai()) + "\n")
            (d / "spec.json").write_text(spec.model_dump_json(indent=2))
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
            self._restart_orphan(rec)
            return rec.to_job()

    def _restart_orphan(self, rec: JobRecord) -> None:
        """An unfinished job that no worker of this process owns: its process is gone, so train
        it again from scratch with the inputs saved in its directory (caller holds the lock)."""
        job = rec.job
        if job.state in (JobState.QUEUED, JobState.RUNNING) and job.key not in self._enqueued:
            rec.update(state=JobState.QUEUED, progress=0.0)
            self._event(rec, "adopted an unfinished job after a restart; training restarts from scratch")
            self._save(rec)
            self._enqueue(job.key)

    def _enqueue(self, key: str) -> None:
        self._enqueued.add(key)
        self._queue.put(key)
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="agentsoc-local-train", daemon=True)
            self._worker.start()

    def close(self, timeout: float | None = None) -> None:
        if self._worker is not None and self._worker.is_alive():
            self._queue.put(None)
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
        d = self.job_dir(key)
        with self._lock:
            rec = self._records[key]
            rec.update(state=JobState.RUNNING, progress=0.0)
            self._event(rec, "running")
            self._save(rec)
        log = d / "train.log"
        log.write_text("")
        started = time.perf_counter()

        def on_step(step: int, total: int, loss: float) -> None:
            with log.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "total": total,
                            "loss": round(loss, 5),
                            "elapsed_s": round(time.perf_counter() - started, 2),
                        }
                    )
                    + "\n"
                )
            with self._lock:
                rec.update(progress=step / total)
                self._event(rec, f"step {step}/{total} loss {loss:.4f}")
                self._save(rec)

        try:
            examples = [
                ChatExample(messages=tuple(Message(**m) for m in json.loads(line)["messages"]))
                for line in (d / "examples.jsonl").read_text().splitlines()
                if line.strip()
            ]
            spec = FinetuneSpec.model_validate_json((d / "spec.json").read_text())
            result = self.runner(d, rec.job.base, examples, spec, on_step)
        except Exception as exc:
            with self._lock:
                rec.update(state=JobState.FAILED, error=f"{type(exc).__name__}: {exc}", retryable=not permanent(exc))
                rec.finished_at = time.time()
                self._event(rec, "failed")
                (d / "error.txt").write_text(traceback.format_exc())
                self._save(rec)
            return
        with self._lock:
            try:
                stats = json.loads((d / "result.json").read_text())
            except (OSError, ValueError):
                stats = {}
            rec.update(
                state=JobState.SUCCEEDED,
                result=result,
                progress=1.0,
                trained_tokens=stats.get("trained_tokens"),
                examples=stats.get("examples"),
                truncated=stats.get("truncated"),
                dropped=stats.get("dropped"),
            )
            rec.finished_at = time.time()
            self._event(rec, f"succeeded in {time.perf_counter() - started:.0f} s")
            self._save(rec)
