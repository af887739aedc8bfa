"""Backend registry: a recipe names a backend, this module builds it.

Each factory imports its SDK lazily, so importing this module (or the core) never pulls in
openai, llama_cpp or torch. ``options`` is the recipe's ``[backend.options]`` table; ``run_dir``
is where a backend may keep state that must survive a restart (uploaded files, local jobs).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agentsoc.backend import Backend

Factory = Callable[[Mapping[str, Any], Path], Backend]

#: name -> "module:function"; the function has the :data:`Factory` signature.
_REGISTRY: dict[str, str] = {
    "mock": "backends.mock:create",
    "llamacpp": "backends.llamacpp:create",
    "local": "backends.local:create",
    "auto": "backends.local:create_auto",
    "openai": "backends.openai:create",
}


def names() -> list[str]:
    return sorted(_REGISTRY)


class UnknownBackendError(ValueError):
    pass


def create(name: str, options: Mapping[str, Any], run_dir: Path) -> Backend:
    """Build the backend called ``name``; an unknown name is an error that lists the known ones."""
    target = _REGISTRY.get(name)
    if target is None:
        raise UnknownBackendError(f"unknown backend {name!r}; known backends: {', '.join(names())}")
    module_name, func_name = target.split(":")
    factory: Factory = getattr(importlib.import_module(module_name), func_name)
    return factory(options, run_dir)
