"""Are two fresh runs of one recipe the same? Compares two run directories piece by piece.

Each run's own directory appears in its adapter paths, so it is replaced by a placeholder before
comparing; wall times, and the clock times and durations in job logs, are all that is left out.
Prints, per phase, how many transcripts and agent traces are identical, then each dataset file,
then the iteration records.

    agentsoc demo --quick --run-dir /tmp/a; agentsoc demo --quick --run-dir /tmp/b
    .venv/bin/python bench/rerun_identical.py /tmp/a /tmp/b
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agentsoc.store import RunStore


def normalised(obj: BaseModel, run_dir: Path) -> str:
    return obj.model_dump_json().replace(str(run_dir), "<run>")


def record(obj: BaseModel, run_dir: Path) -> dict[str, Any]:
    """An iteration record without what differs between any two runs: wall times, timestamps, durations."""
    data: dict[str, Any] = json.loads(normalised(obj, run_dir))
    data.pop("wall_s", None)
    for job in data.get("jobs") or []:
        # "06:08:49 running", "06:09:18 succeeded in 29 s": the clock and the durations differ
        job["events"] = [re.sub(r" in \d+ s$", "", e.split(" ", 1)[1]) for e in job.get("events") or []]
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    args = ap.parse_args()
    a, b = RunStore.open(args.a, readonly=True), RunStore.open(args.b, readonly=True)
    try:
        for phase in a.phases():
            ta, tb = a.transcripts(phase), b.transcripts(phase)
            same = sum(k in tb and normalised(t, args.a) == normalised(tb[k], args.b) for k, t in ta.items())
            traces = [(x, y) for k, t in ta.items() if k in tb for x, y in zip(t.agents, tb[k].agents, strict=True)]
            agents = sum(normalised(x, args.a) == normalised(y, args.b) for x, y in traces)
            n_agents = sum(len(t.agents) for t in ta.values())
            print(f"{phase}: {same}/{len(ta)} transcripts identical, {agents}/{n_agents} agent traces")
        for fa in sorted(args.a.glob("iter-*/data/*.jsonl")):
            fb = args.b / fa.relative_to(args.a)
            same_file = fb.exists() and fa.read_bytes() == fb.read_bytes()
            print(f"{fa.relative_to(args.a)}: {'identical' if same_file else 'DIFFERENT'}")
        ra = [record(r, args.a) for r in a.iterations()]
        rb = [record(r, args.b) for r in b.iterations()]
        print(
            f"iteration records (scores, datasets, slots, diversity, job logs and losses): "
            f"{'identical' if ra == rb else 'DIFFERENT'}"
        )
    finally:
        a.close()
        b.close()


if __name__ == "__main__":
    main()
