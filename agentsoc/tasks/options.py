"""Validate a task's recipe options into its pydantic model, with messages that name the task.

A recipe author sees ``task 'gsm8k': unknown option 'pth' (did you mean 'path'?)`` instead of a
pydantic traceback, and relative data paths resolve against the recipe's folder, not the working
directory the CLI happened to start in.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def parse_options(task: str, model: type[M], options: Mapping[str, Any]) -> M:
    """``model`` validated from ``options``; any problem becomes one ``ValueError`` naming the task."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        problems = [_describe(model, err["type"], err["loc"], err["msg"]) for err in exc.errors()]
        raise ValueError(f"task '{task}': " + "; ".join(problems)) from None


def _describe(model: type[BaseModel], kind: str, loc: tuple[int | str, ...], msg: str) -> str:
    field = ".".join(str(part) for part in loc)
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[0]), list(model.model_fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"unknown option '{field}'{hint}"
    if kind == "missing":
        return f"missing option '{field}'"
    return f"option '{field}': {msg}"


def resolve_path(task: str, option: str, path: Path, base_dir: Path | None) -> Path:
    """``path`` made absolute against ``base_dir`` (the recipe's folder); it must exist."""
    full = path if path.is_absolute() or base_dir is None else base_dir / path
    if not full.exists():
        raise ValueError(f"task '{task}': option '{option}': no such file or directory: {full}")
    return full
