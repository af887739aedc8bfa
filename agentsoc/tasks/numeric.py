"""Numeric answers (Arithmetic, GSM8K): find the final number in a response, compare with tolerance.

Fixes the reference parsers' bugs (algorithm.md §11.2): the sign is kept (ASCII and Unicode minus),
thousands separators are removed without gluing list items together ("3, 4" stays two numbers),
and markdown or LaTeX decoration (``**550**``, ``$550$``, ``\\boxed{550}``) does not hide a number.

In debate rounds >= 1 the agent's own final statement wins: a critic restates the other agents' answers
("Agent 2's answer is 310, I get 312 as final"), so cues and numbers inside such restatements
(:mod:`agentsoc.tasks.attribution`) do not count, and a concluding sentence that closes the response
("... Rechecking, I get 312.") beats an "answer is" cue earlier on.
"""

from __future__ import annotations

import re
from decimal import Decimal
from fractions import Fraction

from agentsoc.tasks.attribution import name_spans, quoted_spans, within
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
    (?P<int>\d{1,3}(?:,\d{3})+(?!\d)     # a comma separates thousands only in groups of three,
      |\d{1,3}(?:(?:[ \u00a0\u2009\u202f]|\\[,;!\ ])\d{3})+(?![\d,])  # so do spaces: "1 000 000", "1\\,000"
      |\d+)
    (?:\.(?P<frac>\d+))?
    (?!\d)
    """,
    re.VERBOSE,
)
_ANSWER_CUE = re.compile(
    r"\b(?:answer|result)\b(?:[^\n.\d]{0,40}?\b(?:is|was|would\s+be|should\s+be|will\s+be)\b|[*_\s]*[:=])",
    re.IGNORECASE,
)
#: a sentence or line ends here; a decimal point is followed by a digit, not by a space
_BOUNDARY = re.compile(r"[.!?](?=\s)|\n")
#: a closing sentence that concludes: the agent's final statement, which beats an earlier cue
_CONCLUSION = re.compile(
    r"\b(?:final(?:ly)?|therefore|thus|hence|conclu(?:de|des|ded|sion)|overall|in\s+total|altogether"
    r"|(?:answer|result)\b|equals?|(?:correct|right|updated|revised|new)\s+(?:answer|result|value|total)"
    r"|(?:(?-i:I)|we)\s+(?:\w+\s+)?(?:get|got|obtain|obtained|find|found|arrive|arrived|calculate|calculated"
    r"|compute|computed|reach|reached|end\s+up|think|believe|agree|confirm|conclude|stick|go|will\s+go))\b|=",
    re.IGNORECASE,
)
#: a closing line that is just a number ("**312**", "$312$"): the answer stated at the end, as asked; not
#: "4." or "4)", which open the next item of a list that max_tokens cut off
_BARE_NUMBER = re.compile(r"[\s*_$\\(){}\[\]]*[-−]?\$?\d[\d,]*(?:\.\d+)?(?![.)]\s*$)[\s*_$\\.)\]{}]*")
_FRACTION = re.compile(r"^(?P<sign>[-−]?)(?:\\[dt]?frac\{(?P<n1>\d+)\}\{(?P<d1>\d+)\}|(?P<n2>\d+)/(?P<d2>\d+))$")
#: thousands separators inside a number literal: commas, spaces (plain, no-break, thin) and LaTeX spacing
_SEPARATORS = re.compile(r"[,\s\u00a0\u2009\u202f]|\\[,;! ]")
_LATEX_NOISE = re.compile(r"\\text\{[^{}]*\}|\\[,!;: ]|\\%|%|\\left|\\right")


def parse_number(text: str) -> str | None:
    """The final numeric answer of ``text`` as a canonical string, or ``None``.

    Order of evidence: the last ``\\boxed{}`` holding a number; a concluding last sentence
    ("Therefore, 312.", "I get 312 as final"); an "answer is"/"answer:" cue near the end; an ``=`` near
    the end; the last number. Evidence inside a restatement of another agent's answer is skipped, boxes
    included ("My answer is \\boxed{18}. Agent 2's \\boxed{20} is incorrect" is 18); only a response
    that has nothing of its own is read with its restatements (never with the number in an agent's name).
    """
    text = text.replace("{,}", ",")
    quoted = quoted_spans(text)
    found = _boxed_number(text, quoted)
    if found is None:
        found = _final_statement(text, quoted)
    if found is None:
        # an agent that only restates others ("Agent 2's answer is 310 and I agree.", "Both agents got
        # \boxed{18}; I agree") adopts their answer; the 2 of "I agree with Agent 2." is nobody's answer
        found = _boxed_number(text, []) or _final_statement(text, name_spans(text))
    return found


def _boxed_number(text: str, quoted: list[range]) -> str | None:
    """The number in the last ``\\boxed{}`` outside ``quoted`` ("Agent 2's \\boxed{20} is wrong" is not one)."""
    boxed = last_boxed(text, skip=lambda position: within(quoted, position))
    return _number_in_box(boxed) if boxed is not None else None


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


def _final_statement(text: str, quoted: list[range]) -> str | None:
    """The answer that ``text`` states outside the ``quoted`` ranges, by the order of :func:`parse_number`."""
    closing = _closing_sentence(text)
    if _concludes(text, closing, quoted):
        found = _stated(text, closing, quoted, last_number=True)
        if found is not None:
            return found
    found = _stated(text, range(max(0, len(text) - NEAR_END), len(text)), quoted, last_number=False)
    if found is not None:
        return found
    own = [number for number in _NUMBER.finditer(text) if not within(quoted, number.start())]
    return _canonical(own[-1]) if own else None


def _closing_sentence(text: str) -> range:
    """The last sentence or line of ``text`` (within :data:`NEAR_END`): where the prompt asks for the answer."""
    end = len(text.rstrip())
    start = max(0, len(text) - NEAR_END)
    for boundary in _BOUNDARY.finditer(text, start, end):
        start = boundary.end()
    return range(start, end)


def _concludes(text: str, sentence: range, quoted: list[range]) -> bool:
    """Whether ``sentence`` is the agent's own conclusion, not a sign-off ("I hope this helps with step 3")."""
    if _BARE_NUMBER.fullmatch(text, sentence.start, sentence.stop):
        return True
    return any(
        not within(quoted, marker.start()) for marker in _CONCLUSION.finditer(text, sentence.start, sentence.stop)
    )


def _stated(text: str, region: range, quoted: list[range], *, last_number: bool) -> str | None:
    """The number that ``region`` states as the answer: after the last own cue, else after its last own ``=``."""
    for cue in reversed(list(_ANSWER_CUE.finditer(text, region.start, region.stop))):
        if within(quoted, cue.start()):
            continue
        found = _first_number(_after_answer_cue(text[cue.end() : cue.end() + 80]))
        if found is not None:
            return found
    equals = [i for i in range(region.start, region.stop) if text[i] == "=" and not within(quoted, i)]
    if equals:
        found = _first_number(text[equals[-1] + 1 : region.stop].split("\n", 1)[0])
        if found is not None:
            return found
    if last_number:
        numbers = [n for n in _NUMBER.finditer(text, region.start, region.stop) if not within(quoted, n.start())]
        if numbers:
            return _canonical(numbers[-1])
    return None


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
    digits = _SEPARATORS.sub("", match["int"]) + ("." + match["frac"] if match["frac"] else "")
    value = Fraction(Decimal(digits))
    return canonical(-value if match["sign"] else value)


def _value(answer: str) -> Fraction | None:
    try:
        return Fraction(answer.replace("−", "-"))
    except (ValueError, ZeroDivisionError):
        return None
