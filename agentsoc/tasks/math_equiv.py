"""MATH answer normalisation and equivalence, at the level of the PRM800K grader (algorithm.md §3.1).

Two answers are equivalent when their normal forms are equal strings or, failing that, when the
small LaTeX converter can read both and ``sympy.simplify(a - b) == 0``. Tuples and intervals are
compared element by element with the same bracket types. The function is symmetric by
construction: every step treats both sides alike, and sympy sees the pair in a fixed order.
"""

from __future__ import annotations

import re
from decimal import Decimal

import sympy

from agentsoc.tasks.latex_sympy import to_sympy

#: longer answers skip sympy: simplification time grows quickly and such answers rarely need it
MAX_SYMPY_CHARS = 100

_WRAPPER = re.compile(r"^\\(?:text|textbf|mathrm|mathbf|mbox|boxed)\{(.*)\}$")
_UNIT_TEXT = re.compile(r"\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z\s.]*\}(?:\^\{?\d\}?)?")
_UNIT_WORDS = re.compile(
    r"(?<=[\d}])\s*(?:square\s+)?(?:units?|degrees?|cm|centimeters?|meters?|inches|inch|feet|foot|miles?"
    r"|hours?|minutes?|seconds?|days?|dollars?|cents?)(?:\^\{?\d\}?)?$"
)
#: "1 and 2", "1\text{ or }2" list answers; removed as units they would glue into "12"
_CONJUNCTION = re.compile(r"\\text\{\s*(?:and|or)\s*\}|\s+(?:and|or)\s+")
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|°")
_THIN_SPACES = re.compile(r"\\[,;:! ]|~")
_ASSIGNMENT = re.compile(r"^(?:[A-Za-z](?:_\{?\w+\}?)?|\\[A-Za-z]+)=(?!=)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_NUMBER = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)$")
_SLASH = re.compile(r"^(?P<sign>-?)(?P<num>\d+)/(?P<den>\d+)$")
_SQRT_BARE = re.compile(r"\\sqrt(\w)")
_OPEN, _CLOSE = "([", ")]"
#: a word (two letters not part of a command): sympy would read "Celia" as C*e*l*i*a, an anagram of "Alice"
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def normalize(answer: str) -> str:
    """A canonical string for a MATH answer (idempotent)."""
    s = answer.replace("\n", " ").strip()
    s = s.replace("\\\\", "\\").replace("{,}", ",")
    s = _THIN_SPACES.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _DEGREES.sub("", s)
    s = _CONJUNCTION.sub(",", s)
    s = _unwrap(s.strip().rstrip(".").strip())
    s = _strip_units(s)
    s = s.replace(" ", "")
    s = _ASSIGNMENT.sub("", s) if s.count("=") == 1 else s
    s = _unwrap(s)
    s = _SQRT_BARE.sub(r"\\sqrt{\1}", s)
    s = _brace_frac_arguments(s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    if _NUMBER.match(s):
        s = _canonical_decimal(s)
    slash = _SLASH.match(s)
    if slash:
        s = f"{slash['sign']}\\frac{{{slash['num']}}}{{{slash['den']}}}"
    return s


def is_equivalent(a: str, b: str) -> bool:
    """Whether two MATH answers mean the same thing (symmetric)."""
    na, nb = normalize(a), normalize(b)
    if na == nb:
        return True
    ta, tb = _split_tuple(na), _split_tuple(nb)
    if ta is None and tb is None:
        return _same_value(na, nb)
    if ta is None or tb is None or ta[0] != tb[0] or len(ta[1]) != len(tb[1]):
        return False
    return all(x == y or _same_value(x, y) for x, y in zip(ta[1], tb[1], strict=True))


def _unwrap(s: str) -> str:
    while (match := _WRAPPER.match(s)) and _balanced(match[1]):
        s = match[1].strip()
    if s.startswith("{") and s.endswith("}") and _balanced(s[1:-1]):
        s = s[1:-1]
    return s


def _strip_units(s: str) -> str:
    stripped = _UNIT_WORDS.sub("", _UNIT_TEXT.sub("", s)).strip()
    return stripped or s


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def _brace_frac_arguments(s: str) -> str:
    """``\\frac12`` and ``\\frac1{2}`` become ``\\frac{1}{2}`` (TeX reads one token per argument)."""
    out: list[str] = []
    i = 0
    while (j := s.find("\\frac", i)) >= 0:
        out.append(s[i : j + 5])
        i = j + 5
        for _ in range(2):
            if i < len(s) and s[i] != "{" and s[i] != "\\":
                out.append("{" + s[i] + "}")
                i += 1
            else:
                end = _group_end(s, i)
                out.append(s[i:end])
                i = end
    out.append(s[i:])
    return "".join(out)


def _group_end(s: str, start: int) -> int:
    """Index after the braced group (or command name) starting at ``start``."""
    if start >= len(s) or s[start] != "{":
        match = re.match(r"\\[A-Za-z]+", s[start:])
        return start + (match.end() if match else 0)
    depth = 0
    for i in range(start, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return i + 1
    return len(s)


def _canonical_decimal(s: str) -> str:
    value = Decimal(s)
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _split_tuple(s: str) -> tuple[str, list[str]] | None:
    """``(brackets, elements)`` for ``(1,2)``, ``[0,\\infty)`` or ``1,2``; ``None`` for one value."""
    brackets = ""
    inner = s
    if len(s) >= 2 and s[0] in _OPEN and s[-1] in _CLOSE and _encloses(s):
        brackets, inner = s[0] + s[-1], s[1:-1]
    parts: list[str] = []
    depth, start = 0, 0
    for i, ch in enumerate(inner):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return (brackets, parts) if len(parts) > 1 else None


def _encloses(s: str) -> bool:
    """Whether the first and last characters of ``s`` are one pair: ``(1,2)`` yes, ``(1)(2)`` no."""
    depth = 0
    for i, ch in enumerate(s):
        depth += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if depth == 0 and i < len(s) - 1:
            return False
    return True


def _same_value(a: str, b: str) -> bool:
    if max(len(a), len(b)) > MAX_SYMPY_CHARS or _WORD.search(a) or _WORD.search(b):
        return False
    first, second = sorted((a, b))
    try:
        return bool(sympy.simplify(to_sympy(first) - to_sympy(second)) == 0)
    except Exception:  # the grader must never crash on a model's answer; unreadable means "not shown equal"
        return False
