"""Base single-agent accuracy of the bundled local model on Arithmetic difficulty levels.

Prints one line per (pattern, operand range): accuracy ± standard error over N problems at
temperature 1.0 / top_p 0.9 through the ``llamacpp`` backend, with the paper's round-0 prompt or
(``--prompt demo``) the one of ``recipes/arithmetic-local.toml``. Used to choose the demo's
difficulty and prompt (target: base accuracy roughly 40-70%).

    .venv/bin/python bench/local_difficulty.py [--n 40] [--levels "a+b:0:30,a+b*c:0:10"] [--prompt demo]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import tempfile
import time
from pathlib import Path

from agentsoc.tasks import arithmetic
from agentsoc.types import Message, Sampling
from backends.llamacpp import create
from backends.options import LlamaCppOptions

DEFAULT_LEVELS = (
    "a+b:0:30,a-b:0:30,a+b-c:0:30,a+b+c:0:30,a*b:0:10,a+b*c:0:10,a*b+c:0:10,a*b-c:0:10,a*b:0:30,a+b*c:0:30,"
    "a+b*c+d-e*f:0:30"
)


def demo_round0() -> str:
    from agentsoc.cli import demo_recipe

    return demo_recipe(quick=False).prompts["round0"]


async def measure(levels: list[tuple[str, int, int]], n: int, max_tokens: int, round0: str | None) -> None:
    backend = create(LlamaCppOptions(), Path(tempfile.mkdtemp()))
    try:
        for pattern, low, high in levels:
            task = arithmetic.create({"pattern": pattern, "low": low, "high": high})
            problems = task.load(n_train=0, n_test=n, seed=0).test
            correct = 0
            tokens = 0
            start = time.perf_counter()
            for i, p in enumerate(problems):
                prompt = (round0 or task.prompts.round0).replace("{question}", p.question)
                c = await backend.complete(
                    "base",
                    [Message(role="user", content=prompt)],
                    Sampling(temperature=1.0, top_p=0.9, max_tokens=max_tokens, seed=1000 + i),
                )
                tokens += c.usage.completion_tokens
                got = task.parse_answer(c.text)
                correct += int(got is not None and task.is_equivalent(got, p.answer))
            secs = time.perf_counter() - start
            acc = correct / n
            se = math.sqrt(acc * (1 - acc) / n)
            print(
                f"{pattern:<14} [{low},{high})  acc {acc:5.1%} ± {se:4.1%}  ({correct}/{n})  "
                f"{tokens / n:5.1f} tokens/answer  {secs / n:4.2f} s/answer",
                flush=True,
            )
    finally:
        await backend.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--levels", default=DEFAULT_LEVELS, help="pattern:low:high, comma-separated")
    ap.add_argument("--prompt", choices=["paper", "demo"], default="paper", help="round-0 prompt to measure")
    args = ap.parse_args()
    levels = []
    for item in args.levels.split(","):
        pattern, low, high = item.split(":")
        levels.append((pattern, int(low), int(high)))
    asyncio.run(measure(levels, args.n, args.max_tokens, demo_round0() if args.prompt == "demo" else None))


if __name__ == "__main__":
    main()
