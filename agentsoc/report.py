"""Markdown tables and matplotlib plots from a run directory or a ``compare`` folder.

``render(path)`` writes ``report.md`` and ``plots/*.png`` next to the data and returns the report
path. A run directory gives per-iteration tables (final vote, vote per round = Majority at round
0, single agent; diversity; dataset sizes; token usage); a compare folder (``compare.json`` plus
one run directory per method) adds a Table-1-style table, method × task, best in bold, and plots
that put the methods side by side: accuracy over iterations (paper Fig. 1), diversity over
iterations (Fig. 3) and accuracy against diversity (Fig. 4). Every comparison drawn on the same
problems carries an exact paired test (:mod:`agentsoc.stats`): method vs reference, final vote vs
round-0 vote (what the debate rounds do), last iteration vs the base society (what finetuning does).
Nothing here calls a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentsoc.config import Recipe, load_recipe, paper_deviations
from agentsoc.evaluate import PairedScore, paired
from agentsoc.records import DatasetRecord, IterationRecord, Score
from agentsoc.stats import SE_CONVENTION, format_p, mcnemar_exact, paired_text, verdict
from agentsoc.store import RunStore
from agentsoc.tables import markdown_table
from agentsoc.transcript import Transcript
from agentsoc.types import Job

MOCK_BANNER = "> **MOCK BACKEND — simulated agents; numbers say nothing about language models.**"

#: diversity metrics in the order they are tabulated and plotted: (key, label, higher = more diverse)
DIVERSITY = (
    ("answer_diversity", "answer diversity (1 − consensus)"),
    ("embedding_dissimilarity", "embedding dissimilarity"),
    ("likelihood_nll", "likelihood (NLL of others' responses)"),
    ("kl", "KL between agents"),
)


class ReportError(ValueError):
    """The folder is not a run or compare directory, or plotting is impossible."""


#: per held-out problem id: whether a vote was right
Correct = dict[str, bool]


@dataclass
class VoteCorrectness:
    """One evaluation's votes, problem by problem: the input of every paired test."""

    final: Correct
    rounds: list[Correct]


@dataclass
class RunSummary:
    """What the report needs from one run directory: its recipe and its typed iteration records."""

    name: str
    label: str
    run_dir: Path
    recipe: Recipe
    records: list[IterationRecord]
    usage: list[dict[str, Any]] = field(default_factory=list)
    #: every fine-tuning job of the run, resubmitted attempts included
    job_records: list[Job] = field(default_factory=list)
    vs_reference: dict[str, Any] | None = None
    #: the Table 1 column; defaults to the evaluation task's name
    column: str | None = None
    #: per evaluated iteration, which held-out problems each vote got right (empty when the
    #: evaluation task cannot be built here, e.g. its data files moved; see ``paired_note``)
    correct: dict[int, VoteCorrectness] = field(default_factory=dict)
    paired_note: str | None = None

    @property
    def col(self) -> str:
        return self.column or self.task

    @property
    def jobs(self) -> int:
        return len(self.job_records)

    @property
    def task(self) -> str:
        ev = self.recipe.evaluation.task
        return (ev or self.recipe.task).name

    @property
    def backend(self) -> str:
        return self.recipe.backend.name

    @property
    def scored(self) -> list[IterationRecord]:
        """The iterations that were evaluated, in order."""
        return [r for r in self.records if r.scores is not None]

    @property
    def iterations(self) -> list[int]:
        return [r.iteration for r in self.scored]

    @property
    def datasets(self) -> list[DatasetRecord]:
        return [d for r in self.records for d in r.datasets]

    def final(self) -> Score | None:
        scored = self.scored
        return scored[-1].scores.debate if scored and scored[-1].scores else None

    def diversity(self, iteration: int, key: str) -> float | None:
        div = next((r.diversity for r in self.records if r.iteration == iteration), None)
        value = div.model_dump().get(key) if div is not None else None
        return None if value is None else float(value)


def _vote_correctness(transcripts: list[Transcript], is_equivalent: Callable[[str, str], bool]) -> VoteCorrectness:
    def right(answer: str | None, truth: str | None) -> bool:
        return answer is not None and truth is not None and is_equivalent(answer, truth)

    rounds = len(transcripts[0].round_votes) if transcripts else 0
    return VoteCorrectness(
        final={t.problem.id: right(t.vote.answer, t.problem.answer) for t in transcripts},
        rounds=[
            {t.problem.id: right(t.round_votes[m].answer, t.problem.answer) for t in transcripts} for m in range(rounds)
        ],
    )


def _correctness(
    recipe: Recipe, store: RunStore, records: list[IterationRecord]
) -> tuple[dict[int, VoteCorrectness], str | None]:
    """Per evaluated iteration, which problems each vote got right, judged by the evaluation task's
    own equivalence (the same judge as the stored scores)."""
    from agentsoc import tasks

    ev = recipe.evaluation.task or recipe.task
    try:
        task = tasks.create(ev.name, ev.options, base_dir=recipe.base_dir)
    except (ValueError, OSError) as e:
        # the task checks its data paths when built; a report must still render without them
        return {}, f"paired tests left out: the evaluation task cannot be built here ({e})"
    out = {}
    for rec in records:
        if rec.scores is not None:
            ts = list(store.transcripts(f"iter-{rec.iteration}/eval").values())
            if ts:
                out[rec.iteration] = _vote_correctness(ts, task.is_equivalent)
    return out, None


def load_run(run_dir: Path, name: str | None = None, label: str | None = None) -> RunSummary:
    if not (run_dir / "run.sqlite").exists():
        raise ReportError(f"{run_dir}: not an agentsoc run directory (no run.sqlite)")
    recipe = load_recipe(run_dir / "recipe.toml")
    store = RunStore.open(run_dir, readonly=True)
    try:
        records = store.iterations()
        correct, note = _correctness(recipe, store, records)
        return RunSummary(
            name=name or recipe.name,
            label=label or recipe.name,
            run_dir=run_dir,
            recipe=recipe,
            records=records,
            usage=store.usage(),
            job_records=store.jobs(),
            correct=correct,
            paired_note=note,
        )
    finally:
        store.close()


def load_compare(out_dir: Path) -> tuple[list[RunSummary], dict[str, Any]]:
    meta = json.loads((out_dir / "compare.json").read_text(encoding="utf-8"))
    runs = []
    for m in meta["methods"]:
        run = load_run(out_dir / m["run_dir"], m["method"], m["label"])
        run.vs_reference = m.get("vs_reference")
        runs.append(run)
    return runs, meta


# -- tables ---------------------------------------------------------------------------------------
def fmt(score: Score | None) -> str:
    return "–" if score is None else str(score)


def _num(v: float | None, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _shape_of(r: RunSummary) -> str:
    soc, ev = r.recipe.society, r.recipe.evaluation
    return f"{ev.agents or soc.agents} × {ev.rounds or soc.rounds}"


def table1(runs: Sequence[RunSummary], reference: str | None = None) -> str:
    """Method × task: accuracy ± SE of the final vote after each method's last iteration; the best
    of each column in bold. With one task, also the iterations, the evaluation shape and (given a
    reference) the paired difference to it on the same problems."""
    tasks = list(dict.fromkeys(r.col for r in runs))
    labels = list(dict.fromkeys(r.label for r in runs))
    cell_run = {(r.label, r.col): r for r in runs}
    best = {}
    for t in tasks:
        accs = [f.accuracy for r in runs if r.col == t and (f := r.final())]
        best[t] = max(accs) if accs else None
    single = len(tasks) == 1
    header = ["Method", *tasks]
    if single:
        header += ["iterations", "agents × rounds (eval)"]
        if reference:
            header.append(f"Δ vs {reference} (paired)")
    rows = []
    for label in labels:
        cells = []
        for t in tasks:
            run = cell_run.get((label, t))
            f = run.final() if run else None
            cell = fmt(f)
            top = best[t]
            if f and top is not None and abs(f.accuracy - top) < 1e-12:
                cell = f"**{cell}**"
            cells.append(cell)
        row = [label, *cells]
        if single:
            r = cell_run[(label, tasks[0])]
            row += [str(r.iterations[-1] if r.iterations else 0), _shape_of(r)]
            if reference:
                vs = r.vs_reference
                # compare.json stores no p-value: it comes from the discordant counts, so folders
                # written before reports carried tests render the same way
                row.append("–" if not vs else paired_text(vs["diff"], vs["se"], vs["a_only"], vs["b_only"]))
        rows.append(row)
    return markdown_table(header, rows)


def _test_row(what: str, a: str, b: str, d: PairedScore) -> list[str]:
    p = mcnemar_exact(d.a_only, d.b_only)
    return [
        what,
        f"{a} − {b}",
        f"{100 * d.diff:+.2f} ± {100 * d.se:.2f}",
        f"{d.a_only} / {d.b_only}",
        format_p(p),
        verdict(p, d.diff),
    ]


def paired_tests(runs: Sequence[RunSummary]) -> str | None:
    """Per run, on the same held-out problems: what the debate rounds do (final vote − round-0 vote,
    every evaluated iteration) and what finetuning does (last iteration − iteration 0, final vote
    and round-0 vote). None when no run has such a comparison."""
    rows = []
    for r in runs:
        its = sorted(r.correct)
        for it in its:
            vc = r.correct[it]
            if len(vc.rounds) > 1:
                rows.append(
                    _test_row(
                        r.label, f"final vote, iter {it}", f"round-0 vote, iter {it}", paired(vc.final, vc.rounds[0])
                    )
                )
        if len(its) > 1:
            first, last = r.correct[its[0]], r.correct[its[-1]]
            rows.append(
                _test_row(
                    r.label,
                    f"final vote, iter {its[-1]}",
                    f"final vote, iter {its[0]}",
                    paired(last.final, first.final),
                )
            )
            if len(first.rounds) > 1 and len(last.rounds) > 1:
                rows.append(
                    _test_row(
                        r.label,
                        f"round-0 vote, iter {its[-1]}",
                        f"round-0 vote, iter {its[0]}",
                        paired(last.rounds[0], first.rounds[0]),
                    )
                )
    if not rows:
        return None
    header = [
        "run",
        "A − B (same problems)",
        "Δ (points) ± SE",
        "only A right / only B right",
        "exact McNemar",
        "reads as",
    ]
    return markdown_table(header, rows)


def _paired_section(runs: Sequence[RunSummary], level: str = "##", *, convention: bool = True) -> list[str]:
    """The paired-tests table with the SE convention stated (unless the document already did)."""
    table = paired_tests(runs)
    notes = sorted({r.paired_note for r in runs if r.paired_note})
    if table is None and not notes:
        return []
    lines = [f"{level} Paired tests", ""] + ([SE_CONVENTION, ""] if convention else [])
    if table is not None:
        lines += [table, ""]
    return lines + [f"- {n}" for n in notes] + ([""] if notes else [])


def iteration_table(run: RunSummary) -> str:
    scored = run.scored
    n_rounds = max((len(r.scores.rounds) for r in scored if r.scores), default=0)
    header = ["iter", "debate (final vote)", *[f"vote round {m}" for m in range(n_rounds)], "single agent"]
    header += [label for _, label in DIVERSITY]
    header.append("wall time (min)")
    rows = []
    for r in scored:
        sc = r.scores
        assert sc is not None
        row = [
            str(r.iteration),
            fmt(sc.debate),
            *[fmt(sc.rounds[m] if m < len(sc.rounds) else None) for m in range(n_rounds)],
        ]
        row.append(fmt(sc.single_agent))
        row += [_num(run.diversity(r.iteration, key)) for key, _ in DIVERSITY]
        row.append(", ".join(f"{k} {v / 60:.1f}" for k, v in r.wall_s.items()) or "–")
        rows.append(row)
    return markdown_table(header, rows)


def dataset_table(run: RunSummary) -> str:
    if not run.datasets:
        return "_no finetuning data (no finetuning iterations)_"
    rows = []
    for rec in run.records:
        if not rec.datasets:
            continue
        gen = [str(d.size) for d in rec.datasets if d.role == "generator"]
        cri = [str(d.size) for d in rec.datasets if d.role == "critic"]
        rationalized = "–" if rec.rationalized is None else str(list(rec.rationalized))
        n, cut, dropped = rec.lost_examples()
        lost = f"{cut} / {dropped} of {n}" if n else "–"
        rows.append(
            [
                str(rec.iteration),
                " / ".join(gen) or "–",
                " / ".join(cri) or "–",
                fmt(rec.label_accuracy),
                rationalized,
                lost,
            ]
        )
    header = ["iter", "generator examples per agent", "critic examples per agent", "vote = truth on train"]
    header += ["STaR rationalized", f"cut / left out by max_seq_len ({run.recipe.finetune.spec.max_seq_len})"]
    return markdown_table(header, rows)


def job_table(run: RunSummary) -> str | None:
    """Each job's state and training loss (first → last logged step): a job whose loss did not fall,
    or fell to nothing on a handful of examples, is visible here without opening its folder."""
    if not run.job_records:
        return None
    rows = []
    for j in run.job_records:
        loss = f"{j.losses[0]:.3f} → {j.losses[-1]:.3f}" if j.losses else "–"
        rows.append([j.key.split("/", 2)[-1], j.state.value, str(j.examples or "–"), str(len(j.losses) or "–"), loss])
    return markdown_table(["job", "state", "examples", "logged steps", "loss (first → last)"], rows)


def usage_table(run: RunSummary) -> str:
    if not run.usage:
        return "_no usage recorded_"
    by: dict[str, list[int]] = {}
    for u in run.usage:
        s = by.setdefault(u["stage"], [0, 0, 0])
        s[0] += u["calls"]
        s[1] += u["prompt_tokens"]
        s[2] += u["completion_tokens"]
    rows = [[stage, str(c), str(p), str(ct)] for stage, (c, p, ct) in sorted(by.items())]
    total = [sum(v[k] for v in by.values()) for k in range(3)]
    rows.append(["**total**", *(f"**{t}**" for t in total)])
    return markdown_table(
        ["stage", "calls sent (cached and shared answers not counted)", "prompt tokens", "completion tokens"], rows
    )


def _deviations(runs: Sequence[RunSummary]) -> list[str]:
    """The switches by which the runs differ from the paper's setting (one list if they all agree)."""
    by_run = {r.label: paper_deviations(r.recipe) for r in runs}
    if not any(by_run.values()):
        return ["## Settings", "", "Every switch is at the paper's setting.", ""]
    out = ["## Settings that differ from the paper", ""]
    if len({tuple(v) for v in by_run.values()}) == 1:
        return out + [f"- {d}" for d in next(iter(by_run.values()))] + [""]
    for label, devs in by_run.items():
        out += [f"- **{label}**: " + ("; ".join(devs) if devs else "none")]
    return [*out, ""]


def _notes(runs: Sequence[RunSummary]) -> list[str]:
    notes: list[str] = []
    diversities = [rec.diversity for r in runs for rec in r.records if rec.diversity is not None]
    embedders = {d.embedder for d in diversities if d.embedder}
    if embedders:
        notes.append(f"Embedding dissimilarity computed with: {', '.join(sorted(embedders))}.")
    seen = {n for d in diversities for n in d.notes}
    notes += sorted(seen)
    if any(r.name.startswith("cooperative") for r in runs):
        from agentsoc.baselines import COOPERATIVE_NOTE

        notes.append(COOPERATIVE_NOTE)
    return notes


# -- plots ----------------------------------------------------------------------------------------
def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ReportError(
            "plots need matplotlib: pip install -e '.[plot]' in the agentsoc checkout (or ask for the report "
            "without plots)"
        ) from e
    return plt


_MARKERS = "osD^v<>pPX*h"
_DASHES = ("--", ":", "-.", (0, (5, 2, 1, 2)))


def _style(k: int) -> dict[str, Any]:
    """Distinct colour and marker per series (tab20 has enough colours for every method)."""
    from matplotlib import colormaps

    return {"color": colormaps["tab20"](k % 20), "marker": _MARKERS[k % len(_MARKERS)]}


def _finish(fig: Any, ax: Any, path: Path, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _accuracy_series(run: RunSummary) -> dict[str, list[tuple[int, Score]]]:
    """One run's accuracy curves: the final vote, the vote of every round, the single agent."""
    out: dict[str, list[tuple[int, Score]]] = {"final vote (debate)": []}
    for rec in run.scored:
        sc = rec.scores
        assert sc is not None
        out["final vote (debate)"].append((rec.iteration, sc.debate))
        for m, s in enumerate(sc.rounds):
            label = "vote round 0 (Majority)" if m == 0 else f"vote round {m}"
            out.setdefault(label, []).append((rec.iteration, s))
    out["single agent"] = [(rec.iteration, rec.scores.single_agent) for rec in run.scored if rec.scores]
    return out


def plot_accuracy(runs: Sequence[RunSummary], path: Path) -> Path:
    """Fig. 1 style: accuracy over finetuning iterations with SE error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    if len(runs) == 1:
        series = _accuracy_series(runs[0])
        for n, (label, pts) in enumerate(series.items()):
            ax.errorbar(
                [i + 0.02 * n for i, _ in pts],
                [100 * s.accuracy for _, s in pts],
                yerr=[100 * s.se for _, s in pts],
                capsize=3,
                **_style(2 * n),
                label=label,
            )
    else:
        flat = [r for r in runs if len(r.iterations) <= 1]
        max_it = max((r.iterations[-1] for r in runs if r.iterations), default=0)
        curves = [r for r in runs if len(r.iterations) > 1]
        for n, r in enumerate(curves):
            pts = [(rec.iteration, rec.scores.debate) for rec in r.scored if rec.scores]
            # a small sideways offset per method keeps overlapping curves and error bars visible
            dx = 0.025 * (n - (len(curves) - 1) / 2)
            ax.errorbar(
                [i + dx for i, _ in pts],
                [100 * s.accuracy for _, s in pts],
                yerr=[100 * s.se for _, s in pts],
                capsize=3,
                label=r.label,
                **_style(n),
            )
        for n, r in enumerate(flat):
            f = r.final()
            if f:
                ax.axhline(
                    100 * f.accuracy,
                    linestyle=_DASHES[n % len(_DASHES)],
                    linewidth=1.2,
                    color=_style(len(curves) + n)["color"],
                    label=f"{r.label} (no finetuning)",
                )
        ax.set_xlim(-0.2, max_it + 0.2)
    ax.set_xticks(sorted({i for r in runs for i in r.iterations}))
    _finish(
        fig,
        ax,
        path,
        f"Held-out accuracy over finetuning iterations ({runs[0].task})",
        "finetuning iteration",
        "accuracy (%) ± SE",
    )
    plt.close(fig)
    return path


def _diverse_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    return [
        r
        for r in runs
        if any(r.diversity(i, key) is not None for i in r.iterations for key, _ in DIVERSITY[1:])
        and (len(r.iterations) > 1 or len(runs) == 1)
    ]


def plot_diversity(runs: Sequence[RunSummary], path: Path) -> Path | None:
    """Fig. 3 style: each diversity metric over finetuning iterations, one line per method."""
    chosen = _diverse_runs(runs)
    if not chosen:
        return None
    plt = _pyplot()
    metrics = [
        (k, lab) for k, lab in DIVERSITY if any(r.diversity(i, k) is not None for r in chosen for i in r.iterations)
    ]
    cols = min(2, len(metrics))
    rows = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + 0.8), squeeze=False)
    flat_axes = [ax for row in axes for ax in row]
    for ax in flat_axes[len(metrics) :]:
        ax.set_visible(False)
    for ax, (key, label) in zip(flat_axes, metrics, strict=False):
        for n, r in enumerate(chosen):
            pts = [(i, v) for i in r.iterations if (v := r.diversity(i, key)) is not None]
            ax.plot([i for i, _ in pts], [v for _, v in pts], label=r.label, **_style(n))
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("finetuning iteration")
        ax.set_ylabel("higher = more diverse")
        ax.set_xticks(sorted({i for r in chosen for i in r.iterations}))
        ax.grid(alpha=0.3)
    handles, labels = flat_axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 0.95))
    fig.suptitle("Diversity of the agents over finetuning iterations")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_vs_diversity(runs: Sequence[RunSummary], path: Path) -> Path | None:
    """Fig. 4 style: accuracy against embedding dissimilarity, one point per iteration."""
    chosen = [r for r in _diverse_runs(runs) if any(r.diversity(i, "embedding_dissimilarity") for i in r.iterations)]
    if not chosen:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for n, r in enumerate(chosen):
        pts = [
            (v, 100 * rec.scores.debate.accuracy, rec.iteration)
            for rec in r.scored
            if rec.scores and (v := r.diversity(rec.iteration, "embedding_dissimilarity")) is not None
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=r.label, **_style(n))
        for x, y, i in pts:
            ax.annotate(f"it {i}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    _finish(
        fig,
        ax,
        path,
        "Accuracy vs diversity over finetuning iterations",
        "embedding dissimilarity (round 0)",
        "accuracy (%)",
    )
    plt.close(fig)
    return path


def plot_losses(run: RunSummary, path: Path) -> Path | None:
    """Every job's training loss per logged step, one line each (a run's jobs, not a comparison's)."""
    curves = [j for j in run.job_records if len(j.losses) > 1]
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9.5, 4.8))
    for n, j in enumerate(curves):
        style = {k: v for k, v in _style(n).items() if k != "marker"}
        ax.plot(range(1, len(j.losses) + 1), j.losses, label=j.key.split("/", 2)[-1], **style)
    _finish(fig, ax, path, f"Training loss per job — {run.label}", "logged step", "loss")
    plt.close(fig)
    return path


def make_plots(runs: Sequence[RunSummary], folder: Path) -> list[Path]:
    out = [plot_accuracy(runs, folder / "accuracy_over_iterations.png")]
    for p in (
        plot_diversity(runs, folder / "diversity_over_iterations.png"),
        plot_accuracy_vs_diversity(runs, folder / "accuracy_vs_diversity.png"),
        plot_losses(runs[0], folder / "training_loss.png") if len(runs) == 1 else None,
    ):
        if p is not None:
            out.append(p)
    return out


# -- the documents --------------------------------------------------------------------------------
def _run_sections(run: RunSummary, level: str = "##") -> list[str]:
    return [
        f"{level} Per iteration — {run.label}",
        "",
        "Accuracy (%) ± SE on the held-out problems. *vote round 0* is the Majority of the current agents;"
        " *single agent* is the mean accuracy of single round-0 answers (its SE counts all N·n answers as"
        " independent, which the N answers to one problem are not: it is too small).",
        "",
        iteration_table(run),
        "",
        *_paired_section([run], level + "#"),
        f"{level}# Training data — {run.label}",
        "",
        dataset_table(run),
        "",
        *_job_section(run, level + "#"),
        f"{level}# Token usage — {run.label} ({run.jobs} finetuning jobs)",
        "",
        usage_table(run),
        "",
    ]


def _job_section(run: RunSummary, level: str) -> list[str]:
    table = job_table(run)
    return [] if table is None else [f"{level} Fine-tuning jobs — {run.label}", "", table, ""]


def _header(runs: Sequence[RunSummary], title: str) -> list[str]:
    lines = [f"# {title}", ""]
    if any(r.backend == "mock" for r in runs):
        lines += [MOCK_BANNER, ""]
    return lines


def _plot_links(plots: Sequence[Path], base: Path) -> list[str]:
    out = ["## Plots", ""]
    for p in plots:
        rel = p.relative_to(base).as_posix()
        out += [f"![{p.stem.replace('_', ' ')}]({rel})", ""]
    return out


def render_run(run_dir: Path, *, plots: bool = True) -> Path:
    run = load_run(run_dir)
    lines = _header([run], f"Report — {run.name}")
    lines += [
        f"Task: **{run.task}** · backend: **{run.backend}** · agents × rounds: "
        f"{run.recipe.society.agents} × {run.recipe.society.rounds}",
        "",
    ]
    lines += _run_sections(run)
    lines += _deviations([run])
    notes = _notes([run])
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += _plot_links(make_plots([run], run_dir / "plots"), run_dir)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def render_compare(out_dir: Path, *, plots: bool = True) -> Path:
    runs, meta = load_compare(out_dir)
    reference = meta.get("reference")
    lines = _header(runs, f"Comparison — {meta.get('recipe', out_dir.name)}")
    lines += [
        "Accuracy (%) ± standard error of the majority-voted final answer on the same fixed,"
        " seeded held-out problems, after each method's last finetuning iteration; unparsable answers count"
        " as wrong. Best per task in **bold**. The paired Δ is the per-problem difference to"
        f" `{reference}` with its SE (+problems only this method solved / −only the reference solved) and"
        " the exact McNemar p-value of that difference.",
        "",
        SE_CONVENTION,
        "",
        table1(runs, reference if any(r.name == reference for r in runs) else None),
        "",
    ]
    lines += _paired_section(runs, convention=False)
    multi = [r for r in runs if len(r.iterations) > 1]
    if multi:
        lines += ["## Accuracy and diversity per iteration", ""]
        for r in multi:
            lines += [f"### {r.label}", "", iteration_table(r), ""]
        lines += ["## Training data and token usage", ""]
        for r in multi:
            lines += [f"### {r.label}", "", dataset_table(r), "", usage_table(r), ""]
    lines += _deviations(runs)
    notes = _notes(runs)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    if plots:
        lines += _plot_links(make_plots(runs, out_dir / "plots"), out_dir)
    lines += ["Run directories: " + ", ".join(f"`{r.run_dir.name}/`" for r in runs), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def render_collection(folder: Path, *, plots: bool = True) -> Path:
    """One Table 1 over several compare folders (one per task/recipe), each also rendered alone."""
    subs = sorted(p for p in folder.iterdir() if (p / "compare.json").exists())
    runs: list[RunSummary] = []
    per_sub = []
    for sub in subs:
        render_compare(sub, plots=plots)
        per_sub.append((sub, load_compare(sub)[0]))
    # columns are tasks; two recipes on the same task (other options) are told apart by recipe name
    tasks = [r.task for _, rs in per_sub for r in rs[:1]]
    for sub, rs in per_sub:
        for r in rs:
            r.column = r.task if tasks.count(r.task) == 1 else f"{r.task} ({sub.name})"
        runs += rs
    lines = _header(runs, f"Comparison — {folder.name}")
    lines += [
        "Accuracy (%) ± SE of the majority-voted final answer on each task's fixed held-out problems, after"
        " each method's last finetuning iteration. Best per task in **bold**. Paired tests: each task's"
        " own report.",
        "",
        SE_CONVENTION,
        "",
        table1(runs),
        "",
        "Per task (per-iteration tables, diversity, data, usage, plots): "
        + ", ".join(f"[{s.name}]({s.name}/report.md)" for s in subs),
        "",
    ]
    notes = _notes(runs)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def render(path: Path, *, plots: bool = True) -> Path:
    """The report of a compare folder (has ``compare.json``), of a folder of compare folders, or of a
    run directory."""
    if (path / "compare.json").exists():
        return render_compare(path, plots=plots)
    if (path / "run.sqlite").exists():
        return render_run(path, plots=plots)
    if path.is_dir() and any((p / "compare.json").exists() for p in path.iterdir()):
        return render_collection(path, plots=plots)
    raise ReportError(f"{path}: neither a run directory (run.sqlite) nor a compare folder (compare.json)")
