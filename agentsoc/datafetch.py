"""``agentsoc data fetch RECIPE``: download the datasets a recipe names, once, so runs need no network.

Run it on a machine with network (or once on a cluster's head node, with ``AGENTSOC_DATA_DIR`` on a
shared disk); every later run of the recipe reads the cached rows (:mod:`agentsoc.tasks.hub`). After
fetching it loads the recipe's problems the way a run does, so a split too small for ``n_train`` /
``n_test`` or a row the task cannot read is reported now, not hours into a run.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence

from agentsoc import tasks
from agentsoc.config import Recipe, TaskConfig
from agentsoc.tasks.hub import FETCH_HINT, HubSplit, cache_root, fetch
from agentsoc.tasks.source import DataSource


def fetch_command(recipes: str | Sequence[str]) -> str:
    """The command that fetches the data of ``recipes`` (the one a run without its data names)."""
    names = [recipes] if isinstance(recipes, str) else list(recipes)
    return FETCH_HINT.replace("RECIPE", " ".join(shlex.quote(str(r)) for r in names))


def _task_configs(recipe: Recipe) -> list[TaskConfig]:
    """The training task and, for zero-shot transfer, the evaluation task."""
    return [recipe.task] + ([recipe.evaluation.task] if recipe.evaluation.task is not None else [])


def _source(recipe: Recipe, config: TaskConfig) -> DataSource | None:
    task = tasks.create(config.name, config.options, base_dir=recipe.base_dir)
    data = getattr(task, "data", None)  # generated tasks (arithmetic) have no data source
    return data if isinstance(data, DataSource) else None


def hub_splits(recipe: Recipe) -> list[HubSplit]:
    """Every dataset split the recipe reads, in order, without repeats."""
    out: list[HubSplit] = []
    for config in _task_configs(recipe):
        source = _source(recipe, config)
        for part in source.hub_splits() if source else []:
            if part not in out:
                out.append(part)
    return out


def fetch_recipe(recipe: Recipe, *, force: bool = False, say: Callable[[str], None] = print) -> int:
    """Fetch and check the recipe's datasets; the number of splits downloaded (not already cached)."""
    parts = hub_splits(recipe)
    if not parts:
        say(f"recipe {recipe.name!r}: no Hugging Face datasets to fetch (its data is local or generated)")
    downloaded = 0
    for part in parts:
        path, rows, fresh = fetch(part, force=force)
        downloaded += fresh
        say(f"{part}: {rows} rows {'fetched into' if fresh else 'already in'} {path}")
    for config in _task_configs(recipe):
        task = tasks.create(config.name, config.options, base_dir=recipe.base_dir)
        split = task.load(config.n_train, config.n_test, recipe.seed)
        say(f"recipe {recipe.name!r}: task '{config.name}' has {len(split.train)} training and "
            f"{len(split.test)} held-out problems (seed {recipe.seed})")  # fmt: skip
    if parts:
        say(f"data cache: {cache_root()} (set AGENTSOC_DATA_DIR to move it)")
    return downloaded
