"""Cost of local LoRA fine-tuning jobs through the ``local`` backend: base load, seconds per job of
~50 debate-sized examples, a second job continued from the first (each job is a process of its own
that loads the base: the first may dequantise the GGUF into the cache, later ones load the cached
copy), peak RSS.

    .venv/bin/python bench/local_train.py [--examples 50] [--epochs 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from agentsoc.tasks import arithmetic
from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message
from backends.local import create
from backends.options import LocalOptions


def examples(n: int) -> list[ChatExample]:
    task = arithmetic.create({"pattern": "a*b+c", "low": 0, "high": 10})
    out = []
    for p in task.load(0, n, seed=2).test:
        a, rest = p.question.split("*")
        b, c = rest.split("+")
        answer = (
            f"To solve {p.question}, first multiply {a} by {b}, which gives {int(a) * int(b)}. "
            f"Then add {c}: {int(a) * int(b)} + {c} = {p.answer}. The answer is {p.answer}."
        )
        out.append(
            ChatExample(
                messages=(
                    Message(role="user", content=task.prompts.round0.replace("{question}", p.question)),
                    Message(role="assistant", content=answer),
                )
            )
        )
    return out


async def run_job(backend: Any, base: str, data: list[ChatExample], spec: FinetuneSpec, key: str) -> tuple[str, float]:
    start = time.perf_counter()
    job = await backend.submit_finetune(base, data, spec, key=key)
    while not job.state.terminal:
        await asyncio.sleep(0.5)
        job = await backend.poll_finetune(job)
    if job.state != JobState.SUCCEEDED:
        raise SystemExit(f"job failed: {job.error}")
    return job.result, time.perf_counter() - start


async def main_async(n: int, epochs: int, batch: int) -> None:
    run_dir = Path(tempfile.mkdtemp())
    backend = create(LocalOptions(), run_dir)
    data = examples(n)
    spec = FinetuneSpec(epochs=epochs, batch_size=batch, learning_rate=3e-4)
    first, t1 = await run_job(backend, "qwen", data, spec, "bench/iter-0/agent-0/generator")
    res1 = json.loads((Path(first.split("+adapter:")[1]).parent / "result.json").read_text())
    print(
        f"job 1 ({n} examples, {epochs} epochs, batch {batch}): {t1:.1f} s wall, process {res1['job_seconds']:.1f} s"
        f" = base load {res1['load_seconds']:.1f} s + training {res1['seconds']:.1f} s ({res1['steps']} steps, "
        f"{res1['trained_tokens']} trained tokens, loss {res1['losses'][0]:.3f} -> {res1['losses'][-1]:.3f})"
    )
    second, t2 = await run_job(backend, first, data, spec, "bench/iter-1/agent-0/generator")
    res2 = json.loads((Path(second.split("+adapter:")[1]).parent / "result.json").read_text())
    print(
        f"job 2 (continued from job 1, a new process): {t2:.1f} s wall, process {res2['job_seconds']:.1f} s = "
        f"base load {res2['load_seconds']:.1f} s + training {res2['seconds']:.1f} s, "
        f"loss {res2['losses'][0]:.3f} -> {res2['losses'][-1]:.3f}"
    )
    size = Path(second.split("+adapter:")[1]).stat().st_size
    await backend.aclose()
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
    print(f"GGUF adapter size {size / 1e6:.1f} MB; peak RSS of a training process {rss:.2f} GB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    asyncio.run(main_async(args.examples, args.epochs, args.batch))


if __name__ == "__main__":
    main()
