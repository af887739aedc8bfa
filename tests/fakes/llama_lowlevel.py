"""A stand-in for the slice of llama-cpp-python's low-level API that the backend uses.

The "model" is arithmetic on token ids, so tests can predict every output: after token ``t``
the next token is ``t + step``, where ``step`` is 1 on the base and the adapter's id with an
adapter attached; a next token in another decade (19 -> 20, 9 -> 11) is end-of-generation instead. The context checks
what a real one would reject (positions that skip or repeat, more tokens than ``n_batch``,
sequence ids out of range) and logs every decode, so tests can see what was batched together.

With ``kv_unified = False`` (the engine's deterministic mode) every sequence has a KV stream of
``n_ctx / n_seq_max`` cells, and the context records each decode's rows in ``rows``, so tests can
check the shapes that make llama.cpp's numerics batch-invariant (``tests/test_llamacpp_batch.py``).
"""

from __future__ import annotations

import ctypes
import types
from dataclasses import dataclass, field
from typing import Any

EOG = 0
LLAMA_FLASH_ATTN_TYPE_AUTO = -1
LLAMA_FLASH_ATTN_TYPE_ENABLED = 1


@dataclass
class FakeContext:
    n_ctx: int
    n_batch: int
    n_seq: int
    kv_unified: bool = True
    flash_attn_type: int = LLAMA_FLASH_ATTN_TYPE_AUTO
    adapter: int | None = None
    kv: dict[int, int] = field(default_factory=dict)  # seq -> tokens stored
    next_token: dict[int, int] = field(default_factory=dict)  # batch row -> predicted token
    #: one entry per decode: (adapter, sequences in the batch, number of tokens)
    log: list[tuple[int | None, tuple[int, ...], int]] = field(default_factory=list)
    #: one entry per decode: its rows as (sequence, position, token, logits wanted)
    rows: list[tuple[tuple[int, int, int, bool], ...]] = field(default_factory=list)


@dataclass
class FakeSampler:
    parts: list[tuple[str, Any]] = field(default_factory=list)


class FakeLlamaCpp:
    """Attributes named like ``llama_cpp``'s functions; state lives on the objects they return."""

    def __init__(self) -> None:
        self.contexts: list[FakeContext] = []
        self.samplers: list[FakeSampler] = []
        self.freed_samplers = 0
        self.adapters: dict[str, int] = {}
        self.fail_decode_at: int | None = None  # make the n-th decode return an error
        self.llama_adapter_lora_p_ctypes = ctypes.c_void_p
        self.LLAMA_FLASH_ATTN_TYPE_AUTO = LLAMA_FLASH_ATTN_TYPE_AUTO
        self.LLAMA_FLASH_ATTN_TYPE_ENABLED = LLAMA_FLASH_ATTN_TYPE_ENABLED

    # model, context, memory
    def llama_model_get_vocab(self, model: Any) -> str:
        return "vocab"

    def llama_context_default_params(self) -> Any:
        return types.SimpleNamespace(
            n_ctx=0,
            n_batch=0,
            n_ubatch=0,
            n_seq_max=1,
            n_threads=1,
            n_threads_batch=1,
            kv_unified=False,
            flash_attn_type=LLAMA_FLASH_ATTN_TYPE_AUTO,
        )

    def llama_init_from_model(self, model: Any, params: Any) -> FakeContext:
        ctx = FakeContext(
            n_ctx=params.n_ctx,
            n_batch=params.n_batch,
            n_seq=params.n_seq_max,
            kv_unified=params.kv_unified,
            flash_attn_type=params.flash_attn_type,
        )
        self.contexts.append(ctx)
        return ctx

    def llama_get_memory(self, ctx: FakeContext) -> FakeContext:
        return ctx

    def llama_memory_clear(self, mem: FakeContext, data: bool) -> None:
        mem.kv.clear()

    def llama_memory_seq_rm(self, mem: FakeContext, seq: int, p0: int, p1: int) -> bool:
        assert p1 == -1, "only tails are removed"
        if p0 <= 0:
            mem.kv.pop(seq, None)
        elif seq in mem.kv:
            mem.kv[seq] = min(mem.kv[seq], p0)
        return True

    def llama_free(self, ctx: FakeContext) -> None:
        pass

    # adapters
    def llama_adapter_lora_init(self, model: Any, path: bytes) -> int:
        return self.adapters.setdefault(path.decode(), 2 + len(self.adapters))

    def llama_adapter_lora_free(self, ptr: int) -> None:
        pass

    def llama_set_adapters_lora(self, ctx: Any, arr: Any, n: int, scales: Any) -> int:
        if isinstance(ctx, FakeContext):
            ctx.adapter = int(arr[0]) if n else None
        return 0

    # batches and decoding
    def llama_batch_init(self, n: int, embd: int, n_seq: int) -> Any:
        return types.SimpleNamespace(
            n_tokens=0,
            token=[0] * n,
            pos=[0] * n,
            n_seq_id=[0] * n,
            seq_id=[[0] for _ in range(n)],
            logits=[False] * n,
        )

    def llama_batch_free(self, batch: Any) -> None:
        pass

    def llama_decode(self, ctx: FakeContext, b: Any) -> int:
        if self.fail_decode_at is not None and len(ctx.log) + 1 == self.fail_decode_at:
            ctx.log.append((ctx.adapter, (), b.n_tokens))
            return -1
        assert 0 < b.n_tokens <= ctx.n_batch, "batch larger than n_batch"
        ctx.next_token.clear()
        seqs = []
        for i in range(b.n_tokens):
            seq = b.seq_id[i][0]
            assert b.n_seq_id[i] == 1 and 0 <= seq < ctx.n_seq, "bad sequence id"
            assert b.pos[i] == ctx.kv.get(seq, 0), f"seq {seq}: position {b.pos[i]}, expected {ctx.kv.get(seq, 0)}"
            ctx.kv[seq] = b.pos[i] + 1
            if b.logits[i]:
                nxt = b.token[i] + (ctx.adapter or 1)
                ctx.next_token[i] = EOG if nxt // 10 != b.token[i] // 10 else nxt
            if seq not in seqs:
                seqs.append(seq)
        if ctx.kv_unified:
            assert sum(ctx.kv.values()) <= ctx.n_ctx, "KV pool overflow"
        else:
            assert max(ctx.kv.values()) <= ctx.n_ctx // ctx.n_seq, "KV stream overflow"
        ctx.log.append((ctx.adapter, tuple(sorted(seqs)), b.n_tokens))
        ctx.rows.append(tuple((b.seq_id[i][0], b.pos[i], b.token[i], bool(b.logits[i])) for i in range(b.n_tokens)))
        return 0

    # sampling
    def llama_sampler_chain_default_params(self) -> None:
        return None

    def llama_sampler_chain_init(self, params: Any) -> FakeSampler:
        s = FakeSampler()
        self.samplers.append(s)
        return s

    def llama_sampler_chain_add(self, chain: FakeSampler, part: tuple[str, Any]) -> None:
        chain.parts.append(part)

    def llama_sampler_init_greedy(self) -> tuple[str, Any]:
        return ("greedy", None)

    def llama_sampler_init_top_k(self, k: int) -> tuple[str, Any]:
        return ("top_k", k)

    def llama_sampler_init_top_p(self, p: float, keep: int) -> tuple[str, Any]:
        return ("top_p", p)

    def llama_sampler_init_min_p(self, p: float, keep: int) -> tuple[str, Any]:
        return ("min_p", p)

    def llama_sampler_init_temp(self, t: float) -> tuple[str, Any]:
        return ("temp", t)

    def llama_sampler_init_dist(self, seed: int) -> tuple[str, Any]:
        return ("dist", seed)

    def llama_sampler_sample(self, chain: FakeSampler, ctx: FakeContext, row: int) -> int:
        return ctx.next_token[row]

    def llama_sampler_free(self, chain: FakeSampler) -> None:
        self.freed_samplers += 1

    # vocabulary
    def llama_vocab_is_eog(self, vocab: Any, token: int) -> bool:
        return token == EOG

    def llama_token_to_piece(self, vocab: Any, token: int, buf: Any, n: int, lstrip: int, special: bool) -> int:
        piece = f"<{token}>".encode()
        if len(piece) > n:
            return -len(piece)
        buf[: len(piece)] = piece
        return len(piece)
