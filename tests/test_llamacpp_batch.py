"""The batching engine against a fake llama.cpp: what is decoded together, in which order, and
what each call gets back. See ``tests/fakes/llama_lowlevel.py`` for the fake's arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from agentsoc.backend import FatalBackendError
from agentsoc.types import Sampling
from backends.llamacpp_batch import BatchEngine, Generated, Request
from tests.fakes.llama_lowlevel import FakeLlamaCpp


def engine(
    ll: FakeLlamaCpp, *, n_seq: int = 4, n_ctx_seq: int = 64, n_batch: int = 32, deterministic: bool = False
) -> BatchEngine:
    def attach(ctx: Any, adapter: str | None) -> None:
        ptrs = [ll.llama_adapter_lora_init(None, adapter.encode())] if adapter else []
        ll.llama_set_adapters_lora(ctx, ptrs, len(ptrs), None)

    return BatchEngine(
        ll,
        "model",
        n_seq=n_seq,
        n_ctx_seq=n_ctx_seq,
        n_batch=n_batch,
        n_threads=1,
        attach=attach,
        deterministic=deterministic,
    )


def req(prompt: list[int], adapter: str | None = None, **sampling: Any) -> Request:
    return Request(adapter=adapter, prompt=lambda: list(prompt), sampling=Sampling(**sampling))


def run(e: BatchEngine, requests: list[Request]) -> list[Generated]:
    queue = list(requests)

    def feed() -> list[Request]:
        taken = list(queue)
        queue.clear()
        return taken

    e.run(feed)
    return [r.future.result() for r in requests]


def test_calls_are_decoded_together_and_end_on_eog_or_max_tokens() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll)
    out = run(e, [req([5, 11]), req([3, 21], max_tokens=2), req([7, 33], seed=9)])
    assert [o.text for o in out] == ["<12><13><14><15><16><17><18><19>", "<22><23>", "<34><35><36><37><38><39>"]
    assert [o.finish_reason for o in out] == ["stop", "length", "stop"]
    assert [(o.prompt_tokens, o.completion_tokens) for o in out] == [(2, 8), (2, 2), (2, 6)]
    ctx = ll.contexts[0]
    assert ctx.log[0] == (None, (0, 1, 2), 6)  # the three prompts in one decode
    assert ctx.log[1] == (None, (0, 1, 2), 3)  # then one token per sequence
    assert e.max_batch_seqs == 3
    assert ctx.kv == {}  # every finished sequence released its KV cells
    assert ll.freed_samplers == 3


def test_sampler_chain_follows_the_sampling() -> None:
    ll = FakeLlamaCpp()
    run(engine(ll), [req([1], temperature=0.7, top_p=0.8, seed=123), req([1], temperature=0.0)])
    assert ll.samplers[0].parts == [("top_k", 40), ("top_p", 0.8), ("min_p", 0.05), ("temp", 0.7), ("dist", 123)]
    assert ll.samplers[1].parts == [("greedy", None)]


def test_one_adapter_per_batch_and_no_switch_while_calls_of_it_wait() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_seq=2)
    calls = [req([1], "a"), req([1], "b"), req([1], "a"), req([1], "b"), req([1], None)]
    out = run(e, calls)
    ids = ll.adapters
    # adapter a adds 2 per token and stops at the first multiple of 10; b adds 3
    assert out[0].text == "<3><5><7><9>" and out[1].text == "<4><7>"
    assert out[4].text == "<2><3><4><5><6><7><8><9>"
    # every decode ran one adapter; a's two calls ran together, then b's, then the base
    order = [adapter for adapter, _, _ in ll.contexts[0].log]
    assert order == sorted(order, key=[ids["a"], ids["b"], None].index)
    assert e.switches == 3


def test_more_calls_than_sequences_reuse_freed_slots() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_seq=2)
    out = run(e, [req([10 * i + 1], max_tokens=3 + i) for i in range(5)])
    assert all(o.completion_tokens == min(3 + i, 8) for i, o in enumerate(out))
    assert max(len(seqs) for _, seqs, _ in ll.contexts[0].log) == 2


def test_long_prompts_are_split_into_batches() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_batch=8)
    prompt = [*range(100, 120), 121]
    (out,) = run(e, [req(prompt, max_tokens=3)])
    assert out.text == "<122><123><124>"
    assert [n for _, _, n in ll.contexts[0].log[:3]] == [8, 8, 5]


def test_a_prompt_too_long_fails_alone() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_ctx_seq=16)
    good, bad = req([1]), req(list(range(100, 120)))
    run_queue = [good, bad]
    e.run(lambda: [run_queue.pop() for _ in range(len(run_queue))])
    assert good.future.result().text.startswith("<2>")
    with pytest.raises(FatalBackendError, match="does not fit"):
        bad.future.result()


def test_generation_stops_at_the_sequence_context() -> None:
    ll = FakeLlamaCpp()
    (out,) = run(engine(ll, n_ctx_seq=6), [req([1, 2, 3, 4, 11], max_tokens=50)])
    # 5 prompt tokens + 1 decoded fill the 6 cells; the last sampled token needs no cell
    assert out.finish_reason == "length" and out.text == "<12><13>"


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_failed_decode_fails_the_running_calls_and_the_engine_goes_on(deterministic: bool) -> None:
    ll = FakeLlamaCpp()
    ll.fail_decode_at = 2  # the first decode step after the prompt
    e = engine(ll, n_seq=1, deterministic=deterministic)
    first, second = req([1]), req([11])
    queue = [first, second]
    e.run(lambda: [queue.pop(0) for _ in range(len(queue))])
    with pytest.raises(FatalBackendError, match="llama_decode failed"):
        first.future.result()
    assert second.future.result().text.startswith("<12>")
    assert ll.contexts[0].kv == {}  # nothing left behind, a deterministic step's filler row included


def test_cancelled_calls_are_skipped() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll)
    gone, kept = req([1]), req([11])
    gone.future.cancel()
    run_queue = [gone, kept]
    e.run(lambda: [run_queue.pop(0) for _ in range(len(run_queue))])
    assert kept.future.result().completion_tokens == 8
    assert all(seqs == (0,) for _, seqs, _ in ll.contexts[0].log)


def test_close_fails_what_is_still_queued() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll)
    waiting = req([1])
    e._waiting.append(waiting)
    e.close()
    with pytest.raises(FatalBackendError, match="closed"):
        waiting.future.result()


def test_abort_stops_after_the_step_in_flight_and_fails_every_call() -> None:
    """Ctrl-C: the decode loop ends within one step instead of decoding every running call to its end."""
    ll = FakeLlamaCpp()
    e = engine(ll, n_seq=2)
    running = [req([1], max_tokens=50), req([2], max_tokens=50)]
    queued = [req([3]), req([4])]
    feeds = [running, queued]

    def feed() -> list[Request]:
        if len(ll.contexts[0].log) >= 2:  # two decode steps done: Ctrl-C arrives
            e.abort()
        return feeds.pop(0) if feeds else []

    e.run(feed)
    assert len(ll.contexts[0].log) <= 3  # not the ~50 steps the running calls asked for
    for r in running + queued:
        with pytest.raises(FatalBackendError, match="closed"):
            r.future.result()


# ---------------------------------------------------------------- deterministic (batch-invariant) mode


def staggered(e: BatchEngine, requests: list[Request], arrivals: list[int]) -> list[Generated]:
    """Feed ``requests[i]`` at the ``arrivals[i]``-th call of ``feed`` (one call per engine step)."""
    calls = 0

    def feed() -> list[Request]:
        nonlocal calls
        calls += 1
        return [r for r, at in zip(requests, arrivals, strict=True) if at == calls]

    while calls < max(arrivals):  # the engine returns when idle; the backend would restart it
        e.run(feed)
    return [r.future.result(timeout=5) for r in requests]


def assert_invariant_shapes(ctx: Any, n_batch: int, n_seq: int) -> None:
    """Every decode is a prompt chunk of one sequence that ends at the next multiple of ``n_batch``
    (or at the prompt's end), or one token per sequence for >= 2 consecutive sequence ids, all
    with logits: the shapes for which a row's numerics do not depend on the other rows."""
    for rows in ctx.rows:
        seqs = [seq for seq, _, _, _ in rows]
        if len(set(seqs)) == 1:  # a prompt chunk
            positions = [pos for _, pos, _, _ in rows]
            assert positions[0] % n_batch == 0 and len(rows) <= n_batch, rows
            assert positions == list(range(positions[0], positions[0] + len(rows))), rows
            assert not any(logits for _, _, _, logits in rows[:-1]), rows
        else:  # a decode step
            assert len(rows) >= 2 and seqs == list(range(seqs[0], seqs[0] + len(rows))), rows
            assert all(logits for _, _, _, logits in rows), rows
            assert seqs[-1] <= n_seq  # n_seq itself is the spare stream


def test_deterministic_mode_gives_every_sequence_a_stream_and_flash_attention() -> None:
    ll = FakeLlamaCpp()
    engine(ll, n_seq=4, n_ctx_seq=64, deterministic=True)
    ctx = ll.contexts[0]
    assert not ctx.kv_unified and ctx.flash_attn_type == ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert ctx.n_seq == 5 and ctx.n_ctx == 5 * 64  # one spare stream for a filler row
    engine(ll, n_seq=4, n_ctx_seq=64)
    assert ll.contexts[1].kv_unified and ll.contexts[1].n_seq == 4


def test_deterministic_mode_a_call_alone_still_decodes_two_rows() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_seq=1, n_batch=8, deterministic=True)
    (out,) = run(e, [req([*range(100, 110), 111], max_tokens=3)])
    assert out.text == "<112><113><114>"
    ctx = ll.contexts[0]
    # the prompt in chunks [0, 8) and [8, 11), then decode steps of the call plus a filler on the spare stream
    assert [len(rows) for rows in ctx.rows] == [8, 3, 2, 2]
    assert all([seq for seq, *_ in rows] == [0, 1] for rows in ctx.rows[2:])
    assert e.fillers == 2 and ctx.kv == {}  # fillers are removed after each decode
    assert_invariant_shapes(ctx, 8, 1)


def test_deterministic_mode_same_texts_alone_and_in_any_batch() -> None:
    """Random prompts, lengths and arrival steps: each call gives what it gives alone (and what the
    default mode gives), and every decode has a batch-invariant shape."""
    import random

    rng = random.Random(7)
    n_batch, n_seq = 8, 3
    prompts = [[*range(100 * i + 10, 100 * i + 10 + rng.randint(0, 19)), 100 * i + 1] for i in range(1, 9)]
    limits = [rng.randint(1, 9) for _ in prompts]

    def requests() -> list[Request]:
        return [req(p, max_tokens=m) for p, m in zip(prompts, limits, strict=True)]

    alone = []
    for p, m in zip(prompts, limits, strict=True):
        ll = FakeLlamaCpp()
        alone.append(run(engine(ll, n_seq=n_seq, n_batch=n_batch, deterministic=True), [req(p, max_tokens=m)])[0])
        assert_invariant_shapes(ll.contexts[0], n_batch, n_seq)
    assert [o.text for o in run(engine(FakeLlamaCpp(), n_seq=n_seq, n_batch=n_batch), requests())] == [
        o.text for o in alone
    ]
    for trial in range(20):
        ll = FakeLlamaCpp()
        e = engine(ll, n_seq=n_seq, n_batch=n_batch, deterministic=True)
        out = staggered(e, requests(), [rng.randint(1, 12) for _ in prompts])
        assert out == alone, trial
        assert_invariant_shapes(ll.contexts[0], n_batch, n_seq)
        assert ll.contexts[0].kv == {}
        assert e.max_batch_seqs <= n_seq
    assert e.fillers > 0


def test_deterministic_mode_serves_adapters() -> None:
    ll = FakeLlamaCpp()
    e = engine(ll, n_seq=2, deterministic=True)
    out = run(e, [req([1], "a"), req([1], "b"), req([1], "a"), req([1], None)])
    assert [o.text for o in out] == ["<3><5><7><9>", "<4><7>", "<3><5><7><9>", "<2><3><4><5><6><7><8><9>"]
    assert e.switches == 3
