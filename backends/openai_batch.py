"""Chat calls through OpenAI's Batch API: half the price, hours of latency.

A debate round is a barrier — every agent's round-m call is issued before any round-(m+1) call —
so collecting the calls that arrive within a short window gathers a whole round of many problems
into one batch (reference/ecosystem.md §2.4). Each request's ``custom_id`` is a hash of its body,
seed included, so equal requests are one line and a restarted process recognises its requests.

Pending batches are recorded in ``run_dir/openai/batches.json`` as soon as they are created: a
resumed run that asks for the same requests waits for the recorded batch instead of paying for a
second one. Failures are not retried here: they reach the caller as backend errors and the single
retry wrapper decides (DESIGN §3); a retried call first looks for its recorded batch again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Any

from openai import AsyncOpenAI
from openai.types import Batch, FileObject

from agentsoc.backend import BackendError, FatalBackendError, TransientBackendError
from backends.openai_files import JsonRecord, expect

#: (exception, call name, model) -> the backend error to raise
ErrorMapper = Callable[[Exception, str, str], BackendError]

_TERMINAL = {"completed", "failed", "expired", "cancelled"}


def request_id(body: dict[str, Any]) -> str:
    """The custom_id of a chat request: a hash of everything in it, the seed included."""
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]


class Batcher:
    """Collects chat requests for ``window_s`` seconds, submits them as one batch, resolves each
    caller's future with its own response body."""

    def __init__(
        self, client: AsyncOpenAI, record: JsonRecord, *, window_s: float, poll_s: float, map_error: ErrorMapper
    ) -> None:
        self._client = client
        self._record = record
        self._window_s = window_s
        self._poll_s = poll_s
        self._map_error = map_error
        self._pending: dict[str, tuple[dict[str, Any], list[asyncio.Future[dict[str, Any]]]]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self._watchers: dict[str, asyncio.Task[dict[str, dict[str, Any]]]] = {}
        self._known: dict[str, str] = {}
        for batch_id, rec in self._record.load().get("batches", {}).items():
            for cid in rec["custom_ids"]:
                self._known[cid] = batch_id

    async def submit(self, body: dict[str, Any]) -> dict[str, Any]:
        """The chat completion body OpenAI returned for ``body`` (as the online call would)."""
        cid = request_id(body)
        batch_id = self._known.get(cid)
        if batch_id is not None:
            results = await self._watch(batch_id)
            if cid in results:
                return self._unwrap(results[cid], body["model"])
            # the recorded batch ended without this request (expired, failed): submit it anew
            del self._known[cid]
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending.setdefault(cid, (body, []))[1].append(fut)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_after_window())
        line = await fut
        return self._unwrap(line, body["model"])

    @staticmethod
    def _unwrap(line: dict[str, Any], model: str) -> dict[str, Any]:
        response = line.get("response") or {}
        status = int(response.get("status_code", 0))
        if line.get("error") or status != 200:
            err = line.get("error") or (response.get("body") or {}).get("error") or {}
            message = err.get("message", "no message") if isinstance(err, dict) else str(err)
            text = f"batch request for model {model} failed (HTTP {status or 'n/a'}): {message}"
            if status == 429 or status >= 500 or status == 0:
                raise TransientBackendError(text)
            raise FatalBackendError(text)
        body: dict[str, Any] = response["body"]
        return body

    async def _flush_after_window(self) -> None:
        await asyncio.sleep(self._window_s)
        pending, self._pending, self._flusher = self._pending, {}, None
        try:
            batch_id = await self._create(pending)
            results = await self._watch(batch_id)
        except BackendError as e:
            for _, futures in pending.values():
                for f in futures:
                    if not f.done():
                        f.set_exception(e)
            return
        for cid, (_, futures) in pending.items():
            line = results.get(cid)
            for f in futures:
                if f.done():
                    continue
                if line is None:
                    f.set_exception(TransientBackendError(f"batch {batch_id} returned no result for request {cid}"))
                else:
                    f.set_result(line)

    async def _create(self, pending: dict[str, tuple[dict[str, Any], list[asyncio.Future[dict[str, Any]]]]]) -> str:
        lines = [
            json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})
            for cid, (body, _) in pending.items()
        ]
        model = next(iter(pending.values()))[0]["model"]
        data = ("\n".join(lines) + "\n").encode()
        try:
            uploaded = expect(
                await self._client.files.create(file=("batch.jsonl", data), purpose="batch"),
                FileObject,
                "files.create",
                model,
            )
            created = await self._client.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"agentsoc": "debate", "requests": str(len(lines))},
            )
            batch = expect(created, Batch, "batches.create", model)
        except Exception as e:
            raise self._map_error(e, "batches.create", model) from None
        state = self._record.load()
        state.setdefault("batches", {})[batch.id] = {"custom_ids": list(pending), "input_file_id": uploaded.id}
        self._record.save(state)
        for cid in pending:
            self._known[cid] = batch.id
        return batch.id

    def _watch(self, batch_id: str) -> asyncio.Task[dict[str, dict[str, Any]]]:
        """One poller per batch, shared by every caller waiting on it; a failed one is replaced."""
        task = self._watchers.get(batch_id)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._poll(batch_id))
            self._watchers[batch_id] = task
        return task

    async def _poll(self, batch_id: str) -> dict[str, dict[str, Any]]:
        try:
            while True:
                batch = expect(await self._client.batches.retrieve(batch_id), Batch, "batches.retrieve", "batch")
                if batch.status in _TERMINAL:
                    break
                await asyncio.sleep(self._poll_s)
            results: dict[str, dict[str, Any]] = {}
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await self._client.files.content(file_id)
                    for raw in content.text.splitlines():
                        if raw.strip():
                            line = json.loads(raw)
                            results[line["custom_id"]] = line
        except Exception as e:
            raise self._map_error(e, f"batches.retrieve {batch_id}", "batch") from None
        return results

    async def aclose(self) -> None:
        tasks = [t for t in (self._flusher, *self._watchers.values()) if t is not None and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
