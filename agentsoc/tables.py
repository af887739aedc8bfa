"""Tables for people: one renderer for the terminal (run summary, jobs, dry run) and one for markdown
(reports), so every table the project prints aligns and reads the same way."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, numeric: bool = False, total: bool = False
) -> str:
    """Columns padded to their widest cell, a rule under the header.

    ``numeric`` right-aligns every column but the first (figures line up by their last digit);
    ``total`` rules off the last row as a sum of the rows above.
    """
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if numeric and i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    lines = [line(r) for r in table]
    lines.insert(1, rule)
    if total and len(rows) > 1:
        lines.insert(-1, rule)
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
