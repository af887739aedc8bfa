"""A fake OpenAI server on 127.0.0.1 for offline tests of the OpenAI backend.

It is a real HTTP server (stdlib ``ThreadingHTTPServer`` in a background thread), so the SDK's
whole stack — HTTPX2, multipart uploads, query encoding, timeouts — runs as it would against the
real API. Chat answers come from :class:`backends.mock.MockBrain`, so they parse and are
deterministic by seed, and fine-tuning "improves" a model the way the mock backend does.

Implemented: chat completions, models (with ``shutdown_date``), files (multipart upload, list by
purpose with cursor pages, content), fine-tuning jobs (create, list with metadata filter, retrieve,
events) and batches (create, retrieve, list with cursor pages). Jobs advance one state per
retrieve. Like the real Batch API, a batch whose lines name more than one model ends ``failed``
with a ``model_mismatch`` error in ``errors.data`` and no output file.

Faults are injected at a seeded rate (at most ``fault_limit`` of them): 429 with Retry-After, 500,
a response slower than the client's timeout, a malformed JSON body, a dropped connection. A dropped
or malformed response to a POST is sent *after* the server acted on it (the response was lost, not
the request) — the case that makes job, file and batch creation non-idempotent. ``respond_late``
delays the answer to chosen requests after they took effect, so a test can kill a client while
the server holds a file (or batch) the client has not heard of.
"""

from __future__ import annotations

import asyncio
import email.message
import hashlib
import json
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Iterable, Iterator
from dataclasses import dataclass, field
from email.parser import BytesParser
from typing import Any

from agentsoc.types import ChatExample, Message
from backends.mock import MockBrain

from .httpfake import Drop, FakeHTTPServer, FakeServer, JsonHandler

FAULTS = ("429", "500", "slow", "malformed", "drop")

#: Real-looking model names → (mock skill, shutdown date)
DEFAULT_MODELS: dict[str, tuple[float, str | None]] = {
    "gpt-3.5-turbo-0125": (0.55, "2026-10-23"),
    "gpt-4o-mini-2024-07-18": (0.6, "2027-01-14"),
    "gpt-4.1-mini-2025-04-14": (0.65, "2027-01-14"),
    "agent-a": (0.45, None),
    "agent-b": (0.5, None),
    "agent-c": (0.55, None),
}


@dataclass
class FakeState:
    """Everything the "server" knows; tests read and tweak it directly (under ``lock``)."""

    api_key: str
    models: dict[str, tuple[float, str | None]] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = FAULTS
    fault_seed: int = 0
    #: inject faults only into requests whose "METHOD /path" starts with this (None: every request)
    fault_only: str | None = None
    #: stop injecting faults after this many (None: no limit), e.g. 1 to lose exactly one response
    fault_limit: int | None = None
    slow_s: float = 1.0
    #: seconds from a request's arrival to its answer; the server's own work is done within them, so a
    #: client measured against this server is charged for its own time only (bench/openai_throughput.py)
    latency_s: float = 0.0
    #: "METHOD /path" prefix -> seconds to wait after acting on such a request, before answering
    respond_late: dict[str, float] = field(default_factory=dict)
    #: retrieves a job needs to go validating_files → queued → running → … → succeeded
    job_polls: int = 3
    #: retrieves a batch needs before it completes
    batch_polls: int = 2
    hold_jobs: bool = False
    fail_jobs: bool = False
    #: the first N jobs created fail with a server error (OpenAI's transient kind)
    flaky_jobs: int = 0
    #: (code, message): every new batch fails validation with this error (as a real batch can)
    fail_batches: tuple[str, str] | None = None
    refuse_finetune: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    ft_models: dict[str, str] = field(default_factory=dict)
    chat_requests: int = 0
    uploads: int = 0
    batch_uploads: int = 0
    jobs_created: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    seen_auth: set[str] = field(default_factory=set)
    _next: int = 0
    _rng: random.Random | None = None

    def new_id(self, prefix: str) -> str:
        self._next += 1
        return f"{prefix}-{self._next:05d}"

    def draw_fault(self) -> str | None:
        if self._rng is None:
            self._rng = random.Random(self.fault_seed)
        if self.fault_rate <= 0 or self._rng.random() >= self.fault_rate:
            return None
        if self.fault_limit is not None and sum(self.faults_injected.values()) >= self.fault_limit:
            return None
        kind = self._rng.choice(self.fault_kinds)
        self.faults_injected[kind] += 1
        return kind

    def active_jobs(self) -> int:
        return sum(1 for j in self.jobs.values() if j["status"] not in ("succeeded", "failed", "cancelled"))

    def brain_ref(self, model: str) -> str | None:
        """The mock model behind an OpenAI model name, or None if it does not exist."""
        if model in self.ft_models:
            return self.ft_models[model]
        if model in self.models:
            return f"mock:{self.models[model][0]}"
        return None


class _Handler(JsonHandler):
    server: FakeHTTPServer[FakeState]

    # -- plumbing -------------------------------------------------------------------------------
    def _send(
        self, status: int, payload: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> None:
        if raw is None:
            self._send_json(status, payload, headers)
        else:
            self._send_bytes(status, raw, "application/octet-stream", headers)

    def _error(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": code, "code": code, "param": None}})

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        body = self._read_body()
        arrived = time.monotonic()
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        auth = self.headers.get("Authorization", "")
        with st.lock:
            st.seen_auth.add(auth)
            targeted = st.fault_only is None or f"{method} {url.path}".startswith(st.fault_only)
            fault = st.draw_fault() if targeted else None
        if auth != f"Bearer {st.api_key}":
            # like OpenAI, the message quotes the key it was given (here in full: worst case for leaks)
            self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}", "invalid_api_key")
            return
        if fault in ("429", "500", "slow"):
            self._wait(arrived)
        if fault == "429":
            self._send(
                429,
                {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded", "code": None}},
                headers={"retry-after-ms": "20", "retry-after": "1"},
            )
            return
        if fault == "500":
            self._error(500, "The server had an error while processing your request", "server_error")
            return
        if fault == "slow":
            time.sleep(st.slow_s)
            raise Drop
        status, payload, raw = self._route(method, url.path, query, body)
        encoded = raw if raw is not None else json.dumps(payload, separators=self.json_separators).encode()
        self._wait(arrived)  # the work is done: answer when the latency is up, not latency + work later
        late = [s for prefix, s in st.respond_late.items() if f"{method} {url.path}".startswith(prefix)]
        if late:
            time.sleep(max(late))
        if fault == "drop":
            raise Drop
        if fault == "malformed" and raw is None:
            self._send(200, None, raw=json.dumps(payload).encode()[:20])
            self.close_connection = True
            return
        self._send_bytes(status, encoded, "application/json" if raw is None else "application/octet-stream")

    def _wait(self, arrived: float) -> None:
        """Sleep until ``latency_s`` after the request arrived."""
        left = arrived + self.server.state.latency_s - time.monotonic()
        if left > 0:
            time.sleep(left)

    # -- routes ---------------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> tuple[int, Any, bytes | None]:
        st = self.server.state
        parts = path.strip("/").split("/")
        if parts[:1] != ["v1"]:
            return 404, {"error": {"message": f"no route {path}"}}, None
        parts = parts[1:]
        with st.lock:
            if method == "POST" and parts == ["chat", "completions"]:
                return self._chat(json.loads(body))
            if method == "GET" and parts[:1] == ["models"] and len(parts) >= 2:
                return self._model("/".join(parts[1:]))
            if method == "POST" and parts == ["files"]:
                return self._upload(body)
            if method == "GET" and parts == ["files"]:
                purpose = query.get("purpose", [None])[0]
                files = [_file_object(fid, f) for fid, f in st.files.items() if purpose in (None, f["purpose"])]
                return 200, _page(files, query, newest_first=query.get("order", ["desc"])[0] == "desc"), None
            if method == "GET" and parts[:1] == ["files"] and parts[2:] == ["content"]:
                f = st.files.get(parts[1])
                if f is None:
                    return 404, {"error": {"message": f"No such File object: {parts[1]}"}}, None
                return 200, None, f["bytes"]
            if parts[:2] == ["fine_tuning", "jobs"]:
                return self._jobs(method, parts[2:], query, body)
            if parts[:1] == ["batches"]:
                return self._batches(method, parts[1:], query, body)
        return 404, {"error": {"message": f"no route {method} {path}"}}, None

    def _chat(self, req: dict[str, Any]) -> tuple[int, Any, None]:
        st = self.server.state
        ref = st.brain_ref(req["model"])
        if ref is None:
            msg = f"The model `{req['model']}` does not exist or you do not have access to it."
            return 404, {"error": {"message": msg, "type": "invalid_request_error", "code": "model_not_found"}}, None
        st.chat_requests += 1
        return 200, chat_response(st, req, ref), None

    def _model(self, model_id: str) -> tuple[int, Any, None]:
        st = self.server.state
        if st.brain_ref(model_id) is None:
            return (
                404,
                {"error": {"message": f"The model '{model_id}' does not exist", "code": "model_not_found"}},
                None,
            )
        base = model_id.split(":")[1] if model_id.startswith("ft:") else model_id
        shutdown = st.models.get(base, (0.0, None))[1]
        return (
            200,
            {"id": model_id, "object": "model", "created": 0, "owned_by": "openai", "shutdown_date": shutdown},
            None,
        )

    def _upload(self, body: bytes) -> tuple[int, Any, None]:
        st = self.server.state
        msg = BytesParser().parsebytes(b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body)
        fields: dict[str, Any] = {}
        filename = "upload.jsonl"
        for part in msg.get_payload():
            assert isinstance(part, email.message.Message)  # a multipart body is a list of parts
            name = str(part.get_param("name", header="content-disposition"))
            filename = part.get_filename() or filename
            fields[name] = part.get_payload(decode=True)
        purpose = fields.get("purpose", b"").decode()
        fid = st.new_id("file")
        st.files[fid] = {"bytes": fields["file"], "purpose": purpose, "filename": filename}
        st.files[fid]["created_at"] = int(time.time())
        if purpose == "fine-tune":
            st.uploads += 1
        else:
            st.batch_uploads += 1
        return 200, _file_object(fid, st.files[fid]), None

    def _jobs(self, method: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> tuple[int, Any, None]:
        st = self.server.state
        if method == "POST" and not rest:
            return self._create_job(json.loads(body))
        if method == "GET" and not rest:
            wanted = {k[len("metadata[") : -1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
            data = [
                j
                for j in sorted(st.jobs.values(), key=lambda j: j["id"], reverse=True)
                if all((j["metadata"] or {}).get(k) == v for k, v in wanted.items())
            ]
            return 200, {"object": "list", "data": data, "has_more": False}, None
        job = st.jobs.get(rest[0])
        if job is None:
            return 404, {"error": {"message": f"No fine-tuning job {rest[0]}"}}, None
        if method == "GET" and rest[1:] == ["events"]:
            events = [
                {
                    "id": f"{job['id']}-ev{i}",
                    "object": "fine_tuning.job.event",
                    "created_at": i,
                    "level": "error" if "fail" in m else "info",
                    "message": m,
                    "type": "message",
                }
                for i, m in enumerate(job["_events"])
            ]
            return 200, {"object": "list", "data": events[::-1], "has_more": False}, None
        if method == "GET" and len(rest) == 1:
            self._advance(job)
            return 200, _public(job), None
        return 404, {"error": {"message": "no route"}}, None

    def _create_job(self, req: dict[str, Any]) -> tuple[int, Any, None]:
        st = self.server.state
        if st.refuse_finetune:
            return 403, {"error": {"message": st.refuse_finetune, "type": "invalid_request_error"}}, None
        base_ref = st.brain_ref(req["model"])
        if base_ref is None:
            return 400, {"error": {"message": f"Model {req['model']} is not available for fine-tuning"}}, None
        f = st.files.get(req["training_file"])
        if f is None:
            return 400, {"error": {"message": f"invalid training_file: {req['training_file']}"}}, None
        examples = [
            ChatExample(messages=tuple(Message(**m) for m in json.loads(line)["messages"]))
            for line in f["bytes"].decode().splitlines()
            if line.strip()
        ]
        # the id (and so the fine-tuned model's name and behaviour) depends on what was trained, not on
        # how many requests came before: a run with injected faults must reproduce a clean run
        digest = hashlib.sha256(f"{req['model']}|{req.get('suffix')}|".encode() + f["bytes"]).hexdigest()[:12]
        jid = f"ftjob-{digest}"
        while jid in st.jobs:
            jid += "x"
        metadata = req.get("metadata") or {}
        st.jobs_created[(metadata.get("iteration", ""), metadata.get("agent", ""), metadata.get("role", ""))] += 1
        base_name = req["model"].split(":")[1] if req["model"].startswith("ft:") else req["model"]
        result = f"ft:{base_name}:agentsoc:{req.get('suffix') or 'model'}:{jid}"
        st.ft_models[result] = MockBrain().train(base_ref, examples, jid)
        tokens = sum(len(m.content) // 4 + 4 for ex in examples for m in ex.messages)
        hp = (req.get("method") or {}).get("supervised", {}).get("hyperparameters", {})
        job = {
            "id": jid,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "model": req["model"],
            "status": "validating_files",
            "fine_tuned_model": None,
            "finished_at": None,
            "error": None,
            "training_file": req["training_file"],
            "validation_file": None,
            "result_files": [],
            "hyperparameters": hp,
            "method": req.get("method"),
            "seed": req.get("seed", 0),
            "organization_id": "org-fake",
            "trained_tokens": None,
            "metadata": metadata,
            "_result": result,
            "_polls": 0,
            "_tokens": tokens * int(hp.get("n_epochs", 1)),
            "_events": [f"Created fine-tuning job: {jid}", "Validating training file"],
            "_flaky": sum(st.jobs_created.values()) <= st.flaky_jobs,
        }
        st.jobs[jid] = job
        return 200, _public(job), None

    def _advance(self, job: dict[str, Any]) -> None:
        st = self.server.state
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return
        job["_polls"] += 1
        if job["_polls"] == 1:
            job["status"] = "queued"
            job["_events"].append("Files validated, moving job to queued state")
        elif job["_polls"] >= 2 and (st.hold_jobs or job["_polls"] < st.job_polls):
            if job["status"] != "running":
                job["_events"].append("Fine-tuning job started")
            job["status"] = "running"
        elif job.get("_flaky"):
            job["status"] = "failed"
            job["error"] = {"code": "server_error", "message": "An internal error occurred", "param": None}
            job["_events"].append("Job failed: An internal error occurred")
        elif st.fail_jobs:
            job["status"] = "failed"
            job["error"] = {
                "code": "invalid_training_file",
                "message": "Training file contains toxic content",
                "param": "training_file",
            }
            job["_events"].append("Job failed: Training file contains toxic content")
        else:
            job["status"] = "succeeded"
            job["fine_tuned_model"] = job["_result"]
            job["trained_tokens"] = job["_tokens"]
            job["finished_at"] = int(time.time())
            job["_events"].append("The job has successfully completed")

    def _batches(self, method: str, rest: list[str], query: dict[str, list[str]], body: bytes) -> tuple[int, Any, None]:
        st = self.server.state
        if method == "GET" and not rest:
            return 200, _page([_public(b) for b in st.batches.values()], query, newest_first=True), None
        if method == "POST" and not rest:
            req = json.loads(body)
            f = st.files.get(req["input_file_id"])
            if f is None:
                return 400, {"error": {"message": "invalid input_file_id"}}, None
            bid = st.new_id("batch")
            items = [json.loads(raw) for raw in f["bytes"].decode().splitlines() if raw.strip()]
            errors = _batch_errors(items, st.fail_batches)
            lines: list[dict[str, Any]] = []
            for item in [] if errors else items:
                ref = st.brain_ref(item["body"]["model"])
                if ref is None:
                    resp = {"status_code": 404, "body": {"error": {"message": "model not found"}}}
                else:
                    st.chat_requests += 1
                    resp = {"status_code": 200, "body": chat_response(st, item["body"], ref)}
                lines.append(
                    {"id": f"{bid}-{len(lines)}", "custom_id": item["custom_id"], "response": resp, "error": None}
                )
            st.batches[bid] = {
                "_models": sorted({item["body"]["model"] for item in items}),
                "id": bid,
                "object": "batch",
                "endpoint": req["endpoint"],
                "input_file_id": req["input_file_id"],
                "completion_window": req["completion_window"],
                "status": "validating",
                "created_at": int(time.time()),
                "output_file_id": None,
                "error_file_id": None,
                "errors": None,
                "failed_at": None,
                "metadata": req.get("metadata"),
                "request_counts": {"total": len(items), "completed": 0, "failed": 0},
                "_lines": lines,
                "_errors": errors,
                "_polls": 0,
            }
            return 200, _public(st.batches[bid]), None
        batch = st.batches.get(rest[0]) if rest else None
        if method == "GET" and batch is not None:
            batch["_polls"] += 1
            if batch["_errors"] and batch["status"] == "validating":
                # validation failed: no output, the reasons in errors.data (as the real API reports)
                batch.update(status="failed", failed_at=int(time.time()))
                batch["errors"] = {"object": "list", "data": batch["_errors"]}
                batch["request_counts"]["failed"] = batch["request_counts"]["total"]
            if batch["status"] not in ("completed", "failed"):
                batch["status"] = "in_progress"
            if batch["_polls"] >= st.batch_polls and batch["status"] == "in_progress":
                out = "".join(json.dumps(line) + "\n" for line in batch["_lines"]).encode()
                fid = st.new_id("file")
                st.files[fid] = {"bytes": out, "purpose": "batch_output", "filename": f"{batch['id']}_output.jsonl"}
                batch.update(status="completed", output_file_id=fid)
                batch["request_counts"]["completed"] = len(batch["_lines"])
            return 200, _public(batch), None
        return 404, {"error": {"message": "no such batch"}}, None


def chat_response(st: FakeState, req: dict[str, Any], ref: str) -> dict[str, Any]:
    """A chat.completion object; the text depends only on model, messages and seed."""
    text = MockBrain().reply(ref, req["messages"], req.get("seed"))
    prompt = sum(len(m["content"]) // 4 + 4 for m in req["messages"])
    completion = len(text) // 4 + 1
    return {
        "id": "chatcmpl-" + hashlib.sha256(json.dumps(req, sort_keys=True).encode()).hexdigest()[:16],
        "object": "chat.completion",
        "created": 0,
        "model": req["model"],
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    }


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not k.startswith("_")}


def _file_object(fid: str, f: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": fid,
        "object": "file",
        "bytes": len(f["bytes"]),
        "created_at": f.get("created_at", 0),
        "filename": f["filename"],
        "purpose": f["purpose"],
        "status": "processed",
    }


def _page(items: list[dict[str, Any]], query: dict[str, list[str]], *, newest_first: bool) -> dict[str, Any]:
    """One cursor page (``limit``, ``after``) of objects whose ids sort by creation."""
    items = sorted(items, key=lambda o: str(o["id"]), reverse=newest_first)
    after = query.get("after", [None])[0]
    if after is not None:
        ids = [o["id"] for o in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    limit = int(query.get("limit", ["20"])[0])
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }


def _batch_errors(items: list[dict[str, Any]], forced: tuple[str, str] | None) -> list[dict[str, Any]]:
    """Why the Batch API would refuse this input file: one model per batch (``model_mismatch``)."""
    if forced is not None:
        return [{"code": forced[0], "message": forced[1], "param": None, "line": None}]
    first = items[0]["body"]["model"] if items else None
    for i, item in enumerate(items):
        model = item["body"]["model"]
        if model != first:
            message = (
                f"The model '{model}' on line {i + 1} does not match '{first}', the model of the batch's "
                "first line. A batch can only contain requests for one model."
            )
            return [{"code": "model_mismatch", "message": message, "param": "body.model", "line": i + 1}]
    return []


class FakeOpenAI(FakeServer[FakeState]):
    """The server and its state; ``base_url`` goes into a recipe's ``backend.options``."""

    handler = _Handler
    thread_name = "fake-openai"

    def __init__(self, api_key: str = "sk-fake-test-key-0123456789", **state: Any) -> None:
        super().__init__(FakeState(api_key=api_key, **state))

    async def kill_with_batches_pending(self, backend: Any, calls: Iterable[Awaitable[Any]], batches: int) -> None:
        """Start ``calls`` on ``backend`` and "kill" it (cancel them, close it) once ``batches``
        batches exist on this server and none of them can finish."""
        self.configure(batch_polls=10**9)
        tasks = [asyncio.ensure_future(c) for c in calls]
        async with asyncio.timeout(10):
            while len(self.state.batches) < batches:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        for t in tasks:
            t.cancel()
        await backend.aclose()
        self.configure(batch_polls=1)


def serve(**state: Any) -> Iterator[FakeOpenAI]:
    """Start a server for the duration of a ``with``/fixture and stop it afterwards."""
    server = FakeOpenAI(**state).start()
    try:
        yield server
    finally:
        server.stop()
