"""Backend registry: a recipe names a backend, this module validates its options and builds it.

Each entry pairs the backend's options model (:mod:`backends.options`, no SDK) with its factory
(imported only when the backend is built), so importing this module — or validating a recipe —
never pulls in openai, llama_cpp, torch or vLLM. ``run_dir`` is where a backend may keep state
that must survive a restart (uploaded files, local jobs, a server's log).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from agentsoc.backend import Backend
from agentsoc.options import parse_options
from backends.options import (
    AutoOptions,
    BackendOptions,
    LlamaCppOptions,
    LocalOptions,
    MockOptions,
    OpenAIOptions,
    SocietyShape,
    TinkerOptions,
    VllmOptions,
)

Factory = Callable[[Any, Path], Backend]


class Entry(NamedTuple):
    options: type[BackendOptions]
    #: "module:function"; the function takes the validated options and the run directory
    factory: str
    #: whether the factory also takes ``society=`` (a :class:`SocietyShape`) to size itself by
    shaped: bool = False


_REGISTRY: dict[str, Entry] = {
    "mock": Entry(MockOptions, "backends.mock:create"),
    "llamacpp": Entry(LlamaCppOptions, "backends.llamacpp:create"),
    "local": Entry(LocalOptions, "backends.local:create"),
    "auto": Entry(AutoOptions, "backends.tinker_auto:create_auto"),
    "openai": Entry(OpenAIOptions, "backends.openai:create"),
    "vllm": Entry(VllmOptions, "backends.vllm:create", shaped=True),
    "tinker": Entry(TinkerOptions, "backends.tinker:create"),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


class UnknownBackendError(ValueError):
    pass


def _entry(name: str) -> Entry:
    entry = _REGISTRY.get(name)
    if entry is None:
        raise UnknownBackendError(f"unknown backend {name!r}; known backends: {', '.join(names())}")
    return entry


def options_model(name: str) -> type[BackendOptions]:
    """The options model of backend ``name`` (an unknown name lists the known ones)."""
    return _entry(name).options


def parse(name: str, options: Mapping[str, Any]) -> BackendOptions:
    """``options`` validated for backend ``name``; raises :class:`agentsoc.options.OptionsError`."""
    return parse_options(f"backend '{name}'", options_model(name), options)


def create(
    name: str, options: Mapping[str, Any] | BackendOptions, run_dir: Path, *, society: SocietyShape | None = None
) -> Backend:
    """Build the backend called ``name`` from its (raw or validated) options; ``society`` is the
    shape of the society it will serve, for backends that size themselves by it."""
    entry = _entry(name)
    if isinstance(options, BackendOptions):
        if not isinstance(options, entry.options):
            raise TypeError(f"backend {name!r} takes {entry.options.__name__}, not {type(options).__name__}")
        typed = options
    else:
        typed = parse(name, options)
    module_name, func_name = entry.factory.split(":")
    factory: Factory = getattr(importlib.import_module(module_name), func_name)
    if entry.shaped and society is not None:
        return factory(typed, run_dir, society=society)  # type: ignore[call-arg]
    return factory(typed, run_dir)
