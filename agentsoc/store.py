"""RunStore: everything a run produces, in one SQLite file (WAL) plus human-readable exports.

Each finished unit of work (a model call, a debated problem, a dataset, a job state change, a
metric) is one committed transaction, so a crash or Ctrl-C at any point loses only the work in
flight, and a resumed run finds the rest. SQLite in WAL mode keeps readers (``agentsoc jobs``)
working while a run writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from agentsoc.records import DatasetRecord, Diversity, EvalScores, IterationRecord, Score, Stage
from agentsoc.transcript import AgentSlot, Transcript
from agentsoc.types import Completion, Job

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS calls (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, model TEXT NOT NULL,
    request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS transcripts (
    phase TEXT NOT NULL, problem_id TEXT NOT NULL, data TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY (phase, problem_id));
CREATE TABLE IF NOT EXISTS datasets (
    iteration INTEGER NOT NULL, agent INTEGER NOT NULL, role TEXT NOT NULL,
    size INTEGER NOT NULL, path TEXT NOT NULL, stats TEXT NOT NULL,
    PRIMARY KEY (iteration, agent, role));
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY, backend TEXT NOT NULL, job_id TEXT NOT NULL, state TEXT NOT NULL,
    data TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS metrics (
    iteration INTEGER NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (iteration, name));
CREATE TABLE IF NOT EXISTS usage (
    stage TEXT NOT NULL, model TEXT NOT NULL, calls INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (stage, model));
"""


class StoreError(Exception):
    """The run's database cannot be used (corrupt, read-only, disk full); the message names the file
    and what to do — an environment problem, not a bug, so it is one line, not a traceback."""


def _environmental(e: sqlite3.DatabaseError) -> bool:
    text = str(e).lower()
    return any(
        s in text for s in ("not a database", "malformed", "readonly", "read-only", "disk is full", "unable to open")
    )


def describe(path: Path, e: sqlite3.DatabaseError) -> str:
    """One line for a database that failed for a reason outside agentsoc."""
    text = str(e).lower()
    if "not a database" in text or "malformed" in text:
        return (
            f"{path}: corrupt or truncated run database ({e}); move it aside and start again in a new --run-dir "
            "(the exports under iter-*/ stay readable)"
        )
    if "disk is full" in text:
        return f"{path}: the disk is full; free some space, then continue with --resume (finished work is kept)"
    if "readonly" in text or "read-only" in text or "unable to open" in text:
        return (
            f"{path.parent}: cannot write the run database there ({e}); a run needs a writable run directory "
            "(agentsoc jobs and report only read it)"
        )
    return f"{path}: {e}"


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection; ``immutable`` where even SQLite's shared-memory file cannot be made
    (a read-only directory holding a WAL database)."""
    if not path.is_file():
        raise sqlite3.OperationalError(f"unable to open database file {path}")
    uri = path.resolve().as_uri()
    for query in ("mode=ro", "mode=ro&immutable=1"):
        try:
            conn = sqlite3.connect(f"{uri}?{query}", uri=True, check_same_thread=False, isolation_level=None)
            conn.execute("SELECT count(*) FROM meta").fetchall()
            return conn
        except sqlite3.OperationalError as e:
            if "not a database" in str(e) or "no such table" in str(e):
                raise
            last = e
    raise last


def _check_integrity(conn: sqlite3.Connection) -> None:
    """Raise (as SQLite would, later and mid-run) if a store about to be resumed is damaged: garbage
    inside the file, its header intact, is otherwise found only by the first query that reads it."""
    rows = conn.execute("PRAGMA quick_check(1)").fetchall()
    if rows != [("ok",)]:
        conn.close()
        found = " ".join(str(rows[0][0]).replace("*** in database main ***", "").split()) if rows else "no answer"
        raise sqlite3.DatabaseError(f"database disk image is malformed: {found}")


class RunStore:
    """The run directory's database. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, run_dir: Path, *, readonly: bool = False) -> RunStore:
        """Open (or create) the run's database; ``readonly`` opens an existing one without writing,
        so ``agentsoc jobs`` and ``report`` work on a finished run in a read-only place."""
        path = run_dir / "run.sqlite"
        if path.is_file() and path.stat().st_size == 0:
            # SQLite writes its first page as soon as a store is made (WAL mode), so an empty file is a
            # store that lost everything: opening it would start the run afresh and pay for every call again
            raise StoreError(
                f"{path}: empty run database (0 bytes): this run's record is lost, and resuming would redo "
                "(and pay for) all of its work; restore run.sqlite from a backup, or start anew in another --run-dir"
            )
        try:
            if readonly:
                conn = _open_readonly(path)
            else:
                existed = path.is_file()
                run_dir.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
                if existed:
                    _check_integrity(conn)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as e:
            raise StoreError(describe(path, e)) from None
        return cls(run_dir, conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.execute(sql, params)
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                if _environmental(e):
                    raise StoreError(describe(self.run_dir / "run.sqlite", e)) from None
                raise

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._conn.execute(sql, params).fetchall())
            except sqlite3.DatabaseError as e:  # a damaged page met by a read (``report`` on a corrupt run)
                if _environmental(e):
                    raise StoreError(describe(self.run_dir / "run.sqlite", e)) from None
                raise

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        rows = self._rows("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- call cache -----------------------------------------------------------------------------
    def get_call(self, key: str) -> Completion | None:
        rows = self._rows("SELECT response FROM calls WHERE key = ?", (key,))
        return Completion.model_validate_json(rows[0][0]) if rows else None

    def put_call(self, key: str, backend: str, model: str, request: str, response: Completion) -> None:
        self._write(
            "INSERT OR REPLACE INTO calls (key, backend, model, request, response, created) VALUES (?,?,?,?,?,?)",
            (key, backend, model, request, response.model_dump_json(), time.time()),
        )

    def count_calls(self) -> int:
        return int(self._rows("SELECT COUNT(*) FROM calls")[0][0])

    def has_work(self) -> bool:
        """Whether the run did anything: a stored call, transcript, dataset, job, metric or usage.

        A store without any is a run that stopped before its first call (a wrong model, an endpoint
        that was down): nothing would be lost or paid twice by starting it again with a changed recipe.
        """
        tables = ("calls", "transcripts", "datasets", "jobs", "metrics", "usage")
        return any(self._rows(f"SELECT EXISTS (SELECT 1 FROM {t})")[0][0] for t in tables)

    # -- transcripts ----------------------------------------------------------------------------
    def put_transcript(self, t: Transcript) -> None:
        self._write(
            "INSERT OR REPLACE INTO transcripts (phase, problem_id, data, created) VALUES (?,?,?,?)",
            (t.phase, t.problem.id, t.model_dump_json(), time.time()),
        )

    def transcripts(self, phase: str) -> dict[str, Transcript]:
        rows = self._rows("SELECT problem_id, data FROM transcripts WHERE phase = ?", (phase,))
        return {pid: Transcript.model_validate_json(data) for pid, data in rows}

    def phases(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT phase FROM transcripts ORDER BY phase")]

    # -- datasets -------------------------------------------------------------------------------
    def put_dataset(self, record: DatasetRecord) -> None:
        self._write(
            "INSERT OR REPLACE INTO datasets (iteration, agent, role, size, path, stats) VALUES (?,?,?,?,?,?)",
            (record.iteration, record.agent, record.role, record.size, record.path, record.model_dump_json()),
        )

    def datasets(self, iteration: int | None = None) -> list[DatasetRecord]:
        sql = "SELECT stats FROM datasets"
        params: tuple[Any, ...] = ()
        if iteration is not None:
            sql += " WHERE iteration = ?"
            params = (iteration,)
        return [
            DatasetRecord.model_validate_json(r[0])
            for r in self._rows(sql + " ORDER BY iteration, agent, role", params)
        ]

    # -- jobs -----------------------------------------------------------------------------------
    def put_job(self, job: Job) -> None:
        self._write(
            "INSERT OR REPLACE INTO jobs (key, backend, job_id, state, data, updated) VALUES (?,?,?,?,?,?)",
            (job.key, job.backend, job.id, job.state.value, job.model_dump_json(), time.time()),
        )

    def get_job(self, key: str) -> Job | None:
        rows = self._rows("SELECT data FROM jobs WHERE key = ?", (key,))
        return Job.model_validate_json(rows[0][0]) if rows else None

    def jobs(self) -> list[Job]:
        return [Job.model_validate_json(r[0]) for r in self._rows("SELECT data FROM jobs ORDER BY key")]

    # -- iteration records ----------------------------------------------------------------------
    # Each part of an iteration's record is written when it is known (a resumed run may write the
    # scores of an iteration whose slots an earlier session wrote); the keys never leave this class.
    def _put(self, iteration: int, name: str, value: str) -> None:
        self._write("INSERT OR REPLACE INTO metrics (iteration, name, value) VALUES (?,?,?)", (iteration, name, value))

    def put_scores(self, iteration: int, scores: EvalScores) -> None:
        self._put(iteration, "scores", scores.model_dump_json())

    def put_label_accuracy(self, iteration: int, score: Score) -> None:
        self._put(iteration, "label_accuracy", score.model_dump_json())

    def put_slots(self, iteration: int, slots: Sequence[AgentSlot]) -> None:
        self._put(iteration, "slots", json.dumps([s.model_dump() for s in slots]))

    def put_wall_time(self, iteration: int, stage: Stage, seconds: float) -> None:
        self._put(iteration, f"wall_s/{stage}", json.dumps(seconds))

    def put_diversity(self, iteration: int, diversity: Diversity) -> None:
        self._put(iteration, "diversity", diversity.model_dump_json())

    def put_rationalized(self, iteration: int, counts: Sequence[int]) -> None:
        self._put(iteration, "rationalized", json.dumps(list(counts)))

    def iteration(self, iteration: int) -> IterationRecord:
        """The record of one iteration (empty parts where nothing was stored yet)."""
        rows = self._rows("SELECT name, value FROM metrics WHERE iteration = ?", (iteration,))
        jobs = [j for j in self.jobs() if f"/iter-{iteration}/" in j.key]
        return _record(iteration, dict(rows), self.datasets(iteration), jobs)

    def iterations(self) -> list[IterationRecord]:
        """Every iteration that stored anything, in order."""
        by: dict[int, dict[str, str]] = {}
        for it, name, value in self._rows("SELECT iteration, name, value FROM metrics ORDER BY iteration, name"):
            by.setdefault(int(it), {})[name] = value
        datasets: dict[int, list[DatasetRecord]] = {}
        for d in self.datasets():
            datasets.setdefault(d.iteration, []).append(d)
        jobs = self.jobs()
        return [
            _record(i, by.get(i, {}), datasets.get(i, []), [j for j in jobs if f"/iter-{i}/" in j.key])
            for i in sorted(set(by) | set(datasets))
        ]

    # -- usage ----------------------------------------------------------------------------------
    def add_usage(self, stage: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._write(
            "INSERT INTO usage (stage, model, calls, prompt_tokens, completion_tokens) VALUES (?,?,1,?,?) "
            "ON CONFLICT (stage, model) DO UPDATE SET calls = calls + 1, "
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens",
            (stage, model, prompt_tokens, completion_tokens),
        )

    def usage(self) -> list[dict[str, Any]]:
        rows = self._rows(
            "SELECT stage, model, calls, prompt_tokens, completion_tokens FROM usage ORDER BY stage, model"
        )
        return [
            {"stage": s, "model": m, "calls": c, "prompt_tokens": p, "completion_tokens": ct} for s, m, c, p, ct in rows
        ]


def _record(
    iteration: int, parts: dict[str, str], datasets: Sequence[DatasetRecord], jobs: Sequence[Job]
) -> IterationRecord:
    wall = {
        stage: float(json.loads(parts[f"wall_s/{stage}"])) for stage in get_args(Stage) if f"wall_s/{stage}" in parts
    }
    return IterationRecord.model_validate(
        {
            "iteration": iteration,
            "scores": json.loads(parts["scores"]) if "scores" in parts else None,
            "label_accuracy": json.loads(parts["label_accuracy"]) if "label_accuracy" in parts else None,
            "slots": json.loads(parts.get("slots", "[]")),
            "wall_s": wall,
            "diversity": json.loads(parts["diversity"]) if "diversity" in parts else None,
            "rationalized": json.loads(parts["rationalized"]) if "rationalized" in parts else None,
            "datasets": [d.model_dump() for d in datasets],
            "jobs": list(jobs),
        }
    )
