"""Numeric answers (Arithmetic, GSM8K): find the final number in a response, compare with tolerance.

Fixes the reference parsers' bugs (algorithm.md §11.2): the sign is kept (ASCII and Unicode minus),
thousands separators are removed without gluing list items together ("3, 4" stays two numbers),
and markdown or LaTeX decoration (``**550**``, ``$550$``, ``\\boxed{550}``) does not hide a number.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from agentsoc.tasks.boxed import last_boxed

#: how far from the end an "answer is"/"=" cue may sit and still name the final answer
NEAR_END = 300
#: two parsed answers closer than this are the same answer
TOLERANCE = Fraction(1, 10**6)

_NUMBER = re.compile(
    r"""
    (?:(?<![\w)\]}])(?P<sign>[-−]))?      # a unary minus; "10-3" is a subtraction, not -3
    (?:\\?\$\s?)?                          # a currency sign, LaTeX-escaped or not
    (?<![\w.])                             # not the tail of a word or of another number
    (?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)  # a comma separates thousands only in groups of three
    (?:\.(?P<frac>\d+))?
    (?!\d)
    """,
    re.VERBOSE,
)
_ANSWER_CUE = re.compile(
    r"\b(?:answer|result)\b(?:[^\n.\d]{0,40}?\b(?:is|was|would\s+be|should\s+be|will\s+be)\b|[*_\s]*[:=])",
    re.IGNORECASE,
)
_FRACTION = re.compile(r"^(?P<sign>[-−]?)(?:\\[dt]?frac\{(?P<n1>\d+)\}\{(?P<d1>\d+)\}|(?P<n2>\d+)/(?P<d2>\d+))$")
_LATEX_NOISE = re.compile(r"\\text\{[^{}]*\}|\\[,!;: ]|\\%|%|\\left|\\right")


def parse_number(text: str) -> str | None:
    """The final numeric answer of ``text`` as a canonical string, or ``None``.

    Order of evidence: the last ``\\boxed{}`` holding a number; an "answer is"/"answer:" cue near
    the end; an ``=`` near the end; the last number anywhere.
    """
    text = text.replace("{,}", ",")
    boxed = last_boxed(text)
    if boxed is not None:
        found = _number_in_box(boxed)
        if found is not None:
            return found
    tail = text[-NEAR_END:]
    for cue in reversed(list(_ANSWER_CUE.finditer(tail))):
        found = _first_number(_after_answer_cue(tail[cue.end() : cue.end() + 80]))
        if found is not None:
            return found
    equals = tail.rfind("=")
    if equals >= 0:
        found = _first_number(tail[equals + 1 :].split("\n", 1)[0])
        if found is not None:
            return found
    numbers = list(_NUMBER.finditer(text))
    return _canonical(numbers[-1]) if numbers else None


def is_equivalent(a: str, b: str) -> bool:
    """Whether two parsed answers are the same number (within :data:`TOLERANCE`)."""
    if a == b:
        return True
    x, y = _value(a), _value(b)
    return x is not None and y is not None and abs(x - y) <= TOLERANCE


def canonical(value: Fraction) -> str:
    """Integers without ``.0``; terminating decimals in minimal form; other fractions as ``p/q``."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for factor in (2, 5):
        while denominator % factor == 0:
            denominator //= factor
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def canonical_number(literal: str) -> str:
    """The canonical form of a plain number literal such as ``-$1,200.50`` (ground-truth files)."""
    cleaned = literal.replace("−", "-").replace("$", "").replace(",", "")
    return canonical(Fraction(Decimal(cleaned)))


def _after_answer_cue(window: str) -> str:
    # "answer: 3*4 = 12" names 12, not 3: within the cue's line, the result follows the last "="
    line = window.lstrip().split("\n", 1)[0]
    return line[line.rfind("=") + 1 :] if "=" in line else window


def _number_in_box(content: str) -> str | None:
    content = _LATEX_NOISE.sub("", content).replace(" ", "")
    fraction = _FRACTION.match(content)
    if fraction:
        numerator = int(fraction["n1"] or fraction["n2"])
        denominator = int(fraction["d1"] or fraction["d2"])
        if denominator == 0:
            return None
        value = Fraction(numerator, denominator)
        return canonical(-value if fraction["sign"] else value)
    numbers = list(_NUMBER.finditer(content))
    return _canonical(numbers[-1]) if numbers else None


def _first_number(text: str) -> str | None:
    match = _NUMBER.search(text)
    return _canonical(match) if match else None


def _canonical(match: re.Match[str]) -> str:
    digits = match["int"].replace(",", "") + ("." + match["frac"] if match["frac"] else "")
    value = Fraction(Decimal(digits))
    return canonical(-value if match["sign"] else value)


def _value(answer: str) -> Fraction | None:
    try:
        return Fraction(answer.replace("−", "-"))
    except (ValueError, ZeroDivisionError):
        return None
