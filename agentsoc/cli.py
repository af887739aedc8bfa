"""``agentsoc run | demo | jobs | report | compare | view`` — the command line.

Errors a user can fix (a recipe field, a data line, a backend name, a busy run directory) print one
line on stderr and exit 2; a failure while running (a refused job, an exhausted retry) exits 1;
Ctrl-C exits 130 and SIGTERM (a scheduler, ``kill``, a container stop) 143, both after the run has
stopped its calls, saved what finished and released its lock, and both say how to resume.
Tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shlex
import signal
import sys
import tomllib
from collections.abc import Callable, Coroutine, Iterator, Sequence
from importlib import metadata, resources
from pathlib import Path
from typing import Any, TypeVar

from agentsoc import console
from agentsoc.backend import BackendError
from agentsoc.config import Recipe, RecipeError, load_recipe, recipe_from_dict, recipe_warnings, set_dotted
from agentsoc.options import OptionsError
from agentsoc.records import IterationRecord, Score
from agentsoc.report import ReportError
from agentsoc.rundir import RunDirError
from agentsoc.society import Society
from agentsoc.store import RunStore, StoreError
from agentsoc.tables import text_table
from agentsoc.tasks.base import DataError
from agentsoc.tasks.hub import NotFetched

#: errors a user can fix; anything else (a ValueError deep in the code) is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (
    RecipeError,
    RunDirError,
    DataError,
    OptionsError,
    ReportError,
    StoreError,
)
T = TypeVar("T")
#: the operating system refusing a write: disk full, read-only file system, no permission
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT}


def lost_cell(record: IterationRecord) -> str:
    """``2 / 0 of 120``: examples whose trained span max_seq_len cut, and those it left out."""
    n, cut, dropped = record.lost_examples()
    return f"{cut} / {dropped} of {n}" if n else "-"


#: below this many held-out problems an accuracy's ± SE says nothing (1/1 right reads "100.00 ± 0.00")
MIN_JUDGED = 20


def score_cell(score: Score | None) -> str:
    """``70.00 ± 5.92``; with n < :data:`MIN_JUDGED` the count instead, marked too small to judge."""
    if score is None:
        return "-"
    if score.n < MIN_JUDGED:
        return f"{100 * score.accuracy:.0f}% ({round(score.accuracy * score.n)}/{score.n}, too few to judge)"
    return str(score)


def summary_table(results: Sequence[IterationRecord]) -> str:
    """Held-out accuracy per iteration beside the per-round and Majority numbers, and data sizes."""
    n_rounds = max((len(r.scores.rounds) for r in results if r.scores), default=0)
    header = [
        "iter",
        "debate (final vote)",
        *[f"vote round {m}" for m in range(n_rounds)],
        "single agent",
        "examples per agent",
        "cut / left out by max_seq_len",
        "wall time (min)",
    ]
    rows = []
    for r in results:
        sizes = (
            "  ".join(
                role[:3] + " " + "/".join(str(d.size) for d in r.datasets if d.role == role)
                for role in ("generator", "critic")
                if any(d.role == role for d in r.datasets)
            )
            or "-"
        )
        sc = r.scores
        rounds = [score_cell(sc.rounds[m]) if sc and m < len(sc.rounds) else "-" for m in range(n_rounds)]
        rows.append(
            [
                str(r.iteration),
                score_cell(sc.debate if sc else None),
                *rounds,
                score_cell(sc.single_agent if sc else None),
                sizes,
                lost_cell(r),
                "  ".join(f"{k} {v / 60:.1f}" for k, v in r.wall_s.items()) or "-",
            ]
        )
    return text_table(header, rows)


async def _run(args: argparse.Namespace) -> int:
    if args.dry_run:
        from agentsoc.config import load_recipe
        from agentsoc.estimate import dry_run

        print(dry_run(load_recipe(args.recipe)))
        return 0
    return await _execute(args.recipe, args)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With ``--json``, everything written to stdout while the run works goes to stderr instead: a
    print in a library, C code, a child process (file descriptor 1 itself is pointed at stderr), so
    the only thing on stdout is the JSON result, written after this block."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no file descriptor 1 (an embedding host): Python-level redirection only
        saved = -1
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved >= 0:
            os.dup2(saved, 1)
            os.close(saved)


async def _execute(recipe: Recipe | str, args: argparse.Namespace) -> int:
    with stdout_to_stderr(args.json):
        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        for line in recipe_warnings(rec):
            print(f"agentsoc: warning: {line}", file=sys.stderr)
        society = Society.from_recipe(rec, run_dir=args.run_dir, resume=args.resume, progress=not args.quiet)
        # the resume hint on Ctrl-C names the directory this run really uses
        args.run_dir = society.run_dir
        async with society:
            print(f"run directory: {society.run_dir}", file=sys.stderr)

            def show(so_far: Sequence[IterationRecord]) -> None:
                # each iteration's table as soon as it is known, on stderr: stdout keeps the final result only
                if len(so_far) < society.recipe.finetune.iterations + 1:
                    print(f"\n{summary_table(so_far)}\n", file=sys.stderr)

            results = await society.run(on_iteration=show)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
    else:
        print(summary_table(results))
        print("\naccuracy (%) ± standard error on held-out problems; 'vote round 0' = Majority of the agents.")
        n = min((r.scores.debate.n for r in results if r.scores), default=MIN_JUDGED)
        if n < MIN_JUDGED:
            print(
                f"only {n} held-out problems: too few to judge a difference between iterations "
                f"(at least {MIN_JUDGED} needed; raise task.n_test)"
            )
    return 0


#: what ``agentsoc demo --quick`` changes in the demo recipe: a smoke run, not a result
QUICK = {
    "task.n_train": 4,
    "task.n_test": 3,
    "finetune.iterations": 1,
    "selection.min_examples": 1,
    "evaluation.diversity": ["consensus"],
}


def demo_recipe(quick: bool) -> Recipe:
    """The packaged demo recipe (``agentsoc/recipes/arithmetic-local.toml``), shrunk by ``--quick``."""
    text = (resources.files("agentsoc") / "recipes" / "arithmetic-local.toml").read_text(encoding="utf-8")
    data: dict[str, Any] = tomllib.loads(text)
    if quick:
        data["name"] = data["name"] + "-quick"
        set_dotted(data, QUICK)
    return recipe_from_dict(data, source="agentsoc/recipes/arithmetic-local.toml")


async def _demo(args: argparse.Namespace) -> int:
    recipe = demo_recipe(args.quick)
    if args.run_dir is None:
        args.run_dir = Path("runs") / recipe.name
    return await _execute(recipe, args)


def _jobs(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "run.sqlite").exists():
        raise RunDirError(f"{run_dir}: not an agentsoc run directory (no run.sqlite)")
    store = RunStore.open(run_dir, readonly=True)
    try:
        jobs = store.jobs()
    finally:
        store.close()
    if args.json:
        print(json.dumps([j.model_dump(mode="json") for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no fine-tuning jobs yet")
        return 0
    rows = [[j.key, j.backend, j.id, j.state.value, j.result or (j.error or "")] for j in jobs]
    print(text_table(["key", "backend", "id", "state", "result"], rows))
    return 0


def _view(args: argparse.Namespace) -> int:
    from agentsoc.view import server, write_view

    page = write_view(Path(args.run_dir), args.out)
    print(page)
    if args.serve:
        httpd = server(page, args.port)
        port = httpd.server_address[1]
        print(f"serving http://127.0.0.1:{port}/{page.name} (Ctrl-C stops)", file=sys.stderr)
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
    return 0


def _report(args: argparse.Namespace) -> int:
    from agentsoc.report import render

    path = render(Path(args.run_dir), plots=not args.no_plots)
    print(path)
    return 0


async def _compare(args: argparse.Namespace) -> int:
    from agentsoc.baselines import compare, resolve
    from agentsoc.config import load_recipe
    from agentsoc.report import render

    recipes = [load_recipe(r) for r in args.recipe]
    methods = resolve([m.strip() for m in args.methods.split(",") if m.strip()])
    if len({r.name for r in recipes}) != len(recipes):
        raise RunDirError("compare: the recipes must have distinct names (each gets its own folder)")
    out = args.out or Path("runs") / (f"{recipes[0].name}-compare" if len(recipes) == 1 else "compare")
    results = []
    with stdout_to_stderr(args.json):
        for recipe in recipes:
            # several recipes (e.g. one per task): one compare folder each, one Table 1 over all of them
            folder = out if len(recipes) == 1 else out / recipe.name
            results += await compare(recipe, methods, folder, reference=args.reference, progress=not args.quiet)
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in results], indent=2))
    else:
        rows = [[r.label, r.task, str(r.score), r.vs_text()] for r in results]
        print(text_table(["method", "task", "accuracy ± SE", f"paired Δ vs {args.reference}"], rows))
    print(f"report: {render(out, plots=not args.no_plots)}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentsoc", description="Multiagent finetuning of language models.")
    p.add_argument("--version", action="version", version=f"agentsoc {version()}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (debate, select, finetune, evaluate; L iterations)")
    run.add_argument("recipe", help="path of a TOML recipe")
    run.add_argument(
        "--run-dir", type=run_dir_arg, default=None, help="where the run lives (default runs/<recipe name>)"
    )
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir without repeating work")
    run.add_argument("--json", action="store_true", help="print results as JSON (only JSON on stdout)")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument(
        "--dry-run", action="store_true", help="print the expected calls, tokens, jobs and cost; send nothing"
    )
    run.set_defaults(handler=_run)

    demo = sub.add_parser("demo", help="the whole loop on the bundled local model (CPU, offline)")
    demo.add_argument("--quick", action="store_true", help="a few problems, one iteration: a smoke test")
    demo.add_argument("--run-dir", type=run_dir_arg, default=None, help="default runs/arithmetic-local[-quick]")
    demo.add_argument("--fresh", dest="resume", action="store_false", help="refuse an existing run directory")
    demo.add_argument("--json", action="store_true", help="print results as JSON (only JSON on stdout)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_demo, resume=True)

    jobs = sub.add_parser("jobs", help="list the fine-tuning jobs of a run")
    jobs.add_argument("run_dir", help="a run directory (holds run.sqlite)")
    jobs.add_argument("--json", action="store_true", help="print the jobs as JSON")
    jobs.set_defaults(handler=_jobs)

    report = sub.add_parser("report", help="write report.md and plots/ for a run directory or a compare folder")
    report.add_argument("run_dir", help="a run directory, or the --out folder of 'agentsoc compare'")
    report.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    report.set_defaults(handler=_report)

    from agentsoc.baselines import METHODS

    cmp = sub.add_parser(
        "compare",
        help="run several methods (baselines, ablations) on the same problems and write one report",
        epilog="methods: " + ", ".join(METHODS),
    )
    cmp.add_argument(
        "recipe", nargs="+", help="TOML recipe(s) (the 'ours' method); several (one per task) give one Table 1"
    )
    cmp.add_argument("--methods", default="ours,base,majority,debate", help="comma-separated method names (see below)")
    cmp.add_argument("--out", type=Path, default=None, help="folder of the method runs (default runs/<name>-compare)")
    cmp.add_argument("--reference", default="ours", help="method the paired differences are taken against")
    cmp.add_argument("--json", action="store_true", help="print results as JSON (only JSON on stdout)")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    cmp.set_defaults(handler=_compare)

    view = sub.add_parser(
        "view", help="write one self-contained HTML page to browse a run or compare folder (debates, data, jobs)"
    )
    view.add_argument("run_dir", help="a run directory, or the --out folder of 'agentsoc compare'")
    view.add_argument("--out", type=Path, default=None, help="where to write the page (default RUN_DIR/view.html)")
    view.add_argument(
        "--serve", action="store_true", help="also serve the page on 127.0.0.1 and print its address (Ctrl-C stops)"
    )
    view.add_argument("--port", type=int, default=0, help="port for --serve (default: any free port)")
    view.set_defaults(handler=_view)

    data = sub.add_parser("data", help="datasets: fetch what a recipe needs, so that runs need no network")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser(
        "fetch", help="download and cache the Hugging Face datasets the recipe(s) name (cache: $AGENTSOC_DATA_DIR)"
    )
    fetch.add_argument("recipe", nargs="+", help="TOML recipe(s) whose task data to fetch")
    fetch.add_argument("--force", action="store_true", help="download again even where a pinned revision is cached")
    fetch.set_defaults(handler=_data_fetch)
    return p


def _data_fetch(args: argparse.Namespace) -> int:
    from agentsoc.datafetch import fetch_recipe

    for recipe in args.recipe:
        fetch_recipe(load_recipe(recipe), force=args.force)
    return 0


def version() -> str:
    """The installed distribution's version (the source tree's when it is not installed)."""
    try:
        return metadata.version("agentsoc")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def resume_command(args: argparse.Namespace) -> str | None:
    """The command that continues an interrupted ``run`` or ``demo``, quoted for a shell: the recipe
    path as given, the run directory really used, and the program as it was called (``.venv/bin/agentsoc``)."""
    prog = sys.argv[0] if Path(sys.argv[0]).name == "agentsoc" else "agentsoc"
    # without a run directory (interrupted before it was chosen) the default, runs/<name>, is the same one
    run_dir = ["--run-dir", str(args.run_dir)] if getattr(args, "run_dir", None) else []
    if args.command == "run":
        return shlex.join([prog, "run", str(args.recipe), *run_dir, "--resume"])
    if args.command == "demo":  # demo resumes its directory by default
        return shlex.join([prog, "demo", *(["--quick"] if args.quick else []), *run_dir])
    return None


def run_dir_arg(text: str) -> Path:
    """``--run-dir``: a path; an empty one (an unset shell variable) would silently mean "here"."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?); give the run directory's path")
    return Path(text)


class Terminated(Exception):
    """The process was asked to stop (SIGTERM); the run was stopped as after Ctrl-C."""


async def stoppable(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` so that SIGTERM stops it like Ctrl-C: its task is cancelled, so every ``async
    with`` on the way out closes the backend, the store and the run's lock, and then
    :class:`Terminated` is raised. (Without this, SIGTERM ends the process on the spot, silently.)"""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    asked: list[bool] = []

    def stop() -> None:
        asked.append(True)
        if task is not None:
            task.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, stop)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
        return await coro
    try:
        return await coro
    except asyncio.CancelledError:
        if asked:
            raise Terminated from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console.configure()
    handler: Callable[[argparse.Namespace], Any] = args.handler
    try:
        out = handler(args)
        if asyncio.iscoroutine(out):
            out = asyncio.run(stoppable(out))
        return int(out)
    except KeyboardInterrupt:
        command = resume_command(args)
        hint = f"; resume with: {command}" if command else ""
        print(f"interrupted — finished work is saved{hint}", file=sys.stderr)
        return 130
    except Terminated:
        command = resume_command(args)
        hint = f"; resume with: {command}" if command else ""
        print(f"terminated (SIGTERM) — finished work is saved{hint}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BackendError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        if isinstance(e, NotFetched) and getattr(args, "recipe", None):
            from agentsoc.datafetch import fetch_command

            # the task that found its data missing does not know the recipe's path; the command line does
            e = DataError(e.message(fetch_command(args.recipe)))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # `agentsoc run ... --dry-run | head`: the reader left; say nothing, and keep Python's own
        # flush at exit from failing on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f" {e.filename}" if e.filename else ""
        hint = (
            "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "make it writable or choose another place"
        )
        # only a run has work to resume; `report` or `view` on a read-only folder is simply run again
        then = (
            "then continue with --resume (finished work is kept)"
            if args.command in ("run", "demo", "compare")
            else f"then run agentsoc {args.command} again"
        )
        print(f"error: {e.strerror}:{where}; {hint}, {then}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
