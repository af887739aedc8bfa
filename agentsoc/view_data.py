"""What the run browser shows, computed once from a run directory or a compare folder.

:func:`build` reads the runs through the typed records and the store and returns JSON-ready data:
correctness against ground truth (with the task's own equivalence), the filter flags of every
(problem, iteration), the parsed answer's position in each reply, and why each agent's turns of a
training debate went into which dataset (D^G, D^C−, D^C+ — :mod:`agentsoc.selection`'s rules, checked
against the exported files). Repeated strings (the round-0 prompt every agent receives) are stored
once in a string table. Rendering is :mod:`agentsoc.view`'s job.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agentsoc import tasks
from agentsoc.config import paper_deviations
from agentsoc.records import Score
from agentsoc.report import MOCK_BANNER, ReportError, RunSummary, load_run
from agentsoc.store import RunStore
from agentsoc.transcript import Transcript

#: phases that hold debates: the training debate and the held-out evaluation of an iteration
_PHASE = re.compile(r"iter-(\d+)/(train|eval)")
#: flag bits of one (problem, iteration): the filters of the problem list
WRONG, CHANGED, DISAGREE, UNPARSABLE = 1, 2, 4, 8

Equivalent = Callable[[str, str], bool]


class _Strings:
    """A string table: each distinct text is stored once and referred to by its index."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        i = self._index.get(text)
        if i is None:
            i = self._index[text] = len(self.items)
            self.items.append(text)
        return i


def _score(s: Score | None) -> dict[str, Any] | None:
    return None if s is None else {"a": s.accuracy, "se": s.se, "n": s.n}


def _equivalence(summary: RunSummary, evaluation: bool) -> tuple[Equivalent, str | None]:
    """The task's equivalence; string equality (and a note saying so) where the task cannot be built."""
    recipe = summary.recipe
    cfg = (recipe.evaluation.task or recipe.task) if evaluation else recipe.task
    try:
        task = tasks.create(cfg.name, cfg.options, base_dir=recipe.base_dir)
    except Exception as e:  # a task whose data moved: the page still shows everything, compared as text
        return (lambda a, b: a.strip() == b.strip()), f"{cfg.name}: answers compared as text ({e})"
    return task.is_equivalent, None


def _same(eq: Equivalent, a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return eq(a, b)


def _highlight(reply: str, answer: str | None) -> list[int] | None:
    """Where the parsed answer stands in the reply: its last occurrence (parsers take the last one)."""
    if not answer:
        return None
    at = reply.rfind(answer)
    return None if at < 0 else [at, at + len(answer)]


#: an example's identity in an exported dataset: (its first user message, its last reply)
ExampleKey = tuple[str, str]


def _exported(run_dir: Path, rel: str) -> set[ExampleKey] | None:
    """(first prompt, last reply) of every example in an exported dataset; None if the file is gone."""
    path = run_dir / rel
    if not path.is_file():
        return None
    out = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            msgs = json.loads(line)["messages"]
            replies = [m["content"] for m in msgs if m.get("role") == "assistant"]
            first = next((m["content"] for m in msgs if m.get("role") == "user"), "")
            out.add((first, replies[-1] if replies else ""))
    return out


def _selection(
    t: Transcript, target: str | None, eq: Equivalent, chosen: dict[tuple[int, str], set[ExampleKey] | None]
) -> list[str]:
    """Per agent, why its turns of this training debate went into which dataset (selection.py's rules):
    ``G`` D^G; ``C-`` D^C− (corrected to the vote); ``C+`` D^C+ drawn, ``c+`` D^C+ not drawn by the w mix."""
    out = []
    for trace in t.agents:
        tags = []
        first, final = trace.first, trace.final
        if target is not None and first is not None and eq(first, target):
            tags.append("G")
        if target is not None and len(trace.answers) >= 2 and final is not None and eq(final, target):
            if first is not None and eq(first, final):
                pool = chosen.get((trace.agent, "critic"))
                # a system message (unique_id) may precede the prompt in the export: match on the user turn
                first = next((m.content for m in trace.messages if m.role == "user"), "")
                key = (first, trace.messages[-1].content)
                tags.append("c+" if pool is not None and key not in pool else "C+")
            else:
                tags.append("C-")
        out.append(" ".join(tags))
    return out


def _cell(
    t: Transcript, run: int, iteration: int, eq: Equivalent, S: _Strings, selection: list[str] | None
) -> dict[str, Any]:
    truth = t.problem.answer
    vote = t.vote.answer
    flags = 0
    ok = None if truth is None else (vote is not None and eq(vote, truth))
    if ok is False:
        flags |= WRONG
    if len(t.round_votes) > 1 and not _same(eq, t.round_votes[0].answer, vote):
        flags |= CHANGED
    finals = [a.final for a in t.agents]
    if len(t.vote.clusters) > 1 or (None in finals and any(f is not None for f in finals)):
        flags |= DISAGREE
    if any(ans is None for a in t.agents for ans in a.answers):
        flags |= UNPARSABLE
    rw, wr = [], []
    agents = []
    for k, a in enumerate(t.agents):
        if truth is not None and len(a.answers) > 1:
            first_ok = a.first is not None and eq(a.first, truth)
            final_ok = a.final is not None and eq(a.final, truth)
            if first_ok and not final_ok:
                rw.append(a.agent)
            if final_ok and not first_ok:
                wr.append(a.agent)
        rounds = len(a.answers)
        replies = [a.response(m) for m in range(rounds)]
        agents.append(
            {
                "ans": list(a.answers),
                "ok": [None if truth is None or x is None else eq(x, truth) for x in a.answers],
                "resp": [S(r) for r in replies],
                "prompt": [S(a.messages[2 * m].content) for m in range(rounds)],
                "hl": [_highlight(r, x) for r, x in zip(replies, a.answers, strict=True)],
                "model": [S(m) for m in a.models],
                "sel": selection[k] if selection else None,
            }
        )
    return {
        "run": run,
        "it": iteration,
        "vote": vote,
        "ok": ok,
        "tie": t.vote.tie,
        "clusters": [[c.answer, list(c.members)] for c in t.vote.clusters],
        "rounds": [v.answer for v in t.round_votes],
        "flags": flags,
        "rw": rw,
        "wr": wr,
        "agents": agents,
    }


def _summary(run: RunSummary) -> dict[str, Any]:
    rows = []
    for r in run.records:
        sc = r.scores
        n, cut, dropped = r.lost_examples()
        rows.append(
            {
                "it": r.iteration,
                "debate": _score(sc.debate) if sc else None,
                "rounds": [_score(s) for s in sc.rounds] if sc else [],
                "single": _score(sc.single_agent) if sc else None,
                "label": _score(r.label_accuracy),
                "diversity": r.diversity.answer_diversity if r.diversity else None,
                "sizes": [[d.agent, d.role, d.size] for d in r.datasets],
                "lost": [n, cut, dropped],
                "wall": {k: round(v, 1) for k, v in r.wall_s.items()},
            }
        )
    return {"rows": rows}


def _training(run: RunSummary) -> list[dict[str, Any]]:
    out = []
    for r in run.records:
        if not r.datasets and not r.jobs:
            continue
        out.append(
            {
                "it": r.iteration,
                "label": _score(r.label_accuracy),
                "datasets": [
                    {
                        "agent": d.agent,
                        "role": d.role,
                        "size": d.size,
                        "path": d.path,
                        "minus": d.critic_minus,
                        "plus_available": d.critic_plus_available,
                        "plus_used": d.critic_plus_used,
                    }
                    for d in r.datasets
                ],
                "jobs": [
                    {
                        "key": j.key,
                        "state": j.state.value,
                        "examples": j.examples,
                        "cut": j.truncated,
                        "dropped": j.dropped,
                        "result": j.result,
                        "error": j.error,
                        "losses": list(j.losses),
                    }
                    for j in r.jobs
                ],
            }
        )
    return out


def _plots(folder: Path) -> list[dict[str, str]]:
    plots = folder / "plots"
    if not plots.is_dir():
        return []
    return [
        {"name": p.stem.replace("_", " "), "uri": "data:image/png;base64," + base64.b64encode(p.read_bytes()).decode()}
        for p in sorted(plots.glob("*.png"))
    ]


def _runs_of(path: Path) -> tuple[list[RunSummary], dict[str, Any] | None, list[dict[str, Any]]]:
    """The runs of a run directory or a compare folder; a compare folder whose run directories are
    not there (a committed result) gives its methods' final scores only."""
    if (path / "run.sqlite").exists():
        return [load_run(path)], None, []
    meta_path = path / "compare.json"
    if not meta_path.exists():
        raise ReportError(f"{path}: neither a run directory (run.sqlite) nor a compare folder (compare.json)")
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    runs, missing = [], []
    for m in meta.get("methods", []):
        run_dir = path / m["run_dir"]
        if (run_dir / "run.sqlite").exists():
            run = load_run(run_dir, m["method"], m["label"])
            run.vs_reference = m.get("vs_reference")
            runs.append(run)
        else:
            missing.append(m)
    return runs, meta, missing


def _debates(run: RunSummary) -> list[tuple[int, str, list[Transcript]]]:
    """(iteration, ``train`` or ``eval``, transcripts by problem id) of every debate of a run, in order."""
    store = RunStore.open(run.run_dir, readonly=True)
    try:
        out = []
        for phase in store.phases():
            m = _PHASE.fullmatch(phase)
            if m:
                ts = sorted(store.transcripts(phase).values(), key=lambda t: t.problem.id)
                out.append((int(m.group(1)), m.group(2), ts))
    finally:
        store.close()
    return sorted(out, key=lambda x: (x[0], x[1]))


def _add_problems(run: RunSummary, k: int, S: _Strings, problems: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Add run ``k``'s debates to ``problems`` (one entry per split and problem, a cell per run and
    iteration); returns notes on how answers were compared."""
    eq_train, note_t = _equivalence(run, evaluation=False)
    eq_eval, note_e = _equivalence(run, evaluation=True)
    for iteration, kind, transcripts in _debates(run):
        split = "held-out" if kind == "eval" else "train"
        eq = eq_eval if kind == "eval" else eq_train
        chosen: dict[tuple[int, str], set[ExampleKey] | None] = {
            (d.agent, d.role): _exported(run.run_dir, d.path)
            for d in run.datasets
            if kind == "train" and d.iteration == iteration
        }
        for t in transcripts:
            entry = problems.setdefault(
                (split, t.problem.id),
                {
                    "id": t.problem.id,
                    "split": split,
                    "q": S(t.problem.question),
                    "truth": t.problem.answer,
                    "cells": [],
                },
            )
            selection = None
            if kind == "train":
                # STaR selects against the truth (society.select); everything else against the vote
                target = t.problem.answer if run.recipe.selection.label == "ground_truth" else t.vote.answer
                selection = _selection(t, target, eq, chosen)
            entry["cells"].append(_cell(t, k, iteration, eq, S, selection))
    return [n for n in (note_t, note_e) if n]


def _run_info(run: RunSummary) -> dict[str, Any]:
    soc, ev = run.recipe.society, run.recipe.evaluation
    return {
        "label": run.label,
        "name": run.name,
        "dir": run.run_dir.name,
        "task": run.task,
        "backend": run.backend,
        "agents": max(soc.agents, ev.agents or 0),
        "shape": f"{soc.agents} agents × {soc.rounds} rounds",
        "recipe": (run.run_dir / "recipe.toml").read_text(encoding="utf-8"),
        "deviations": paper_deviations(run.recipe),
        "summary": _summary(run),
        "training": _training(run),
        "vs_reference": run.vs_reference,
    }


def build(path: Path) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data."""
    runs, meta, missing = _runs_of(path)
    S = _Strings()
    problems: dict[tuple[str, str], dict[str, Any]] = {}
    notes: list[str] = []
    for k, run in enumerate(runs):
        notes += [n for n in _add_problems(run, k, S, problems) if n not in notes]
    out_runs = [_run_info(run) for run in runs]
    ordered = sorted(problems.values(), key=lambda p: (p["split"] != "held-out", p["id"]))
    return {
        "title": (meta or {}).get("recipe") or (runs[0].name if runs else path.name),
        "kind": "compare" if meta is not None else "run",
        "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mock": MOCK_BANNER.strip("> *") if any(r.backend == "mock" for r in runs) else None,
        "reference": (meta or {}).get("reference"),
        "missing": [
            {
                "label": m.get("label", m.get("method")),
                "run_dir": m.get("run_dir"),
                "score": m.get("score"),
                "iterations": m.get("iterations"),
                "vs_reference": m.get("vs_reference"),
            }
            for m in missing
        ],
        "notes": notes,
        "plots": _plots(path),
        "runs": out_runs,
        "problems": ordered,
        "S": S.items,
    }
