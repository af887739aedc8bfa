"""Task registry: a recipe names a task and passes options; :func:`create` returns the Task.

Task modules are imported on first use, so a run on Arithmetic does not pay for importing sympy.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agentsoc.tasks.base import DataError, Problem, Split, Task

__all__ = ["DataError", "Problem", "Split", "Task", "create", "names"]

#: task name -> module that defines ``create(options, base_dir)``
_MODULES = {
    "arithmetic": "agentsoc.tasks.arithmetic",
    "gsm8k": "agentsoc.tasks.gsm8k",
    "math": "agentsoc.tasks.math",
    "mmlu": "agentsoc.tasks.mmlu",
}


def names() -> list[str]:
    """The task names a recipe may use."""
    return sorted(_MODULES)


def create(name: str, options: Mapping[str, Any], *, base_dir: Path | None = None) -> Task:
    """The task ``name`` configured by ``options``; relative paths resolve against ``base_dir``.

    Raises :class:`DataError` or :class:`agentsoc.options.OptionsError` naming the task and the option.
    """
    if name not in _MODULES:
        raise DataError(f"unknown task {name!r}; choose one of {', '.join(names())}")
    task: Task = importlib.import_module(_MODULES[name]).create(options, base_dir)
    return task
