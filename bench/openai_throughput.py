"""How close the OpenAI backend gets to the server's own limit, and what concurrency buys.

Runs the debates of a few arithmetic problems (3 agents, 2 rounds, summaries) through the OpenAI
backend against the fake server (tests/fakes) with a fixed latency per request, and prints:

* the ideal time: the server-bound lower bound at the given concurrency, max(calls × latency /
  concurrency, sequential depth × latency) — a debate has 2·rounds − 1 dependent steps per problem;
* the achieved time and achieved/ideal;
* the time of one request at a time (the reference code's loop) and the speed-up over it.

Usage: .venv/bin/python bench/openai_throughput.py [--problems 20] [--latency 0.2] [--concurrency 32]
Prints measured numbers; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.fake_openai import FakeOpenAI  # noqa: E402

from agentsoc.debate import DebateSettings, debate  # noqa: E402
from agentsoc.tasks import create as create_task  # noqa: E402
from agentsoc.transcript import AgentSlot  # noqa: E402
from agentsoc.wrappers import Limited  # noqa: E402
from backends.openai import create as create_backend  # noqa: E402

MODEL = "gpt-4o-mini-2024-07-18"
AGENTS, ROUNDS = 3, 2


async def timed_debate(base_url: str, run_dir: Path, n_problems: int, concurrency: int) -> tuple[float, int]:
    """Seconds to debate ``n_problems`` with ``concurrency`` calls in flight, and the calls made."""
    task = create_task("arithmetic", {})
    problems = task.load(n_problems, 1, seed=0).train
    backend = Limited(create_backend({"base_url": base_url, "timeout_s": 60}, run_dir), concurrency)
    slots = [AgentSlot(index=n, generator=MODEL, critic=MODEL) for n in range(AGENTS)]
    settings = DebateSettings(rounds=ROUNDS, summarize=True, summarizer=MODEL, phase=f"bench-{concurrency}")
    start = time.perf_counter()
    transcripts = await debate(backend, task, task.prompts, slots, problems, settings)
    elapsed = time.perf_counter() - start
    await backend.aclose()
    assert len(transcripts) == n_problems
    calls = n_problems * (AGENTS * ROUNDS + AGENTS * (ROUNDS - 1))
    return elapsed, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per chat call")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    server = FakeOpenAI(latency_s=args.latency).start()
    os.environ["OPENAI_API_KEY"] = server.state.api_key
    try:
        with tempfile.TemporaryDirectory() as tmp:
            achieved, calls = asyncio.run(timed_debate(server.base_url, Path(tmp), args.problems, args.concurrency))
            sequential, _ = asyncio.run(timed_debate(server.base_url, Path(tmp), args.problems, 1))
    finally:
        server.stop()
    depth = 2 * ROUNDS - 1
    ideal = max(math.ceil(calls / args.concurrency) * args.latency, depth * args.latency)
    print(f"debates: {args.problems} problems x {AGENTS} agents x {ROUNDS} rounds (+ summaries) = {calls} chat calls")
    print(f"server latency {args.latency * 1000:.0f} ms per call, concurrency {args.concurrency}")
    print(f"ideal (server-bound) time : {ideal:7.2f} s")
    print(f"achieved time             : {achieved:7.2f} s   (achieved / ideal = {achieved / ideal:.2f})")
    print(f"one request at a time     : {sequential:7.2f} s   (ideal {calls * args.latency:.2f} s)")
    print(f"speed-up over sequential  : {sequential / achieved:7.1f} x")


if __name__ == "__main__":
    main()
