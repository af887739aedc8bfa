"""Validate a component's options (a task's, a backend's) into its pydantic model, with messages that
name the component and the field.

One helper for every kind of option table in a recipe, so that ``[task.options]`` and
``[backend.options]`` report mistakes the same way: ``task 'gsm8k': unknown option 'pth' (did you
mean 'path'?)`` instead of a pydantic traceback, and ``backend.options.paralel: unknown option (did
you mean 'parallel'?)`` when the recipe loader places it in the file.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


class OptionProblem(NamedTuple):
    """One thing wrong in an option table: the dotted field and what is wrong with it."""

    field: str
    problem: str


class OptionsError(ValueError):
    """Options that do not fit their model; ``problems`` lists every field at fault."""

    def __init__(self, owner: str, problems: list[OptionProblem]) -> None:
        self.owner = owner
        self.problems = problems
        super().__init__(f"{owner}: " + "; ".join(_sentence(p) for p in problems))


def _sentence(p: OptionProblem) -> str:
    if p.problem.startswith("unknown option"):
        return f"unknown option '{p.field}'" + p.problem.removeprefix("unknown option")
    if p.problem == "missing option":
        return f"missing option '{p.field}'"
    return f"option '{p.field}': {p.problem}"


def parse_options(owner: str, model: type[M], options: Mapping[str, Any]) -> M:
    """``model`` validated from ``options``; any problem becomes one :class:`OptionsError` naming
    ``owner`` (``task 'gsm8k'``, ``backend 'local'``) and every field at fault."""
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        raise OptionsError(owner, problems(model, exc)) from None


def problems(model: type[BaseModel], exc: ValidationError) -> list[OptionProblem]:
    """The fields of ``exc`` with a short description each; unknown names get a close-match hint."""
    out = []
    for err in exc.errors():
        loc = err["loc"]
        field = ".".join(str(part) for part in loc)
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(loc[-1]), _fields_at(model, loc[:-1]), n=1)
            out.append(OptionProblem(field, "unknown option" + (f" (did you mean '{close[0]}'?)" if close else "")))
        elif err["type"] == "missing":
            out.append(OptionProblem(field, "missing option"))
        else:
            out.append(OptionProblem(field, str(err["msg"])))
    return out


def _fields_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names of the (nested) model at ``loc``, for close-match hints."""
    current = model
    for part in loc:
        info = current.model_fields.get(str(part))
        annotation = info.annotation if info is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        current = annotation
    return list(current.model_fields)
