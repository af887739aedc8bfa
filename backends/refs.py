"""Model references of the backends that serve finetuned models on one loaded base.

``<name>`` is the base model; ``<name>+adapter:<absolute path>`` is that base with a LoRA adapter
(a GGUF file for llama.cpp, a PEFT folder for vLLM); ``<name>+model:<absolute path>`` is a fully
finetuned model folder (vLLM serves it with a server of its own). The path is part of the
reference so that a restarted process or server can load it again from the reference alone.
The core never parses these; only the backend that issued them does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from agentsoc.backend import FatalBackendError
from agentsoc.types import ModelRef

ADAPTER_SEP = "+adapter:"
MODEL_SEP = "+model:"

Kind = Literal["base", "adapter", "model"]


def parse_ref(ref: ModelRef) -> tuple[str, Kind, str | None]:
    """``name+adapter:/p`` → (name, "adapter", /p); ``name+model:/p`` → (name, "model", /p);
    a plain name → (name, "base", None)."""
    kinds: tuple[tuple[str, Kind], ...] = ((ADAPTER_SEP, "adapter"), (MODEL_SEP, "model"))
    for sep, kind in kinds:
        name, found, path = ref.partition(sep)
        if found:
            if not path:
                raise FatalBackendError(f"model reference {ref!r} has an empty {kind} path")
            return name, kind, path
    return ref, "base", None


def split_ref(ref: ModelRef) -> tuple[str, str | None]:
    """``name+adapter:/path`` -> (``name``, ``/path``); a plain name -> (name, None)."""
    name, kind, path = parse_ref(ref)
    if kind == "model":
        raise FatalBackendError(f"model reference {ref!r} is a full model; this backend serves adapters only")
    return name, path


def adapter_ref(name: str, adapter: str | os.PathLike[str]) -> ModelRef:
    return f"{name}{ADAPTER_SEP}{Path(adapter).resolve()}"


def model_ref(name: str, folder: str | os.PathLike[str]) -> ModelRef:
    return f"{name}{MODEL_SEP}{Path(folder).resolve()}"
