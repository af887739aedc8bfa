"""What the debate rounds do in a stored comparison: critic transitions and paired vote differences.

The report gives each round's vote accuracy; this prints what lies behind those numbers, read from
the stored held-out transcripts of every method under a ``compare`` output directory:

* per method and iteration, how the agents' answers moved from round 0 to the last round: right
  to wrong, wrong to right, and to or from an abstention (a cut-off or unparsable reply). These
  count agents, and the N agents of one problem are not independent: the counts describe, the
  paired vote tests below decide;
* paired differences (per held-out problem) between the round-0 vote and the final vote of the same
  society, and between methods' round-0 votes, each with its SE and exact McNemar p-value, in the
  one convention of the reports (:data:`agentsoc.stats.SE_CONVENTION`).

    .venv/bin/python bench/critic_effect.py runs/arithmetic-compare [--against single_agent_ft]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from agentsoc.config import load_recipe
from agentsoc.evaluate import paired
from agentsoc.stats import SE_CONVENTION, format_p, mcnemar_exact, verdict
from agentsoc.store import RunStore
from agentsoc.tasks import create
from agentsoc.transcript import Transcript

Equivalent = Callable[[str, str], bool]


def outcome(answer: str | None, gold: str | None, equivalent: Equivalent) -> str:
    if answer is None:
        return "abstain"
    return "right" if gold is not None and equivalent(answer, gold) else "wrong"


def paired_test(a: dict[str, bool], b: dict[str, bool]) -> str:
    """Mean per-problem difference a − b (points) ± its SE, the discordant counts and the exact
    McNemar p-value, with the word the prose may use."""
    d = paired(a, b)
    p = mcnemar_exact(d.a_only, d.b_only)
    counts = f"n={d.n}, {d.a_only}/{d.b_only} discordant"
    return f"{100 * d.diff:+.1f} ± {100 * d.se:.1f} ({counts}, {format_p(p)}: {verdict(p, d.diff)})"


def vote_correct(ts: dict[str, Transcript], rnd: int, equivalent: Equivalent) -> dict[str, bool]:
    """Per problem: is the vote after round ``rnd`` (-1: the final vote) right?"""
    out = {}
    for pid, t in ts.items():
        answer = t.vote.answer if rnd == -1 or not t.round_votes else t.round_votes[rnd].answer
        out[pid] = outcome(answer, t.problem.answer, equivalent) == "right"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("compare_dir", type=Path)
    ap.add_argument("--reference", default="ours")
    ap.add_argument("--against", default="single_agent_ft", help="method whose round-0 votes are compared")
    args = ap.parse_args()
    print(SE_CONVENTION)
    methods = sorted(p.name for p in args.compare_dir.iterdir() if (p / "run.sqlite").exists())
    round0: dict[str, dict[int, dict[str, bool]]] = {}
    for method in methods:
        run = args.compare_dir / method
        recipe = load_recipe(run / "recipe.toml")
        ev = recipe.evaluation.task or recipe.task  # held-out problems may be another task's (transfer)
        task = create(ev.name, ev.options, base_dir=recipe.base_dir)
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
                        f"  final vote - round-0 vote {paired_test(final, round0[method][it])}"
                    )
                print(line)
        finally:
            store.close()
    ref, other = round0.get(args.reference, {}), round0.get(args.against, {})
    for it in sorted(set(ref) & set(other)):
        print(f"round-0 vote, iter {it}: {args.reference} - {args.against} {paired_test(ref[it], other[it])}")
    if ref:
        lo, hi = min(ref), max(ref)
        print(f"round-0 vote of {args.reference}, iter {hi} - iter {lo}: {paired_test(ref[hi], ref[lo])}")


if __name__ == "__main__":
    main()
