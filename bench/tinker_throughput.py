"""How close the tinker backend gets to the server's own limit (calls/s vs the server-bound ideal).

Runs the debates of a few arithmetic problems (3 agents, 2 rounds, summaries) through the backend
stack a run uses (``agentsoc.wrappers.compose``: cache, meter, retries, limiter over the tinker
backend, with a run store) against the fake Tinker service (tests/fakes/fake_tinker.py) — the real
``tinker`` SDK on the wire — whose sample futures resolve ``--latency`` seconds after the request,
and prints the ideal time (max(ceil(calls / concurrency) × latency, sequential depth × latency); a
debate has 2·rounds − 1 dependent steps per problem), the achieved time and achieved/ideal.

Every call costs the client more than an OpenAI call: render the chat template, tokenize, one
``asample`` request and one ``retrieve_future`` long-poll through the SDK (which runs its own event
loop in a thread), decode. The fake runs in a child process, as a real service would, so its work
is not billed to the client. A warm-up of ``concurrency`` calls (session, sampler, tokenizer load,
connections: paid once per run) is printed, not timed.

Usage: .venv/bin/python bench/tinker_throughput.py [--problems 20] [--latency 0.2] [--concurrency 32]
Prints measured numbers; not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.fake_tinker import FAKE_API_KEY, FakeTinker  # noqa: E402
from test_tinker_backend import arithmetic_sampler, build_tokenizer  # noqa: E402

from agentsoc.debate import DebateSettings, debate  # noqa: E402
from agentsoc.store import RunStore  # noqa: E402
from agentsoc.tasks import create as create_task  # noqa: E402
from agentsoc.transcript import AgentSlot  # noqa: E402
from agentsoc.types import Message, Sampling  # noqa: E402
from agentsoc.wrappers import compose  # noqa: E402
from backends.options import TinkerOptions  # noqa: E402
from backends.tinker import TinkerBackend  # noqa: E402

MODEL = "Qwen/Qwen3-8B"
AGENTS, ROUNDS = 3, 2


async def timed_debate(
    base_url: str, tokenizer: Path, run_dir: Path, n_problems: int, concurrency: int
) -> tuple[float, float, int, float]:
    """(warm-up s, debate s, calls, event-loop CPU s) of ``n_problems`` debates."""
    task = create_task("arithmetic", {})
    problems = task.load(n_problems, 1, seed=0).train
    store = RunStore.open(run_dir)
    inner = TinkerBackend(TinkerOptions(base_url=base_url, tokenizer=str(tokenizer)), run_dir, key=FAKE_API_KEY)
    backend = compose(inner, store, concurrency=concurrency)
    slots = [AgentSlot(index=n, generator=MODEL, critic=MODEL) for n in range(AGENTS)]
    settings = DebateSettings(rounds=ROUNDS, summarize=True, summarizer=MODEL, phase=f"bench-{concurrency}")
    start = time.perf_counter()
    warm_up = [
        backend.complete(MODEL, [Message(role="user", content=f"warm-up {i}")], Sampling(seed=i))
        for i in range(concurrency)
    ]
    await asyncio.gather(*warm_up)
    warm = time.perf_counter() - start
    cpu0, start = time.thread_time(), time.perf_counter()
    transcripts = await debate(backend, task, task.prompts, slots, problems, settings)
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu0
    await backend.aclose()
    store.close()
    assert len(transcripts) == n_problems
    calls = n_problems * (AGENTS * ROUNDS + AGENTS * (ROUNDS - 1))
    return warm, elapsed, calls, cpu


@contextlib.contextmanager
def fake_service(latency: float, tokenizer: Path) -> Iterator[str]:
    """The fake Tinker service in a child process; yields its base URL."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(latency), "--tokenizer", str(tokenizer)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        child.terminate()
        child.wait()


def serve(latency: float, tokenizer: Path) -> None:
    """The child: a fake service whose samples take ``latency`` s, until terminated."""
    sampler, decode = arithmetic_sampler(tokenizer)
    fake = FakeTinker(sampler=sampler, decode=decode, delays={"asample": latency}, long_poll_s=5.0).start()
    print(fake.base_url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the service takes per sample")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.tokenizer)
        return
    os.environ.setdefault("TINKER_TELEMETRY", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tokenizer")
        with fake_service(args.latency, tokenizer) as base_url:
            warm, achieved, calls, cpu = asyncio.run(
                timed_debate(base_url, tokenizer, Path(tmp) / "run", args.problems, args.concurrency)
            )
    depth = 2 * ROUNDS - 1
    ideal = max(math.ceil(calls / args.concurrency) * args.latency, depth * args.latency)
    print(f"debates: {args.problems} problems x {AGENTS} agents x {ROUNDS} rounds (+ summaries) = {calls} chat calls")
    print(
        f"service latency {args.latency * 1000:.0f} ms per sample (fake in a child process), concurrency "
        f"{args.concurrency}"
    )
    print(f"warm-up ({args.concurrency} calls, not timed)  : {warm:7.2f} s")
    print(f"ideal (server-bound) time      : {ideal:7.2f} s   ({calls / ideal:6.1f} calls/s)")
    print(
        f"achieved time                  : {achieved:7.2f} s   ({calls / achieved:6.1f} calls/s; "
        f"achieved / ideal = {achieved / ideal:.2f})"
    )
    print(f"  event loop CPU               : {cpu:7.2f} s   ({cpu / calls * 1000:.2f} ms per call)")


if __name__ == "__main__":
    main()
