"""How close the OpenAI backend gets to the server's own limit, and what concurrency buys.

Runs the debates of a few arithmetic problems (3 agents, 2 rounds, summaries) through the backend
stack a run uses (``agentsoc.wrappers.compose``: cache, meter, retries, limiter over the OpenAI
backend, with a run store) against the fake server (tests/fakes) with a fixed latency per request,
and prints:

* the ideal time: the server-bound lower bound at the given concurrency, max(ceil(calls /
  concurrency) × latency, sequential depth × latency) — a debate has 2·rounds − 1 dependent steps
  per problem;
* the achieved time and achieved/ideal;
* the time of one request at a time (the reference code's loop) and the speed-up over it.

The fake server answers each request ``--latency`` seconds after it arrived (its own work done
within them). It runs in a child process by default, as a real server would: in this process its
handler threads would run on the client's GIL and their work would be billed to the client
(``--server thread`` measures that setup). Each measurement starts after a warm-up of
``concurrency`` calls on the same backend (the HTTP stack's lazy imports, the SDK's platform probe
and one keep-alive connection per slot: costs a run pays once, not per call); it is printed.

To tell the client's own cost from a busy machine it also prints the event loop's CPU time per call
and, on Linux, how long the loop thread and the server's threads were runnable but waiting for a
CPU that other processes held (``/proc/<pid>/task/<tid>/schedstat``).

Usage: .venv/bin/python bench/openai_throughput.py [--problems 20] [--latency 0.2] [--concurrency 32]
       [--server process|thread]
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
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fakes.fake_openai import FakeOpenAI  # noqa: E402

from agentsoc.debate import DebateSettings, debate  # noqa: E402
from agentsoc.store import RunStore  # noqa: E402
from agentsoc.tasks import create as create_task  # noqa: E402
from agentsoc.transcript import AgentSlot  # noqa: E402
from agentsoc.types import Message, Sampling  # noqa: E402
from agentsoc.wrappers import compose  # noqa: E402
from backends.openai import create as create_backend  # noqa: E402
from backends.options import OpenAIOptions  # noqa: E402

MODEL = "gpt-4o-mini-2024-07-18"
AGENTS, ROUNDS = 3, 2


@dataclass
class Measured:
    warm_up_s: float  #: the untimed warm-up
    elapsed_s: float  #: the debate
    calls: int
    loop_cpu_s: float  #: CPU time of the event loop's thread during the debate
    loop_wait_s: float | None  #: time the loop's thread waited for a CPU during the debate (Linux)
    server_wait_s: float | None  #: the same for the server's threads (a server in a child process)


def cpu_wait_s(pid: int | str = "self", tids: Sequence[int] | None = None) -> float | None:
    """Seconds the threads of ``pid`` (or only ``tids``) have spent runnable but not running, or None."""
    try:
        tasks = Path(f"/proc/{pid}/task")
        names = [str(t) for t in tids] if tids is not None else [t.name for t in tasks.iterdir()]
        total = 0
        for name in names:
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                total += int((tasks / name / "schedstat").read_text().split()[1])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class Server:
    base_url: str
    api_key: str
    pid: int | None  #: the child process serving, if not this one


async def timed_debate(server: Server, run_dir: Path, n_problems: int, concurrency: int) -> Measured:
    """Debate ``n_problems`` with ``concurrency`` calls in flight, after a warm-up."""
    base_url = server.base_url
    task = create_task("arithmetic", {})
    problems = task.load(n_problems, 1, seed=0).train
    store = RunStore.open(run_dir)
    backend = compose(
        create_backend(OpenAIOptions(base_url=base_url, timeout_s=60), run_dir), store, concurrency=concurrency
    )
    slots = [AgentSlot(index=n, generator=MODEL, critic=MODEL) for n in range(AGENTS)]
    settings = DebateSettings(rounds=ROUNDS, summarize=True, summarizer=MODEL, phase=f"bench-{concurrency}")
    start = time.perf_counter()
    warm_up = [
        backend.complete(MODEL, [Message(role="user", content=f"warm-up {i}")], Sampling(seed=i))
        for i in range(concurrency)
    ]
    await asyncio.gather(*warm_up)
    warm = time.perf_counter() - start
    loop = [threading.get_native_id()]
    server0 = cpu_wait_s(server.pid) if server.pid else None
    wait0, cpu0, start = cpu_wait_s(tids=loop), time.thread_time(), time.perf_counter()
    transcripts = await debate(backend, task, task.prompts, slots, problems, settings)
    elapsed, cpu, wait = time.perf_counter() - start, time.thread_time() - cpu0, cpu_wait_s(tids=loop)
    server1 = cpu_wait_s(server.pid) if server.pid else None
    await backend.aclose()
    store.close()
    assert len(transcripts) == n_problems
    calls = n_problems * (AGENTS * ROUNDS + AGENTS * (ROUNDS - 1))
    return Measured(warm, elapsed, calls, cpu, _minus(wait, wait0), _minus(server1, server0))


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


@contextlib.contextmanager
def fake_server(latency: float, where: str) -> Iterator[Server]:
    """A fake OpenAI server in a child process or in a thread of this one."""
    if where == "thread":
        server = FakeOpenAI(latency_s=latency).start()
        try:
            yield Server(server.base_url, server.state.api_key, None)
        finally:
            server.stop()
        return
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(latency)], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert child.stdout is not None
        base_url, key = child.stdout.readline().split()
        yield Server(base_url, key, child.pid)
    finally:
        child.terminate()
        child.wait()


def serve(latency: float) -> None:
    """The child: a fake server until terminated."""
    server = FakeOpenAI(latency_s=latency).start()
    print(server.base_url, server.state.api_key, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds the server takes per chat call")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--server", choices=("process", "thread"), default="process", help="where the fake runs")
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return

    with fake_server(args.latency, args.server) as server, tempfile.TemporaryDirectory() as tmp:
        os.environ["OPENAI_API_KEY"] = server.api_key
        run = asyncio.run(timed_debate(server, Path(tmp) / "concurrent", args.problems, args.concurrency))
        sequential = asyncio.run(timed_debate(server, Path(tmp) / "sequential", args.problems, 1)).elapsed_s
    calls, achieved = run.calls, run.elapsed_s
    depth = 2 * ROUNDS - 1
    ideal = max(math.ceil(calls / args.concurrency) * args.latency, depth * args.latency)
    print(f"debates: {args.problems} problems x {AGENTS} agents x {ROUNDS} rounds (+ summaries) = {calls} chat calls")
    where = f"server in a {args.server}"
    print(f"server latency {args.latency * 1000:.0f} ms per call ({where}), concurrency {args.concurrency}")
    print(f"warm-up ({args.concurrency} calls, not timed)  : {run.warm_up_s:7.2f} s")
    print(f"ideal (server-bound) time      : {ideal:7.2f} s")
    print(f"achieved time                  : {achieved:7.2f} s   (achieved / ideal = {achieved / ideal:.2f})")
    print(
        f"  event loop CPU               : {run.loop_cpu_s:7.2f} s   ({run.loop_cpu_s / calls * 1000:.2f} ms per call)"
    )
    for who, wait in (("event loop", run.loop_wait_s), ("server", run.server_wait_s)):
        if wait is not None:
            print(f"  {who + ' waited for a CPU':29s}: {wait:7.2f} s   (held by other processes or threads)")
    print(f"one request at a time          : {sequential:7.2f} s   (ideal {calls * args.latency:.2f} s)")
    print(f"speed-up over sequential       : {sequential / achieved:7.1f} x")


if __name__ == "__main__":
    main()
