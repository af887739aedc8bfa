"""``agentsoc view``: one self-contained HTML page to browse a run directory or a compare folder.

The page is a single file (no server, no CDN, opens from disk and can be mailed): the data of
:func:`agentsoc.view_data.build` is embedded as JSON in a ``<script type="application/json">`` block
and rendered by a small plain-JS program (``view_assets/``). Model text is untrusted — a reply may
contain ``<script>`` — so:

* the JSON is escaped so that no ``<``, ``>`` or ``&`` appears raw in the HTML (``</script>`` in a
  reply cannot end the data block);
* the page renders every string with ``textContent``, never as HTML;
* a Content-Security-Policy allows only the page's own script (by hash) and ``data:`` images, so even
  a rendering bug could neither run injected code nor load anything from the network.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.server
import json
from importlib import resources
from pathlib import Path
from typing import Any

from agentsoc.report import ReportError
from agentsoc.view_data import build


def _asset(name: str) -> str:
    return (resources.files("agentsoc") / "view_assets" / name).read_text(encoding="utf-8")


def embed_json(data: Any) -> str:
    """JSON that is inert inside ``<script type="application/json">``: no raw ``<``, ``>`` or ``&``
    (so ``</script>`` or ``<!--`` in model text cannot end or bend the block), and no U+2028/U+2029."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for raw, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(raw, esc)
    return text


def render_html(data: dict[str, Any]) -> str:
    """The page: template + CSS + script + data, one file."""
    script = _asset("view.js")
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{digest}'"
    page = _asset("view.html")
    # our own assets first, the (untrusted) data last and once, so nothing in it is ever substituted
    page = page.replace("<!--CSP-->", csp).replace("/*CSS*/", _asset("view.css")).replace("//SCRIPT", script)
    title = str(data["title"]).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    page = page.replace("<!--TITLE-->", title)
    before, marker, after = page.partition("<!--DATA-->")
    assert marker, "view.html lost its <!--DATA--> marker"
    return before + embed_json(data) + after


def write_view(path: Path, out: Path | None = None) -> Path:
    """Write the page for a run directory or compare folder; default ``<path>/view.html``."""
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory; give a run directory or an 'agentsoc compare' --out folder")
    target = out or path / "view.html"
    html = render_html(build(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(target)
    return target


def server(page: Path, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A local server (127.0.0.1 only) for the page's folder; the caller runs ``serve_forever``."""
    handler = functools.partial(_QuietHandler, directory=str(page.parent))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per request would bury the URL
        return None
