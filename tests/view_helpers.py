"""A finished mock run with a hostile reply injected, shared by the run browser's tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from agentsoc.store import RunStore
from agentsoc.transcript import Transcript

ROOT = Path(__file__).resolve().parents[1]
#: 3 held-out problems debated by the bundled 0.5B model (tests/data/real-run-qwen0.5b/README.md)
REAL_RUN = ROOT / "tests" / "data" / "real-run-qwen0.5b"

#: model text that would run code or load a URL if the page ever rendered it as HTML
HOSTILE = (
    '<script>window.pwned=1</script><img src=x onerror="window.pwned=2"></script><!-- & \u2028 <b>not bold</b> -->'
)


def agentsoc(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess: Playwright's sync API keeps an event loop running in the test's thread,
    where the CLI's own ``asyncio.run`` cannot start."""
    done = subprocess.run(
        [sys.executable, "-m", "agentsoc.cli", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    return done


def mock_run(folder: Path) -> Path:
    """``agentsoc run recipes/arithmetic-mock.toml`` into ``folder/run`` (60 + 60 problems, 2 iterations)."""
    run_dir = folder / "run"
    agentsoc("run", str(ROOT / "recipes" / "arithmetic-mock.toml"), "--run-dir", str(run_dir), "--quiet")
    return run_dir


def inject_hostile(run_dir: Path, phase: str = "iter-0/eval") -> Transcript:
    """Replace agent 0's round-0 reply of one held-out problem by :data:`HOSTILE` (its parsed answer kept
    at the end) and put a hostile string in the question; returns the modified transcript."""
    store = RunStore.open(run_dir)
    try:
        transcripts = store.transcripts(phase)
        t = transcripts[sorted(transcripts)[0]]
        trace = t.agents[0]
        messages = list(trace.messages)
        messages[1] = messages[1].model_copy(update={"content": f"{HOSTILE} The answer is {trace.answers[0]}."})
        agents = (trace.model_copy(update={"messages": tuple(messages)}), *t.agents[1:])
        problem = t.problem.model_copy(update={"question": t.problem.question + " <i>question</i>"})
        hostile = t.model_copy(update={"agents": agents, "problem": problem})
        store.put_transcript(hostile)
    finally:
        store.close()
    return hostile


def real_run(folder: Path) -> Path:
    """A copy of the committed real-model run (opening a database may write beside it)."""
    return Path(shutil.copytree(REAL_RUN, folder / "real-run", ignore=shutil.ignore_patterns("README.md")))
