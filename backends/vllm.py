"""The ``vllm`` backend: open models at scale on existing engines (DESIGN §3b).

- **Inference**: a vLLM OpenAI-compatible server serves one base model; every finetuned agent and
  role is a LoRA adapter loaded at run time (``POST /v1/load_lora_adapter``) and named as the
  chat request's ``model``. Chat goes through the OpenAI backend's own chat path (one HTTP stack,
  one error classification) and the run's one retry layer; nothing here retries a chat.
- **Training**: one job per agent and role, ``python -m backends.trl_train JOB_DIR`` (TRL's
  ``SFTTrainer``, one process per job so a GPU's memory is free between jobs), placed by Ray
  (:mod:`backends.ray_jobs`): a local instance started for the run, or a cluster.

Model references (:mod:`backends.refs`): the base is the server's model name; a finetuned model is
``<base>+adapter:<PEFT folder>``, so the reference alone says where the adapter lives. That is
what makes a restarted server harmless: it forgets its adapters and answers 404 for their names,
and the adapter is loaded again from the path in the reference before the call is sent again.
Adapters of finished iterations are unloaded when the society releases them.

Full finetuning (``method = "full"``, the paper's open-model setting) gives ``<base>+model:<folder>``:
vLLM serves one model per server, so with ``serve = true`` each such model gets a server of its
own, started on its first call and stopped when the society releases it (size them with
``gpu_memory_utilization``: 2N + 1 servers share the GPU).

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
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2

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
from backends.local_jobs import safe_key
from backends.openai import OpenAIBackend
from backends.openai import create as create_openai
from backends.options import OpenAIOptions, VllmOptions
from backends.ray_jobs import JobLostError, RayJobs
from backends.refs import adapter_ref, model_ref, parse_ref
from backends.trl_train import LOG_FILE, RESULT_FILE, JobInput, write_inputs
from backends.vllm_server import VllmServer, tail

#: job outputs live in ``<job dir>/out`` (``JobInput.output_dir``)
OUT = "out"


def adapter_name(path: str) -> str:
    """The name an adapter is served under: readable, unique per path, stable across processes."""
    folder = Path(path)
    label = (folder.parent.name if folder.name in ("peft", "adapter") else folder.name) or "adapter"
    return f"{label[:60]}-{hashlib.sha256(path.encode()).hexdigest()[:10]}"


class VllmBackend:
    """Chat through a vLLM server with per-agent LoRA adapters; TRL jobs on Ray."""

    name = "vllm"
    capabilities = Capabilities(finetune=True, adapters=True)

    def __init__(self, options: VllmOptions, run_dir: Path, *, base_model: Path | None = None) -> None:
        self.options = options
        self.run_dir = run_dir
        self.base_model = base_model
        self.served_name = options.served_model_name or _default_name(options.model)
        self.max_loras = options.max_loras or 6
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
        self._http = httpx2.AsyncClient(timeout=options.timeout_s)
        self._started: asyncio.Task[None] | None = None
        self._loaded: dict[str, str] = {}  # adapter name -> path, as loaded on the server
        self._loading: dict[str, asyncio.Lock] = {}
        self._warned_loras = False
        self.adapters_dir = (options.adapters_dir or run_dir / "adapters").expanduser().resolve()
        head_env = {"CUDA_VISIBLE_DEVICES": options.train_devices} if options.train_devices is not None else None
        self.jobs = RayJobs(run_dir, address=options.ray_address, head_env=head_env)
        self._submitted: set[str] = set()
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
                await server.start()
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
            self._started = asyncio.ensure_future(self.server.start())
        await asyncio.shield(self._started)

    async def _post(self, route: str, body: dict[str, Any]) -> httpx2.Response:
        try:
            return await self._http.post(f"{self.root_url}/v1/{route}", json=body)
        except httpx2.TransportError as e:
            raise TransientBackendError(f"vllm backend: {route} at {self.root_url} failed: {e}") from None

    async def _load(self, name: str, path: str) -> None:
        """Load an adapter once; concurrent calls for the same adapter wait for one load."""
        lock = self._loading.setdefault(name, asyncio.Lock())
        async with lock:
            if self._loaded.get(name) == path:
                return
            response = await self._post("load_lora_adapter", {"lora_name": name, "lora_path": path})
            text = _message(response)
            if response.status_code == 200 or (response.status_code == 400 and "already been loaded" in text):
                self._loaded[name] = path
                self._warn_max_loras()
                return
            if response.status_code == 404:
                raise FatalBackendError(
                    f"vllm backend: the server at {self.root_url} cannot read adapter {path} ({text}); the server "
                    "must see adapters_dir at the same path (on a cluster: a shared disk)"
                )
            if response.status_code == 429 or (response.status_code >= 500 and "Worker failed" not in text):
                raise TransientBackendError(
                    f"vllm backend: loading adapter {path}: HTTP {response.status_code}: {text}"
                )
            raise FatalBackendError(
                f"vllm backend: the server refused adapter {path}: HTTP {response.status_code}: {text}"
            )

    def _warn_max_loras(self) -> None:
        if len(self._loaded) > self.max_loras and not self._warned_loras:
            self._warned_loras = True
            print(
                f"agentsoc: vllm: {len(self._loaded)} adapters in use but the server batches at most "
                f"{self.max_loras} per step (--max-loras): calls of different agents take turns, which costs "
                "throughput; set backend.options.max_loras to at least 2 x agents",
                file=sys.stderr,
            )

    async def _unload(self, name: str) -> None:
        self._loaded.pop(name, None)
        response = await self._post("unload_lora_adapter", {"lora_name": name})
        if response.status_code not in (200, 404):  # 404: already gone (a restarted server)
            raise FatalBackendError(
                f"vllm backend: unloading {name}: HTTP {response.status_code}: {_message(response)}"
            )

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
        return self.adapters_dir / safe_key(key)

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
        python = self.options.job_python or sys.executable
        entrypoint = f"{shlex.quote(python)} -m backends.trl_train {shlex.quote(str(job_dir))}"
        try:
            ray_job = await asyncio.to_thread(
                self.jobs.submit,
                key,
                entrypoint,
                num_gpus=self.options.num_gpus,
                num_cpus=self.options.num_cpus,
                env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
            )
        except JobLostError as e:
            raise FatalBackendError(f"job {key}: {e}") from None
        self._submitted.add(key)
        return ray_job.submission_id

    def _finished(self, key: str, base: ModelRef) -> Job | None:
        """The succeeded job whose result marker is on disk: adopted, never trained again."""
        result_file = self.job_dir(key) / OUT / RESULT_FILE
        if not result_file.is_file():
            return None
        result = json.loads(result_file.read_text())
        name, _, _ = parse_ref(base)
        made = model_ref if result.get("method") == "full" else adapter_ref
        return Job(
            key=key,
            backend=self.name,
            id=f"done:{self.job_dir(key).name}",
            base=base,
            state=JobState.SUCCEEDED,
            result=made(name, result["output"]),
            progress=1.0,
            trained_tokens=result.get("trained_tokens"),
            examples=result.get("examples"),
            truncated=result.get("truncated"),
            dropped=(result.get("dropped_too_long") or 0) + (result.get("dropped_no_target") or 0),
            events=(f"trained {result.get('steps')} steps in {result.get('seconds')} s",),
        )

    async def poll_finetune(self, job: Job) -> Job:
        done = self._finished(job.key, job.base)
        if done is not None:
            return done
        state, message = await asyncio.to_thread(self.jobs.status, job.key)
        log = self.job_dir(job.key) / OUT / LOG_FILE
        progress, events = _progress(log)
        if state is JobState.SUCCEEDED:  # Ray says done but no marker: the job did not finish its work
            state, message = JobState.FAILED, f"the job exited without {RESULT_FILE}: {message}"
        # backends.trl_train exits 2 for bad input and 3 for out of memory: the same job would fail again
        code = re.search(r"exit code (\d+)", message)
        return job.model_copy(
            update={
                "state": state,
                "progress": progress,
                "events": events,
                "error": message if state is JobState.FAILED else None,
                "retryable": not (code and code[1] in ("2", "3")),
            }
        )

    async def aclose(self) -> None:
        await self.chat.aclose()
        await self._http.aclose()
        for server, chat in self._full.values():
            await chat.aclose()
            await server.stop()
        self._full.clear()
        if self.server is not None:
            await self.server.stop()
        if self.jobs.local:
            running = [k for k in self._submitted if not (self.job_dir(k) / OUT / RESULT_FILE).is_file()]
            if running:
                print(
                    f"agentsoc: vllm: {len(running)} training job(s) still run on the local Ray instance; "
                    "it stays up so that --resume adopts them",
                    file=sys.stderr,
                )
            else:
                await asyncio.to_thread(self.jobs.stop_local)


def _message(response: httpx2.Response) -> str:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            err = body.get("error", body)
            if isinstance(err, dict) and err.get("message"):
                return str(err["message"])
    return response.text.strip()[:500]


def _progress(log: Path) -> tuple[float | None, tuple[str, ...]]:
    """Progress (0..1) and the last step lines from a job's ``train.log``."""
    lines = [line for line in tail(log, 20).splitlines() if line.strip()]
    progress = None
    with contextlib.suppress(ValueError, KeyError, IndexError, ZeroDivisionError):
        last = json.loads(lines[-1])
        progress = float(last["step"]) / float(last["total"])
    return progress, tuple(lines[-5:])


def _default_name(model: str) -> str:
    return Path(model).name if "/" in model or Path(model).exists() else model


def create(options: VllmOptions, run_dir: Path) -> VllmBackend:
    """The backend from its recipe options (:class:`backends.options.VllmOptions`).

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
    return VllmBackend(options, run_dir, base_model=base_model)
