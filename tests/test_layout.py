"""DESIGN §2 checked, not hoped for: which module may import which, and where messages are printed.

The rules are read off the source with ``ast`` so a new import that breaks them fails here, with the
file and line, instead of surfacing months later as a core that needs an SDK to import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what a backend may use of the core: the port and its data, and two leaf utilities with no dependencies
BACKEND_MAY_IMPORT = {"agentsoc.types", "agentsoc.backend", "agentsoc.atomic", "agentsoc.options"}
#: SDKs and engines that only backends (and their job processes) may import
SDKS = {"openai", "llama_cpp", "torch", "transformers", "peft", "trl", "ray", "vllm", "tinker", "tinker_cookbook"}
#: the core modules that look backends up by name (the registry); no other core module imports backends
REGISTRY_USERS = {"agentsoc/config.py"}


def imports(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def test_backends_use_only_the_port_and_leaf_utilities_of_the_core() -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {name}"
        for p in sources("backends")
        for line, name in imports(p)
        if name.startswith("agentsoc") and name != "agentsoc" and name not in BACKEND_MAY_IMPORT
    ]
    assert not bad, "backends import more of the core than DESIGN §2 allows:\n" + "\n".join(bad)


def test_the_core_imports_no_backend_sdk_and_no_backend_outside_the_registry() -> None:
    bad = []
    for p in sources("agentsoc"):
        rel = str(p.relative_to(ROOT))
        for line, name in imports(p):
            top = name.split(".")[0]
            if top in SDKS or (top == "backends" and rel not in REGISTRY_USERS):
                bad.append(f"{rel}:{line}: {name}")
    assert not bad, "the core imports what DESIGN §2 keeps out of it:\n" + "\n".join(bad)


def test_only_the_command_line_prints_to_stderr() -> None:
    """Everything else logs (agentsoc/console.py decides how it shows), so --json stays clean and a
    library user can silence or redirect the project's messages like any other library's."""
    bad = []
    for p in [*sources("agentsoc"), *sources("backends")]:
        rel = str(p.relative_to(ROOT))
        if rel == "agentsoc/cli.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"), rel)):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "print"
                and any(k.arg == "file" for k in node.keywords)
            ):
                bad.append(f"{rel}:{node.lineno}")
    assert not bad, "print(..., file=...) outside the CLI; use logging:\n" + "\n".join(bad)
