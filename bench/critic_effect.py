"""What the debate rounds do in a stored comparison: critic transitions and paired vote differences.

The report gives each round's vote accuracy; this prints what lies behind those numbers, read from
the stored held-out transcripts of every method under a ``compare`` output directory:

* per method and iteration, how the agents' answers moved from round 0 to the last round: right
  to wrong, wrong to right, and to or from an abstention (a cut-off or unparsable reply);
* paired differences (per held-out problem, with their standard error) between the round-0 vote
  and the final vote of the same society, and between methods' round-0 votes.

    .venv/bin/python bench/critic_effect.py runs/arithmetic-compare [--against single_agent_ft]
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from agentsoc.config import load_recipe
from agentsoc.store import RunStore
from agentsoc.tasks import create
from agentsoc.transcript import Transcript

Equivalent = Callable[[str, str], bool]


def outcome(answer: str | None, gold: str, equivalent: Equivalent) -> str:
    if answer is None:
        return "abstain"
    return "right" if equivalent(answer, gold) else "wrong"


def paired(a: dict[str, bool], b: dict[str, bool]) -> str:
    """Mean per-problem difference a − b (points) ± its standard error."""
    d = [int(a[k]) - int(b[k]) for k in a if k in b]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1)) if n > 1 else 0.0
    return f"{100 * mean:+.1f} ± {100 * sd / math.sqrt(n):.1f} (n={n})"


def vote_correct(ts: dict[str, Transcript], rnd: int, equivalent: Equivalent) -> dict[str, bool]:
    """Per problem: is the vote after round ``rnd`` (-1: the final vote) right?"""
    out = {}
    for pid, t in ts.items():
        answer = t.vote.answer if rnd == -1 or not t.round_votes else t.round_votes[rnd].answer
        out[pid] = answer is not None and equivalent(answer, t.problem.answer)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--reference", default="ours")
    ap.add_argument("--against", default="single_agent_ft", help="method whose round-0 votes are compared")
    args = ap.parse_args()
    methods = sorted(p.name for p in args.compare_dir.iterdir() if (p / "run.sqlite").exists())
    round0: dict[str, dict[int, dict[str, bool]]] = {}
    for method in methods:
        run = args.compare_dir / method
        recipe = load_recipe(run / "recipe.toml")
        task = create(recipe.task.name, recipe.task.options, base_dir=recipe.base_dir)
        store = RunStore.open(run, readonly=True)
        try:
            phases = [p for p in store.phases() if p.endswith("/eval")]
            for phase in phases:
                ts = store.transcripts(phase)
                it = int(phase.split("/")[0].split("-")[1])
                moves: Counter[str] = Counter()
                for t in ts.values():
                    for trace in t.agents:
                        if len(trace.answers) < 2:
                            continue
                        first = outcome(trace.answers[0], t.problem.answer, task.is_equivalent)
                        last = outcome(trace.answers[-1], t.problem.answer, task.is_equivalent)
                        moves[f"{first}->{last}"] += 1
                round0.setdefault(method, {})[it] = vote_correct(ts, 0, task.is_equivalent)
                line = f"{method:18s} iter {it}"
                if moves:
                    final = vote_correct(ts, -1, task.is_equivalent)
                    line += (
                        f"  right->wrong {moves['right->wrong']:3d}  wrong->right {moves['wrong->right']:3d}"
                        f"  right->abstain {moves['right->abstain']:3d}  abstain->right {moves['abstain->right']:3d}"
                        f"  final vote - round-0 vote {paired(final, round0[method][it])}"
                    )
                print(line)
        finally:
            store.close()
    ref, other = round0.get(args.reference, {}), round0.get(args.against, {})
    for it in sorted(set(ref) & set(other)):
        print(f"round-0 vote, iter {it}: {args.reference} - {args.against} {paired(ref[it], other[it])}")
    if ref:
        first, last = min(ref), max(ref)
        print(f"round-0 vote of {args.reference}, iter {last} - iter {first}: {paired(ref[last], ref[first])}")


if __name__ == "__main__":
    main()
