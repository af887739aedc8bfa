"""Atomic file writes: a reader (or a resumed run) sees the old file or the new one, never half.

The temporary file is named for this process and thread, so two processes writing the same file
(a second run on one directory, two training jobs) never write into one shared temp file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path


def temp_path(path: Path) -> Path:
    """A sibling of ``path`` that no other process or thread writes to."""
    return path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a private temp file and one rename.

    ``durable`` also flushes the file to disk before the rename, for a file whose presence means
    "this is done" (a training job's result): after a power cut it is complete or absent.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with tmp.open("wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            if durable:
                f.flush()
                os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    """One line per item (``\\n``-terminated), atomically: JSONL exports."""
    write_atomic(path, "".join(line + "\n" for line in lines))
