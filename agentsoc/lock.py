"""One process per run directory: an exclusive lock held for the run's life.

Two processes on one run directory would both send the calls neither has cached and both submit
the jobs neither has recorded (seen: three duplicate job submissions). An ``flock`` on
``run_dir/run.lock`` is released by the kernel when its holder exits, however it exits, so a
SIGKILLed run never leaves a stale lock behind; the pid written into the file only serves the
message the second process prints.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_FILE = "run.lock"


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """The exclusive lock of one run directory; :meth:`acquire` fails at once if it is taken."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid = handle.read().strip() or "?"
            handle.close()
            raise RunDirBusyError(
                f"run directory {self.path.parent} is in use by pid {pid}; wait for that run to end or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
