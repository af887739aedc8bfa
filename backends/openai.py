"""The OpenAI backend: chat completions, fine-tuning jobs and (optionally) the Batch API.

Built on ``openai.AsyncOpenAI`` with ``max_retries=0``: retries live in exactly one layer, the
``Retrying`` wrapper (DESIGN §3, ecosystem.md finding 6). This module only *classifies* failures —
429/5xx/timeouts/dropped connections/malformed bodies are transient (with the server's Retry-After),
400/401/403/404 are fatal with a message naming the model and the call. Any OpenAI-compatible
``base_url`` (vLLM, llama.cpp server) works for inference.

Fine-tuning is where money and time are lost, so :meth:`OpenAIBackend.submit_finetune` checks
everything it can before spending: the training set (OpenAI's documented limits), the base model
(shut down? gone?), an existing job with the same key (adopt-before-create, because job creation
is not idempotent — finding 3), and a file already uploaded for the same key and content (recorded
in ``run_dir/openai/uploads/``, one file per key, or — after a kill between the upload and that
record — found in ``files.list`` by its name, which carries the key and content hashes).

The API key is read from the environment variable the recipe names, never from the recipe, and is
scrubbed from every error message this module produces. A key that cannot be an HTTP header value
is caught when the backend is built (surrounding whitespace — a pasted trailing newline — is
stripped with a warning; any other space, control or non-ASCII character is refused), because the
HTTP client would refuse it on every call and the retries would hide that for minutes.
:meth:`OpenAIBackend.check` probes the endpoint before the first stage for the same reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import hashlib
import json
import logging
import os
import re
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI
from openai.types import FileObject, Model
from openai.types.fine_tuning import FineTuningJob
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_fixed

from agentsoc.atomic import write_atomic
from agentsoc.backend import (
    BackendError,
    Capabilities,
    FatalBackendError,
    ModelNotFoundError,
    TransientBackendError,
    cannot_score,
)
from agentsoc.options import OptionProblem, OptionsError
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
    Usage,
)
from backends.openai_batch import Batcher
from backends.openai_files import (
    MIN_EXAMPLES,
    RecordDir,
    base_name,
    content_hash,
    describe,
    load_json,
    shutdown_date,
    training_jsonl,
    upload_name,
    validate,
)
from backends.openai_files import expect as _expect
from backends.options import OpenAIOptions

log = logging.getLogger(__name__)

#: From this day OpenAI accepts no new fine-tuning jobs from anyone; the last day was 2027-01-05
#: (OpenAI's deprecations page, 2026-05-07; ecosystem.md finding 1).
NO_NEW_JOBS_FROM = dt.date(2027, 1, 6)
#: OpenAI's gates on creating fine-tuning jobs (deprecations page, 2026-05-07), named in its refusals
OPENAI_GATES = (
    "OpenAI refuses new fine-tuning jobs from organisations that never fine-tuned (since 2026-05-07), from "
    "those without fine-tuned-model inference in the last 60 days (since 2026-07-02), and from everyone "
    f"from {NO_NEW_JOBS_FROM}"
)
_STATUS = {
    "validating_files": JobState.QUEUED,
    "queued": JobState.QUEUED,
    "running": JobState.RUNNING,
    "pausing": JobState.RUNNING,
    "paused": JobState.RUNNING,
    "succeeded": JobState.SUCCEEDED,
    "failed": JobState.FAILED,
    "cancelled": JobState.CANCELLED,
}
#: error codes of failed fine-tuning jobs that a new job may get past (everything else — an invalid
#: file, too few examples, a policy refusal — would fail the same way and is not resubmitted)
_TRANSIENT_JOB_CODES = {"server_error", "internal_error", "internal_server_error", "rate_limit_exceeded", "timeout"}
#: OpenAI limits metadata values to 512 characters.
_METADATA_MAX = 512
#: the start-up probe: seconds per try (to connect, and in all), and tries before an unreachable
#: endpoint stops the run (3 tries 1 s apart: a blip at start-up is not a dead endpoint)
PROBE_TIMEOUT_S = 10.0
PROBE_CONNECT_S = 5.0
PROBE_TRIES = 3
#: seconds to open a connection: an unreachable host is named in seconds, not after ``timeout_s``
CONNECT_TIMEOUT_S = 10.0
_LOCAL_HINT = (
    "use a hosted or local recipe instead: recipes/arithmetic-tinker.toml (the tinker backend: LoRA on open "
    "models at a Tinker-API provider, billed per token), recipes/arithmetic-vllm.toml (open models on vLLM, your "
    "GPUs) or recipes/arithmetic-local.toml (the local backend: llama.cpp + LoRA on this machine) as a template"
)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, ``retry-after`` seconds or HTTP date."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max((parsed - dt.datetime.now(dt.UTC)).total_seconds(), 0.0) if parsed else None


def connection_problem(e: BaseException) -> str:
    """What went wrong opening a connection, in words (``connection refused``), from the cause chain."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "unknown host"
        if isinstance(cause, TimeoutError | openai.APITimeoutError | httpx2.TimeoutException):
            return "no answer (timed out)"
        cause = cause.__cause__ or cause.__context__
    inner = e.__cause__ if isinstance(e, openai.APIConnectionError) and e.__cause__ else e
    return f"connection failed: {inner}"


def api_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return e.message


def _names_model(e: openai.APIStatusError, model: str) -> bool:
    """Whether a 404 says the *model* is unknown (OpenAI: code ``model_not_found``; vLLM and llama.cpp
    name the model in the message), rather than the path — a wrong base URL also answers 404."""
    body = e.body
    err = body.get("error", body) if isinstance(body, dict) else None
    if isinstance(err, dict) and err.get("code") == "model_not_found":
        return True
    return bool(model) and model in api_message(e)


class OpenAIBackend:
    """The Backend over the OpenAI API (or any OpenAI-compatible server for inference)."""

    name = "openai"
    capabilities = Capabilities(finetune=True, min_finetune_examples=MIN_EXAMPLES)

    def __init__(
        self,
        client: AsyncOpenAI,
        *,
        run_dir: Path,
        secret: str,
        batch: bool = False,
        batch_window_s: float = 2.0,
        batch_poll_s: float = 30.0,
        weight_support: bool = True,
        today: dt.date | None = None,
        key_env: str = "OPENAI_API_KEY",
    ) -> None:
        self.client = client
        self.key_env = key_env
        self.state_dir = run_dir / "openai"
        self.weight_support = weight_support
        self._secret = secret
        self._today = today
        self._uploads = RecordDir(self.state_dir / "uploads")
        #: uploads recorded by earlier versions (one shared file), read but never written
        self._legacy_uploads = load_json(self.state_dir / "uploads.json")
        self._upload_locks: dict[str, asyncio.Lock] = {}
        self._batcher = (
            Batcher(
                client,
                RecordDir(self.state_dir / "batches"),
                legacy=load_json(self.state_dir / "batches.json"),
                window_s=batch_window_s,
                poll_s=batch_poll_s,
                map_error=self.map_error,
            )
            if batch
            else None
        )
        if batch:
            # calls wait hours in a batch: they must not hold concurrency slots (see Limited)
            self.capabilities = self.capabilities.model_copy(update={"queued": True})

    def __repr__(self) -> str:
        return f"OpenAIBackend(base_url={str(self.client.base_url)!r}, batch={self._batcher is not None})"

    # -- errors ---------------------------------------------------------------------------------
    def scrub(self, text: str) -> str:
        """``text`` with the API key (and any bearer token) blanked out."""
        if self._secret:
            text = text.replace(self._secret, "***")
        return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)

    @property
    def base_url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    def not_found_hint(self, e: openai.APIStatusError, model: str) -> str:
        """Why a 404 came back: a model OpenAI shut down, a model this server does not have, or no
        such route at all (a wrong ``base_url`` — the usual cause with a self-hosted server)."""
        if not _names_model(e, model):
            return (
                f" ({self.base_url} has no such route or model: check backend.options.base_url — an "
                "OpenAI-compatible server answers under .../v1)"
            )
        day = shutdown_date(model)
        if day is not None and day <= self._now():
            return f" (OpenAI shut {base_name(model)} down on {day}, and every model finetuned from it; {_LOCAL_HINT})"
        return f" (no model {model} at {self.base_url}: check the name, or that this server serves it)"

    def map_error(self, e: Exception, call: str, model: str) -> BackendError:
        """Classify an SDK/transport failure: transient (retry may help) or fatal (it cannot)."""
        if isinstance(e, BackendError):
            return e
        if isinstance(e, openai.APIStatusError):
            status = e.status_code
            text = f"openai {call} for model {model}: HTTP {status}: {api_message(e)}"
            if status in (408, 409, 429) or status >= 500:
                return TransientBackendError(self.scrub(text), retry_after=_retry_after(e.response.headers))
            if status == 404:
                return ModelNotFoundError(self.scrub(text + self.not_found_hint(e, model)))
            return FatalBackendError(self.scrub(text))
        if isinstance(e, openai.APITimeoutError):
            return TransientBackendError(self.scrub(f"openai {call} for model {model}: timed out ({self.base_url})"))
        if isinstance(e, openai.APIConnectionError | httpx2.TransportError):
            # "connection refused at http://…": the words a person needs to see the endpoint is down
            return TransientBackendError(
                self.scrub(f"openai {call} for model {model}: {connection_problem(e)} at {self.base_url}")
            )
        if isinstance(e, openai.APIResponseValidationError | ValueError | KeyError | TypeError | AttributeError):
            # a truncated or malformed body (the SDK fails while building its objects from it, e.g. a
            # page from a string): the same request will most likely get a good one
            return TransientBackendError(self.scrub(f"openai {call} for model {model}: malformed response: {e}"))
        return FatalBackendError(self.scrub(f"openai {call} for model {model}: {type(e).__name__}: {e}"))

    # -- start-up probe --------------------------------------------------------------------------
    async def check(self, models: Sequence[ModelRef]) -> None:
        """Before the first stage: is the endpoint there, does it take the key, has it the models?

        One ``models.retrieve`` per model, with a short timeout. Unreachable after
        :data:`PROBE_TRIES` tries, a refused key (401), or a 404 that names the model stops the run
        in seconds, with the URL and what to check. Anything else (403 from a key limited to chat,
        429, 5xx, a server without that route) shows the endpoint is there: the run goes on and its
        calls, with their retries, tell the rest.
        """
        client = self.client.with_options(timeout=httpx2.Timeout(PROBE_TIMEOUT_S, connect=PROBE_CONNECT_S))

        def tell(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            problem = connection_problem(exc) if exc is not None else "no answer"
            log.warning(
                "%s: %s; trying again (%d of %d)", self.base_url, problem, state.attempt_number + 1, PROBE_TRIES
            )

        # unreachable is the one failure worth a few quick tries (a server still starting); the rest
        # answers in one request
        reach = AsyncRetrying(
            stop=stop_after_attempt(PROBE_TRIES),
            wait=wait_fixed(1.0),
            retry=retry_if_exception_type((openai.APITimeoutError, openai.APIConnectionError)),
            before_sleep=tell,
            reraise=True,
        )
        for model in dict.fromkeys(models):
            try:
                await reach(client.models.retrieve, model)
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                raise FatalBackendError(
                    self.scrub(
                        f"cannot reach {self.base_url}: {connection_problem(e)} ({PROBE_TRIES} tries); "
                        "check backend.options.base_url, that the server is running, and the network"
                    )
                ) from None
            except openai.AuthenticationError as e:
                raise FatalBackendError(
                    self.scrub(
                        f"{self.base_url} refused the API key in {self.key_env} (models.retrieve for model "
                        f"{model}: HTTP 401: {api_message(e)}); set {self.key_env} to a valid key"
                    )
                ) from None
            except openai.NotFoundError as e:
                if _names_model(e, model):
                    raise ModelNotFoundError(
                        self.scrub(f"model {model} is not served at {self.base_url}" + self.not_found_hint(e, model))
                    ) from None
            except Exception:  # the endpoint answered: that is all the probe asks
                pass

    # -- chat -----------------------------------------------------------------------------------
    @staticmethod
    def chat_body(model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> dict[str, Any]:
        """The request body of one chat call; the same for the online and the Batch API path."""
        body: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        return body

    async def _chat(self, body: dict[str, Any], model: ModelRef) -> dict[str, Any]:
        """One online chat call; the answer's JSON body as a dict.

        Sent with ``client.post`` — the SDK's documented way to send a request as it is, with the
        client's auth, base URL, timeout and error classes — rather than ``chat.completions.create``:
        that one passes the body through its TypedDict transform and builds pydantic objects from the
        answer, which we turned back into a dict. Measured at concurrency 32, that cost ~1.9 ms of
        event-loop CPU per call against ~1.2 ms this way; the loop's CPU per call is what stretches
        a burst of calls (bench/openai_throughput.py).
        """
        try:
            response = await self.client.post("/chat/completions", body=body, cast_to=httpx2.Response)
            data = json.loads(response.content)
        except Exception as e:  # a truncated body fails json.loads (ValueError): transient, as map_error says
            raise self.map_error(e, "chat.completions.create", model) from None
        if not isinstance(data, dict):
            raise TransientBackendError(
                self.scrub(f"openai chat.completions.create for model {model}: malformed response")
            )
        return data

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        body = self.chat_body(model, messages, sampling)
        data = await (self._batcher.submit(body) if self._batcher is not None else self._chat(body, model))
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Completion(
                text=choice["message"]["content"] or "",
                usage=Usage(
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                ),
                model=model,
                finish_reason=choice.get("finish_reason"),
            )
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise self.map_error(e, "chat.completions.create", model) from None

    # -- fine-tuning ----------------------------------------------------------------------------
    def _now(self) -> dt.date:
        return self._today or dt.datetime.now(dt.UTC).date()

    async def preflight(self, base: ModelRef, where: str) -> None:
        """Refuse a base model that is shut down or gone, and any job after OpenAI's cut-off."""
        today = self._now()
        if today >= NO_NEW_JOBS_FROM:
            raise FatalBackendError(
                f"fine-tuning {where} on {base}: OpenAI stopped new fine-tuning jobs on {NO_NEW_JOBS_FROM}; "
                + _LOCAL_HINT
            )
        try:
            model = _expect(await self.client.models.retrieve(base), Model, "models.retrieve", base)
        except openai.NotFoundError as e:
            raise FatalBackendError(
                self.scrub(
                    f"fine-tuning {where}: model {base} does not exist at this endpoint" + self.not_found_hint(e, base)
                )
            ) from None
        except Exception as e:
            raise self.map_error(e, "models.retrieve", base) from None
        shutdown = getattr(model, "shutdown_date", None)
        if shutdown:
            try:
                day = dt.date.fromisoformat(str(shutdown)[:10])
            except ValueError:
                day = None
            if day is not None and day <= today:
                raise FatalBackendError(
                    f"fine-tuning {where}: model {base} was shut down on {day}; OpenAI stopped new fine-tuning "
                    f"jobs on it (and stops all new jobs on {NO_NEW_JOBS_FROM}); " + _LOCAL_HINT
                )

    @staticmethod
    def job_tag(key: str) -> str:
        """The metadata value that identifies a job by its key (hashed when too long for OpenAI)."""
        if len(key) <= _METADATA_MAX:
            return key
        return "sha256:" + hashlib.sha256(key.encode()).hexdigest()

    async def _adopt(self, key: str, base: ModelRef) -> Any | None:
        """An existing job with this key that has not failed: a resumed run must not pay twice."""
        try:
            page = await self.client.fine_tuning.jobs.list(metadata={"agentsoc_key": self.job_tag(key)}, limit=100)
        except Exception as e:
            raise self.map_error(e, "fine_tuning.jobs.list", base) from None
        for job in page.data:
            if (job.metadata or {}).get("agentsoc_key") == self.job_tag(key) and job.status not in (
                "failed",
                "cancelled",
            ):
                return job
        return None

    async def _upload(self, key: str, data: bytes, base: ModelRef) -> str:
        """The file id of ``data`` for ``key``, uploaded at most once per key and content.

        Reused, in this order: the upload recorded for ``key`` (its own record file); an upload of the
        same content recorded for another key (a resubmitted job's earlier attempt); a file on the
        server whose name marks it as ours with this content (uploaded by a process killed before
        it wrote the record, or whose answer was lost); only then a new upload. The per-content
        lock keeps two calls of one process from both missing the record and both uploading.
        """
        digest = content_hash(data)
        async with self._upload_locks.setdefault(digest, asyncio.Lock()):
            seen = self._uploads.get(key) or self._legacy_uploads.get(key)
            if seen and seen.get("sha256") == digest:
                return str(seen["file_id"])
            # a new attempt of a failed job (key ``…#attempt-2``) trains on the same bytes: reuse the file
            same = next((r for r in self._uploads.all().values() if r.get("sha256") == digest), None)
            if same is not None:
                self._uploads.put(key, {"sha256": digest, "file_id": same["file_id"], "filename": same["filename"]})
                return str(same["file_id"])
            name = upload_name(key, digest)
            file_id = await self._find_upload(digest, base)
            if file_id is None:
                write_atomic(self.state_dir / name, data)  # the training file as sent, for people
                try:
                    uploaded = _expect(
                        await self.client.files.create(file=(name, data), purpose="fine-tune"),
                        FileObject,
                        "files.create",
                        base,
                    )
                except Exception as e:
                    raise self.map_error(e, "files.create", base) from None
                file_id = uploaded.id
            self._uploads.put(key, {"sha256": digest, "file_id": file_id, "filename": name})
            return file_id

    async def _find_upload(self, digest: str, base: ModelRef) -> str | None:
        """The id of a usable fine-tune file on the server whose name marks it as ours with this
        content (any key's: the bytes are what the job trains on), if there is one."""
        tail = upload_name("", digest).rsplit("-", 1)[1]  # "<digest[:16]>.jsonl"
        try:
            async for f in self.client.files.list(purpose="fine-tune", limit=10_000):
                if f.filename.startswith("agentsoc-") and f.filename.endswith("-" + tail) and f.status != "error":
                    return str(f.id)
        except Exception as e:
            raise self.map_error(e, "files.list", base) from None
        return None

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        where = describe(key, spec.metadata)
        validate(examples, base, key, spec.metadata, weights=self.weight_support)
        await self.preflight(base, where)
        existing = await self._adopt(key, base)
        if existing is not None:
            return await self._to_job(key, base, existing, events=False)
        file_id = await self._upload(key, training_jsonl(examples, weights=self.weight_support), base)
        metadata = {k: v[:_METADATA_MAX] for k, v in list(spec.metadata.items())[:15]}
        metadata["agentsoc_key"] = self.job_tag(key)
        try:
            created = await self.client.fine_tuning.jobs.create(
                model=base,
                training_file=file_id,
                method={
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {
                            "n_epochs": spec.epochs,
                            "batch_size": spec.batch_size,
                            "learning_rate_multiplier": spec.learning_rate_multiplier,
                        }
                    },
                },
                suffix=self._suffix(spec),
                seed=spec.seed,
                metadata=metadata,
            )
        except openai.APIStatusError as e:
            if e.status_code in (400, 403, 404):
                raise FatalBackendError(
                    self.scrub(
                        f"OpenAI refused to create fine-tuning {where} on {base}: HTTP {e.status_code}: "
                        f'"{api_message(e)}". The likely cause: this organisation is not eligible — '
                        f"{OPENAI_GATES}; " + _LOCAL_HINT
                    )
                ) from None
            raise self.map_error(e, "fine_tuning.jobs.create", base) from None
        except Exception as e:
            raise self.map_error(e, "fine_tuning.jobs.create", base) from None
        return await self._to_job(
            key, base, _expect(created, FineTuningJob, "fine_tuning.jobs.create", base), events=False
        )

    @staticmethod
    def _suffix(spec: FinetuneSpec) -> str:
        """A readable model-name suffix (``i1-a0-critic``); OpenAI allows up to 64 characters."""
        if spec.suffix:
            raw = spec.suffix
        else:
            m = spec.metadata
            raw = f"i{m.get('iteration', 'x')}-a{m.get('agent', 'x')}-{m.get('role', 'model')}"
        return re.sub(r"[^A-Za-z0-9_-]", "-", raw)[:64]

    async def poll_finetune(self, job: Job) -> Job:
        try:
            remote = _expect(
                await self.client.fine_tuning.jobs.retrieve(job.id),
                FineTuningJob,
                "fine_tuning.jobs.retrieve",
                job.base,
            )
        except Exception as e:
            raise self.map_error(e, f"fine_tuning.jobs.retrieve {job.id}", job.base) from None
        return await self._to_job(job.key, job.base, remote, events=True)

    async def _to_job(self, key: str, base: ModelRef, remote: Any, *, events: bool) -> Job:
        state = _STATUS.get(remote.status, JobState.QUEUED)
        lines: tuple[str, ...] = ()
        if events:
            try:
                page = await self.client.fine_tuning.jobs.list_events(remote.id, limit=50)
            except Exception as e:
                raise self.map_error(e, f"fine_tuning.jobs.list_events {remote.id}", base) from None
            lines = tuple(f"{ev.level}: {ev.message}" for ev in reversed(page.data))
        error = None
        retryable = True
        if state in (JobState.FAILED, JobState.CANCELLED):
            message = remote.error.message if remote.error is not None and remote.error.message else None
            code = remote.error.code if remote.error is not None and remote.error.code else ""
            error = self.scrub(f'OpenAI says: "{message}"') if message else f"OpenAI reports the job {remote.status}"
            if code:
                error += f" [{code}]"
            # only a server-side failure is worth a new job; a rejected file fails the same way again
            retryable = state is JobState.CANCELLED or code in _TRANSIENT_JOB_CODES
        return Job(
            key=key,
            backend=self.name,
            id=remote.id,
            base=base,
            state=state,
            result=remote.fine_tuned_model if state is JobState.SUCCEEDED else None,
            error=error,
            progress=1.0 if state is JobState.SUCCEEDED else None,
            events=lines,
            trained_tokens=remote.trained_tokens,
            retryable=retryable,
        )

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        raise cannot_score(self.name)

    async def release(self, models: Sequence[ModelRef]) -> None:
        return None

    async def aclose(self) -> None:
        if self._batcher is not None:
            await self._batcher.aclose()
        await self.client.close()


def create(options: OpenAIOptions, run_dir: Path) -> OpenAIBackend:
    """The backend from its recipe options (:class:`backends.options.OpenAIOptions`).

    The key comes from the environment variable ``api_key_env`` names, never from the recipe
    (:func:`api_key`). A local server (``base_url`` set) needs no key; the hosted API does. With
    ``batch``, calls wait in their batch without holding a slot of ``backend.concurrency``, so a
    batch holds a whole debate round (up to the Batch API's 50,000 requests).
    """
    key = api_key(options)
    client = AsyncOpenAI(
        api_key=key,
        base_url=options.base_url,
        organization=options.organization,
        project=options.project,
        timeout=httpx2.Timeout(options.timeout_s, connect=min(options.timeout_s, CONNECT_TIMEOUT_S)),
        max_retries=0,
    )
    return OpenAIBackend(
        client,
        run_dir=run_dir,
        secret=key,
        batch=options.batch,
        batch_window_s=options.batch_window_s,
        batch_poll_s=options.batch_poll_s,
        weight_support=options.weight_support,
        key_env=options.api_key_env,
    )


def api_key(options: OpenAIOptions) -> str:
    """The API key from ``options.api_key_env``, checked before anything is sent.

    Whitespace around the key (a trailing newline from ``$(cat key.txt)``, a pasted space) is
    stripped with a warning on stderr. Any other character an HTTP header cannot carry is refused
    with one line naming the variable and the position — never the key or the character itself.
    """
    env = options.api_key_env
    raw = os.environ.get(env, "")
    key = raw.strip()
    if not key:
        if options.base_url is not None:
            return "not-needed"  # local OpenAI-compatible servers ignore the key but the SDK wants one
        what = "is empty" if env in os.environ else "is not set"
        raise OptionsError(
            "backend 'openai'",
            [OptionProblem("api_key_env", f"the environment variable {env} {what}; export {env}=<your API key>")],
        )
    if key != raw:
        log.warning("%s has spaces or a line break around the key; using it with them stripped", env)
    for i, c in enumerate(key, 1):
        if not 33 <= ord(c) <= 126:
            kind = "a non-ASCII character" if ord(c) > 126 else "a space or control character"
            raise OptionsError(
                "backend 'openai'",
                [
                    OptionProblem(
                        "api_key_env",
                        f"character {i} of the key in {env} is {kind}, which an HTTP header cannot carry; "
                        f"copy the key again (API keys are plain ASCII)",
                    )
                ],
            )
    return key
