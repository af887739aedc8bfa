"""Chat calls through OpenAI's Batch API: half the price, hours of latency.

A debate round is a barrier — every agent's round-m call is issued before any round-(m+1) call —
so collecting the calls that arrive within a short window gathers a whole round of many problems
into one batch per model (reference/ecosystem.md §2.4). The Batch API takes one model per batch
(a file naming two fails with ``model_mismatch``), and finetuned agents each call their own model,
so the calls of a window are split by model. A batch is as large as the Batch API allows
(:data:`MAX_REQUESTS` requests, :data:`MAX_BYTES` of input file), never capped by the run's
concurrency: calls waiting for a batch hold no concurrency slot (``capabilities.queued``), so a
round of 1,000 problems × 3 agents is one batch, not hundreds. Each request's ``custom_id`` is a hash of its body,
seed included, so equal requests are one line and a restarted process recognises its requests.

Batch creation is not idempotent, and a lost ``batches.create`` answer (the server created it, the
client never heard) must not lead to a second billed batch. So each request set gets a tag, and its
record — one small file per set in ``run_dir/openai/batches/`` — is written *before* the batch is
created; the tag goes into the batch's metadata. A call whose request belongs to a recorded set
without a known batch (a lost answer, a killed process) first lists the batches and adopts the one
carrying that tag; only if there is none is the request submitted anew.

Failures are not retried here: they reach the caller as backend errors and the single retry wrapper
decides (DESIGN §3). A batch that fails validation reports the server's own reasons, names the
model, and is remembered, so a retried or resumed call reports it again instead of uploading a new
file for another doomed batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from openai import AsyncOpenAI
from openai.types import Batch, FileObject

from agentsoc.backend import BackendError, FatalBackendError, TransientBackendError
from backends.openai_files import RecordDir, expect

#: (exception, call name, model) -> the backend error to raise
ErrorMapper = Callable[[Exception, str, str], BackendError]
#: a request body and the futures of the callers waiting for its result line
Pending = tuple[dict[str, Any], list[asyncio.Future[dict[str, Any]]]]
Results = dict[str, dict[str, Any]]

_TERMINAL = {"completed", "failed", "expired", "cancelled"}
#: batch error codes that a later, new batch may not meet (the org's queue was full)
_TRANSIENT_CODES = {"token_limit_exceeded", "rate_limit_exceeded", "server_error"}
#: how far back (seconds, against the server's clock) a lost batch is looked for before its record
_CLOCK_SLACK_S = 3600
#: metadata key carrying a request set's tag
TAG_KEY = "agentsoc_batch"
#: the Batch API's limits per batch (openai SDK ``resources/batches.py``: "up to 50,000 requests,
#: and can be up to 200 MB in size"); MB taken as 10^6 bytes, the smaller reading
MAX_REQUESTS = 50_000
MAX_BYTES = 200_000_000
T = TypeVar("T")


def request_id(body: dict[str, Any]) -> str:
    """The custom_id of a chat request: a hash of everything in it, the seed included."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


def request_line(body: dict[str, Any]) -> str:
    """One line of a batch input file: the request ``body`` under its custom_id."""
    return json.dumps({"custom_id": request_id(body), "method": "POST", "url": "/v1/chat/completions", "body": body})


def split(group: dict[str, Pending], max_requests: int, max_bytes: int) -> list[dict[str, Pending]]:
    """``group`` in order, cut into sets that each fit one batch (requests and input-file bytes)."""
    out: list[dict[str, Pending]] = [{}]
    size = 0
    for cid, item in group.items():
        n = len(request_line(item[0]).encode()) + 1
        if out[-1] and (len(out[-1]) >= max_requests or size + n > max_bytes):
            out.append({})
            size = 0
        out[-1][cid] = item
        size += n
    return out


def set_tag(model: str, custom_ids: list[str], created: float) -> str:
    """The tag of one submission of a request set (its creation time keeps a resubmission of the
    same requests, after an expired batch, apart from the first)."""
    raw = json.dumps([model, sorted(custom_ids), created])
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Batcher:
    """Collects chat requests for ``window_s`` seconds, submits one batch per model, resolves each
    caller's future with its own result line."""

    def __init__(
        self,
        client: AsyncOpenAI,
        records: RecordDir,
        *,
        window_s: float,
        poll_s: float,
        map_error: ErrorMapper,
        legacy: Mapping[str, Any] | None = None,
        max_requests: int = MAX_REQUESTS,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self._client = client
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self._records = records
        self._window_s = window_s
        self._poll_s = poll_s
        self._map_error = map_error
        self._pending: dict[str, Pending] = {}
        self._flusher: asyncio.Task[None] | None = None
        #: tag -> record: model, custom_ids, created, input_file_id, batch_id, error
        self._sets: dict[str, dict[str, Any]] = records.all()
        # batches recorded by earlier versions (one shared file): their ids were known, not their model
        for batch_id, rec in (legacy or {}).get("batches", {}).items():
            self._sets.setdefault(
                f"legacy-{batch_id}", {"model": "(unrecorded)", "custom_ids": rec["custom_ids"], "batch_id": batch_id}
            )
        #: custom_id -> tag of the set that holds it
        self._known: dict[str, str] = {cid: tag for tag, rec in self._sets.items() for cid in rec["custom_ids"]}
        #: tag -> the task that creates the set's batch, or finds it again; its result is the batch id
        self._resolving: dict[str, asyncio.Task[str | None]] = {}
        #: tag -> the poller of the set's batch, shared by every caller waiting on it
        self._watchers: dict[str, asyncio.Task[Results]] = {}

    # -- callers ------------------------------------------------------------------------------
    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion body OpenAI returned for ``body`` (as the online call would)."""
        cid = request_id(body)
        model = str(body["model"])
        tag = self._known.get(cid)
        if tag is not None:
            results = await self._results(tag)
            if results is not None and cid in results:
                return self._unwrap(tag, cid, results[cid], model)
            # the set has no batch (its creation never happened), or the batch ended without this
            # request (expired, cancelled): submit it anew
            self._forget(tag, cid)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(cid, (body, []))[1].append(fut)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_after_window())
        line = await fut
        return self._unwrap(self._known.get(cid), cid, line, model)

    def _unwrap(self, tag: str | None, cid: str, line: dict[str, Any], model: str) -> dict[str, Any]:
        response = line.get("response") or {}
        status = int(response.get("status_code", 0))
        if line.get("error") or status != 200:
            err = line.get("error") or (response.get("body") or {}).get("error") or {}
            message = err.get("message", "no message") if isinstance(err, dict) else str(err)
            text = f"batch request for model {model} failed (HTTP {status or 'n/a'}): {message}"
            if status == 429 or status >= 500 or status == 0:
                if tag is not None:
                    self._forget(tag, cid)  # a retry sends the request anew instead of rereading this line
                raise TransientBackendError(text)
            raise FatalBackendError(text)
        body: dict[str, Any] = response["body"]
        return body

    # -- one window -----------------------------------------------------------------------------
    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self._window_s)
        pending, self._pending, self._flusher = self._pending, {}, None
        by_model: dict[str, dict[str, Pending]] = {}
        for cid, item in pending.items():
            by_model.setdefault(str(item[0]["model"]), {})[cid] = item
        sets = [
            (m, part) for m, group in by_model.items() for part in split(group, self._max_requests, self._max_bytes)
        ]
        await asyncio.gather(*(self._run(model, part) for model, part in sets))

    async def _run(self, model: str, group: dict[str, Pending]) -> None:
        """Submit one model's requests as one batch and hand each caller its line (or the error)."""
        try:
            tag, results = await self._submit_set(model, group)
        except Exception as e:
            error = e if isinstance(e, BackendError) else FatalBackendError(f"batch for model {model}: {e!r}")
            for _, futures in group.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(error)
            return
        batch_id = self._sets.get(tag, {}).get("batch_id")
        for cid, (_, futures) in group.items():
            line = (results or {}).get(cid)
            if line is None:
                self._forget(tag, cid)
            for f in futures:
                if f.done():
                    continue
                if line is None:
                    f.set_exception(
                        TransientBackendError(f"batch {batch_id} for model {model} ended without a result for {cid}")
                    )
                else:
                    f.set_result(line)

    async def _submit_set(self, model: str, group: dict[str, Pending]) -> tuple[str, Results | None]:
        """Record the set (before anything is created), create its batch, wait for its results."""
        created = time.time()
        tag = set_tag(model, list(group), created)
        self._save(tag, {"model": model, "custom_ids": sorted(group), "created": created})
        for cid in group:
            self._known[cid] = tag
        # shared: a call asking for one of these requests meanwhile waits for this same creation
        creating = self._resolving[tag] = asyncio.create_task(self._create(tag, [b for b, _ in group.values()]))
        await asyncio.shield(creating)  # its error goes to this set's callers; their retries look for the batch
        return tag, await self._results(tag)

    # -- sets and their batches -----------------------------------------------------------------
    def _save(self, tag: str, rec: dict[str, Any]) -> None:
        self._sets[tag] = rec
        if not tag.startswith("legacy-"):
            self._records.put(tag, rec)

    def _drop(self, tag: str) -> None:
        """Forget a set entirely (it has no batch, or none worth waiting for)."""
        rec = self._sets.pop(tag, None)
        self._records.delete(tag)
        for cid in (rec or {}).get("custom_ids", []):
            if self._known.get(cid) == tag:
                del self._known[cid]

    def _forget(self, tag: str, cid: str) -> None:
        """``cid`` will be sent anew; a set none of whose requests is still wanted is dropped."""
        if self._known.get(cid) == tag:
            del self._known[cid]
        rec = self._sets.get(tag)
        if rec is not None and not any(self._known.get(c) == tag for c in rec["custom_ids"]):
            self._drop(tag)

    async def _results(self, tag: str) -> Results | None:
        """The result lines of the set's batch, or None if the set turned out to have no batch."""
        rec = self._sets.get(tag)
        if rec is None:
            return None
        if rec.get("error"):
            raise FatalBackendError(rec["error"])
        batch_id = rec.get("batch_id")
        if batch_id is None:
            # no creation running here, or it failed (perhaps only its answer was lost): look
            batch_id = await _shared(self._resolving, tag, lambda: self._find(tag))
            if batch_id is None:
                return None
        return await _shared(self._watchers, tag, lambda: self._poll(tag, batch_id))

    async def _create(self, tag: str, bodies: list[dict[str, Any]]) -> str | None:
        """Upload the set's input file and create its batch, recording each step as it is done."""
        rec = self._sets[tag]
        model = rec["model"]
        lines = [request_line(body) for body in bodies]
        call = "files.create"
        try:
            uploaded = expect(
                await self._client.files.create(
                    file=(f"agentsoc-batch-{tag}.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch"
                ),
                FileObject,
                call,
                model,
            )
            self._save(tag, {**rec, "input_file_id": uploaded.id})
            call = "batches.create"
            created = await self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={TAG_KEY: tag, "agentsoc_model": model[:512], "agentsoc_requests": str(len(lines))},
            )
            batch = expect(created, Batch, call, model)
        except Exception as e:
            error = self._map_error(e, call, model)
            if isinstance(error, FatalBackendError):
                self._drop(tag)  # refused: nothing was created
            raise error from None
        self._save(tag, {**self._sets[tag], "batch_id": batch.id})
        return batch.id

    async def _find(self, tag: str) -> str | None:
        """The batch created for ``tag`` whose creation answer never arrived, or None (set dropped)."""
        rec = self._sets.get(tag)
        if rec is None:
            return None
        if rec.get("input_file_id") is None:
            self._drop(tag)  # no input file, so no batch can have been created
            return None
        since = float(rec.get("created", 0)) - _CLOCK_SLACK_S
        try:
            async for batch in self._client.batches.list(limit=100):
                if (batch.metadata or {}).get(TAG_KEY) == tag:
                    self._save(tag, {**rec, "batch_id": batch.id})
                    return batch.id
                if batch.created_at < since:
                    break  # newest first: the rest were created before this set was
        except Exception as e:
            raise self._map_error(e, "batches.list", rec["model"]) from None
        self._drop(tag)
        return None

    async def _poll(self, tag: str, batch_id: str) -> Results:
        model = self._sets.get(tag, {}).get("model", "(unrecorded)")
        call = f"batches.retrieve {batch_id}"
        try:
            while True:
                batch = expect(await self._client.batches.retrieve(batch_id), Batch, call, model)
                if batch.status in _TERMINAL:
                    break
                await asyncio.sleep(self._poll_s)
            if batch.status == "failed" and not batch.output_file_id:
                raise self._failed(tag, batch, model)
            results: Results = {}
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    call = f"files.content {file_id} (batch {batch_id})"
                    content = await self._client.files.content(file_id)
                    for raw in content.text.splitlines():
                        if raw.strip():
                            line = json.loads(raw)
                            results[line["custom_id"]] = line
        except Exception as e:
            raise self._map_error(e, call, model) from None
        return results

    def _failed(self, tag: str, batch: Batch, model: str) -> BackendError:
        """The error of a batch that failed as a whole, in the server's words, with the model named."""
        errors = (batch.errors.data if batch.errors else None) or []
        reasons = "; ".join(
            f"{e.code or 'error'}: {e.message or 'no message'}" + (f" (line {e.line})" if e.line else "")
            for e in errors
        )
        text = f"OpenAI batch {batch.id} for model {model} failed: {reasons or 'no reason given'}"
        if any(e.code in _TRANSIENT_CODES for e in errors):
            self._drop(tag)  # a later batch may pass: let a retry create one
            return TransientBackendError(text)
        if tag in self._sets:
            self._save(tag, {**self._sets[tag], "error": text})  # the same requests fail the same way
        return FatalBackendError(text)

    async def aclose(self) -> None:
        tasks = [
            t
            for t in (self._flusher, *self._resolving.values(), *self._watchers.values())
            if t is not None and not t.done()
        ]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _shared(tasks: dict[str, asyncio.Task[T]], tag: str, start: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """The result of ``tasks[tag]``, one task shared by every caller; started (again) if there is none
    or the last one failed. Shielded: a cancelled caller must not cancel the others' task."""
    task = tasks.get(tag)
    if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
        task = tasks[tag] = asyncio.create_task(start())
    return await asyncio.shield(task)
