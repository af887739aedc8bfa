"""The fake Tinker service's state and records (see :mod:`fakes.fake_tinker` for what they mean).

Plain data, shared between the test and the server's handler threads under ``TinkerState.lock``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .fake_tinker_model import DEFAULT_VOCAB, Sampler

FaultKind = Literal["429", "500", "503", "drop", "drop_after"]
Category = Literal["user", "server", "unknown"]


@dataclass(frozen=True)
class ServedModel:
    name: str
    max_context_length: int = 32768
    trainable: bool = True
    sampleable: bool = True


DEFAULT_MODELS: tuple[ServedModel, ...] = (
    ServedModel("Qwen/Qwen3-8B", max_context_length=32768),
    ServedModel("meta-llama/Llama-3.1-8B-Instruct", max_context_length=131072),
)


@dataclass(frozen=True)
class Faults:
    rate: float = 0.0
    kinds: tuple[FaultKind, ...] = ("429", "500", "503", "drop")
    routes: frozenset[str] | None = None  #: None: every route but telemetry
    seed: int = 0
    retry_after_s: float = 0.05
    max_in_a_row: int = 2


@dataclass(frozen=True)
class DatumRecord:
    model_id: str
    seq_id: int
    loss_fn: str
    tokens: tuple[int, ...]
    target_tokens: tuple[int, ...]
    weights: tuple[float, ...]
    inputs: Mapping[str, np.ndarray]


@dataclass
class FakeRun:
    model_id: str
    base_model: str
    rank: int
    step: int = 0
    forward_backwards: int = 0
    datums: list[DatumRecord] = field(default_factory=list)
    optim_params: list[dict[str, Any]] = field(default_factory=list)
    loaded_from: str | None = None
    optimizer_restored: bool = False
    user_metadata: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class FakeCheckpoint:
    path: str
    kind: Literal["training", "sampler"]
    model_id: str
    name: str
    base_model: str
    rank: int
    step: int
    user_metadata: dict[str, Any] | None = None
    created: float = field(default_factory=time.time)


@dataclass(frozen=True)
class SampleRecord:
    sampler_id: str
    model_path: str | None
    base_model: str
    prompt: tuple[int, ...]
    num_samples: int
    params: Mapping[str, Any]
    outputs: tuple[tuple[int, ...], ...]


@dataclass
class _Future:
    ready_at: float
    body: bytes = b""
    content_type: str = "application/json"
    error: tuple[str, Category] | None = None


@dataclass
class _Sampler:
    base_model: str
    checkpoint: FakeCheckpoint | None


@dataclass
class TinkerState:
    """Everything the fake knows; tests read it under ``lock`` (handler threads write it)."""

    models: dict[str, ServedModel]
    api_keys: set[str]
    sampler: Sampler | None = None
    decode: Callable[[Sequence[int]], str] | None = None
    eos_token: int | None = None
    vocab: range = DEFAULT_VOCAB
    delays: dict[str, float] = field(default_factory=dict)
    faults: Faults = Faults()
    unknown_model: Literal["400", "future"] = "400"
    long_poll_s: float = 1.0
    compress_fwdbwd: bool = False
    fwdbwd_max_chunk_len: int = 1024
    pyqwest: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    # counters and records
    requests: Counter[str] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    retries_seen: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    auth_failures: int = 0
    sessions: list[str] = field(default_factory=list)
    heartbeats: Counter[str] = field(default_factory=Counter)
    finished: dict[str, str] = field(default_factory=dict)
    telemetry: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, FakeRun] = field(default_factory=dict)
    datums: list[DatumRecord] = field(default_factory=list)
    checkpoints: dict[str, FakeCheckpoint] = field(default_factory=dict)
    saves: Counter[str] = field(default_factory=Counter)
    loads: int = 0
    optim_steps: int = 0
    samples: list[SampleRecord] = field(default_factory=list)
    tokens: Counter[str] = field(default_factory=Counter)
    log: list[tuple[str, str, int | str]] = field(default_factory=list)
    # internals
    _samplers: dict[str, _Sampler] = field(default_factory=dict)
    _futures: dict[str, _Future] = field(default_factory=dict)
    _idempotent: dict[tuple[object, ...], dict[str, Any]] = field(default_factory=dict)
    _attempts: Counter[tuple[object, ...]] = field(default_factory=Counter)
    _in_a_row: Counter[tuple[object, ...]] = field(default_factory=Counter)
    _next_faults: dict[str, deque[FaultKind | int]] = field(default_factory=dict)
    _next_failures: dict[str, deque[tuple[str, Category]]] = field(default_factory=dict)
    _ids: Counter[str] = field(default_factory=Counter)
    _nonce: int = 0

    def next_id(self, kind: str) -> int:
        self._ids[kind] += 1
        return self._ids[kind]
