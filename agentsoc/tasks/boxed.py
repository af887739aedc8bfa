"""Find the last ``\\boxed{...}`` answer in a text, with balanced braces.

Shared by MATH (answers *and* ground truth come from it) and the numeric tasks, whose prompts ask
for ``\\boxed{answer}`` too. A regex cannot match nested braces (``\\boxed{\\frac{1}{2}}``), hence
the small scanner.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def last_boxed(text: str, skip: Callable[[int], bool] | None = None) -> str | None:
    """Content of the last ``\\boxed{..}``/``\\fbox{..}`` (or ``\\boxed 5``); ``None`` if absent.

    An unclosed brace (a truncated response) yields ``None`` for that box and the search moves to
    the previous one, so a cut-off answer never passes for a complete one. ``skip(position)`` leaves
    out boxes by where they start: a critic's restatement of another agent's box is not its own.
    """
    for match in reversed(list(_BOX.finditer(text))):
        if skip is not None and skip(match.start()):
            continue
        content = _box_content(text, match.end())
        if content is not None:
            return content
    return None


def _box_content(text: str, start: int) -> str | None:
    rest = text[start:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        offset = len(rest) - len(stripped) + start
        depth = 0
        for i in range(offset, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[offset + 1 : i].strip()
        return None
    # "\boxed 5": the argument runs to the next space or dollar sign (TeX's one-token form)
    if rest[:1] != " ":
        return None
    token = re.match(r"\s*([^\s$]+)", rest)
    return token.group(1).rstrip(".") if token else None
