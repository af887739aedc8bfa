"""The README's API example runs as written, and the public surface does not drift silently."""

from __future__ import annotations

import re
from pathlib import Path
from types import ModuleType

import agentsoc

ROOT = Path(__file__).resolve().parents[1]


def test_all_matches_public_names() -> None:
    exported = {n for n in dir(agentsoc) if not n.startswith("_") and not isinstance(getattr(agentsoc, n), ModuleType)}
    assert exported == set(agentsoc.__all__)


def test_readme_python_example_runs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S)
    assert code is not None
    monkeypatch.chdir(tmp_path)  # from anywhere: the example names a shipped recipe, not a path
    source = code.group(1).replace('"runs/demo"', repr(str(tmp_path / "demo")))
    exec(compile(source, "README.md", "exec"), {"__name__": "__main__"})
    assert (tmp_path / "demo" / "run.sqlite").exists()
