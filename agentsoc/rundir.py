"""The run directory: created atomically, locked for one process, bound to one experiment.

Everything a run produces lands here (DESIGN §5). Three promises live in this module and nowhere
else: a directory is either a complete empty run or absent (never half made), one process holds
it at a time (``run.lock``), and a resumed run is the same experiment (the recipe's fingerprint).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tomli_w

from agentsoc.atomic import write_atomic
from agentsoc.config import Recipe, differing_fields
from agentsoc.lock import LOCK_FILE, RunDirBusyError, RunLock
from agentsoc.store import RunStore


class RunDirError(ValueError):
    """The run directory cannot be used as asked (not empty without --resume, another recipe)."""


def prepare_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool) -> RunLock:
    """Lock the run directory for this process, creating it if needed; refuse to mix experiments.

    A new run directory is built under a temporary name (resolved recipe, database, fingerprint)
    and renamed into place, so a kill at any moment leaves either no run or a complete empty one —
    never a directory that can be neither resumed nor started again. An existing run that never
    did any work (it stopped at its first call: an unknown model, an endpoint that was down) is
    started again with this recipe, changed or not, with or without ``--resume``: nothing in it can
    be lost or paid twice. A store that is empty or damaged is refused (:class:`StoreError`).
    """
    _check_parents(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} is a file; choose another --run-dir")
    if not (run_dir / "run.sqlite").exists():
        if (run_dir / "recipe.toml").exists():
            raise RunDirError(
                f"run directory {run_dir} holds a run's recipe.toml but no run.sqlite: the run's record is lost; "
                "restore run.sqlite from a backup, or choose another --run-dir"
            )
        if run_dir.exists() and any(p.name != LOCK_FILE for p in run_dir.iterdir()):
            raise RunDirError(
                f"run directory {run_dir} is not empty and holds no agentsoc run (no run.sqlite); "
                "choose another --run-dir"
            )
        _create(run_dir, recipe)
        return acquire(run_dir)
    lock = acquire(run_dir)  # before the store is read: another process may be writing it
    try:
        if not _has_work(run_dir):
            _restart(run_dir, recipe)
        elif not resume:
            raise RunDirError(
                f"run directory {run_dir} is not empty; pass --resume to continue that run, or choose another --run-dir"
            )
    except BaseException:
        lock.release()
        raise
    return lock


def _check_parents(run_dir: Path) -> None:
    """One line for a run directory that cannot be made because a folder above it is a file
    (``--run-dir notes.txt/run``), instead of the ``FileExistsError`` of ``mkdir``."""
    for parent in run_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(
                    f"cannot create run directory {run_dir}: {parent} is a file, not a folder; choose another --run-dir"
                )
            return


def _has_work(run_dir: Path) -> bool:
    """Whether the run's store holds any work (read only; an empty or damaged store raises StoreError)."""
    store = RunStore.open(run_dir, readonly=True)
    try:
        return store.has_work()
    finally:
        store.close()


def _restart(run_dir: Path, recipe: Recipe) -> None:
    """Bind a run that never did any work to ``recipe``: its resolved recipe and fingerprint."""
    _write_identity(run_dir, recipe)


def _write_identity(folder: Path, recipe: Recipe) -> None:
    """The resolved recipe and a store bound to it: what makes a folder a run of ``recipe``."""
    write_atomic(folder / "recipe.toml", tomli_w.dumps(recipe.to_toml_dict()))
    store = RunStore.open(folder)
    try:
        bind(store, recipe)
    finally:
        store.close()


def acquire(run_dir: Path) -> RunLock:
    """The run directory's lock, taken now; a second process gets one line naming the holder."""
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunDirBusyError as e:
        raise RunDirError(str(e)) from None
    return lock


def _create(run_dir: Path, recipe: Recipe) -> None:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.parent.glob(f".{run_dir.name}.*.creating"):  # left by a process killed mid-creation
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir.parent / f".{run_dir.name}.{os.getpid()}.creating"
    tmp.mkdir()
    try:
        _write_identity(tmp, recipe)
        if run_dir.exists():
            run_dir.rmdir()  # an empty directory (or one holding only a lock file) is not a run yet
        tmp.rename(run_dir)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunDirError(f"could not create run directory {run_dir}: {e}") from None


def bind(store: RunStore, recipe: Recipe) -> None:
    """Record which experiment the store belongs to (the fingerprint and the fields behind it)."""
    store.set_meta("recipe_view", json.dumps(recipe.results_view(), sort_keys=True))
    store.set_meta("fingerprint", recipe.fingerprint())


def check_recipe(store: RunStore, recipe: Recipe, run_dir: Path) -> None:
    """A resumed run must be the same experiment; the error names the fields that differ."""
    stored = store.get_meta("fingerprint")
    if stored is None:
        bind(store, recipe)
    elif stored != recipe.fingerprint():
        view = store.get_meta("recipe_view")
        fields = differing_fields(json.loads(view), recipe.results_view()) if view else []
        raise RunDirError(
            f"run directory {run_dir} holds a run of a different recipe"
            + (f" (these fields differ: {', '.join(fields)})" if fields else f" (fingerprint {stored})")
            + "; resume it with the recipe it was started with (concurrency, retries, polling and timeouts "
            "may change)"
        )


def key_prefix(recipe: Recipe) -> str:
    """What every job key of this experiment starts with; backends adopt jobs by these keys."""
    return f"{recipe.name}/{recipe.fingerprint()[:8]}"
