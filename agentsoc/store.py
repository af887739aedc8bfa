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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentsoc.debate import Transcript
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


class RunStore:
    """The run directory's database. Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, run_dir: Path, conn: sqlite3.Connection) -> None:
        self.run_dir = run_dir
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, run_dir: Path) -> RunStore:
        run_dir.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(run_dir / "run.sqlite", check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_SCHEMA)
        return cls(run_dir, conn)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute(sql, params)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

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
    def put_dataset(self, iteration: int, agent: int, role: str, size: int, path: Path, stats: dict[str, Any]) -> None:
        self._write(
            "INSERT OR REPLACE INTO datasets (iteration, agent, role, size, path, stats) VALUES (?,?,?,?,?,?)",
            (iteration, agent, role, size, str(path.relative_to(self.run_dir)), json.dumps(stats)),
        )

    def datasets(self, iteration: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT iteration, agent, role, size, path, stats FROM datasets"
        params: tuple[Any, ...] = ()
        if iteration is not None:
            sql += " WHERE iteration = ?"
            params = (iteration,)
        return [
            {"iteration": i, "agent": a, "role": r, "size": s, "path": p, **json.loads(st)}
            for i, a, r, s, p, st in self._rows(sql + " ORDER BY iteration, agent, role", params)
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

    # -- metrics --------------------------------------------------------------------------------
    def put_metric(self, iteration: int, name: str, value: Any) -> None:
        self._write(
            "INSERT OR REPLACE INTO metrics (iteration, name, value) VALUES (?,?,?)",
            (iteration, name, json.dumps(value)),
        )

    def metrics(self) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        for it, name, value in self._rows("SELECT iteration, name, value FROM metrics ORDER BY iteration, name"):
            out.setdefault(int(it), {})[name] = json.loads(value)
        return out

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


def export_jsonl(rows: Iterator[str] | list[str], path: Path) -> None:
    """Write one JSON document per line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(row + "\n")
    tmp.replace(path)
