"""Batch invariance of the llamacpp backend and what it costs: ``deterministic = false`` ("batched") vs ``true``.

Each mode runs in a process of its own (ggml reads ``GGML_CPU_TILED_MM`` once per process, and
the batched mode must keep ggml's defaults); the two take turns and never decode at once.

Throughput: ``--n`` calls submitted at once (what a debate does), tokens/s of each mode; the
modes alternate ``--rounds`` times so that load from elsewhere on the machine hits both alike,
and the ratio is that of the medians (per-round ratios printed too).

Invariance: ``--calls`` random calls (debate-like prompts of 20 to ~700 tokens, sampled at
temperature 1 with their own seeds) are each run alone, then ``--trials`` times inside random
batches: a random subset of the others, submitted in random order at random moments while the
engine is already decoding. Every call in a batch is compared with its text alone; the count of
identical texts is printed per mode (batched: some differ; deterministic: all identical).

    .venv/bin/python bench/local_determinism.py [--n 24] [--max-tokens 128] [--calls 12] [--trials 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import statistics
import time
from typing import Any

import numpy as np
from local_throughput import prompts, through_backend  # the sibling bench: same prompts, same calls

from agentsoc.types import Message, Sampling
from backends import bundled
from backends.llamacpp import LlamaCppBackend
from backends.llamacpp_batch import BatchEngine
from backends.options import LlamaCppOptions

Call = tuple[list[Message], Sampling]


def random_calls(n: int, max_tokens: int, rng: random.Random) -> list[Call]:
    """Debate-like calls: a question alone, or with 1-3 other agents' answers (long prompts)."""
    calls: list[Call] = []
    for i in range(n):
        a, b, c = (rng.randint(1, 60) for _ in range(3))
        question = f"What is the result of {a}+{b}*{c}? Make sure to state your answer at the end of the response."
        others = rng.choice([0, 0, 1, 3])
        text = question
        if others:
            answers = "\n\n".join(
                f"One agent solution: To solve {a}+{b}*{c}, first multiply {b} by {c}, which gives {b * c}. "
                + "Then add it to the other term and check every step again carefully. " * rng.randint(3, 12)
                + f"The answer is {a + b * c + rng.randint(-2, 2)}."
                for _ in range(others)
            )
            text = f"These are the solutions to the problem from other agents:\n{answers}\n\n{question}"
        calls.append(([Message(role="user", content=text)], Sampling(temperature=1.0, max_tokens=max_tokens, seed=i)))
    return calls


def record_logits(engine: BatchEngine) -> dict[int, list[bytes]]:
    """Digest of every logits row a call is sampled from, by the call's seed (bench instrumentation)."""
    import llama_cpp

    digests: dict[int, list[bytes]] = {}
    n_vocab = llama_cpp.llama_vocab_n_tokens(engine._vocab)
    original = engine._sample

    def sample(r: Any) -> None:
        if r.row >= 0:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(engine._ctx, r.row), shape=(n_vocab,))
            digests.setdefault(r.request.sampling.seed, []).append(hashlib.blake2b(row.tobytes()).digest())
        original(r)

    engine._sample = sample  # type: ignore[method-assign]
    return digests


async def in_random_batch(backend: LlamaCppBackend, calls: list[Call], idx: list[int], rng: random.Random) -> list[str]:
    """Submit ``calls[idx]`` in the given order, each after a random pause (0-300 ms)."""

    async def one(i: int, delay: float) -> str:
        await asyncio.sleep(delay)
        msgs, sampling = calls[i]
        return (await backend.complete("qwen", msgs, sampling)).text

    delays = sorted(rng.uniform(0, 0.3) for _ in idx)
    return list(await asyncio.gather(*(one(i, d) for i, d in zip(idx, delays, strict=True))))


async def invariance(
    backend: LlamaCppBackend, calls: list[Call], trials: int, seed: int
) -> tuple[int, int, int, int, list[str]]:
    """(identical texts, identical logits at every step, compared, calls changed at least once, texts alone)."""
    assert backend._engine is not None
    digests = record_logits(backend._engine)
    alone = [(await backend.complete("qwen", m, s)).text for m, s in calls]
    alone_logits = {k: list(v) for k, v in digests.items()}
    rng = random.Random(seed)
    same = same_logits = total = 0
    changed: set[int] = set()
    for _ in range(trials):
        k = rng.randint(2, min(9, len(calls)))
        idx = rng.sample(range(len(calls)), k)
        digests.clear()
        texts = await in_random_batch(backend, calls, idx, rng)
        for i, t in zip(idx, texts, strict=True):
            total += 1
            seed_i = calls[i][1].seed
            assert seed_i is not None
            same_logits += digests[seed_i] == alone_logits[seed_i]
            if t == alone[i]:
                same += 1
            else:
                changed.add(i)
    return same, same_logits, total, len(changed), alone


_backend: LlamaCppBackend | None = None


def worker_init(deterministic: bool, threads: int, parallel: int) -> float:
    """In the mode's own process: load the backend once (returns the load time)."""
    global _backend
    _backend = LlamaCppBackend(
        bundled.resolve_model_path(),
        model_name="qwen",
        options=LlamaCppOptions(n_threads=threads, parallel=parallel, deterministic=deterministic, n_ctx=2048),
    )
    _backend.load()
    _backend.complete_sync("qwen", [Message(role="user", content="Hi")], Sampling(temperature=0.0, max_tokens=4))
    assert _backend.load_seconds is not None
    return _backend.load_seconds


def worker_throughput(n: int, max_tokens: int) -> tuple[float, int]:
    assert _backend is not None
    return asyncio.run(through_backend(_backend, prompts(n), max_tokens, ["qwen"], concurrent=True))


def worker_invariance(n_calls: int, max_tokens: int, trials: int, seed: int) -> tuple[int, int, int, int, list[str]]:
    assert _backend is not None
    calls = random_calls(n_calls, max_tokens, random.Random(seed))
    return asyncio.run(invariance(_backend, calls, trials, seed))


def main_with(args: argparse.Namespace) -> None:
    # one process per mode: ggml reads GGML_CPU_TILED_MM once per process, and the batched mode
    # must run with ggml's defaults; the processes take turns, never decode at the same time
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    spawn = multiprocessing.get_context("spawn")
    modes = {name: ProcessPoolExecutor(1, mp_context=spawn) for name in ("batched", "deterministic")}
    try:
        for name, pool in modes.items():
            load = pool.submit(worker_init, name == "deterministic", args.threads, args.parallel).result()
            print(f"{name:13s}: model loaded in {load:.1f} s", flush=True)
        if args.n:
            rates: dict[str, list[float]] = {name: [] for name in modes}
            for r in range(args.rounds):
                for name in list(modes) if r % 2 == 0 else list(reversed(modes)):
                    secs, tokens = modes[name].submit(worker_throughput, args.n, args.max_tokens).result()
                    rates[name].append(tokens / secs)
                    print(
                        f"round {r}: {name:13s} {tokens} tokens in {secs:6.1f} s = {tokens / secs:5.1f} tok/s",
                        flush=True,
                    )
            pairs = [d / a for a, d in zip(rates["batched"], rates["deterministic"], strict=True)]
            med = {name: statistics.median(v) for name, v in rates.items()}
            print(
                f"{args.n} calls at once, max_tokens={args.max_tokens}, parallel={args.parallel}, "
                f"{args.threads} threads: "
                f"batched {med['batched']:.1f} tok/s, deterministic {med['deterministic']:.1f} tok/s (medians of "
                f"{args.rounds}); ratio deterministic/batched = {med['deterministic'] / med['batched']:.2f} "
                f"(per round: {', '.join(f'{x:.2f}' for x in pairs)})"
            )
        if args.calls:
            calls = random_calls(args.calls, args.inv_max_tokens, random.Random(args.seed))
            print(
                f"invariance: {args.calls} calls ({max(len(m[0].content) for m, _ in calls)} chars at most), "
                f"{args.trials} random batches of 2-9 calls",
                flush=True,
            )
            alone_by_mode = {}
            for name, pool in modes.items():
                start = time.perf_counter()
                job = pool.submit(worker_invariance, args.calls, args.inv_max_tokens, args.trials, args.seed)
                same, same_logits, total, changed, alone = job.result()
                alone_by_mode[name] = alone
                print(
                    f"  {name:13s}: {same}/{total} texts in random batches identical to the call alone, "
                    f"{same_logits}/{total} with bitwise identical logits at every step "
                    f"({changed} of {args.calls} calls changed text at least once; "
                    f"{time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            agree = sum(a == b for a, b in zip(alone_by_mode["batched"], alone_by_mode["deterministic"], strict=True))
            print(f"  calls alone, batched vs deterministic mode: {agree}/{args.calls} identical texts")
    finally:
        for pool in modes.values():
            pool.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=24, help="calls at once for the throughput (0: skip)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="throughput runs per mode, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="sequences the backend decodes together")
    ap.add_argument("--calls", type=int, default=12, help="random calls of the invariance check (0: skip)")
    ap.add_argument("--trials", type=int, default=8, help="random batches per mode")
    ap.add_argument("--inv-max-tokens", type=int, default=48, help="max_tokens of the invariance calls")
    ap.add_argument("--seed", type=int, default=0)
    main_with(ap.parse_args())


if __name__ == "__main__":
    main()
