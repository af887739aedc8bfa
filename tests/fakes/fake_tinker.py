"""A fake Tinker API service on 127.0.0.1 that the real ``tinker`` SDK (0.38.0) talks to over HTTP.

Read from the SDK's source (``tinker/lib/internal_client_holder.py``, ``api_future_impl.py``,
``resources/*``, ``proto/*``): the routes, bodies, futures and error shapes below are the ones that
SDK sends and accepts. What the live service answers where the SDK does not pin it down (the text of
an error, whether an unknown base model is refused at once or in its future) is marked *assumed*.

Use::

    from fakes.fake_tinker import FAKE_API_KEY, FakeTinker
    with FakeTinker() as fake:                      # or fake = FakeTinker().start(); fake.stop()
        sc = tinker.ServiceClient(base_url=fake.base_url, api_key=FAKE_API_KEY)
        tc = sc.create_lora_training_client(base_model="Qwen/Qwen3-8B", rank=8).result()
        ...
        with fake.state.lock:
            assert fake.state.runs[tc.model_id].step == 1

A pytest fixture: ``@pytest.fixture def fake_tinker(): yield from serve_tinker(**options)``.
``fake.base_url`` is ``http://127.0.0.1:<port>`` (the SDK appends ``/api/v1/...`` itself);
``fake.env()`` gives ``TINKER_BASE_URL`` / ``TINKER_API_KEY`` for code that reads the environment.
The state survives ``stop()``/``start()`` (same port), like the real service's checkpoints survive a
client that dies — so a test can kill its client and resume against the same fake.

Constructor (every field is also on ``fake.state`` and can be changed with ``fake.configure(...)``):

``models``
    Served base models: names or :class:`ServedModel` (``trainable`` / ``sampleable`` /
    ``max_context_length``). Default :data:`DEFAULT_MODELS` (``Qwen/Qwen3-8B``,
    ``meta-llama/Llama-3.1-8B-Instruct``). Listed by ``GET /api/v1/get_server_capabilities``
    (``RestClient().get_server_capabilities()``).
``api_keys``
    Keys accepted in the ``X-API-Key`` header; default ``{FAKE_API_KEY}``. Any other key, or none, is
    ``401 {"detail": "Invalid API key"}`` on every route but ``/healthz`` → the SDK raises
    ``tinker.AuthenticationError`` (it retries no 4xx but 408/409/429). NB: the SDK itself refuses a
    key that does not start with ``tml-`` (``TinkerError``) before sending anything.
``unknown_model``
    How a ``create_model`` for a base model that is not served (or not ``trainable``) is refused:
    ``"400"`` (default; ``400 {"detail": ...}`` → ``tinker.BadRequestError`` at once) or
    ``"future"`` (accepted, then its future fails → ``tinker.RequestFailedError``, category user).
    *Assumed*: which one the live service does is not visible from the SDK; the backend should cope
    with both. A sampling client for an unserved base model is always a 400.
``sampler``
    A hook ``(SampleCall) -> Sequence[int]``: the completion tokens for one sample (see
    :class:`~fakes.fake_tinker_model.SampleCall`: base_model, model_path, step, prompt, seed,
    sample_index, max_tokens, temperature, stop_tokens). Default: hash noise of 3–16 tokens from
    ``vocab`` ended by the first stop token, a function of (checkpoint path or base model, prompt,
    seed, sample index). ``text_sampler(encode, decode, answer)`` (re-exported here) builds a hook
    from a text function ``answer(prompt_text, call) -> str`` and the test's tokenizer. The fake
    then applies the request's stop tokens (the stop token is kept in the output,
    ``stop_reason="stop"``), stop strings (needs ``decode``) and ``max_tokens`` (``"length"``), and
    attaches per-token logprobs.
``decode``
    ``(token ids) -> str``, only needed to honour stop *strings*; without it such a sample fails in
    its future (category server) with a message naming this option.
``eos_token``
    The stop token used when a request sends ``stop=None`` (the model's implicit EOS); default None.
``vocab``
    Token-id range of the default sampler; default ``range(1000, 9000)``.
``delays``
    Seconds before a route's future resolves, e.g. ``{"forward_backward": 0.5}`` (a slow
    forward_backward). ``retrieve_future`` long-polls (up to ``long_poll_s``, default 1.0) and then
    answers ``{"type": "try_again", ...}``, which the SDK polls again at once.
``faults``
    :class:`Faults`: a deterministic fraction ``rate`` of requests (on ``routes``, default all but
    telemetry) answered with one of ``kinds``: ``"429"`` (``Retry-After`` / ``retry-after-ms`` from
    ``retry_after_s``), ``"500"``, ``"503"``, ``"drop"`` (connection closed, request not processed) or
    ``"drop_after"`` (processed, then the connection closed before the answer: a lost response).
    Whether attempt *n* of a given request body is hit is a hash of (``seed``, route, body, n), so a
    run is reproducible whatever the thread interleaving; a body is never hit more than
    ``max_in_a_row`` times running, so the SDK's own retries always get through.
``compress_fwdbwd`` / ``fwdbwd_max_chunk_len`` / ``pyqwest``
    Flags the fake hands the SDK in ``/api/v1/client/config``: zstd request bodies for
    forward_backward, the datums per forward_backward request (the SDK splits a bigger batch into
    several requests), and the SDK's pyqwest HTTP transport (default True, as in production).

One-shot faults: ``fake.fail_next(route, kind, count=1)`` queues ``kind`` (as above, or any status
code) for the next ``count`` requests of ``route``; ``fake.fail_future(route, message, category="server",
count=1)`` makes the next ``count`` futures of ``route`` fail the SDK's way (``retrieve_future`` answers
``200 {"error": message, "category": ...}`` → ``tinker.RequestFailedError``; the request has no
effect).

Routes (names used by ``faults``, ``delays``, ``fail_next``, ``fail_future`` and the counters):
``client_config``, ``dynamic_config``, ``create_session``, ``heartbeat``, ``finish_session``,
``telemetry``, ``healthz``, ``capabilities``, ``create_model``, ``get_info``, ``forward_backward``,
``optim_step``, ``save_weights``, ``save_weights_for_sampler``, ``load_weights``,
``create_sampling_session``, ``get_sampler``, ``asample``, ``retrieve_future``, ``cancel_future``,
``training_run``, ``list_training_runs`` (newest first, ``user_metadata`` included),
``list_checkpoints``, ``weights_info``. Any other path is ``404`` with a body naming the fake.

Semantics worth knowing:

* Training requests carry ``seq_id``; a repeated (model, seq_id) — the SDK retrying a request whose
  answer was lost — gets the first attempt's future back and is not applied twice (counted in
  ``duplicates``). Likewise (session, model_seq_id) for create_model / create-from-state, (session,
  sampling_session_seq_id) for sampling sessions and (sampler, seq_id) for samples. *Assumed* from the
  SDK's own notes ("the model id the server derives from (session_id, model_seq_id)").
* ``forward_backward`` accepts ``cross_entropy`` (other loss functions fail in their future: the fake
  does not implement them). Each datum needs 1-D ``target_tokens`` and ``weights`` as long as its
  ``model_input``, else the future fails (category user). Output: per datum ``logprobs`` and
  ``elementwise_loss`` (float32, one per position), metric ``loss:sum`` = Σ weight × NLL, where the
  NLL of a token is a hash in [0.5, 3) times 0.9 per optimizer step the run has taken.
* Checkpoint paths: ``save_state(name)`` → ``tinker://<model_id>/weights/<name>`` (the run's step,
  rank and base model); ``save_weights_for_sampler(name)`` → ``tinker://<model_id>/sampler_weights/<name>``.
  Saving an existing name without ``overwrite`` fails in its future (category user). Model ids are
  ``<session_id>:train:<n>``. ``create_training_client_from_state(path)`` (and the deprecated
  ``load_state``) restore the step counter from the checkpoint; an unknown path fails in its future.
* A sampling client on a training ``weights/`` path is created, but each sample then fails (category
  user), as reported for the live service (tinker-feedback issue 74, "Unknown client error").
  An unknown ``tinker://`` path is ``404`` at ``create_sampling_client``.
* ``compute_logprobs`` (a sample with ``prompt_logprobs``): ``None`` at position 0 and before
  ``prompt_logprobs_last_n``; a hash of (model, prefix, token) in (-4.05, -0.05] elsewhere. Top-k /
  target / alt-token logprobs are not implemented and fail in their future (category server).

Counters and records, on ``fake.state`` (read them under ``fake.state.lock``):

``requests`` / ``faults_injected`` / ``retries_seen`` / ``duplicates``
    ``Counter`` per route: requests received (faulted ones included), faults sent (key
    ``"<route>:<kind>"``), requests the SDK marked as a retry (``x-stainless-retry-count`` > 0), and
    repeated seq_ids. ``auth_failures``: 401s sent.
``runs``
    ``{model_id: FakeRun}``: ``base_model``, ``rank``, ``step`` (optimizer steps, restored ones
    included), ``forward_backwards``, ``datums`` (list of :class:`DatumRecord`), ``optim_params`` (the
    Adam params of each step this run took itself, as sent: ``len()`` is the steps it trained),
    ``loaded_from`` (checkpoint path or None), ``optimizer_restored``, ``user_metadata``.
    ``optim_steps``: optimizer steps applied over all runs — what a resumed job paid for twice shows here.
``datums``
    Every :class:`DatumRecord` received, in order: ``model_id``, ``seq_id``, ``loss_fn``, ``tokens``,
    ``target_tokens``, ``weights``, ``inputs`` (every loss_fn input as a numpy array).
``checkpoints`` / ``saves`` / ``loads``
    ``{path: FakeCheckpoint}`` (``kind`` "training" or "sampler", ``model_id``, ``name``, ``step``,
    ``base_model``, ``rank``, ``user_metadata``); ``saves`` a ``Counter`` by kind; ``loads`` an int.
``samples``
    Every :class:`SampleRecord`: ``sampler_id``, ``model_path``, ``base_model``, ``prompt``,
    ``num_samples``, ``params`` (sampling params as sent), ``outputs`` (token lists).
``tokens``
    ``Counter``: ``prefill`` (prompt tokens of sample requests), ``sampled`` (completion tokens),
    ``trained`` (model-input tokens of forward_backward), ``forward`` (of forward-only passes).
``sessions`` / ``heartbeats`` / ``finished`` / ``telemetry`` / ``log``
    Session ids created, heartbeats per session, finish status per session, the telemetry events
    the SDK sent (JSON, as received), and ``(method, path, status)`` of every request (status ``"drop"`` for a cut one).

What the SDK retries by itself (0.38.0 source; measured against this fake in tests/test_fake_tinker.py),
so the backend must not wrap another retry loop around it, only bound the time:

* HTTP client (every call unless it passes ``max_retries=0``): up to 10 retries on 408/409/429/5xx
  and connection errors; sleeps ``Retry-After``/``retry-after-ms`` when 0 < it ≤ 60 s, else
  ``min(0.5·2^n, 10) s × U(0.75, 1)``; never a 400/401/403/404/422.
* ``execute_with_retries`` (wraps forward_backward, optim_step, save/load, get_info, the client
  config fetch, the sample submission; not create_model, create_session, create_sampling_session):
  retries 408/409/429/5xx, connection errors and timeouts, sleeping ``min(2^n, 30) s``, starting new
  attempts for 5 minutes; a 402 pauses (5 s sleeps) for up to an hour. So a persistent 5xx on
  forward_backward surfaces after ~5–6 minutes (each attempt is itself ~57 s of HTTP retries); on
  create_model after ~57 s.
* ``retrieve_future`` polling: 5xx/408 polled again at once; 429 and connection errors back off
  ``min(2^n, 30) s``; a bare 400 thrice; 410 raises ``RetryableException``; other 4xx raise
  ``ValueError`` ("Error retrieving result: ..."); a failed future raises ``RequestFailedError``.
* Sampling: a 429 on submission backs every sample off 1 s (5 s for prompts > 128 KiB); a whole
  sample is retried by ``RetryHandler`` on connection errors and retryable codes without an attempt
  limit (``0.5·2^n`` s up to 10 s, until 2 h without progress).
* Telemetry: a fatal future error is reported to ``/api/v1/telemetry`` with the request headers,
  ``X-API-Key`` included (tests pin it). It goes to the provider's own URL; ``TINKER_TELEMETRY=0``
  turns telemetry off.

The SDK and the network: ``import tinker`` needs none. A ``ServiceClient`` talks only to its base URL
(config, session, heartbeat every 10 s, telemetry to ``/api/v1/telemetry`` unless
``TINKER_TELEMETRY=0``). ``TrainingClient.get_tokenizer()`` / ``SamplingClient.get_tokenizer()``
download the tokenizer from the Hugging Face hub (``AutoTokenizer.from_pretrained``): offline code
must bring its own tokenizer.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, Self
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .fake_tinker_model import (
    DEFAULT_VOCAB,
    SampleCall,
    Sampler,
    default_sampler,
    digest,
    extend_context,
    prefix_context,
    prompt_logprobs,
    text_sampler,
    token_logprob,
    token_nll,
)
from .fake_tinker_proto import (
    WireError,
    WireSequence,
    decode_forward_backward,
    encode_forward_backward_output,
    encode_sample_response,
)
from .fake_tinker_state import (
    DEFAULT_MODELS,
    Category,
    DatumRecord,
    FakeCheckpoint,
    FakeRun,
    FaultKind,
    Faults,
    SampleRecord,
    ServedModel,
    TinkerState,
    _Future,
    _Sampler,
)
from .httpfake import Drop, FakeServer, JsonHandler

#: the key the fake accepts by default (the SDK insists on the ``tml-`` prefix)
FAKE_API_KEY = "tml-fake-0123456789abcdef"
__all__ = [
    "DEFAULT_MODELS",
    "FAKE_API_KEY",
    "DatumRecord",
    "FakeCheckpoint",
    "FakeRun",
    "FakeTinker",
    "Faults",
    "SampleCall",
    "SampleRecord",
    "ServedModel",
    "TinkerState",
    "serve_tinker",
    "text_sampler",
]
PROTOBUF = "application/x-protobuf"


class _Refuse(Exception):
    """An HTTP error answer, raised by a route: ``status`` and ``{"detail": detail}``."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_EXACT_ROUTES: dict[tuple[str, str], str] = {
    ("POST", "/api/v1/client/config"): "client_config",
    ("POST", "/api/v1/client/dynamic_config"): "dynamic_config",
    ("POST", "/api/v1/create_session"): "create_session",
    ("POST", "/api/v1/session_heartbeat"): "heartbeat",
    ("POST", "/api/v1/telemetry"): "telemetry",
    ("GET", "/api/v1/healthz"): "healthz",
    ("GET", "/api/v1/get_server_capabilities"): "capabilities",
    ("POST", "/api/v1/create_model"): "create_model",
    ("POST", "/api/v1/get_info"): "get_info",
    ("POST", "/api/v1/forward_backward"): "forward_backward",
    ("POST", "/api/v1/optim_step"): "optim_step",
    ("POST", "/api/v1/save_weights"): "save_weights",
    ("POST", "/api/v1/save_weights_for_sampler"): "save_weights_for_sampler",
    ("POST", "/api/v1/load_weights"): "load_weights",
    ("POST", "/api/v1/create_sampling_session"): "create_sampling_session",
    ("POST", "/api/v1/asample"): "asample",
    ("POST", "/api/v1/retrieve_future"): "retrieve_future",
    ("POST", "/api/v1/cancel_future"): "cancel_future",
    ("POST", "/api/v1/weights_info"): "weights_info",
    ("GET", "/api/v1/training_runs"): "list_training_runs",
}
_PATTERN_ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"/api/v1/sessions/(?P<id>[^/]+)/finish"), "finish_session"),
    ("GET", re.compile(r"/api/v1/samplers/(?P<id>[^/]+)"), "get_sampler"),
    ("GET", re.compile(r"/api/v1/training_runs/(?P<id>[^/]+)/checkpoints"), "list_checkpoints"),
    ("GET", re.compile(r"/api/v1/training_runs/(?P<id>[^/]+)"), "training_run"),
)
_ALL_ROUTES = frozenset(_EXACT_ROUTES.values()) | {name for _, _, name in _PATTERN_ROUTES}
_NO_AUTH = frozenset({"healthz"})
_ERROR_TEXT = {429: "Rate limit exceeded", 500: "Internal Server Error", 503: "Service Unavailable"}


def _route(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    path = path.split("?", 1)[0]
    if (name := _EXACT_ROUTES.get((method, path))) is not None:
        return name, {}
    for m, pattern, name in _PATTERN_ROUTES:
        if m == method and (match := pattern.fullmatch(path)):
            return name, match.groupdict()
    return None


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat()


class _Handler(JsonHandler):
    server: Any  # FakeHTTPServer[TinkerState]
    json_separators = (",", ":")

    @property
    def st(self) -> TinkerState:
        return self.server.state  # type: ignore[no-any-return]

    # -- plumbing ------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        st = self.st
        body = self._read_body()
        found = _route(method, self.path)
        if found is None:
            self._send_json(404, {"detail": f"FakeTinker does not serve {method} {self.path}"})
            return
        route, params = found
        with st.lock:
            st.requests[route] += 1
            if int(self.headers.get("x-stainless-retry-count") or 0) > 0:
                st.retries_seen[route] += 1
            if route not in _NO_AUTH and self.headers.get("X-API-Key") not in st.api_keys:
                st.auth_failures += 1
                st.log.append((method, self.path, 401))
                authorized = False
            else:
                authorized = True
                fault = self._pick_fault(st, route, body)
        if not authorized:
            self._send_json(401, {"detail": "Invalid API key"})
            return
        if fault is not None and fault != "drop_after":
            self._send_fault(st, method, route, fault)
            return
        try:
            if route == "retrieve_future":
                status, payload, ctype = self._retrieve(st, body)
            else:
                with st.lock:
                    status, payload, ctype = getattr(self, f"_r_{route}")(st, body, params)
        except _Refuse as e:
            status, payload, ctype = e.status, {"detail": e.detail}, "application/json"
        except (WireError, ValueError, KeyError, TypeError) as e:
            status, payload, ctype = 400, {"detail": f"{type(e).__name__}: {e}"}, "application/json"
        if fault == "drop_after":
            self._send_fault(st, method, route, fault)
            return
        with st.lock:
            st.log.append((method, self.path, status))
        if isinstance(payload, bytes):
            self._send_bytes(status, payload, ctype)
        else:
            self._send_json(status, payload)

    def _pick_fault(self, st: TinkerState, route: str, body: bytes) -> FaultKind | int | None:
        """Called under the lock: a queued one-shot fault, else the deterministic random one."""
        queued = st._next_faults.get(route)
        if queued:
            return queued.popleft()
        f = st.faults
        routes = f.routes if f.routes is not None else _ALL_ROUTES - {"telemetry"}
        if f.rate <= 0 or route not in routes or not f.kinds:
            return None
        key = (route, digest(body))
        attempt = st._attempts[key]
        st._attempts[key] += 1
        u = digest(f.seed, key, attempt) / 2.0**64
        if u >= f.rate or st._in_a_row[key] >= f.max_in_a_row:
            st._in_a_row[key] = 0
            return None
        st._in_a_row[key] += 1
        return f.kinds[digest(f.seed, key, attempt, "kind") % len(f.kinds)]

    def _send_fault(self, st: TinkerState, method: str, route: str, fault: FaultKind | int) -> None:
        with st.lock:
            st.faults_injected[f"{route}:{fault}"] += 1
            st.log.append((method, self.path, "drop" if str(fault).startswith("drop") else int(fault)))
        if fault in ("drop", "drop_after"):
            raise Drop
        status = int(fault)
        headers = {}
        if status == 429:
            after = st.faults.retry_after_s
            headers = {"Retry-After": str(max(1, math.ceil(after))), "retry-after-ms": str(int(after * 1000))}
        self._send_json(status, {"detail": _ERROR_TEXT.get(status, f"Error {status}")}, headers)

    @staticmethod
    def _json(body: bytes) -> dict[str, Any]:
        data = json.loads(body or b"{}")
        if not isinstance(data, dict):
            raise ValueError("request body must be a JSON object")
        return data

    @staticmethod
    def _ok(payload: dict[str, Any] | None) -> tuple[int, Any, str]:
        return 200, payload, "application/json"

    # -- futures -------------------------------------------------------------------------------

    def _submit(
        self,
        st: TinkerState,
        route: str,
        key: tuple[object, ...],
        work: Callable[[], tuple[bytes | dict[str, Any], str]],
        extra: dict[str, Any] | None = None,
    ) -> tuple[int, Any, str]:
        """Create (or, for a repeated idempotency key, return again) the future of a request.

        ``work`` runs now, under the lock, unless a queued ``fail_future`` for the route fails the
        request first; a ``_Refuse`` from it is the failed future of a user error.
        """
        if key in st._idempotent:
            st.duplicates[route] += 1
            return self._ok(st._idempotent[key])
        request_id = f"req-{route}-{st.next_id('request'):06d}"
        future = _Future(ready_at=time.monotonic() + st.delays.get(route, 0.0))
        failures = st._next_failures.get(route)
        if failures:
            future.error = failures.popleft()
        else:
            try:
                result, future.content_type = work()
                future.body = result if isinstance(result, bytes) else json.dumps(result).encode()
            except _Refuse as e:
                future.error = (e.detail, "user" if e.status < 500 else "server")
        st._futures[request_id] = future
        answer = {"request_id": request_id, **(extra or {})}
        st._idempotent[key] = answer
        return self._ok(answer)

    def _retrieve(self, st: TinkerState, body: bytes) -> tuple[int, Any, str]:
        request_id = str(self._json(body)["request_id"])
        with st.lock:
            future = st._futures.get(request_id)
            long_poll = st.long_poll_s
        if future is None:
            raise _Refuse(404, f"Future {request_id} not found")
        wait = future.ready_at - time.monotonic()
        if wait > 0:
            time.sleep(min(wait, long_poll))
            if future.ready_at > time.monotonic():
                return self._ok({"type": "try_again", "request_id": request_id, "queue_state": "active"})
        if future.error is not None:
            return self._ok({"error": future.error[0], "category": future.error[1]})
        return 200, future.body, future.content_type

    # -- session and configuration -------------------------------------------------------------

    def _r_client_config(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        return self._ok(
            {
                "pjwt_auth_enabled": False,  # plain API keys: no /auth/token exchange
                "use_pyqwest_transport": st.pyqwest,
                "proto_compress_fwdbwd": st.compress_fwdbwd,
                "fwdbwd_max_chunk_len": st.fwdbwd_max_chunk_len,
                "sample_use_retrieve_futures": False,  # one /retrieve_future poll per request
                "sample_join_sampling_session": False,
                "custom_loss_server_side": False,
            }
        )

    def _r_dynamic_config(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        return self._ok({"refresh_interval_sec": 300, "sample_cancel_enabled": False})

    def _r_create_session(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        self._json(body)
        session_id = f"{st.next_id('session'):08x}-fake-session"
        st.sessions.append(session_id)
        return self._ok({"type": "create_session", "session_id": session_id})

    def _session(self, st: TinkerState, session_id: object) -> str:
        if session_id not in st.sessions:
            raise _Refuse(404, f"Session {session_id} not found")
        if session_id in st.finished:
            raise _Refuse(410, f"Session {session_id} has finished")
        return str(session_id)

    def _r_heartbeat(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        session_id = self._session(st, self._json(body).get("session_id"))
        st.heartbeats[session_id] += 1
        return self._ok({"type": "session_heartbeat"})

    def _r_finish_session(self, st: TinkerState, body: bytes, p: dict[str, str]) -> tuple[int, Any, str]:
        session_id = self._session(st, p["id"])
        st.finished[session_id] = str((self._json(body).get("reason") or {}).get("type"))
        return self._ok(None)

    def _r_telemetry(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        st.telemetry.extend(self._json(body).get("events") or [])
        return self._ok({"status": "accepted"})

    def _r_healthz(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        return self._ok({"status": "ok"})

    def _r_cancel_future(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        return self._ok(None)

    def _r_capabilities(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        models = [
            {
                "model_name": m.name,
                "max_context_length": m.max_context_length,
                "trainable": m.trainable,
                "sampleable": m.sampleable,
            }
            for m in st.models.values()
        ]
        return self._ok({"supported_models": models})

    # -- training ------------------------------------------------------------------------------

    def _run(self, st: TinkerState, model_id: object) -> FakeRun:
        run = st.runs.get(str(model_id))
        if run is None:
            raise _Refuse(404, f"Model {model_id} not found")
        return run

    def _r_create_model(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        session_id = self._session(st, req.get("session_id"))
        seq = int(req["model_seq_id"])
        base = str(req["base_model"])
        served = st.models.get(base)
        refusal = None
        if served is None or not served.trainable:
            trainable = sorted(m.name for m in st.models.values() if m.trainable)
            refusal = _Refuse(400, f"Base model {base!r} is not supported for training; supported: {trainable}")
            if st.unknown_model == "400":
                raise refusal
        model_id = f"{session_id}:train:{seq}"

        def work() -> tuple[dict[str, Any], str]:
            if refusal is not None:
                raise refusal
            rank = int((req.get("lora_config") or {}).get("rank", 32))
            st.runs[model_id] = FakeRun(model_id, base, rank, user_metadata=req.get("user_metadata"))
            return {"model_id": model_id, "type": "create_model"}, "application/json"

        return self._submit(st, "create_model", ("model", session_id, seq), work, {"model_id": model_id})

    def _r_get_info(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        run = self._run(st, self._json(body).get("model_id"))
        return self._ok(
            {
                "type": "get_info",
                "model_id": run.model_id,
                "model_data": {"arch": "fake", "model_name": run.base_model, "tokenizer_id": run.base_model},
                "is_lora": True,
                "lora_rank": run.rank,
                "model_name": run.base_model,
            }
        )

    def _r_forward_backward(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = decode_forward_backward(body, self.headers.get("Content-Encoding"))
        run = self._run(st, req.model_id)

        def work() -> tuple[bytes, str]:
            if req.loss_fn != "cross_entropy":
                raise _Refuse(501, f"FakeTinker implements loss_fn 'cross_entropy' only, not {req.loss_fn!r}")
            records = []
            for i, d in enumerate(req.data):
                targets, weights = d.loss_fn_inputs.get("target_tokens"), d.loss_fn_inputs.get("weights")
                if targets is None or weights is None:
                    raise _Refuse(400, f"datum {i}: cross_entropy needs loss_fn_inputs target_tokens and weights")
                if targets.shape != (len(d.tokens),) or weights.shape != (len(d.tokens),):
                    raise _Refuse(
                        400,
                        f"datum {i}: target_tokens {list(targets.shape)} and weights {list(weights.shape)} "
                        f"must both be [{len(d.tokens)}], the length of model_input",
                    )
                records.append(
                    DatumRecord(
                        run.model_id,
                        req.seq_id,
                        req.loss_fn,
                        d.tokens,
                        tuple(int(t) for t in targets),
                        tuple(float(w) for w in weights),
                        d.loss_fn_inputs,
                    )
                )
            outputs, loss_sum = [], 0.0
            for r in records:
                context, nll = 0, []
                for token, target in zip(r.tokens, r.target_tokens, strict=True):
                    context = extend_context(context, token)
                    nll.append(token_nll(run.base_model, context, target, run.step))
                elementwise = np.asarray(nll) * np.asarray(r.weights)
                loss_sum += float(elementwise.sum())
                outputs.append({"logprobs": -np.asarray(nll), "elementwise_loss": elementwise})
            n_tokens = sum(len(r.tokens) for r in records)
            if req.forward_only:
                st.tokens["forward"] += n_tokens
            else:
                st.tokens["trained"] += n_tokens
                run.forward_backwards += 1
                run.datums.extend(records)
                st.datums.extend(records)
            return encode_forward_backward_output(outputs, {"loss:sum": loss_sum}), PROTOBUF

        return self._submit(st, "forward_backward", ("train", run.model_id, req.seq_id), work)

    def _r_optim_step(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        run = self._run(st, req.get("model_id"))
        params = req.get("adam_params") or req.get("optimizer_params") or {}

        def work() -> tuple[dict[str, Any], str]:
            run.step += 1
            run.optim_params.append(params)
            st.optim_steps += 1
            return {"metrics": {"step:max": float(run.step)}}, "application/json"

        return self._submit(st, "optim_step", ("train", run.model_id, req.get("seq_id")), work)

    def _save(
        self, st: TinkerState, run: FakeRun, kind: Literal["training", "sampler"], name: str, req: dict[str, Any]
    ) -> FakeCheckpoint:
        segment = "weights" if kind == "training" else "sampler_weights"
        path = f"tinker://{run.model_id}/{segment}/{name}"
        if path in st.checkpoints and not req.get("overwrite"):
            raise _Refuse(409, f"Checkpoint {path} already exists; pass overwrite=True to replace it")
        checkpoint = FakeCheckpoint(
            path, kind, run.model_id, name, run.base_model, run.rank, run.step, req.get("user_metadata")
        )
        st.checkpoints[path] = checkpoint
        st.saves[kind] += 1
        return checkpoint

    def _r_save_weights(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        run = self._run(st, req.get("model_id"))

        def work() -> tuple[dict[str, Any], str]:
            checkpoint = self._save(st, run, "training", str(req["path"]), req)
            return {"path": checkpoint.path, "type": "save_weights"}, "application/json"

        return self._submit(st, "save_weights", ("train", run.model_id, req.get("seq_id")), work)

    def _r_save_weights_for_sampler(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        run = self._run(st, req.get("model_id"))

        def work() -> tuple[dict[str, Any], str]:
            if req.get("path"):
                checkpoint = self._save(st, run, "sampler", str(req["path"]), req)
                return {"path": checkpoint.path, "type": "save_weights_for_sampler"}, "application/json"
            # no name: an ephemeral snapshot, handed back as a sampling session at once
            name = f"ephemeral-{st.next_id('ephemeral'):06d}"
            checkpoint = self._save(st, run, "sampler", name, req)
            sampler_id = f"{run.model_id}:sample:{req.get('sampling_session_seq_id')}"
            st._samplers[sampler_id] = _Sampler(run.base_model, checkpoint)
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}, "application/json"

        return self._submit(st, "save_weights_for_sampler", ("train", run.model_id, req.get("seq_id")), work)

    def _r_load_weights(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        path = str(req["path"])
        if req.get("session_id") is not None:  # create-via-load: a new model from a checkpoint
            session_id = self._session(st, req["session_id"])
            seq = int(req["model_seq_id"])
            model_id = f"{session_id}:train:{seq}"
            key: tuple[object, ...] = ("model", session_id, seq)
            run = None
        else:  # legacy: load into an existing model
            run = self._run(st, req.get("model_id"))
            model_id = run.model_id
            key = ("train", model_id, req.get("seq_id"))

        def work() -> tuple[dict[str, Any], str]:
            checkpoint = st.checkpoints.get(path)
            if checkpoint is None or checkpoint.kind != "training":
                raise _Refuse(404, f"Training checkpoint {path} not found")
            target = run
            if target is None:
                base = req.get("base_model") or checkpoint.base_model
                target = st.runs[model_id] = FakeRun(
                    model_id, base, checkpoint.rank, user_metadata=req.get("user_metadata")
                )
            target.step = checkpoint.step
            target.loaded_from = path
            target.optimizer_restored = bool(req.get("optimizer"))
            st.loads += 1
            return {"path": path, "model_id": model_id, "type": "load_weights"}, "application/json"

        return self._submit(st, "load_weights", key, work)

    # -- sampling ------------------------------------------------------------------------------

    def _r_create_sampling_session(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        session_id = self._session(st, req.get("session_id"))
        seq = int(req["sampling_session_seq_id"])
        key = ("sampler", session_id, seq)
        if key in st._idempotent:
            st.duplicates["create_sampling_session"] += 1
            return self._ok(st._idempotent[key])
        if model_path := req.get("model_path"):
            checkpoint = st.checkpoints.get(str(model_path))
            if checkpoint is None:
                raise _Refuse(404, f"Model path {model_path} not found")
            sampler = _Sampler(checkpoint.base_model, checkpoint)
        else:
            base = str(req.get("base_model"))
            served = st.models.get(base)
            if served is None or not served.sampleable:
                sampleable = sorted(m.name for m in st.models.values() if m.sampleable)
                raise _Refuse(400, f"Base model {base!r} is not available for sampling; supported: {sampleable}")
            sampler = _Sampler(base, None)
        sampler_id = f"{session_id}:sample:{seq}"
        st._samplers[sampler_id] = sampler
        st._idempotent[key] = {"type": "create_sampling_session", "sampling_session_id": sampler_id}
        return self._ok(st._idempotent[key])

    def _r_get_sampler(self, st: TinkerState, body: bytes, p: dict[str, str]) -> tuple[int, Any, str]:
        sampler = st._samplers.get(p["id"])
        if sampler is None:
            raise _Refuse(404, f"Sampler {p['id']} not found")
        path = sampler.checkpoint.path if sampler.checkpoint else None
        return self._ok({"sampler_id": p["id"], "base_model": sampler.base_model, "model_path": path})

    def _r_asample(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        req = self._json(body)
        sampler_id = str(req.get("sampling_session_id"))
        sampler = st._samplers.get(sampler_id)
        if sampler is None:
            raise _Refuse(404, f"Sampler {sampler_id} not found")
        num_samples = int(req.get("num_samples", 1))
        key = ("sample", sampler_id, req.get("seq_id"))
        if key in st._idempotent:  # a retried sample keeps the sequence ids of its first answer
            st.duplicates["asample"] += 1
            return self._ok(st._idempotent[key])
        sequence_ids = [f"{sampler_id}:{req.get('seq_id')}:{i}" for i in range(num_samples)]
        return self._submit(
            st,
            "asample",
            key,
            lambda: self._sample(st, sampler, sampler_id, req),
            {"sample_sequence_ids": sequence_ids},
        )

    def _sample(self, st: TinkerState, sampler: _Sampler, sampler_id: str, req: dict[str, Any]) -> tuple[bytes, str]:
        checkpoint = sampler.checkpoint
        if checkpoint is not None and checkpoint.kind == "training":
            raise _Refuse(400, f"Unknown client error: {checkpoint.path} holds training state, not sampler weights")
        if (
            req.get("topk_prompt_logprobs")
            or req.get("topk_sample_logprobs")
            or req.get("prompt_alt_tokens_k")
            or req.get("target_prompt_logprobs")
        ):
            raise _Refuse(501, "FakeTinker does not implement top-k, target or alt-token logprobs")
        prompt = tuple(t for chunk in req["prompt"]["chunks"] for t in chunk["tokens"])
        params = dict(req.get("sampling_params") or {})
        max_tokens = params.get("max_tokens")
        limit = st.models[sampler.base_model].max_context_length if sampler.base_model in st.models else None
        if limit is not None and len(prompt) + (max_tokens or 0) > limit:
            raise _Refuse(400, f"Prompt ({len(prompt)} tokens) plus max_tokens ({max_tokens}) exceeds {limit}")
        stop = params.get("stop")
        stops = [stop] if isinstance(stop, str) else list(stop) if stop is not None else None
        stop_strings = [s for s in stops or [] if isinstance(s, str)]
        stop_tokens = tuple(int(s) for s in stops or [] if not isinstance(s, str))
        if stops is None and st.eos_token is not None:
            stop_tokens = (st.eos_token,)
        if stop_strings and st.decode is None:
            raise _Refuse(501, "FakeTinker(decode=...) is needed to honour stop strings")
        temperature = float(params.get("temperature", 1.0))
        model_key = checkpoint.path if checkpoint else sampler.base_model
        prompt_context = prefix_context(prompt)
        sequences, outputs = [], []
        for i in range(int(req.get("num_samples", 1))):
            if temperature == 0:
                seed = 0
            elif params.get("seed") is not None:
                seed = int(params["seed"])
            else:
                st._nonce += 1
                seed = digest("nonce", st._nonce, time.time_ns())
            call = SampleCall(
                sampler.base_model,
                checkpoint.path if checkpoint else None,
                checkpoint.step if checkpoint else None,
                prompt,
                seed,
                i,
                max_tokens,
                temperature,
                stop_tokens,
            )
            raw = st.sampler(call) if st.sampler else default_sampler(call, st.vocab)
            tokens, stopped = self._truncate(st, list(raw), max_tokens, stop_tokens, stop_strings)
            context, logprobs = prompt_context, []
            for token in tokens:
                logprobs.append(token_logprob(model_key, context, token))
                context = extend_context(context, token)
            sequences.append(WireSequence(tokens, logprobs, stopped))
            outputs.append(tuple(tokens))
        scored = None
        if req.get("prompt_logprobs"):
            scored = prompt_logprobs(model_key, prompt, req.get("prompt_logprobs_last_n"))
        st.tokens["prefill"] += len(prompt)
        st.tokens["sampled"] += sum(len(o) for o in outputs)
        st.samples.append(
            SampleRecord(
                sampler_id,
                checkpoint.path if checkpoint else None,
                sampler.base_model,
                prompt,
                len(outputs),
                params,
                tuple(outputs),
            )
        )
        return encode_sample_response(sequences, scored), PROTOBUF

    @staticmethod
    def _truncate(
        st: TinkerState, raw: list[int], max_tokens: int | None, stop_tokens: tuple[int, ...], stop_strings: list[str]
    ) -> tuple[list[int], bool]:
        """The model's tokens cut at the first stop (kept, "stop") or at max_tokens ("length")."""
        out: list[int] = []
        for token in raw:
            if max_tokens is not None and len(out) >= max_tokens:
                return out, False
            out.append(int(token))
            if token in stop_tokens:
                return out, True
            if stop_strings and st.decode is not None and any(s in st.decode(out) for s in stop_strings):
                return out, True
        # the model ended on its own (an EOS outside the stop set); exactly max_tokens is "length"
        return out, max_tokens is None or len(out) < max_tokens

    # -- REST ----------------------------------------------------------------------------------

    @staticmethod
    def _checkpoint_json(c: FakeCheckpoint) -> dict[str, Any]:
        return {
            "checkpoint_id": c.path.split("/", 3)[3],
            "checkpoint_type": c.kind,
            "time": _iso(c.created),
            "tinker_path": c.path,
            "user_metadata": c.user_metadata,
        }

    def _r_list_checkpoints(self, st: TinkerState, body: bytes, p: dict[str, str]) -> tuple[int, Any, str]:
        run = self._run(st, p["id"])
        found = [self._checkpoint_json(c) for c in st.checkpoints.values() if c.model_id == run.model_id]
        return self._ok({"checkpoints": found})

    def _r_weights_info(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        path = str(self._json(body).get("tinker_path"))
        checkpoint = st.checkpoints.get(path)
        if checkpoint is None:
            raise _Refuse(404, f"Checkpoint {path} not found")
        return self._ok({"base_model": checkpoint.base_model, "is_lora": True, "lora_rank": checkpoint.rank})

    def _training_run_json(self, st: TinkerState, run: FakeRun) -> dict[str, Any]:
        mine = [c for c in st.checkpoints.values() if c.model_id == run.model_id]
        last = {kind: [c for c in mine if c.kind == kind] for kind in ("training", "sampler")}
        return {
            "training_run_id": run.model_id,
            "base_model": run.base_model,
            "model_owner": "fake-owner",
            "is_lora": True,
            "lora_rank": run.rank,
            "last_request_time": _iso(time.time()),
            "last_checkpoint": self._checkpoint_json(last["training"][-1]) if last["training"] else None,
            "last_sampler_checkpoint": self._checkpoint_json(last["sampler"][-1]) if last["sampler"] else None,
            "user_metadata": run.user_metadata,
        }

    def _r_training_run(self, st: TinkerState, body: bytes, p: dict[str, str]) -> tuple[int, Any, str]:
        return self._ok(self._training_run_json(st, self._run(st, p["id"])))

    def _r_list_training_runs(self, st: TinkerState, body: bytes, _: dict[str, str]) -> tuple[int, Any, str]:
        query = parse_qs(urlsplit(self.path).query)
        offset, limit = int(query.get("offset", ["0"])[0]), int(query.get("limit", ["20"])[0])
        newest_first = sorted(st.runs.values(), key=lambda r: r.created, reverse=True)
        page = [self._training_run_json(st, r) for r in newest_first[offset : offset + limit]]
        cursor = {"offset": offset, "limit": limit, "total_count": len(newest_first)}
        return self._ok({"training_runs": page, "cursor": cursor})


class FakeTinker(FakeServer[TinkerState]):
    """The fake service; see the module docstring for every option, fault knob and counter."""

    handler = _Handler
    thread_name = "fake-tinker"

    def __init__(
        self,
        *,
        models: Iterable[str | ServedModel] = DEFAULT_MODELS,
        api_keys: Collection[str] = (FAKE_API_KEY,),
        sampler: Sampler | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        eos_token: int | None = None,
        vocab: range = DEFAULT_VOCAB,
        delays: Mapping[str, float] | None = None,
        faults: Faults | None = None,
        unknown_model: Literal["400", "future"] = "400",
        long_poll_s: float = 1.0,
        compress_fwdbwd: bool = False,
        fwdbwd_max_chunk_len: int = 1024,
        pyqwest: bool = True,
    ) -> None:
        served = [m if isinstance(m, ServedModel) else ServedModel(m) for m in models]
        super().__init__(
            TinkerState(
                models={m.name: m for m in served},
                api_keys=set(api_keys),
                sampler=sampler,
                decode=decode,
                eos_token=eos_token,
                vocab=vocab,
                delays=dict(delays or {}),
                faults=faults or Faults(),
                unknown_model=unknown_model,
                long_poll_s=long_poll_s,
                compress_fwdbwd=compress_fwdbwd,
                fwdbwd_max_chunk_len=fwdbwd_max_chunk_len,
                pyqwest=pyqwest,
            )
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_key(self) -> str:
        return FAKE_API_KEY

    def env(self) -> dict[str, str]:
        return {"TINKER_BASE_URL": self.base_url, "TINKER_API_KEY": FAKE_API_KEY}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, route: str, kind: FaultKind | int, count: int = 1) -> None:
        """The next ``count`` requests of ``route`` get ``kind`` (a status code, "drop", "drop_after")."""
        self._check_route(route)
        with self.state.lock:
            self.state._next_faults.setdefault(route, deque()).extend([kind] * count)

    def fail_future(
        self, route: str, message: str = "Injected failure", category: Category = "server", count: int = 1
    ) -> None:
        """The next ``count`` futures of ``route`` fail (``RequestFailedError``) without taking effect."""
        self._check_route(route)
        with self.state.lock:
            self.state._next_failures.setdefault(route, deque()).extend([(message, category)] * count)

    @staticmethod
    def _check_route(route: str) -> None:
        if route not in _ALL_ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {sorted(_ALL_ROUTES)}")

    def steps(self, model_id: str) -> int:
        """Optimizer steps the run ``model_id`` has taken (restored ones included)."""
        with self.state.lock:
            return self.state.runs[model_id].step


def serve_tinker(**options: Any) -> Iterator[FakeTinker]:
    """Start a fake for the duration of a fixture (``yield from serve_tinker(...)``), then stop it."""
    with FakeTinker(**options) as fake:
        yield fake
