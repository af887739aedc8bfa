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

Exactly once, per run: a job's submission id is derived from the run's id and the job's key
(:func:`submission_id`). The run id is made once with the state dir (``ray-run-id``, created
atomically, read on resume), so a resumed run finds its own jobs and adopts them (``get_job_info``
first; Ray's own refusal of a duplicate id settles a race) while another run directory with the
same recipe on the same cluster gets ids of its own and never adopts this run's jobs. Every id is
written to ``<state_dir>/ray-submissions.jsonl`` *before* it is sent, with the Ray instance it
went to; a journaled id that the current instance does not know was lost with an instance that
is gone (machine reboot, a killed head): :meth:`RayJobs.status` then reports it ``failed`` and
:meth:`RayJobs.submit` raises :class:`JobLostError` instead of training it a second time — the
caller retries under ``attempt + 1``, a new id.

Queued jobs wait: Ray fails a job still PENDING after the head's RAY_JOB_START_TIMEOUT_SECONDS
(default 900 s; a local instance is started with a week). On a cluster whose head was started
without it, :meth:`RayJobs.status` submits such a job again under the next *requeue* id
(``…-a1-q1``) with the same entrypoint, resources and runtime_env and reports it ``queued``: waiting
for a GPU is not a failure and burns no attempt.

Nothing left running: a local instance is watched by a small process of its own (:func:`watch`)
that stops it once no job on it is pending or running and no agentsoc process holds the run
(the run directory's ``run.lock``, or the process that started the instance) for
``idle_timeout_s``.

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
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentsoc.atomic import write_atomic
from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.types import JobState
from backends.job_folder import one_line as _one_line
from backends.job_folder import slug

log = logging.getLogger(__name__)

RAY_PIP = "pip install 'ray[default]'"
STATE_FILE = "ray-instance.json"
JOURNAL_FILE = "ray-submissions.jsonl"
LOCK_FILE = "ray.lock"
HEAD_LOG = "ray-head.log"
RUN_ID_FILE = "ray-run-id"
WATCH_LOG = "ray-watch.log"
#: the lock file agentsoc.lock.RunLock holds for a run's life (an flock: gone when its holder dies)
RUN_LOCK_FILE = "run.lock"
#: Ray's error type of a job that stayed PENDING past the head's RAY_JOB_START_TIMEOUT_SECONDS
START_TIMEOUT = "JOB_SUPERVISOR_ACTOR_START_TIMEOUT"

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


def submission_id(run: str, key: str, attempt: int = 1, requeue: int = 0) -> str:
    """Ray's submission id of attempt ``attempt`` of the job ``key`` of run ``run``: deterministic
    and unique per run, so two runs of one recipe on one cluster never share (or adopt) a job.

    Ray puts the id unquoted into URL paths (``/api/jobs/<id>``), actor names and log file names,
    so ``/``, ``#`` and ``?`` would break it: the key is reduced to ``[A-Za-z0-9._-]`` for people
    to read, and a hash of the run and the full key keeps two keys that reduce alike apart.
    Run ``1f2e…``, ``t/iter-0/agent-1/critic``, attempt 2 → ``agentsoc-1f2e3d4c-t_iter-0_agent-1_critic-<12 hex>-a2``;
    ``requeue`` n > 0 (the same attempt submitted again after waiting too long in Ray's queue) adds ``-qn``.
    """
    if attempt < 1 or requeue < 0:
        raise ValueError(f"attempt must be >= 1 and requeue >= 0, got {attempt}, {requeue}")
    digest = hashlib.sha256(f"{run}\0{key}".encode()).hexdigest()[:12]
    return f"agentsoc-{run[:8]}-{slug(key)}-{digest}-a{attempt}" + (f"-q{requeue}" if requeue else "")


def run_id(state_dir: Path) -> str:
    """The run's id: made once, atomically, in ``state_dir`` (two processes racing agree on one),
    and read back by every later process of the run (a resumed run, ``agentsoc jobs``)."""
    path = state_dir / RUN_ID_FILE
    with contextlib.suppress(FileNotFoundError):
        return _valid_run_id(path)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / f".{RUN_ID_FILE}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(uuid.uuid4().hex + "\n")
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs is the run's id
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return _valid_run_id(path)


def _valid_run_id(path: Path) -> str:
    text = path.read_text().strip()
    if not re.fullmatch(r"[0-9a-f]{32}", text):
        raise FatalBackendError(f"{path} holds no run id ({text[:40]!r}); restore it or remove the run directory")
    return text


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
        idle_timeout_s: float = 600.0,
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
        #: a local instance stops itself after this long without a job or an agentsoc process (:func:`watch`)
        self.idle_timeout_s = idle_timeout_s
        self._lock = threading.RLock()
        self._client: Any = None
        self._url: str | None = None
        self._instance: LocalInstance | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run: str | None = None

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
        self._start_watch(state, env)
        self._client, self._instance, self._url = client, state, state.dashboard_url

    def _start_watch(self, state: LocalInstance, env: Mapping[str, str]) -> None:
        """The instance's own watchdog (:func:`watch`): marked as one of its processes, so stopping
        the instance stops it too, and in a session of its own, so it outlives agentsoc."""
        root = str(Path(__file__).resolve().parents[1])
        cmd = [sys.executable, "-m", "backends.ray_jobs", "watch", str(self.state_dir), state.instance]
        cmd += ["--idle-timeout-s", str(self.idle_timeout_s), "--owner", str(os.getpid())]
        watch_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))}
        with (self.state_dir / WATCH_LOG).open("ab") as log:
            subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=watch_env,
                start_new_session=True, cwd=root,
            )  # fmt: skip

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
            # our own child: right after Popen its environment can still read empty (exec in progress)
            return self._proc.poll() is None
        try:
            os.kill(state.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        environ = _environ(state.pid)
        return environ is None or f"{INSTANCE_ENV}={state.instance}" in environ  # None: cannot tell here

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

    @property
    def run(self) -> str:
        """This run's id (:func:`run_id`), part of every submission id."""
        if self._run is None:
            self._run = run_id(self.state_dir)
        return self._run

    def submit(
        self,
        key: str,
        entrypoint: str,
        *,
        num_gpus: float,
        num_cpus: float,
        env: Mapping[str, str] | None = None,
        working_dir: Path | str | None = None,
        py_modules: Sequence[Path | str] = (),
        resources: Mapping[str, float] | None = None,
        attempt: int = 1,
    ) -> RayJob:
        """Submit attempt ``attempt`` of job ``key`` — or adopt it if Ray already has it.

        ``entrypoint`` is a shell command run on the cluster (``python`` is the node's interpreter;
        on a local instance, this environment's); ``num_gpus``/``num_cpus`` (and custom
        ``resources``) are reserved for it while it runs. ``env``, ``working_dir`` and
        ``py_modules`` become its runtime_env: Ray packs a local ``working_dir`` or module folder,
        uploads it to the cluster and puts it on the job's path on whichever node runs it. An
        adopted job keeps the entrypoint it was first submitted with.
        """
        if num_gpus < 0 or num_cpus < 0:
            raise ValueError(f"num_gpus and num_cpus must be >= 0, got {num_gpus}, {num_cpus}")
        # an attempt journaled to an instance that is gone is lost — known before starting a new one
        live = self._ensure(start=False)
        with self._lock:
            where = self._where() if live else None
        sid = self._sid(key, attempt)
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
        runtime_env: dict[str, Any] = {}
        if env:
            runtime_env["env_vars"] = dict(env)
        if working_dir is not None:
            runtime_env["working_dir"] = str(working_dir)
        if py_modules:
            runtime_env["py_modules"] = [str(m) for m in py_modules]
        spec = {
            "entrypoint": entrypoint,
            "runtime_env": runtime_env or None,
            "entrypoint_num_gpus": num_gpus,
            "entrypoint_num_cpus": num_cpus,
            "entrypoint_resources": dict(resources) if resources else None,
        }
        self._raise_if_lost(key, attempt, sid, where, record=True, spec=spec)
        try:
            self._send(client, key, attempt, sid, spec)
        except _Exists:  # another thread or process submitted it since our look-up
            return RayJob(key, attempt, sid, adopted=True)
        return RayJob(key, attempt, sid, adopted=False)

    def _send(self, client: Any, key: str, attempt: int, sid: str, spec: Mapping[str, Any]) -> None:
        self._call(
            client.submit_job,
            submission_id=sid,
            metadata={"agentsoc_run": self.run, "agentsoc_key": key, "agentsoc_attempt": str(attempt)},
            what=f"submit job {key!r}",
            **spec,
        )

    def status(self, key: str, *, attempt: int = 1) -> tuple[JobState, str]:
        """The attempt's state and Ray's message; a failed job's message ends with its last log lines.

        A job that Ray does not know although it was submitted from this state dir was lost with a
        Ray instance that is gone: ``failed``, never a wait that does not end. A job that Ray
        failed because it waited in the queue longer than the head allows is submitted again
        (the next requeue id) and is ``queued``.
        """
        sid = self._sid(key, attempt)
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
        if state in (JobState.QUEUED, JobState.FAILED):
            with self._file_lock():
                entry = self._journal().get(sid) or {}
            spec = entry.get("spec")  # what it asked for (Ray's job record does not say)
            if state is JobState.QUEUED:
                return state, _waiting(info, spec or {})
            if spec and START_TIMEOUT in str(info.error_type or ""):
                return JobState.QUEUED, self._requeue(client, key, attempt, where, spec, int(entry.get("requeue", 0)))
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

    def _requeue(
        self, client: Any, key: str, attempt: int, where: str | None, spec: Mapping[str, Any], requeue: int
    ) -> str:
        """Submit a job that Ray gave up waiting for again, exactly as it was first submitted."""
        new = submission_id(self.run, key, attempt, requeue + 1)
        self._raise_if_lost(key, attempt, new, where, record=True, spec=spec, requeue=requeue + 1)
        with contextlib.suppress(_Exists):
            self._send(client, key, attempt, new, spec)
        return f"queued: waited longer than Ray's job start timeout for {_wants(spec)}; submitted again as {new}"

    def logs_tail(self, key: str, lines: int = 20, *, attempt: int = 1) -> str:
        """The last ``lines`` lines of the attempt's output (stdout and stderr together)."""
        sid = self._sid(key, attempt)
        if not self._ensure(start=False):
            raise FatalBackendError(f"no live local Ray instance for {self.state_dir}: job {key!r} is gone")
        with self._lock:
            client = self._client
        try:
            logs = str(self._call(client.get_job_logs, sid, what=f"read the logs of job {key!r}"))
        except _NotFound:
            raise FatalBackendError(f"Ray has no job {key!r} attempt {attempt} ({sid}) at {self._url}") from None
        return "\n".join(logs.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""

    def info(self, key: str, *, attempt: int = 1) -> Any:
        """Ray's record of the attempt (``JobDetails``: status, node, resources), None if unknown."""
        if not self._ensure(start=False):
            return None
        with self._lock:
            client = self._client
        try:
            return self._call(client.get_job_info, self._sid(key, attempt), what=f"look up job {key!r}")
        except _NotFound:
            return None

    def cancel(self, key: str, *, attempt: int = 1) -> bool:
        """Ask Ray to stop the attempt; ``True`` if it was still running."""
        sid = self._sid(key, attempt)
        if not self._ensure(start=False):
            return False
        with self._lock:
            client = self._client
        try:
            return bool(self._call(client.stop_job, sid, what=f"stop job {key!r}"))
        except _NotFound:
            return False

    # ------------------------------------------------------------------ GPUs held for a server

    def hold_gpus(self, name: str, num_gpus: int, *, timeout_s: float, owner: int | None = None) -> tuple[str, str]:
        """Reserve ``num_gpus`` GPUs of this machine's Ray node for a process Ray does not run (the
        vLLM server): a job pinned to this node that asks for them and holds them while ``owner``
        (default: this process) lives. Ray never gives them to another job meanwhile.

        Returns the hold's submission id (stop it with :meth:`release`) and the devices Ray
        assigned, as ``CUDA_VISIBLE_DEVICES`` for the server. Waits (saying so once) while Ray has
        no free GPUs for it; a machine that is not a node of the cluster is an error.
        """
        self.connect()
        with self._lock:
            client, url = self._client, str(self._url)
        node = self._this_node(url)
        sid = f"agentsoc-{self.run[:8]}-hold-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:40]}-{uuid.uuid4().hex[:8]}"
        code = (
            "import os, time\n"
            "print('AGENTSOC_HOLD CUDA_VISIBLE_DEVICES=' + os.environ.get('CUDA_VISIBLE_DEVICES', ''), flush=True)\n"
            # ends (and frees the GPUs) when the owner is gone, if nobody stopped it first
            f"while os.path.exists('/proc/{owner or os.getpid()}'):\n    time.sleep(2)"
        )
        self._call(
            client.submit_job,
            entrypoint=f"python -c {shlex.quote(code)}",
            submission_id=sid,
            entrypoint_num_gpus=num_gpus,
            entrypoint_num_cpus=0,
            entrypoint_resources={node: 0.001},
            metadata={"agentsoc_run": self.run, "agentsoc_hold": name},
            what=f"reserve {num_gpus} GPU(s) for {name}",
        )
        deadline, said = time.monotonic() + timeout_s, False
        while True:
            info = self._call(client.get_job_info, sid, what=f"poll the GPU hold of {name}")
            if str(info.status) == "RUNNING":
                logs = str(self._call(client.get_job_logs, sid, what=f"read the GPU hold of {name}"))
                # at a line's start: Ray's log also echoes the entrypoint, which holds the same words
                found = re.search(r"^AGENTSOC_HOLD CUDA_VISIBLE_DEVICES=([0-9,]*)$", logs, re.M)
                if found:
                    return sid, found[1]
            elif str(info.status) != "PENDING":
                raise FatalBackendError(f"reserving {num_gpus} GPU(s) for {name} in Ray failed: {info.message}")
            elif not said:
                log.info("waiting for %d free GPU(s) on this node for %s (%s)", num_gpus, name, sid)
                said = True
            if time.monotonic() > deadline:
                self.release(sid)
                raise FatalBackendError(
                    f"Ray had no {num_gpus} free GPU(s) on this node ({node}) for {name} within {timeout_s:.0f} s: "
                    "free them, or lower server_num_gpus"
                )
            time.sleep(0.5)

    def release(self, sid: str, *, wait_s: float = 20.0) -> None:
        """End a hold (or any job) by submission id, and wait up to ``wait_s`` until Ray says it has
        ended (a stop is asynchronous): when the run exits, its GPUs are free. Quiet if it ended."""
        if not self._ensure(start=False):
            return
        with self._lock:
            client = self._client
        deadline = time.monotonic() + wait_s
        with contextlib.suppress(_NotFound, TransientBackendError, FatalBackendError):
            self._call(client.stop_job, sid, what=f"stop {sid}")
            while time.monotonic() < deadline:
                if str(self._call(client.get_job_status, sid, what=f"poll {sid}")) not in ("PENDING", "RUNNING"):
                    return
                time.sleep(0.25)

    def _this_node(self, dashboard_url: str) -> str:
        """Ray's resource naming this machine's node (``node:<ip>``): the node whose address is one
        of this machine's own."""
        list_nodes = importlib.import_module("ray.util.state").list_nodes
        try:
            nodes = list_nodes(address=dashboard_url, detail=True)
        except Exception as exc:  # the state API's errors vary by release
            raise TransientBackendError(f"Ray at {dashboard_url}: cannot list nodes: {_one_line(exc)}") from exc
        for node in nodes:
            if node.state == "ALIVE" and _is_own_address(str(node.node_ip)):
                return f"node:{node.node_ip}"
        raise FatalBackendError(
            f"this machine is not a node of the Ray cluster at {dashboard_url}, so Ray cannot reserve the vLLM "
            "server's GPUs here: run agentsoc on a GPU node of the cluster, or set server_num_gpus = 0 and keep "
            "the server's GPUs out of Ray yourself (start that node's Ray with --num-gpus excluding them)"
        )

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

    def _sid(self, key: str, attempt: int) -> str:
        """The attempt's current submission id: the last one journaled for it (a requeued job has
        a newer one), else the first it would get."""
        with self._file_lock():
            ids = [
                (int(e.get("requeue", 0)), sid)
                for sid, e in self._journal().items()
                if e.get("key") == key and e.get("attempt") == attempt and e.get("run") == self.run
            ]
        return max(ids)[1] if ids else submission_id(self.run, key, attempt)

    def _raise_if_lost(
        self,
        key: str,
        attempt: int,
        sid: str,
        where: str | None,
        *,
        record: bool = False,
        spec: Mapping[str, Any] | None = None,
        requeue: int = 0,
    ) -> None:
        """Raise :class:`JobLostError` if the journal sends ``sid`` to another instance than ``where``;
        with ``record``, journal it first-hand (write-ahead: before Ray may start it), with the
        ``spec`` it is submitted with (a requeue submits the same again)."""
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
                entry = {"id": sid, "run": self.run, "key": key, "attempt": attempt, "requeue": requeue, "at": where}
                self._append_journal({**entry, "t": time.time(), "spec": dict(spec) if spec else None})

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
        with _flock(self.state_dir / LOCK_FILE):
            yield

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


# ---------------------------------------------------------------------- the idle watchdog


def watch(state_dir: Path, instance: str, *, idle_timeout_s: float, owner: int, interval_s: float = 5.0) -> str:
    """Stop the local instance ``instance`` of ``state_dir`` once it has been idle ``idle_timeout_s``.

    Idle: no job on it is PENDING or RUNNING, and no agentsoc process holds the run — neither the
    run directory's lock (a run, or its resume) nor the process that started the instance (a
    caller without a run directory, e.g. a test). Returns why it ended. A run that still needs the
    instance later starts a new one; its finished jobs' results are on disk.
    """
    idle_since: float | None = None
    while True:
        time.sleep(interval_s)
        state = _read_state_file(state_dir)
        if state is None or state.instance != instance:
            return "the instance was stopped or replaced"
        if not _pid_alive(state.pid):
            return "the instance's head is gone (the next connect sweeps what is left)"
        if _run_held(state_dir) or _pid_alive(owner) or _has_active_jobs(state.dashboard_url):
            idle_since = None
            continue
        idle_since = idle_since if idle_since is not None else time.monotonic()
        if time.monotonic() - idle_since < idle_timeout_s:
            continue
        with _flock(state_dir / LOCK_FILE):
            state = _read_state_file(state_dir)
            if state is None or state.instance != instance:
                return "the instance was stopped or replaced"
            _kill_instance(state, grace_s=5.0)
            shutil.rmtree(state.temp_dir, ignore_errors=True)
            (state_dir / STATE_FILE).unlink(missing_ok=True)
        return f"stopped the instance after {idle_timeout_s:g} s without jobs or an agentsoc process"


def _read_state_file(state_dir: Path) -> LocalInstance | None:
    with contextlib.suppress(OSError, ValueError, TypeError):
        return LocalInstance(**json.loads((state_dir / STATE_FILE).read_text()))
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    psutil = _psutil()
    with contextlib.suppress(psutil.Error):  # a zombie (exited, not yet reaped) holds nothing
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    return True


def _run_held(state_dir: Path) -> bool:
    """Whether some process holds the run directory's lock — read from /proc/locks, never by
    taking the lock (a run starting at that moment would find it busy). Without /proc: held."""
    try:
        inode = (state_dir / RUN_LOCK_FILE).stat().st_ino
    except OSError:
        return False
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return True
    return any(
        len(f) > 5 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == str(inode)
        for f in (line.split() for line in table.splitlines())
    )


def _has_active_jobs(dashboard_url: str) -> bool:
    """Whether any job on the instance is PENDING or RUNNING (plain HTTP: no Ray import, no memory).
    A dashboard that does not answer counts as busy: never stop an instance on a hiccup."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{dashboard_url}/api/jobs/", timeout=30) as response:
            jobs = json.loads(response.read())
    except (OSError, ValueError):
        return True
    return any(str(j.get("status")) in ("PENDING", "RUNNING") for j in jobs if isinstance(j, dict))


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m backends.ray_jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("watch", help="stop a local Ray instance once it is idle (started by RayJobs)")
    w.add_argument("state_dir", type=Path)
    w.add_argument("instance")
    w.add_argument("--idle-timeout-s", type=float, required=True)
    w.add_argument("--owner", type=int, required=True, help="pid of the process that started the instance")
    args = parser.parse_args(argv)
    why = watch(args.state_dir, args.instance, idle_timeout_s=args.idle_timeout_s, owner=args.owner)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} agentsoc ray watch {args.instance[:12]}: {why}", flush=True)
    return 0


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


def _is_own_address(ip: str) -> bool:
    """Whether ``ip`` belongs to this machine (it can be bound to)."""
    with contextlib.suppress(OSError), socket.socket() as s:
        s.bind((ip, 0))
        return True
    return False


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


def _psutil() -> Any:
    """psutil, which reads processes on every OS (imported here: only a local Ray instance needs it)."""
    try:
        return importlib.import_module("psutil")
    except ImportError as exc:
        raise FatalBackendError(f"a local Ray instance needs psutil: {RAY_PIP}") from exc


def _environ(pid: int) -> list[str] | None:
    """A process's environment as ``KEY=value`` strings; ``[]`` if unreadable, None where this OS
    does not show other processes' environments."""
    psutil = _psutil()
    try:
        env = psutil.Process(pid).environ()
    except psutil.Error:  # gone, a zombie, or not ours to read
        return []
    except NotImplementedError:
        return None
    return [f"{k}={v}" for k, v in env.items()]


def _instance_pids(state: LocalInstance) -> list[int]:
    """Every process of a local instance.

    Two marks, because neither alone finds all: the INSTANCE_ENV marker in the environment (job
    processes run in sessions of their own), or the head's session together with an open file or
    working directory under the instance's temp dir — Ray's processes that rename themselves
    (``ray::DashboardAgent``, the dashboard's modules) overwrite what the OS shows of their
    environment, but they log there. (A user's ``tail -f`` of a log is in neither.)
    """
    marker, me, out = f"{INSTANCE_ENV}={state.instance}", os.getpid(), []
    for pid in _psutil().pids():
        if pid != me and (
            marker in (_environ(pid) or []) or (_session(pid) == state.pid and _uses_dir(pid, state.temp_dir))
        ):
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
    psutil = _psutil()
    try:
        proc = psutil.Process(pid)
        paths = [proc.cwd(), *(f.path for f in proc.open_files())]
    except psutil.Error:
        return False
    return any(path.startswith(prefix) for path in paths)


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


def _wants(spec: Mapping[str, Any]) -> str:
    """What a job asks of the cluster, for people: ``1 GPU(s) and 8 CPU(s)``."""
    gpus, cpus = spec.get("entrypoint_num_gpus") or 0, spec.get("entrypoint_num_cpus") or 0
    extra = "".join(f" and {v:g} {k}" for k, v in (spec.get("entrypoint_resources") or {}).items())
    return f"{gpus:g} GPU(s) and {cpus:g} CPU(s){extra}"


def _waiting(info: Any, spec: Mapping[str, Any]) -> str:
    """A PENDING job's message: what it waits for, and since when."""
    since = time.strftime("%H:%M:%S", time.localtime((info.start_time or time.time() * 1000) / 1000))
    return f"queued since {since}: waiting for {_wants(spec)} to be free on the Ray cluster"


if __name__ == "__main__":
    sys.exit(main())
