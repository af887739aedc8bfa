"""Task option helpers: data paths resolve against the recipe's folder, not the working directory
the CLI happened to start in. Validation itself is :func:`agentsoc.options.parse_options`."""

from __future__ import annotations

from pathlib import Path

from agentsoc.tasks.base import DataError


def resolve_path(task: str, option: str, path: Path, base_dir: Path | None) -> Path:
    """``path`` made absolute against ``base_dir`` (the recipe's folder); it must exist."""
    full = path if path.is_absolute() or base_dir is None else base_dir / path
    if not full.exists():
        raise DataError(f"task '{task}': option '{option}': no such file or directory: {full}")
    return full
