"""Hugging Face datasets, the way the field loads GSM8K, MATH and MMLU, without the network at run time.

``agentsoc data fetch RECIPE`` (:mod:`agentsoc.datafetch`) reads each split a recipe names through
``datasets.load_dataset(name, config, split=..., revision=...)`` and writes its rows, as JSON lines,
into the agentsoc data cache. A run reads only that cache, with the standard library: it never
imports ``datasets``, never opens a connection, and works the same on an offline machine or a
cluster head node that shares the cache folder. A split missing from the cache is one error line
that names the command to run.

Why our own cache and not ``datasets``' one: reading a pinned revision back from the HF cache in
offline mode depends on how that version of ``datasets`` names its cache folders, and needs
``datasets`` (and pyarrow) wherever a run starts. A JSON-lines file per (dataset, revision, config,
split) is inspectable, version-proof and sufficient for benchmarks of a few thousand rows.

The cache folder is ``$AGENTSOC_DATA_DIR``, else ``$XDG_CACHE_HOME/agentsoc/datasets``, else
``~/.cache/agentsoc/datasets``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentsoc.tasks.base import DataError

#: the environment variable that moves the cache (a shared disk on a cluster)
CACHE_ENV = "AGENTSOC_DATA_DIR"
#: where ``agentsoc data fetch`` is told to go when a run finds its data missing
FETCH_HINT = "agentsoc data fetch RECIPE"


def cache_root() -> Path:
    """The data cache folder (see the module docstring); it need not exist yet."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "agentsoc" / "datasets"


@dataclass(frozen=True)
class HubSplit:
    """One split of one config of a dataset at one revision: the unit that is fetched and cached.

    ``dataset`` is a hub id (``openai/gsm8k``) or the absolute path of a local folder in the hub
    layout (parquet/JSON files with a README that lists the configs), which ``datasets`` reads the
    same way; ``revision`` is a commit (or tag) of the hub repository, ``None`` for a local folder.
    """

    dataset: str
    config: str | None
    split: str
    revision: str | None

    def __str__(self) -> str:
        parts = [f"config {self.config}"] if self.config else []
        parts.append(f"split {self.split}")
        if self.revision:
            parts.append(f"revision {self.revision}")
        return f"{self.dataset} ({', '.join(parts)})"

    @property
    def is_local(self) -> bool:
        return Path(self.dataset).is_absolute()

    def cache_file(self, root: Path | None = None) -> Path:
        """Where the rows live: ``<root>/<dataset>/<revision>/<config>/<split>.jsonl``."""
        if self.is_local:
            # a folder anywhere on disk: readable name plus a hash of the full path (no collisions)
            digest = hashlib.sha256(self.dataset.encode()).hexdigest()[:8]
            name = f"local__{_safe(Path(self.dataset).name)}-{digest}"
        else:
            name = _safe(self.dataset)
        folder = (root or cache_root()) / name / _safe(self.revision or "local") / _safe(self.config or "default")
        return folder / f"{_safe(self.split)}.jsonl"


def _safe(part: str) -> str:
    """A path component for a dataset name, revision, config or split ("openai/gsm8k" -> "openai__gsm8k")."""
    return re.sub(r"[^\w.-]+", "__", part).strip(".") or "_"


class NotFetched(DataError):
    """A split the run needs is not in the cache; the CLI names the recipe in the fetch command."""

    def __init__(self, task: str, part: HubSplit, where: Path) -> None:
        self.task, self.part, self.where = task, part, where
        super().__init__(self.message(FETCH_HINT))

    def message(self, command: str) -> str:
        return (
            f"task '{self.task}': dataset {self.part} is not in the data cache ({self.where}); "
            f"fetch it on a machine with network first: {command}"
        )


def read_rows(task: str, part: HubSplit) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, row)`` per cached row of ``part``; :class:`NotFetched` when it was never fetched.

    Reads a local file only: no ``datasets`` import, no network, whatever ``HF_HUB_OFFLINE`` says.
    """
    path = part.cache_file()
    if not path.is_file():
        raise NotFetched(task, part, path.parent)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            location = f"{part} row {number - 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # only a hand-edited or half-copied cache gets here: fetching writes whole files
                raise DataError(f"{path}:{number}: corrupt cache line; delete the file and fetch again") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: corrupt cache line; delete the file and fetch again")
            yield location, row


def fetch(part: HubSplit, *, force: bool = False) -> tuple[Path, int, bool]:
    """Download ``part`` through ``datasets`` and cache its rows; ``(file, rows, downloaded)``.

    A pinned revision never changes, so a cached one is kept unless ``force``; a local folder (no
    revision) is read again every time, since its files may have changed. The file is written to a
    temporary name and renamed, so an interrupted fetch leaves no half file behind.
    """
    path = part.cache_file()
    if path.is_file() and part.revision and not force:
        return path, _count_lines(path), False
    rows = _download(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path, len(rows), True


def _download(part: HubSplit) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            "agentsoc data fetch needs the 'datasets' library: install the data extra (pip install -e '.[data]')"
        ) from None
    datasets.disable_progress_bars()
    with contextlib.ExitStack() as stack:
        # a local folder is read through a throw-away cache: datasets keys its cache of local files by
        # names, not by content, and would hand back the rows of an earlier folder of the same name
        cache_dir = (
            stack.enter_context(tempfile.TemporaryDirectory(prefix="agentsoc-fetch-")) if part.is_local else None
        )
        try:
            data = datasets.load_dataset(
                part.dataset, part.config, split=part.split, revision=part.revision, cache_dir=cache_dir
            )
        except Exception as exc:  # the hub's, fsspec's and datasets' own errors: one line for the user
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(f"could not fetch dataset {part}: {type(exc).__name__}: {first[:300]}") from None
        return [dict(row) for row in data]


def _count_lines(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())
