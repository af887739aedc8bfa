"""Reading problem files and splitting them into seeded, disjoint train/held-out sets.

Every record carries its location (``file.jsonl:17``) so that a bad line is reported where it is,
and the split logic is shared so that GSM8K, MATH and MMLU draw problems the same way.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agentsoc.tasks.base import DataError, Problem, Split


def stable_id(prefix: str, text: str) -> str:
    """An id that depends only on the problem text, so it survives reordering and re-downloads."""
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def read_text(path: Path) -> str:
    """A data file's text; a directory or a file that is not UTF-8 is a :class:`DataError` naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory; give the data file itself") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def read_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(location, object)`` per record of a JSONL file, or of a JSON file holding a list."""
    text = read_text(path)
    if path.suffix == ".json" or text.lstrip().startswith("["):
        yield from _json_list(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        location = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{location}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        yield location, record


def _json_list(path: Path, text: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of objects or JSON lines")
    for index, record in enumerate(items):
        location = f"{path}: item {index}"
        if not isinstance(record, dict):
            raise DataError(f"{location}: expected a JSON object, got {type(record).__name__}")
        yield location, record


def text_field(record: dict[str, Any], field: str, location: str) -> str:
    """A required, non-empty string field of a record."""
    if field not in record:
        raise DataError(f"{location}: field '{field}': missing")
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{location}: field '{field}': expected a non-empty string, got {value!r:.60}")
    return value


def split(
    task: str,
    pool: Sequence[Problem],
    source: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    test_pool: Sequence[Problem] | None = None,
    test_source: str | Path | None = None,
) -> Split:
    """Seeded, disjoint train/held-out problems.

    Without ``test_pool`` one shuffled pool yields train first, then test (the reference's
    ``[0:500]``/``[500:1000]``). With it, train is drawn from ``pool`` and test from ``test_pool``
    minus every question that also occurs in ``pool``, so the held-out set does not depend on
    ``n_train``. Duplicate questions are dropped, keeping the first.
    """
    if n_train < 0 or n_test < 0:
        raise DataError(f"task '{task}': n_train and n_test must be >= 0, got {n_train} and {n_test}")
    train_pool = _shuffled(_unique(pool), seed)
    if test_pool is None:
        _require(task, source, len(train_pool), n_train + n_test, f"n_train + n_test = {n_train} + {n_test}")
        return Split(train=tuple(train_pool[:n_train]), test=tuple(train_pool[n_train : n_train + n_test]))
    _require(task, source, len(train_pool), n_train, f"n_train = {n_train}")
    seen = {p.question for p in pool}
    held_out = _shuffled([p for p in _unique(test_pool) if p.question not in seen], seed)
    _require(task, test_source or source, len(held_out), n_test, f"n_test = {n_test} (after removing training overlap)")
    return Split(train=tuple(train_pool[:n_train]), test=tuple(held_out[:n_test]))


def _unique(problems: Sequence[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def _shuffled(problems: list[Problem], seed: int) -> list[Problem]:
    out = list(problems)
    random.Random(seed).shuffle(out)
    return out


def _require(task: str, source: str | Path, have: int, need: int, what: str) -> None:
    if have < need:
        raise DataError(f"task '{task}': {source} has {have} distinct problems, fewer than {what} requested")
