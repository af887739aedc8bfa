"""A small LaTeX-to-sympy converter for the answers MATH problems have.

Covers numbers, single-letter symbols, ``+ - * / ^``, ``\\frac``, ``\\sqrt`` (and ``\\sqrt[n]``),
``\\pi``, ``\\cdot``, ``\\times``, ``\\div``, ``\\infty``, brackets and implicit multiplication
(``2\\sqrt{3}``, ``3x``). Anything else raises :class:`LatexError`: the caller treats that as "cannot
tell", never as equal. Written here instead of using sympy's ANTLR-based parser, which needs an
extra runtime with a pinned version.
"""

from __future__ import annotations

import re
from typing import Any

import sympy

#: exponents larger than this are refused: ``10^{10^{10}}`` would otherwise hang the grader
MAX_EXPONENT = 1000

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\\[a-zA-Z]+)|([a-zA-Z])|([-+*/^(){}\[\]]))")
_CONSTANTS: dict[str, Any] = {"\\pi": sympy.pi, "\\infty": sympy.oo}
_TIMES = {"*", "\\cdot", "\\times"}
_DIVIDE = {"/", "\\div"}
_ATOM_START = {"(", "[", "{", "\\frac", "\\sqrt", *_CONSTANTS}
_CLOSING = {"(": ")", "[": "]", "{": "}"}


class LatexError(ValueError):
    """The text is not LaTeX this converter understands."""


def to_sympy(latex: str) -> Any:
    """The sympy expression for ``latex`` (exact: ``0.1`` becomes ``1/10``)."""
    tokens = _tokenize(latex)
    parser = _Parser(tokens)
    value = parser.expression()
    if parser.pos != len(tokens):
        raise LatexError(f"unexpected {tokens[parser.pos]!r} in {latex!r}")
    return value


def _tokenize(latex: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = latex.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            raise LatexError(f"cannot read {text[pos : pos + 10]!r}")
        token = match.group(match.lastindex or 0)
        if token not in ("\\left", "\\right"):
            tokens.append(token)
        pos = match.end()
    return tokens


class _Parser:
    """Recursive descent: expression > term > signed > power > atom."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise LatexError(f"expected {expected or 'more input'}, got {token!r}")
        self.pos += 1
        return token

    def expression(self) -> Any:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Any:
        value = self.signed()
        while (token := self.peek()) is not None:
            if token in _TIMES or token in _DIVIDE:
                self.take()
                value = value * self.signed() if token in _TIMES else value / self.signed()
            elif _starts_atom(token):
                value = value * self.power()
            else:
                break
        return value

    def signed(self) -> Any:
        if self.peek() in ("+", "-"):
            return -self.signed() if self.take() == "-" else self.signed()
        return self.power()

    def power(self) -> Any:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        exponent = self.signed() if self.peek() in ("+", "-") else self.power()
        if exponent.is_number and abs(exponent) > MAX_EXPONENT:
            raise LatexError(f"exponent too large: {exponent}")
        return sympy.Pow(base, exponent)

    def atom(self) -> Any:
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(token)
        if len(token) == 1 and token.isalpha():
            return sympy.Symbol(token)
        if token in _CONSTANTS:
            return _CONSTANTS[token]
        if token in _CLOSING:
            value = self.expression()
            self.take(_CLOSING[token])
            return value
        if token == "\\frac":  # arguments are braced by the normaliser (\frac12 -> \frac{1}{2})
            return self.atom() / self.atom()
        if token == "\\sqrt":
            if self.peek() == "[":
                self.take()
                degree = self.expression()
                self.take("]")
                return sympy.root(self.atom(), degree)
            return sympy.sqrt(self.atom())
        raise LatexError(f"unsupported {token!r}")


def _starts_atom(token: str) -> bool:
    return token[0].isdigit() or token[0] == "." or (len(token) == 1 and token.isalpha()) or token in _ATOM_START
