"""Fine-tuning jobs placed by Ray through the Ray Jobs API (DESIGN §3b), exactly once per key.

One job = one process (``python -m backends.trl_train JOB_DIR``) submitted with
``JobSubmissionClient.submit_job``. Ray does the placing: each job asks for
``entrypoint_num_gpus``/``entrypoint_num_cpus``, so the 2N jobs of an iteration run side by side as
far as the cluster's GPUs and CPUs allow and Ray queues the rest — there is no scheduler of ours.

Where Ray is (``address``):

- ``""`` — a local Ray instance started for the run with ``ray start --head --block`` in its own
  session, so it outlives a SIGKILL of agentsoc (a job keeps training while agentsoc is down). Its
  pid, ports and temp dir are recorded in ``<state_dir>/ray-instance.json``; a resumed run
  reconnects to it while it is alive and starts a new one otherwise. :meth:`RayJobs.stop_local`
  shuts it down when the run ends.
- ``"auto"``, ``"ray://head:10001"``, ``"http://head:8265"``, ``"head:6379"`` — an existing
  cluster, resolved by Ray's own client: never started, never stopped.

Exactly once: a job's submission id is derived from its key (:func:`submission_id`), so a resumed
run finds the job by key and adopts it (``get_job_info`` first; Ray's own refusal of a duplicate
id settles a race). Every id is written to ``<state_dir>/ray-submissions.jsonl`` *before* it is
sent, with the Ray instance it went to; a journaled id that the current instance does not know
was lost with an instance that is gone (machine reboot, a killed head): :meth:`RayJobs.status`
then reports it ``failed`` and :meth:`RayJobs.submit` raises :class:`JobLostError` instead of
training it a second time — the caller retries under ``attempt + 1``, a new id.

The class is synchronous and thread-safe. Ray's job client is built on ``requests`` (blocking;
its only async method tails logs), so the backend calls these methods through
``asyncio.to_thread``; one synchronous API also serves the CLI, tests and subprocesses.
``import ray`` costs about a second, so Ray is imported only inside the methods that need it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentsoc.atomic import write_atomic
from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.types import JobState

RAY_PIP = "pip install 'ray[default]'"
STATE_FILE = "ray-instance.json"
JOURNAL_FILE = "ray-submissions.jsonl"
LOCK_FILE = "ray.lock"
HEAD_LOG = "ray-head.log"

#: Environment variable set on ``ray start`` and so inherited by every process of a local instance
#: (GCS, raylet, dashboard, workers and the jobs' own processes): with the head's session and temp
#: dir, how :func:`_instance_pids` finds them all again — not by name, which would match other runs'.
INSTANCE_ENV = "AGENTSOC_RAY_INSTANCE"

#: Ray fails a job that is still PENDING after RAY_JOB_START_TIMEOUT_SECONDS (default 900 s). Jobs
#: waiting for a GPU behind longer training jobs are not stuck, so the local instance waits a week;
#: :meth:`RayJobs.submit` refuses at once what the local instance can never run.
LOCAL_JOB_START_TIMEOUT_S = 7 * 24 * 3600

_STATE_MAP = {
    "PENDING": JobState.QUEUED,
    "RUNNING": JobState.RUNNING,
    "SUCCEEDED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "STOPPED": JobState.CANCELLED,
}


def submission_id(key: str, attempt: int = 1) -> str:
    """Ray's submission id of attempt ``attempt`` of the job ``key``: deterministic and unique.

    Ray puts the id unquoted into URL paths (``/api/jobs/<id>``), actor names and log file names,
    so ``/``, ``#`` and ``?`` would break it: the key is reduced to ``[A-Za-z0-9._-]`` for people
    to read, and a hash of the full key keeps two keys that reduce alike apart.
    ``run/iter-0/agent-1/critic``, attempt 2 → ``agentsoc-run_iter-0_agent-1_critic-<12 hex>-a2``.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-")[:80] or "job"
    return f"agentsoc-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}-a{attempt}"


@dataclass(frozen=True)
class RayJob:
    """One attempt of one job on Ray. ``adopted``: it already existed and was not submitted again."""

    key: str
    attempt: int
    submission_id: str
    adopted: bool


class JobLostError(FatalBackendError):
    """This attempt went to a Ray instance that is gone; its outcome is unknown, and submitting the
    same id again could train it twice. Submit ``attempt + 1``."""

    def __init__(self, key: str, attempt: int, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.attempt = attempt


@dataclass
class LocalInstance:
    """What ``<state_dir>/ray-instance.json`` records about the local Ray instance of a run."""

    instance: str  #: a fresh uuid per start; the value of INSTANCE_ENV in all its processes
    pid: int  #: the ``ray start --block`` process; its death takes the instance down
    temp_dir: str
    dashboard_url: str
    gcs_port: int
    started_at: float
    startup_s: float | None = None
    resources: dict[str, float] = field(default_factory=dict)  #: the head node's CPU/GPU totals


class _NotFound(Exception):
    pass


class _Exists(Exception):
    pass


class RayJobs:
    """Submit, adopt, poll and stop fine-tuning jobs on Ray; see the module docstring.

    ``state_dir`` is the run directory (state file, submission journal, head log). ``num_cpus``,
    ``num_gpus`` and ``object_store_memory`` size the local instance only (None: what Ray detects);
    jobs use processes, not Ray objects, so the object store is kept small.
    """

    def __init__(
        self,
        state_dir: Path | str,
        *,
        address: str = "",
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        object_store_memory: int = 256 * 2**20,
        start_timeout_s: float = 120.0,
        http_timeout_s: float = 60.0,
        head_env: Mapping[str, str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir).resolve()
        self.address = address.strip()
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.object_store_memory = object_store_memory
        self.start_timeout_s = start_timeout_s
        self.http_timeout_s = http_timeout_s
        #: environment of a local instance (and so of its jobs): e.g. CUDA_VISIBLE_DEVICES, to keep
        #: training off the GPU the vLLM servers use
        self.head_env = dict(head_env or {})
        self._lock = threading.RLock()
        self._client: Any = None
        self._url: str | None = None
        self._instance: LocalInstance | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def local(self) -> bool:
        """Whether jobs go to a local instance this client starts and stops."""
        return not self.address

    # ------------------------------------------------------------------ connecting

    def connect(self) -> str:
        """Make sure Ray is reachable and return its dashboard URL (idempotent).

        Local: reconnect to the recorded instance if it is alive, else clean up what is left of it
        and start a new one. A cluster: one connection check; an unreachable address is a
        :class:`FatalBackendError` in one line.
        """
        self._ensure(start=True)
        return str(self._url)

    def _ensure(self, *, start: bool) -> bool:
        """Connect if needed; ``False`` when there is no live local instance and ``start`` is off.

        Only :meth:`connect` and :meth:`submit` start an instance: polling a run's jobs (a resumed
        run, ``agentsoc jobs``) must not bring up Ray, and must report a dead instance's jobs lost.
        """
        with self._lock:
            if not self.local:
                if self._client is None:
                    self._connect_cluster()
                return True
            if self._client is not None and self._instance is not None and self._alive(self._instance):
                return True
            self._client = self._url = self._instance = None
            with self._file_lock():
                return self._connect_local(start=start)

    def _connect_cluster(self) -> None:
        try:
            client = _client_class(self.http_timeout_s)(self.address)
        except ImportError as exc:
            raise FatalBackendError(f"Ray jobs need the Ray job client: {RAY_PIP} ({exc})") from exc
        except Exception as exc:  # ConnectionError, RpcError, ValueError … depending on the address form
            raise FatalBackendError(
                f"Ray is unreachable at ray_address={self.address!r} ({_one_line(exc)}): start the cluster "
                "or fix ray_address ('auto', ray://head:10001, http://head:8265), or leave it empty "
                "to run jobs on a local Ray instance"
            ) from None
        self._client, self._url = client, str(client.get_address())

    def _connect_local(self, *, start: bool) -> bool:
        """Caller holds both locks."""
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            if os.environ.get(var):
                # Ray's job client lets these override any address it is given
                raise FatalBackendError(
                    f"{var}={os.environ[var]} is set, and Ray's job client would send this run's jobs "
                    f"there instead of to its local Ray instance: unset {var}, or set ray_address to it"
                )
        previous = self._read_state()
        if previous is not None:
            if self._alive(previous):
                self._client = self._wait_ready(previous, deadline=time.monotonic() + self.start_timeout_s)
                self._instance, self._url = previous, previous.dashboard_url
                return True
            # gone, or half gone (a killed head leaves agents and job processes behind): kill what is
            # left before its jobs are reported lost, so no orphan of an old attempt trains on
            _kill_instance(previous, grace_s=0.0)
            shutil.rmtree(previous.temp_dir, ignore_errors=True)
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        if not start:
            return False
        self._start_local()
        return True

    def _start_local(self) -> None:
        """Start ``ray start --head --block`` detached, record it, wait until it takes jobs."""
        if importlib.util.find_spec("ray") is None:
            raise FatalBackendError(f"a local Ray instance needs Ray: {RAY_PIP}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        instance = uuid.uuid4().hex
        # short: Ray's unix sockets live under it, and a socket path may not exceed 107 bytes
        temp_dir = Path(tempfile.gettempdir()) / f"agentsoc-ray-{instance[:12]}"
        gcs, dashboard, client_server, agent = _free_ports(4)
        cmd = [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
            "--disable-usage-stats", "--log-style", "record", "--log-color", "false",
            "--temp-dir", str(temp_dir), "--port", str(gcs),
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
            # fixed by default (10001, 52365): two runs' instances on one machine would collide
            "--ray-client-server-port", str(client_server), "--dashboard-agent-listen-port", str(agent),
            "--object-store-memory", str(self.object_store_memory),
        ]  # fmt: skip
        if self.num_cpus is not None:
            cmd += ["--num-cpus", str(self.num_cpus)]
        if self.num_gpus is not None:
            cmd += ["--num-gpus", str(self.num_gpus)]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        env.update(
            {
                INSTANCE_ENV: instance,
                "RAY_USAGE_STATS_ENABLED": "0",
                # jobs' `python` is this environment's, as when agentsoc runs them itself
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            }
        )
        env.update(self.head_env)
        env.setdefault("RAY_JOB_START_TIMEOUT_SECONDS", str(LOCAL_JOB_START_TIMEOUT_S))
        started = time.monotonic()
        with (self.state_dir / HEAD_LOG).open("ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
            log.flush()
            # a session of its own: neither a SIGKILL of agentsoc nor a Ctrl-C in its terminal reaches it
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        state = LocalInstance(
            instance=instance,
            pid=proc.pid,
            temp_dir=str(temp_dir),
            dashboard_url=f"http://127.0.0.1:{dashboard}",
            gcs_port=gcs,
            started_at=time.time(),
        )
        self._proc = proc
        self._write_state(state)  # before waiting: a crash during startup still leaves it findable
        try:
            client = self._wait_ready(state, deadline=started + self.start_timeout_s)
            state.resources = self._head_resources(state)
        except BaseException:
            proc.kill()  # by pid: the marks that _kill_instance looks for may not be readable yet
            _kill_instance(state, grace_s=0.0)
            shutil.rmtree(temp_dir, ignore_errors=True)
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)
            raise
        state.startup_s = round(time.monotonic() - started, 2)
        self._write_state(state)
        self._client, self._instance, self._url = client, state, state.dashboard_url

    def _wait_ready(self, state: LocalInstance, *, deadline: float) -> Any:
        """The job client of a local instance, once its dashboard answers (it may still be starting)."""
        cls = _client_class(self.http_timeout_s)
        while True:
            if not self._alive(state):
                raise FatalBackendError(
                    f"the local Ray instance exited while starting: {self._head_log_tail()} "
                    f"(full log: {self.state_dir / HEAD_LOG})"
                )
            try:
                return cls(state.dashboard_url)
            except (OSError, RuntimeError):  # refused, timed out, or answering before its routes are up
                if time.monotonic() > deadline:
                    raise FatalBackendError(
                        f"the local Ray instance (pid {state.pid}) did not answer at {state.dashboard_url} "
                        f"within {self.start_timeout_s:.0f} s; see {self.state_dir / HEAD_LOG}, or stop it "
                        f"with RayJobs({str(self.state_dir)!r}).stop_local()"
                    ) from None
                time.sleep(0.25)

    def _head_resources(self, state: LocalInstance) -> dict[str, float]:
        """CPU/GPU totals of the head node, from Ray's state API (waits until the node registered)."""
        list_nodes = importlib.import_module("ray.util.state").list_nodes
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            with contextlib.suppress(Exception):  # the state API answers before the node registered
                for node in list_nodes(address=state.dashboard_url, detail=True):
                    total = dict(node.resources_total or {})
                    if node.state == "ALIVE" and "CPU" in total:
                        return {k: float(total[k]) for k in ("CPU", "GPU") if k in total}
            if time.monotonic() > deadline:
                raise FatalBackendError(f"the local Ray instance at {state.dashboard_url} reports no live node")
            time.sleep(0.25)

    def _alive(self, state: LocalInstance) -> bool:
        """Whether the instance's ``ray start --block`` process runs (and is ours, not a reused pid)."""
        if self._proc is not None and self._proc.pid == state.pid:
            # our own child: right after Popen its /proc environ can still read empty (exec in progress)
            return self._proc.poll() is None
        try:
            os.kill(state.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        environ = _environ(state.pid)
        return environ is None or f"{INSTANCE_ENV}={state.instance}" in environ  # None: no /proc here

    def stop_local(self, *, grace_s: float = 5.0) -> bool:
        """Shut down the local instance of this state dir (and every job still on it); ``False`` when
        there is none. Never touches a cluster given by ``address``.

        SIGTERM first — Ray's graceful stop, which waits for running jobs, so only ``grace_s`` — then
        SIGKILL to every process of the instance (:func:`_instance_pids`). Not ``ray stop``: that
        stops every Ray instance of the machine, other runs' included.
        """
        if not self.local:
            return False
        with self._lock, self._file_lock():
            state = self._read_state()
            self._client = self._url = self._instance = None
            if state is None:
                return False
            if self._proc is not None and self._proc.pid == state.pid and self._proc.poll() is None:
                self._proc.terminate()
            _kill_instance(state, grace_s=grace_s)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
                self._proc = None
            shutil.rmtree(state.temp_dir, ignore_errors=True)
            (self.state_dir / STATE_FILE).unlink(missing_ok=True)
            return True

    # ------------------------------------------------------------------ jobs

    def submit(
        self,
        key: str,
        entrypoint: str,
        *,
        num_gpus: float,
        num_cpus: float,
        env: Mapping[str, str] | None = None,
        working_dir: Path | str | None = None,
        attempt: int = 1,
    ) -> RayJob:
        """Submit attempt ``attempt`` of job ``key`` — or adopt it if Ray already has it.

        ``entrypoint`` is a shell command run on the cluster (use an absolute interpreter path, or
        ``python`` from the local instance's PATH); ``num_gpus``/``num_cpus`` are reserved for it
        while it runs. ``env`` and ``working_dir`` become its runtime_env (Ray packs and uploads a
        local ``working_dir``; prefer paths the cluster can read for large data). An adopted job
        keeps the entrypoint it was first submitted with.
        """
        if num_gpus < 0 or num_cpus < 0:
            raise ValueError(f"num_gpus and num_cpus must be >= 0, got {num_gpus}, {num_cpus}")
        sid = submission_id(key, attempt)
        # an attempt journaled to an instance that is gone is lost — known before starting a new one
        live = self._ensure(start=False)
        with self._lock:
            where = self._where() if live else None
        self._raise_if_lost(key, attempt, sid, where)
        self.connect()
        with self._lock:
            client, where, instance = self._client, self._where(), self._instance
        if instance is not None:
            self._check_fits(instance, num_gpus=num_gpus, num_cpus=num_cpus)
        try:
            self._call(client.get_job_info, sid, what=f"look up job {key!r}")
            return RayJob(key, attempt, sid, adopted=True)
        except _NotFound:
            pass
        self._raise_if_lost(key, attempt, sid, where, record=True)
        runtime_env: dict[str, Any] = {}
        if env:
            runtime_env["env_vars"] = dict(env)
        if working_dir is not None:
            runtime_env["working_dir"] = str(working_dir)
        try:
            self._call(
                client.submit_job,
                entrypoint=entrypoint,
                submission_id=sid,
                runtime_env=runtime_env or None,
                metadata={"agentsoc_key": key, "agentsoc_attempt": str(attempt)},
                entrypoint_num_gpus=num_gpus,
                entrypoint_num_cpus=num_cpus,
                what=f"submit job {key!r}",
            )
        except _Exists:  # another thread or process submitted it since our look-up
            return RayJob(key, attempt, sid, adopted=True)
        return RayJob(key, attempt, sid, adopted=False)

    def status(self, key: str, *, attempt: int = 1) -> tuple[JobState, str]:
        """The attempt's state and Ray's message; a failed job's message ends with its last log lines.

        A job that Ray does not know although it was submitted from this state dir was lost with a
        Ray instance that is gone: ``failed``, never a wait that does not end.
        """
        sid = submission_id(key, attempt)
        if not self._ensure(start=False):
            return JobState.FAILED, self._unknown(key, attempt, sid, None)
        with self._lock:
            client, where = self._client, self._where()
        try:
            info = self._call(client.get_job_info, sid, what=f"poll job {key!r}")
        except _NotFound:
            return JobState.FAILED, self._unknown(key, attempt, sid, where)
        except TransientBackendError:
            if self.local and not self._ensure(start=False):  # the instance died under us (and is swept now)
                return JobState.FAILED, self._unknown(key, attempt, sid, None)
            raise
        state = _STATE_MAP.get(str(info.status), JobState.FAILED)
        message = (str(info.message or str(info.status)).strip().splitlines() or [""])[0]
        message = message.split(", last available logs")[0]  # the logs follow below, the last lines only
        if state is JobState.FAILED:
            if info.error_type:
                message = f"{message} [{info.error_type}]"
            with contextlib.suppress(TransientBackendError, FatalBackendError):
                tail = self.logs_tail(key, lines=20, attempt=attempt)
                if tail:
                    message = f"{message}\nlast log lines:\n{tail}"
        return state, message

    def logs_tail(self, key: str, lines: int = 20, *, attempt: int = 1) -> str:
        """The last ``lines`` lines of the attempt's output (stdout and stderr together)."""
        sid = submission_id(key, attempt)
        if not self._ensure(start=False):
            raise FatalBackendError(f"no live local Ray instance for {self.state_dir}: job {key!r} is gone")
        with self._lock:
            client = self._client
        try:
            logs = str(self._call(client.get_job_logs, sid, what=f"read the logs of job {key!r}"))
        except _NotFound:
            raise FatalBackendError(f"Ray has no job {key!r} attempt {attempt} ({sid}) at {self._url}") from None
        return "\n".join(logs.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""

    def cancel(self, key: str, *, attempt: int = 1) -> bool:
        """Ask Ray to stop the attempt; ``True`` if it was still running."""
        sid = submission_id(key, attempt)
        if not self._ensure(start=False):
            return False
        with self._lock:
            client = self._client
        try:
            return bool(self._call(client.stop_job, sid, what=f"stop job {key!r}"))
        except _NotFound:
            return False

    # ------------------------------------------------------------------ helpers

    def _where(self) -> str:
        """The identity of the Ray instance jobs go to now, as recorded in the journal."""
        return f"local:{self._instance.instance}" if self._instance is not None else self.address

    def _unknown(self, key: str, attempt: int, sid: str, where: str | None) -> str:
        """Why Ray does not know a job (``where`` None: no live local instance at all)."""
        with self._file_lock():
            entry = self._journal().get(sid)
        if entry is None:
            at = f"at {self._url}" if where is not None else f"(no live local Ray instance for {self.state_dir})"
            return f"Ray has no job {key!r} attempt {attempt} ({sid}) {at}, and it was never submitted from here"
        if entry.get("at") != where:
            return (
                f"job {key!r} attempt {attempt} went to Ray instance {entry.get('at')}, which is gone "
                f"(machine restarted, or the instance was stopped): it is lost — submit attempt {attempt + 1}"
            )
        return (
            f"job {key!r} attempt {attempt} never reached Ray (agentsoc stopped between recording and "
            "submitting it); submit it again"
        )

    def _raise_if_lost(self, key: str, attempt: int, sid: str, where: str | None, *, record: bool = False) -> None:
        """Raise :class:`JobLostError` if the journal sends ``sid`` to another instance than ``where``;
        with ``record``, journal it first-hand (write-ahead: before Ray may start it)."""
        with self._file_lock():
            entry = self._journal().get(sid)
            if entry is not None and entry.get("at") != where:
                raise JobLostError(
                    key,
                    attempt,
                    f"job {key!r} attempt {attempt} ({sid}) went to Ray instance {entry.get('at')}, which is "
                    f"gone: its outcome is lost and its id is never sent twice — submit attempt {attempt + 1}",
                )
            if entry is None and record:
                self._append_journal({"id": sid, "key": key, "attempt": attempt, "at": where, "t": time.time()})

    def _check_fits(self, instance: LocalInstance, *, num_gpus: float, num_cpus: float) -> None:
        """A local instance never grows: a job asking more than it has would wait forever."""
        have = instance.resources
        for name, want in (("GPU", num_gpus), ("CPU", num_cpus)):
            if have and want > have.get(name, 0.0):
                raise FatalBackendError(
                    f"a job needs {want:g} {name}(s) but the local Ray instance has {have.get(name, 0.0):g}: "
                    f"lower num_{name.lower()}s per job, or set ray_address to a cluster that has them"
                )

    def _call(self, fn: Any, *args: Any, what: str, **kwargs: Any) -> Any:
        """Run one job-client call and sort its errors into ours."""
        try:
            return fn(*args, **kwargs)
        except OSError as exc:  # requests' errors, ConnectionError and timeouts derive from OSError
            raise TransientBackendError(f"Ray at {self._url}: cannot {what}: {_one_line(exc)}") from exc
        except RuntimeError as exc:  # the job client's HTTP errors: "Request failed with status code N: …"
            text = str(exc)
            if "already exists" in text:
                raise _Exists from None
            code = re.search(r"status code (\d{3})", text)
            status = int(code.group(1)) if code else 0
            if status == 404:
                raise _NotFound from None
            err = TransientBackendError if status >= 500 or status == 429 else FatalBackendError
            raise err(f"Ray at {self._url}: cannot {what}: {_one_line(exc)}") from exc

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Across processes sharing the state dir (a resumed run, `agentsoc jobs`): one starts the
        instance, and journal lines are never interleaved."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / LOCK_FILE).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _read_state(self) -> LocalInstance | None:
        path = self.state_dir / STATE_FILE
        try:
            return LocalInstance(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise FatalBackendError(f"{path} is not a Ray instance record ({exc}); remove it") from exc

    def _write_state(self, state: LocalInstance) -> None:
        write_atomic(self.state_dir / STATE_FILE, json.dumps(asdict(state), indent=2))

    def _journal(self) -> dict[str, dict[str, Any]]:
        path = self.state_dir / JOURNAL_FILE
        if not path.is_file():
            return {}
        out: dict[str, dict[str, Any]] = {}
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line torn by a crash mid-write
                entry = json.loads(line)
                out.setdefault(str(entry["id"]), entry)
        return out

    def _append_journal(self, entry: dict[str, Any]) -> None:
        with (self.state_dir / JOURNAL_FILE).open("a+b") as f:
            torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
            f.write((b"\n" if torn else b"") + json.dumps(entry).encode() + b"\n")  # a torn line stays alone
            f.flush()
            os.fsync(f.fileno())

    def _head_log_tail(self, lines: int = 5) -> str:
        try:
            text = (self.state_dir / HEAD_LOG).read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# ---------------------------------------------------------------------- module helpers


@functools.cache
def _client_class(http_timeout_s: float) -> Any:
    """Ray's ``JobSubmissionClient`` with a timeout on every HTTP request.

    The client calls ``requests`` without one, so a wedged dashboard would block a worker thread
    forever (``asyncio.to_thread`` cannot cancel it). Its ``_do_request`` forwards extra keyword
    arguments to ``requests.request``; if a Ray release renames it, this override is simply unused.
    """
    base: Any = importlib.import_module("ray.job_submission").JobSubmissionClient
    timeout = (min(10.0, http_timeout_s), http_timeout_s)  # (connect, read)

    def _do_request(self: Any, method: str, endpoint: str, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", timeout)
        return base._do_request(self, method, endpoint, **kwargs)

    return type("TimedJobSubmissionClient", (base,), {"_do_request": _do_request})


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free right now (Ray binds them a moment later; a clash fails the start)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _environ(pid: int) -> list[str] | None:
    """A process's environment as ``KEY=value`` strings; ``[]`` if unreadable, None without /proc."""
    if not os.path.isdir("/proc/self"):
        return None
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _instance_pids(state: LocalInstance) -> list[int]:
    """Every process of a local instance (Linux; elsewhere none are found).

    Two marks, because neither alone finds all: the INSTANCE_ENV marker in the environment (job
    processes run in sessions of their own), or the head's session together with an open file or
    working directory under the instance's temp dir — Ray's processes that rename themselves
    (``ray::DashboardAgent``, the dashboard's modules) overwrite what /proc shows of their
    environment, but they log there. (A user's ``tail -f`` of a log is in neither.)
    """
    if not os.path.isdir("/proc/self"):
        return []
    marker, me, out = f"{INSTANCE_ENV}={state.instance}", os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            pid = int(entry)
            if marker in (_environ(pid) or []) or (_session(pid) == state.pid and _uses_dir(pid, state.temp_dir)):
                out.append(pid)
    return out


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _uses_dir(pid: int, directory: str) -> bool:
    """Whether the process has its working directory or an open file under ``directory``."""
    prefix = directory.rstrip(os.sep) + os.sep
    try:
        links = [f"/proc/{pid}/cwd"] + [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    for link in links:
        with contextlib.suppress(OSError):
            if os.readlink(link).startswith(prefix):
                return True
    return False


def _kill_instance(state: LocalInstance, *, grace_s: float) -> None:
    """SIGTERM the head (if it is still ours), wait ``grace_s``, then SIGKILL every marked process."""
    environ = _environ(state.pid)
    if environ is None or f"{INSTANCE_ENV}={state.instance}" in environ:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _instance_pids(state):
            time.sleep(0.2)
    deadline = time.monotonic() + 15.0
    while (pids := _instance_pids(state)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "…") if len(text) > 300 else text or type(exc).__name__
