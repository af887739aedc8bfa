"""The ``vllm`` backend: open models at scale on existing engines (DESIGN §3b).

- **Inference**: a vLLM OpenAI-compatible server serves one base model; every finetuned agent and
  role is a LoRA adapter loaded at run time (``POST /v1/load_lora_adapter``) and named as the
  chat request's ``model``. Chat goes through the OpenAI backend's own chat path (one HTTP stack,
  one error classification) and the run's one retry layer; nothing here retries a chat.
- **Training**: one job per agent and role, ``python -m backends.trl_train JOB_DIR`` (TRL's
  ``SFTTrainer``, one process per job so a GPU's memory is free between jobs), placed by Ray
  (:mod:`backends.ray_jobs`): a local instance started for the run, or a cluster. The job runs
  the node's ``python`` (or ``job_python``) with our two packages shipped as Ray ``py_modules``;
  with ``accelerate_config`` and ``num_gpus`` > 1 it runs under ``accelerate launch`` (FSDP or
  ZeRO-3), one process per GPU.

Model references (:mod:`backends.refs`): the base is the server's model name; a finetuned model is
``<base>+adapter:<PEFT folder>``, so the reference alone says where the adapter lives. That is
what makes a restarted server harmless: it forgets its adapters and answers 404 for their names,
and the adapter is loaded again from the path in the reference before the call is sent again.
Adapters of finished iterations are unloaded when the society releases them.

Full finetuning (``method = "full"``, the paper's open-model setting) gives ``<base>+model:<folder>``:
vLLM serves one model per server, so with ``serve = true`` each such model gets a server of its
own, started on its first call and stopped when the society releases it (size them with
``gpu_memory_utilization``: 2N + 1 servers take the servers' devices one each in turn;
:mod:`agentsoc.memory_plan` checks the sizes in ``--dry-run``). ``server_num_gpus`` reserves the
servers' GPUs in Ray (:meth:`backends.ray_jobs.RayJobs.hold_gpus`) so no job is placed on them.

Start-up (:func:`preflight`, from :func:`create`): the base model folder, Ray and an attached
server are checked in seconds, before any debate is paid for.

Exactly once: a job's folder (``adapters_dir/<safe key>``) holds its inputs and, when training
finished, ``out/result.json``; a resumed run reads that marker first, then asks Ray about the
job's submission id, and submits only a job that neither knows — never a second training run.

``serve = true`` starts the server as a child process (:mod:`backends.vllm_server`) from vLLM's
own environment and stops it when the run ends; ``base_url`` attaches to a running one, which must
be able to read ``adapters_dir`` (on a cluster: a shared disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import logging
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2
import openai

from agentsoc.backend import (
    Capabilities,
    FatalBackendError,
    ModelNotFoundError,
    TransientBackendError,
    cannot_score,
)
from agentsoc.types import (
    ChatExample,
    Completion,
    FinetuneSpec,
    Job,
    JobState,
    Message,
    ModelRef,
    Sampling,
    TokenLogprobs,
)
from backends.job_folder import RESULT_FILE, JobInput, key_slug, read_progress, read_result, write_inputs
from backends.openai import OpenAIBackend, api_message
from backends.openai import create as create_openai
from backends.options import OpenAIOptions, SocietyShape, VllmOptions
from backends.ray_jobs import JobLostError, RayJobs
from backends.refs import adapter_ref, model_ref, parse_ref
from backends.vllm_server import VllmServer

log = logging.getLogger(__name__)

#: job outputs live in ``<job dir>/out`` (``JobInput.output_dir``)
OUT = "out"
#: the packages a training job imports, shipped with every job (Ray's runtime_env ``py_modules``)
CODE = (Path(__file__).resolve().parents[1] / "agentsoc", Path(__file__).resolve().parent)
#: what to do about a job that exits 2 (bad input) or 3 (out of memory): it is not retried
PERMANENT_FIX = (
    "not retried: the same job fails the same way. Bad input (exit 2): fix what the line above names. "
    "Out of memory (exit 3): lower finetune.spec.batch_size (raise gradient_accumulation_steps to keep the "
    "effective batch), max_seq_len or lora_r, give each job more GPUs (num_gpus with accelerate_config), "
    "or check the plan with agentsoc run --dry-run"
)


def adapter_name(path: str) -> str:
    """The name an adapter is served under: readable, unique per path, stable across processes.

    A job's adapter lives in ``<adapters_dir>/<safe job key>/out/peft``; its name is the key's
    tail — ``iter-1_agent-0_generator-<hash>`` — so the server's logs and ``/v1/models`` say
    which agent, role and iteration it is.
    """
    folder = Path(path)
    if folder.name in ("peft", "adapter"):
        folder = folder.parent
    if folder.name == OUT:
        folder = folder.parent
    label = folder.name or "adapter"
    tail = re.search(r"iter-\d+_agent-\d+_[A-Za-z]+(?:_attempt-\d+)?", label)
    label = tail[0] if tail else label
    return f"{label[:60]}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


class VllmBackend:
    """Chat through a vLLM server with per-agent LoRA adapters; TRL jobs on Ray."""

    name = "vllm"
    capabilities = Capabilities(finetune=True, adapters=True)

    def __init__(
        self,
        options: VllmOptions,
        run_dir: Path,
        *,
        base_model: Path | None = None,
        society: SocietyShape | None = None,
    ) -> None:
        self.options = options
        self.run_dir = run_dir
        self.base_model = base_model
        self.served_name = options.served_model_name or _default_name(options.model)
        #: every agent and role at once; 6 (3 agents x 2 roles) when the society's shape is not known
        self.max_loras = options.max_loras or (society.adapters if society is not None else 6)
        self.server: VllmServer | None = None
        if options.serve:
            if base_model is None:
                raise FatalBackendError("vllm backend: serve = true needs the base model's folder")
            self.server = self._server(base_model, run_dir / "vllm-server.log", lora=True, port=options.port)
            base_url = self.server.base_url
        elif options.base_url:
            base_url = options.base_url.rstrip("/")
        else:
            raise FatalBackendError("vllm backend: set backend.options.base_url (a running server) or serve = true")
        self.base_url = base_url
        self.root_url = base_url.removesuffix("/v1")
        self.chat: OpenAIBackend = create_openai(
            OpenAIOptions(base_url=base_url, api_key_env=options.api_key_env, timeout_s=options.timeout_s), run_dir
        )
        self._started: asyncio.Task[None] | None = None
        self._loaded: dict[str, str] = {}  # adapter name -> path, as loaded on the server
        self._loading: dict[str, asyncio.Lock] = {}
        self._warned_loras = False
        self.adapters_dir = (options.adapters_dir or run_dir / "adapters").expanduser().resolve()
        head_env = {"CUDA_VISIBLE_DEVICES": options.train_devices} if options.train_devices is not None else None
        self.jobs = RayJobs(run_dir, address=options.ray_address, head_env=head_env)
        self._submitted: set[str] = set()
        #: the Ray job holding the servers' GPUs (server_num_gpus), and the devices it holds
        self._hold: tuple[str, str] | None = None
        self._servers_started = 0  #: servers go round-robin over the servers' devices
        #: fully finetuned models: folder -> (its server, the chat client talking to it)
        self._full: dict[str, tuple[VllmServer, OpenAIBackend]] = {}
        self._full_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"VllmBackend(base_url={self.base_url!r}, serve={self.server is not None})"

    # -- the servers -----------------------------------------------------------------------------
    def _server(self, model: Path, log: Path, *, lora: bool, port: int | None = None) -> VllmServer:
        o = self.options
        args = list(o.server_args)
        if o.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(o.gpu_memory_utilization)]
        return VllmServer(
            python=o.python,
            model=model,
            served_name=self.served_name,
            log_path=log,
            port=port,
            lora=(self.max_loras, o.max_lora_rank) if lora else None,
            dtype=o.dtype,
            max_model_len=o.max_model_len,
            args=args,
            env=o.server_env,
            startup_timeout_s=o.startup_timeout_s,
        )

    async def _full_model(self, folder: str) -> OpenAIBackend:
        """The chat client of a fully finetuned model's own server, started on first use."""
        async with self._full_lock:
            if folder not in self._full:
                if self.server is None:
                    raise FatalBackendError(
                        f"vllm backend: {folder} is a fully finetuned model; serving it needs a server of its own, "
                        "which the backend starts only with serve = true (or use method = 'lora')"
                    )
                log = self.run_dir / "vllm-servers" / f"{Path(folder).parent.name or 'model'}.log"
                server = self._server(Path(folder), log, lora=False)
                await self._start(server)
                chat = create_openai(
                    OpenAIOptions(
                        base_url=server.base_url, api_key_env=self.options.api_key_env, timeout_s=self.options.timeout_s
                    ),
                    self.run_dir,
                )
                self._full[folder] = (server, chat)
            return self._full[folder][1]

    async def _ready(self) -> None:
        """Start the child server once (concurrent first calls wait for the same start)."""
        if self.server is None:
            return
        if self._started is None or (self._started.done() and self._started.exception() is not None):
            self._started = asyncio.ensure_future(self._start(self.server))
        await asyncio.shield(self._started)

    async def _start(self, server: VllmServer) -> None:
        """Start a server on the servers' GPUs: those Ray holds for them (server_num_gpus; Ray then
        never places a training job on them, on one box or on a cluster), else server_env's.

        A vLLM server without tensor parallelism computes on the first device it sees, so the
        2N + 1 servers of full finetuning each get one device of the list in turn — the memory
        plan (``agentsoc run --dry-run``) counts them so.
        """
        devices = server.env.get("CUDA_VISIBLE_DEVICES")
        if self.options.server_num_gpus:
            if self._hold is None:
                self._hold = await asyncio.to_thread(
                    self.jobs.hold_gpus,
                    "vllm-server",
                    self.options.server_num_gpus,
                    timeout_s=self.options.startup_timeout_s,
                )
            devices = self._hold[1]
        if devices is not None:
            listed = [d for d in devices.split(",") if d.strip()]
            parallel = any(a.startswith(("--tensor-parallel-size", "-tp")) for a in self.options.server_args)
            if listed and not parallel:
                devices = listed[self._servers_started % len(listed)]
            server.env["CUDA_VISIBLE_DEVICES"] = devices
        self._servers_started += 1
        await server.start()

    async def _post(self, route: str, body: dict[str, Any]) -> tuple[int, str]:
        """An adapter call through the chat calls' own client: the same connection pool, headers, key
        and timeouts, and the same error mapping (a dropped connection or a 5xx is transient, with the
        URL). Only the statuses the adapter routes give meaning to come back as ``(status, message)``:
        200, 400 ("already loaded") and 404 (unreadable path, or an adapter a restarted server forgot)."""
        try:
            text = await self.chat.client.post(f"/{route}", cast_to=str, body=body)
        except openai.APIStatusError as e:
            text = api_message(e)
            # 400/404 have a meaning here; a 500 "Worker failed" is an adapter the server cannot use, not
            # a passing fault
            if e.status_code in (400, 404) or (e.status_code >= 500 and "Worker failed" in text):
                return e.status_code, text
            raise self.chat.map_error(e, route, str(body.get("lora_name", ""))) from None
        except Exception as e:
            raise self.chat.map_error(e, route, str(body.get("lora_name", ""))) from None
        return 200, str(text)

    async def _load(self, name: str, path: str) -> None:
        """Load an adapter once; concurrent calls for the same adapter wait for one load."""
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            if self._loaded.get(name) == path:
                return
            status, text = await self._post("load_lora_adapter", {"lora_name": name, "lora_path": path})
            if status == 200 or (status == 400 and "already been loaded" in text):
                self._loaded[name] = path
                self._warn_max_loras()
                return
            if status == 404:
                raise FatalBackendError(
                    f"vllm backend: the server at {self.root_url} cannot read adapter {path} ({text}); the server "
                    "must see adapters_dir at the same path (on a cluster: a shared disk)"
                )
            raise FatalBackendError(f"vllm backend: the server refused adapter {path}: HTTP {status}: {text}")

    def _warn_max_loras(self) -> None:
        if len(self._loaded) > self.max_loras and not self._warned_loras:
            self._warned_loras = True
            log.warning(
                "vllm: %d adapters in use but the server batches at most %d per step (--max-loras): calls of "
                "different agents take turns, which costs throughput; set backend.options.max_loras to at least "
                "2 x agents",
                len(self._loaded),
                self.max_loras,
            )

    async def _unload(self, name: str) -> None:
        self._loaded.pop(name, None)
        status, text = await self._post("unload_lora_adapter", {"lora_name": name})
        if status == 400:  # 404 is fine: already gone (a restarted server)
            raise FatalBackendError(f"vllm backend: unloading {name}: HTTP {status}: {text}")

    # -- Backend ---------------------------------------------------------------------------------
    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        await self._ready()
        base, kind, path = parse_ref(model)
        if kind == "model" and path is not None:
            out = await (await self._full_model(path)).complete(self.served_name, messages, sampling)
            return out.model_copy(update={"model": model})
        if path is None:
            return await self.chat.complete(base, messages, sampling)
        name = adapter_name(path)
        await self._load(name, path)
        try:
            out = await self.chat.complete(name, messages, sampling)
        except ModelNotFoundError:
            # the server forgot the adapter (it restarted): load it again from its path and resend
            self._loaded.pop(name, None)
            await self._load(name, path)
            out = await self.chat.complete(name, messages, sampling)
        return out.model_copy(update={"model": model})

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        raise cannot_score(self.name)

    async def release(self, models: Sequence[ModelRef]) -> None:
        """Unload the adapters (stop the servers) of models no agent uses any more (an earlier iteration's)."""
        for model in models:
            _, kind, path = parse_ref(model)
            if kind == "adapter" and path is not None and adapter_name(path) in self._loaded:
                await self._unload(adapter_name(path))
            elif kind == "model" and path is not None and path in self._full:
                server, chat = self._full.pop(path)
                await chat.aclose()
                await server.stop()

    def job_dir(self, key: str) -> Path:
        return self.adapters_dir / key_slug(key)

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        if spec.method == "full" and self.server is None:
            raise FatalBackendError(
                f"job {key}: method = 'full' needs serve = true: each fully finetuned model is served by a vLLM "
                "server of its own, which the backend starts (use method = 'lora' with a server you run yourself)"
            )
        if spec.method == "lora" and spec.lora_r > self.options.max_lora_rank:
            raise FatalBackendError(
                f"job {key}: finetune.spec.lora_r = {spec.lora_r} exceeds backend.options.max_lora_rank = "
                f"{self.options.max_lora_rank}: the server could not load the adapter; raise max_lora_rank"
            )
        done = self._finished(key, base)
        if done is not None:
            return done
        job_dir = self.job_dir(key)
        if not (job_dir / "job.json").is_file():
            write_inputs(job_dir, self._job_input(base, key), examples, spec)
        job_id = await self._submit(key, job_dir)
        return Job(key=key, backend=self.name, id=job_id, base=base, state=JobState.QUEUED)

    def _job_input(self, base: ModelRef, key: str) -> JobInput:
        if self.base_model is None:
            raise FatalBackendError(
                f"job {key}: the vllm backend trains from a transformers folder: set backend.options.model to one"
            )
        _, kind, path = parse_ref(base)
        return JobInput(
            base_model=Path(path) if kind == "model" and path else self.base_model,
            init_adapter=Path(path) if kind == "adapter" and path else None,
            output_dir=Path(OUT),
            precision=self.options.precision,
            lora_targets=self.options.lora_targets,
        )

    async def _submit(self, key: str, job_dir: Path) -> str:
        # the node's interpreter (on a local instance: this environment's, first on its PATH); our
        # code travels with the job as py_modules, so a worker needs only the training stack
        python = self.options.job_python or "python"
        command = [python, *launcher(self.options), "-m", "backends.trl_train", str(job_dir)]
        entrypoint = shlex.join(command)
        try:
            ray_job = await asyncio.to_thread(
                self.jobs.submit,
                key,
                entrypoint,
                num_gpus=self.options.num_gpus,
                num_cpus=self.options.num_cpus,
                env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
                py_modules=CODE,
            )
        except JobLostError as e:
            raise FatalBackendError(f"job {key}: {e}") from None
        self._submitted.add(key)
        return ray_job.submission_id

    def _finished(self, key: str, base: ModelRef) -> Job | None:
        """The succeeded job whose result marker is on disk: adopted, never trained again."""
        result = read_result(self.job_dir(key))
        if result is None:
            return None
        name, _, _ = parse_ref(base)
        made = model_ref if result.method == "full" else adapter_ref
        return Job(
            key=key,
            backend=self.name,
            id=f"done:{self.job_dir(key).name}",
            base=base,
            state=JobState.SUCCEEDED,
            result=made(name, result.output),
            events=(f"trained {result.steps} steps in {result.seconds} s",),
            **result.job_fields(),
        )

    async def poll_finetune(self, job: Job) -> Job:
        done = self._finished(job.key, job.base)
        if done is not None:
            return done
        state, message = await asyncio.to_thread(self.jobs.status, job.key)
        progress, events = read_progress(self.job_dir(job.key))
        if state is JobState.QUEUED:  # waiting for a GPU is not a failure: say what it waits for
            events = (*events, message)
        if state is JobState.SUCCEEDED:  # Ray says done but no marker: the job did not finish its work
            state, message = JobState.FAILED, f"the job exited without {RESULT_FILE}: {message}"
        # backends.trl_train exits 2 for bad input and 3 for out of memory: the same job would fail again
        code = re.search(r"exit code (\d+)", message)
        permanent = bool(code and code[1] in ("2", "3"))
        if permanent:
            message = f"{message}\n{PERMANENT_FIX}"
        return job.model_copy(
            update={
                "state": state,
                "progress": progress,
                "events": events,
                "error": message if state is JobState.FAILED else None,
                "retryable": not permanent,
            }
        )

    async def aclose(self) -> None:
        await self.chat.aclose()
        for server, chat in self._full.values():
            await chat.aclose()
            await server.stop()
        self._full.clear()
        if self.server is not None:
            await self.server.stop()
        if self._hold is not None:
            await asyncio.to_thread(self.jobs.release, self._hold[0])
            self._hold = None
        if self.jobs.local:
            running = [k for k in self._submitted if await self._still_running(k)]
            if running:
                log.info(
                    "vllm: %d training job(s) still run on the local Ray instance; it stays up so that --resume "
                    "adopts them",
                    len(running),
                )
            else:
                await asyncio.to_thread(self.jobs.stop_local)

    async def _still_running(self, key: str) -> bool:
        """Whether a submitted job may still train: no result yet and Ray does not call it ended
        (a failed job does not keep the local instance up)."""
        if read_result(self.job_dir(key)) is not None:
            return False
        try:
            state, _ = await asyncio.to_thread(self.jobs.status, key)
        except (TransientBackendError, FatalBackendError):
            return True  # unknown: keep the instance (its watchdog stops it once idle)
        return not state.terminal


#: ``accelerate launch`` flags of each accelerate_config: full sharding of weights, gradients and
#: optimizer states over the job's GPUs in bf16 — what makes full finetuning of a 7-8B model fit
#: (16 bytes per parameter, ~125 GB, over 2+ GPUs of 80 GB). Flags, not a config file, so nothing
#: but our code has to reach the worker. Not run here (no GPUs): bench/gpu_check.sh is one GPU.
ACCELERATE: dict[str, tuple[str, ...]] = {
    "fsdp": (
        "--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type", "FULL_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true",
        "--fsdp_reshard_after_forward", "true", "--mixed_precision", "bf16",
    ),
    "deepspeed": (
        "--use_deepspeed", "--zero_stage", "3", "--zero3_init_flag", "true", "--zero3_save_16bit_model", "true",
        "--mixed_precision", "bf16",
    ),
}  # fmt: skip


def launcher(options: VllmOptions) -> list[str]:
    """What runs between the interpreter and ``-m backends.trl_train``: nothing for a one-GPU job;
    ``-m accelerate.commands.launch`` with one process per GPU for a sharded one."""
    gpus = int(options.num_gpus)
    if options.accelerate_config is None or gpus <= 1:
        return []
    flags = ACCELERATE[options.accelerate_config]
    return ["-m", "accelerate.commands.launch", "--num_processes", str(gpus), "--num_machines", "1", *flags]


def _default_name(model: str) -> str:
    return Path(model).name if "/" in model or Path(model).exists() else model


def create(options: VllmOptions, run_dir: Path, *, society: SocietyShape | None = None) -> VllmBackend:
    """The backend from its recipe options (:class:`backends.options.VllmOptions`), checked before
    any paid work (:func:`preflight`).

    ``model`` is a transformers folder, or the bundled model's name: then its transformers copy
    (dequantised once from the bundled GGUF into the cache) is both served and trained.
    """
    from backends import bundled

    if options.model in bundled.BUNDLED:
        from backends.hf import hf_copy

        base_model: Path | None = hf_copy(bundled.resolve_model_path(None, options.model))
    else:
        folder = Path(options.model).expanduser()
        base_model = folder.resolve() if folder.exists() else None
    if base_model is None and options.serve:
        raise FatalBackendError(
            f"vllm backend: model {options.model!r} is neither a transformers folder nor a bundled model "
            f"({', '.join(bundled.BUNDLED)})"
        )
    preflight(options, run_dir, base_model)
    return VllmBackend(options, run_dir, base_model=base_model, society=society)


def preflight(o: VllmOptions, run_dir: Path, base_model: Path | None) -> None:
    """Every endpoint and path the run will need, checked in seconds at start-up — not after the
    debates: the trainer's base model, Ray (a cluster answers; a local instance can be started),
    an attached server (it answers and serves the model)."""
    where = "backend.options"
    if base_model is None:
        raise FatalBackendError(
            f"vllm backend: {where}.model = {o.model!r} is not a folder here, and the training jobs load the base "
            "model from a transformers folder: set model to one (on a cluster: a path on a disk every node shares)"
        )
    if not (base_model / "config.json").is_file():
        raise FatalBackendError(
            f"vllm backend: {where}.model: {base_model} has no config.json; the training jobs need a "
            "transformers model folder"
        )
    if o.ray_address:
        RayJobs(run_dir, address=o.ray_address).connect()  # one line naming ray_address if it does not answer
    elif importlib.util.find_spec("ray") is None:
        raise FatalBackendError(
            "vllm backend: training jobs run on Ray, which is not installed: pip install -e '.[scale]' in the "
            "agentsoc checkout"
        )
    if not o.serve and o.base_url:
        root = o.base_url.rstrip("/").removesuffix("/v1")
        try:
            response = httpx2.get(f"{root}/v1/models", timeout=10.0)
        except httpx2.TransportError as e:
            raise FatalBackendError(
                f"vllm backend: no server answers at {where}.base_url = {o.base_url} ({e}); start it, or set "
                "serve = true"
            ) from None
        served = [m.get("id") for m in (_json(response).get("data") or []) if isinstance(m, dict)]
        name = o.served_model_name or _default_name(o.model)
        if response.status_code == 200 and served and name not in served:
            raise FatalBackendError(
                f"vllm backend: the server at {o.base_url} serves {', '.join(map(str, served))}, not "
                f"{name!r}: set served_model_name (or model) to the name it serves"
            )


def _json(response: httpx2.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            return body
    return {}
