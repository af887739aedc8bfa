"""Continuous batching for the llama.cpp backend: many calls decoded by one ``llama_decode``.

Why: on 2 CPU cores one sequence of the bundled 0.5B model decodes ~25 tokens/s, while 8
sequences decoded together give ~72 tokens/s in all (measured: ``bench/local_throughput.py``),
and a debate keeps dozens of calls in flight. So the backend queues calls here and this engine
keeps up to ``n_seq`` of them in one context, each in its own KV sequence: every step decodes
the next token of every running sequence plus a chunk of any newly admitted prompt, then
samples each sequence with its own seeded sampler chain.

LoRA adapters attach to a *context*, not to a sequence, so all running sequences share one
adapter. The engine serves the adapter of the oldest waiting call; it admits further calls of
that adapter as slots free up, and switches only when none of them is running or waiting. In a
finetuned society each agent's calls therefore run as one batch, one agent after another.

The sampler chain is llama-cpp-python's default for chat completions (top-k 40, top-p, min-p
0.05, temperature, seeded draw; greedy at temperature 0), so a recipe means the same thing
with and without batching.

Determinism. Each call samples with its own seeded sampler, but by default its logits depend on
what else shares its decodes, and that depends on when calls arrive (the event loop admits them
while this thread decodes). What changes a row's floating-point result in llama.cpp 0.3.36 on
the CPU (read in ggml's source, confirmed by comparing logits bitwise):

- the unified KV pool: a finished sequence leaves a hole, the running ones' next tokens fill it,
  and flash attention accumulates over a sequence's cells in pool order, not position order;
- kernels chosen by the number of rows: one row uses ``vec_dot`` where two or more use llamafile's
  sgemm, and one query over >= 512 cells splits the KV across threads; repacked weights
  (``extra_buffers``) run blocks of 4 rows with one kernel and the rest with another; K-quant
  weights take a tiled product from 8 rows; flash attention tiles from 64 query rows;
- prompt chunks mixed with other sequences' rows, cut wherever the step's budget ended.

``deterministic`` mode (the backend option) makes every row's numerics independent of its
batch-mates instead of trying to make the schedule repeatable, which no wall-clock-free rule
could: one KV stream per sequence (``kv_unified = False``), so a sequence's cells sit in position
order from cell 0; flash attention on; a decode step holds one row per sequence id over a range
of consecutive ids (llama.cpp then decodes it as one piece) and at least two rows, an id without
a generating sequence getting a filler row that is removed after the decode (a spare stream
serves a call alone); each prompt chunk is decoded alone and ends at a multiple of ``n_batch``.
The backend loads the model without repacked weights and turns ggml's tiled K-quant product off
(``GGML_CPU_TILED_MM=0``). Then the same call (messages, sampling, seed) gives the same text
alone or among any other calls (``bench/local_determinism.py``: logits bitwise identical at every
step), so a fresh rerun of a run reproduces its transcripts on the same machine and build.

Everything here runs on the backend's one llama.cpp thread; the backend's queue, fed in through
``run(feed)``, is the only thing shared with other threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentsoc.backend import FatalBackendError
from agentsoc.types import Sampling

#: llama-cpp-python's defaults for the samplers a recipe does not set
TOP_K = 40
MIN_P = 0.05
#: llama.cpp's "pick a random seed" value, used when a call carries no seed
RANDOM_SEED = 0xFFFFFFFF
#: token of the filler rows of deterministic mode (any valid id; its output is discarded)
FILLER_TOKEN = 0


@dataclass
class Generated:
    """What one call produced: the text, how it ended, and its token counts."""

    text: str
    finish_reason: str  # "stop" (end-of-generation token) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Request:
    """One queued call. ``prompt`` is tokenized on the engine's thread, like every llama.cpp call."""

    adapter: str | None
    prompt: Callable[[], list[int]]
    sampling: Sampling
    future: concurrent.futures.Future[Generated] = field(default_factory=concurrent.futures.Future)


def fail(request: Request, exc: BaseException) -> None:
    """Fail a call that has not started; one its caller already cancelled is left alone."""
    if request.future.set_running_or_notify_cancel():
        request.future.set_exception(exc)


@dataclass
class _Running:
    request: Request
    seq: int
    sampler: Any
    todo: list[int]  # prompt tokens not yet decoded
    pos: int = 0  # next position in the sequence
    prompt_len: int = 0
    out: list[int] = field(default_factory=list)
    row: int = -1  # index of this sequence's logits in the last batch, -1 if none


class BatchEngine:
    """A llama.cpp context with ``n_seq`` sequences, fed from a queue of :class:`Request`."""

    def __init__(
        self,
        llama_cpp: Any,
        model: Any,
        *,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        n_threads: int,
        attach: Callable[[Any, str | None], None],
        deterministic: bool = False,
    ) -> None:
        """``model`` is the loaded ``llama_model``; ``attach(ctx, adapter)`` sets the context's adapter.

        ``deterministic``: batch-invariant decoding (see the module docstring); the model must then
        have been loaded without repacked weight buffers.
        """
        self._L = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.deterministic = deterministic
        # streams: one KV stream per sequence, plus a spare one for a filler row (deterministic)
        n_streams = n_seq + 1 if deterministic else n_seq
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_streams
        params.n_batch = params.n_ubatch = n_batch
        params.n_seq_max = n_streams
        # default: one KV pool for all sequences (kv_unified). With a stream per sequence llama.cpp
        # splits a batch into pieces of consecutive sequence ids with equally many tokens each, and
        # this engine's mixed batches decoded 35% slower (measured 33 vs 51 tokens/s, 8 sequences).
        # The pool has room for every sequence at its full length. Deterministic mode needs a
        # stream per sequence and shapes its batches so that llama.cpp never splits them.
        params.kv_unified = not deterministic
        if deterministic:
            params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        params.n_threads = params.n_threads_batch = n_threads
        self._ctx = llama_cpp.llama_init_from_model(model, params)
        if not self._ctx:
            raise FatalBackendError(f"llama.cpp could not create a context for {n_seq} sequences of {n_ctx_seq} tokens")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self.n_seq = n_seq
        self.n_ctx_seq = n_ctx_seq
        self.n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._attach = attach
        self._adapter: str | None = None
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: dict[int, _Running] = {}
        self._aborted = False
        #: counters for benchmarks and tests: adapter switches, decode calls, sequences per decode,
        #: filler rows decoded (deterministic mode)
        self.switches = 0
        self.decodes = 0
        self.max_batch_seqs = 0
        self.fillers = 0

    def abort(self) -> None:
        """Stop :meth:`run` after the decode step in flight (any thread may call it): on Ctrl-C the
        process must exit in seconds, not after every running sequence has decoded to its end —
        whatever was in flight is either cached already or asked again on resume."""
        self._aborted = True

    def run(self, feed: Callable[[], list[Request]]) -> None:
        """Decode until no call is waiting or running; ``feed()`` hands over newly queued calls."""
        while True:
            if self._aborted:
                self._waiting.extend(feed())  # taken off the caller's queue too, so its drain loop ends
                self.fail_all(FatalBackendError("the backend was closed"))
                return
            self._waiting.extend(feed())
            self._admit()
            if not self._running:
                if not self._waiting:
                    return
                continue
            try:
                self._step()
            except Exception as exc:  # a failed decode fails the calls in it, not the engine
                for r in list(self._running.values()):
                    self._finish(r, exc)

    def _admit(self) -> None:
        """Fill free sequences with waiting calls of the current adapter; switch adapters when idle."""
        while len(self._running) < self.n_seq and self._waiting:
            if not self._running and self._waiting[0].adapter != self._adapter:
                wanted = self._waiting[0].adapter
                try:
                    self._switch(wanted)
                except Exception as exc:  # e.g. a missing adapter file: fail its calls, serve the rest
                    for r in [r for r in self._waiting if r.adapter == wanted]:
                        self._waiting.remove(r)
                        fail(r, exc)
                    continue
            request = next((r for r in self._waiting if r.adapter == self._adapter), None)
            if request is None:
                return
            self._waiting.remove(request)
            if not request.future.set_running_or_notify_cancel():
                continue  # the caller gave up before the call started
            try:
                self._start(request)
            except Exception as exc:
                request.future.set_exception(exc)

    def _switch(self, adapter: str | None) -> None:
        self._L.llama_memory_clear(self._mem, True)
        self._attach(self._ctx, adapter)
        self._adapter = adapter
        self.switches += 1

    def fail_all(self, exc: BaseException) -> None:
        """Fail every running and waiting call (the engine itself broke)."""
        for r in list(self._running.values()):
            self._finish(r, exc)
        waiting, self._waiting = list(self._waiting), collections.deque()
        for request in waiting:
            fail(request, exc)

    def _start(self, request: Request) -> None:
        prompt = request.prompt()
        if not prompt:
            raise FatalBackendError("empty prompt")
        if len(prompt) >= self.n_ctx_seq:
            raise FatalBackendError(
                f"prompt of {len(prompt)} tokens does not fit the context of {self.n_ctx_seq} tokens per sequence"
                " (raise the backend option n_ctx)"
            )
        seq = next(i for i in range(self.n_seq) if i not in self._running)
        self._running[seq] = _Running(
            request=request, seq=seq, sampler=self._sampler(request.sampling), todo=list(prompt), prompt_len=len(prompt)
        )

    def _sampler(self, s: Sampling) -> Any:
        L = self._L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if s.temperature == 0.0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
            return chain
        for part in (
            L.llama_sampler_init_top_k(TOP_K),
            L.llama_sampler_init_top_p(s.top_p, 1),
            L.llama_sampler_init_min_p(MIN_P, 1),
            L.llama_sampler_init_temp(s.temperature),
            L.llama_sampler_init_dist(RANDOM_SEED if s.seed is None else s.seed & 0xFFFFFFFF),
        ):
            L.llama_sampler_chain_add(chain, part)
        return chain

    def _step(self) -> None:
        if self.deterministic:
            self._step_invariant()
        else:
            self._step_mixed()

    def _step_mixed(self) -> None:
        """One ``llama_decode``: each generating sequence's last token, then prompt chunks."""
        b = self._batch
        b.n_tokens = 0

        def add(r: _Running, token: int, logits: bool) -> None:
            k = b.n_tokens
            b.token[k] = token
            b.pos[k] = r.pos
            b.n_seq_id[k] = 1
            b.seq_id[k][0] = r.seq
            b.logits[k] = logits
            if logits:
                r.row = k
            r.pos += 1
            b.n_tokens += 1

        for r in self._running.values():
            r.row = -1
            if not r.todo:
                add(r, r.out[-1], True)
        for r in self._running.values():
            chunk, r.todo = r.todo[: self.n_batch - b.n_tokens], r.todo[self.n_batch - b.n_tokens :]
            for i, token in enumerate(chunk):
                add(r, token, not r.todo and i == len(chunk) - 1)
        self.max_batch_seqs = max(self.max_batch_seqs, sum(1 for r in self._running.values() if r.row >= 0 or r.todo))
        self._decode()
        for r in list(self._running.values()):
            self._sample(r)

    def _decode(self) -> None:
        rc = self._L.llama_decode(self._ctx, self._batch)
        self.decodes += 1
        if rc != 0:
            raise FatalBackendError(f"llama_decode failed ({rc}) with {len(self._running)} sequences")

    def _sample(self, r: _Running) -> None:
        """Sample ``r``'s next token from its row of the last decode (if it has one)."""
        if r.row < 0:
            return
        token = int(self._L.llama_sampler_sample(r.sampler, self._ctx, r.row))
        r.row = -1
        if self._L.llama_vocab_is_eog(self._vocab, token):
            self._finish(r, "stop")
            return
        r.out.append(token)
        if len(r.out) >= r.request.sampling.max_tokens or r.pos >= self.n_ctx_seq:
            self._finish(r, "length")

    def _step_invariant(self) -> None:
        """Batch-invariant step: one decode of every generating sequence, then prompt chunks alone.

        The decode holds one row per sequence id from the lowest to the highest generating one
        (consecutive ids, so llama.cpp decodes it as one piece), at least two rows; an id without
        a generating sequence gets a filler row at its stream's next position, removed again
        after the decode. Each prompt chunk is decoded in a call of its own and ends at a multiple
        of ``n_batch``, so how a prompt is cut depends on the prompt alone.
        """
        L, b = self._L, self._batch
        generating = sorted(r.seq for r in self._running.values() if not r.todo)
        if generating:
            lo, hi = generating[0], max(generating[-1], generating[0] + 1)  # seq n_seq is the spare stream
            b.n_tokens = 0
            fillers: list[tuple[int, int]] = []
            for seq in range(lo, hi + 1):
                r = self._running.get(seq)
                if r is not None and not r.todo:
                    self._add(seq, r.out[-1], r.pos, True)
                    r.row = b.n_tokens - 1
                    r.pos += 1
                else:  # logits too: the output layer's product must also see >= 2 rows
                    pos = r.pos if r is not None else 0
                    self._add(seq, FILLER_TOKEN, pos, True)
                    fillers.append((seq, pos))
            self.max_batch_seqs = max(self.max_batch_seqs, len(generating))
            self.fillers += len(fillers)
            try:
                self._decode()
            finally:
                for seq, pos in fillers:
                    L.llama_memory_seq_rm(self._mem, seq, pos, -1)
            for seq in generating:
                self._sample(self._running[seq])
        budget = self.n_batch
        for r in sorted(self._running.values(), key=lambda r: r.seq):
            while r.todo and budget > 0:
                n = self.n_batch - r.pos % self.n_batch  # up to the next multiple of n_batch
                chunk, r.todo = r.todo[:n], r.todo[n:]
                b.n_tokens = 0
                for i, token in enumerate(chunk):
                    self._add(r.seq, token, r.pos + i, not r.todo and i == len(chunk) - 1)
                r.row = b.n_tokens - 1 if not r.todo else -1
                r.pos += len(chunk)
                budget -= len(chunk)
                self.max_batch_seqs = max(self.max_batch_seqs, 1)
                self._decode()
                self._sample(r)

    def _add(self, seq: int, token: int, pos: int, logits: bool) -> None:
        b = self._batch
        k = b.n_tokens
        b.token[k] = token
        b.pos[k] = pos
        b.n_seq_id[k] = 1
        b.seq_id[k][0] = seq
        b.logits[k] = logits
        b.n_tokens += 1

    def _finish(self, r: _Running, outcome: str | BaseException) -> None:
        del self._running[r.seq]
        self._L.llama_memory_seq_rm(self._mem, r.seq, -1, -1)
        self._L.llama_sampler_free(r.sampler)
        if isinstance(outcome, BaseException):
            r.request.future.set_exception(outcome)
            return
        text = self.detokenize(r.out)
        r.request.future.set_result(
            Generated(text=text, finish_reason=outcome, prompt_tokens=r.prompt_len, completion_tokens=len(r.out))
        )

    def detokenize(self, tokens: list[int]) -> str:
        buf = ctypes.create_string_buffer(256)
        pieces: list[bytes] = []
        for t in tokens:
            n = self._L.llama_token_to_piece(self._vocab, t, buf, len(buf), 0, False)
            if n < 0:  # piece longer than the buffer
                big = ctypes.create_string_buffer(-n)
                n = self._L.llama_token_to_piece(self._vocab, t, big, len(big), 0, False)
                pieces.append(big.raw[:n])
            else:
                pieces.append(buf.raw[:n])
        return b"".join(pieces).decode("utf-8", errors="ignore")

    def close(self) -> None:
        self.fail_all(FatalBackendError("the backend was closed"))
        self._L.llama_batch_free(self._batch)
        self._L.llama_free(self._ctx)
