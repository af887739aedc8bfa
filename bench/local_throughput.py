"""Tokens/s of the llamacpp backend vs raw llama-cpp-python on the same prompts, plus the cost of
switching LoRA adapters and of scoring.

Raw: one ``llama_cpp.Llama`` and ``create_chat_completion`` in a loop. Backend: the same prompts and
seeds through ``LlamaCppBackend.complete``, first one call at a time (the overhead of the queue,
the batching engine and adapter bookkeeping: ratio backend/raw, 1.0 = none), then all calls at
once (what a debate does: the engine decodes up to ``--parallel`` of them together), then all at
once spread over 3 LoRA adapters (one adapter per batch). Raw runs in a subprocess so the two
never share a process (see the comment in main_async).

    .venv/bin/python bench/local_throughput.py [--n 24] [--max-tokens 128] [--parallel 8]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from agentsoc.tasks import arithmetic
from agentsoc.types import Message, Sampling
from backends import bundled
from backends.llamacpp import LlamaCppBackend, _construct_llama, cpu_has_amx
from backends.options import LlamaCppOptions
from backends.refs import adapter_ref


def prompts(n: int) -> list[str]:
    task = arithmetic.create({"pattern": "a+b*c+d-e*f", "low": 0, "high": 30})
    return [
        task.prompts.round0.replace("{question}", p.question) + " Explain your steps."
        for p in task.load(0, n, seed=1).test
    ]


def raw(path: Path, texts: list[str], max_tokens: int, n_threads: int) -> tuple[float, int, float]:
    import llama_cpp

    start = time.perf_counter()
    llm = _construct_llama(
        llama_cpp,
        extra_buffers=not cpu_has_amx(),
        model_path=str(path),
        n_ctx=4096,
        n_threads=n_threads,
        verbose=False,
    )
    load = time.perf_counter() - start
    tokens = 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": text}], temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=i
        )
        tokens += out["usage"]["completion_tokens"]
    secs = time.perf_counter() - start
    llm.close()
    return secs, tokens, load


async def through_backend(
    backend: LlamaCppBackend, texts: list[str], max_tokens: int, refs: list[str], *, concurrent: bool
) -> tuple[float, int]:
    def call(i: int, text: str) -> Any:
        return backend.complete(
            refs[i % len(refs)],
            [Message(role="user", content=text)],
            Sampling(temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=i),
        )

    start = time.perf_counter()
    if concurrent:
        outs = await asyncio.gather(*(call(i, t) for i, t in enumerate(texts)))
    else:
        outs = [await call(i, t) for i, t in enumerate(texts)]
    return time.perf_counter() - start, sum(c.usage.completion_tokens for c in outs)


def random_adapter(path: Path, base: Path, seed: int) -> Path:
    from backends.gguf_lora import base_info, write_gguf_adapter

    arch, n_blocks, shapes = base_info(base)
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(n_blocks):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output"):
            n_in, n_out = shapes[f"blk.{i}.{t}.weight"]
            tensors.append((f"blk.{i}.{t}.weight.lora_a", rng.normal(0, 1, (8, n_in)).astype(np.float32)))
            tensors.append((f"blk.{i}.{t}.weight.lora_b", rng.normal(0, 0.01, (n_out, 8)).astype(np.float32)))
    return write_gguf_adapter(path, arch=arch, alpha=16.0, tensors=tensors, name=f"random-{seed}")


async def main_async(n: int, max_tokens: int, n_threads: int, parallel: int) -> None:
    path = bundled.resolve_model_path()
    texts = prompts(n)
    # raw runs in its own process: llama.cpp calls from two OS threads of one process each get an
    # OpenMP team, and the second team slows both (measured 25.7 -> 17.4 tokens/s on 2 cores)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        r_secs, r_tok, r_load = pool.apply(raw, (path, texts, max_tokens, n_threads))
    print(
        f"raw llama-cpp-python : load {r_load:5.2f} s   {r_tok} tokens in {r_secs:6.1f} s = {r_tok / r_secs:5.1f} tok/s"
    )

    backend = LlamaCppBackend(path, model_name="qwen", options=LlamaCppOptions(n_threads=n_threads, parallel=parallel))
    backend.load()
    raw_rate = r_tok / r_secs
    b_secs, b_tok = await through_backend(backend, texts, max_tokens, ["qwen"], concurrent=False)
    print(
        f"llamacpp backend     : load {backend.load_seconds:5.2f} s   {b_tok} tokens in {b_secs:6.1f} s = "
        f"{b_tok / b_secs:5.1f} tok/s   ratio backend/raw = {(b_tok / b_secs) / raw_rate:.2f}   (one call at a time)"
    )
    c_secs, c_tok = await through_backend(backend, texts, max_tokens, ["qwen"], concurrent=True)
    print(
        f"backend, {n} calls at once: {c_tok} tokens in {c_secs:6.1f} s = {c_tok / c_secs:5.1f} tok/s   "
        f"ratio batched/raw = {(c_tok / c_secs) / raw_rate:.2f}   (parallel={parallel})"
    )

    tmp = Path(tempfile.mkdtemp())
    refs = [adapter_ref("qwen", random_adapter(tmp / f"a{i}.gguf", path, i)) for i in range(3)]
    start = time.perf_counter()
    for ref in refs:
        backend.load()
        backend._adapter(ref.split("+adapter:")[1])
    first_load = (time.perf_counter() - start) / len(refs)
    a_secs, a_tok = await through_backend(backend, texts, max_tokens, refs, concurrent=True)
    print(
        f"3 LoRA adapters (r=8 q/k/v/o), calls at once: {a_tok} tokens in {a_secs:6.1f} s = "
        f"{a_tok / a_secs:5.1f} tok/s (adapter load {first_load * 1000:.0f} ms each, first use only)"
    )
    msgs = [Message(role="user", content=texts[0])]
    s = Sampling(temperature=0.0, max_tokens=1)
    timings = []
    for i in range(12):
        start = time.perf_counter()
        backend.complete_sync(refs[i % 3] if i % 2 else "qwen", msgs, s)
        timings.append(time.perf_counter() - start)
    same = []
    for _ in range(6):
        start = time.perf_counter()
        backend.complete_sync(refs[0], msgs, s)
        same.append(time.perf_counter() - start)
    print(
        f"1-token call with an adapter switch {np.median(timings) * 1000:.0f} ms vs same adapter "
        f"{np.median(same) * 1000:.0f} ms (median; both evaluate the whole prompt)"
    )
    answer = "The result is 42. " * 10
    start = time.perf_counter()
    sc = backend.score_sync(refs[0], msgs, answer)
    print(f"score: {len(sc.tokens)} response tokens in {(time.perf_counter() - start) * 1000:.0f} ms (top-5 included)")
    await backend.aclose()
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=8, help="sequences the backend decodes together")
    args = ap.parse_args()
    asyncio.run(main_async(args.n, args.max_tokens, args.threads, args.parallel))


if __name__ == "__main__":
    main()
