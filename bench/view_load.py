"""How big and how fast the run browser's page is on a large run: 500 training + 500 held-out problems,
3 finetuning iterations (7 debates of 500 problems, 3 agents × 2 rounds), on the mock backend.

The mock's replies are ~80 characters; a real model's are longer, so by default every reply is padded
to ``--reply-chars`` with step-by-step filler (the parsed answer kept at the end) before the page is
built — the size and timings then stand for a run of real-model-length replies. Prints the page size,
the Python build time, and in headless Chromium (if Playwright and /usr/bin/chromium are there): time
to a rendered summary, to the first page of the problem list, to apply a filter, to search the replies,
and to open one problem.

    .venv/bin/python bench/view_load.py [--problems 500] [--iterations 3] [--reply-chars 600] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

from agentsoc.store import RunStore
from agentsoc.view import write_view

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def make_run(folder: Path, problems: int, iterations: int) -> Path:
    recipe = {
        "name": "view-load",
        "seed": 0,
        "task": {"name": "arithmetic", "n_train": problems, "n_test": problems},
        "backend": {"name": "mock", "concurrency": 64, "poll_interval_s": 0.01},
        "society": {"agents": 3, "rounds": 2, "models": ["mock:0.45", "mock:0.5", "mock:0.55"], "summarize": True},
        "finetune": {"iterations": iterations},
    }
    path = folder / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    run_dir = folder / "run"
    cmd = [sys.executable, "-m", "agentsoc.cli", "run", str(path), "--run-dir", str(run_dir), "--quiet"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the mock run failed:\n{done.stderr}")
    return run_dir


def pad_replies(run_dir: Path, chars: int) -> int:
    """Lengthen every reply to about ``chars`` characters, its final sentence (the answer) kept last.
    Each padding is unique (a real model's replies are), so the page's string table cannot fold them."""
    store = RunStore.open(run_dir)
    n = 0
    try:
        for phase in store.phases():
            for t in store.transcripts(phase).values():
                agents = []
                for a in t.agents:
                    msgs = list(a.messages)
                    for i, m in enumerate(msgs):
                        if m.role == "assistant" and len(m.content) < chars:
                            steps, k = [], 1
                            while sum(len(s) for s in steps) + len(m.content) < chars:
                                steps.append(f"Step {k} of reply {n}: multiply the pairs first, then add them. ")
                                k += 1
                            msgs[i] = m.model_copy(update={"content": "".join(steps) + m.content})
                            n += 1
                    agents.append(a.model_copy(update={"messages": tuple(msgs)}))
                store.put_transcript(t.model_copy(update={"agents": tuple(agents)}))
    finally:
        store.close()
    return n


def browser_timings(page_path: Path) -> dict[str, float] | None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("playwright not installed: no browser timings (pip install -e '.[browser]')")
        return None
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        print("no chromium: no browser timings (apt-get install chromium)")
        return None
    out: dict[str, float] = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(120_000)
        t0 = time.perf_counter()
        page.goto(page_path.as_uri())
        page.wait_for_selector("body[data-ready]")
        out["open from disk to rendered summary (s)"] = time.perf_counter() - t0
        out["of which in the page: parse + first render (ms)"] = page.evaluate("performance.now()")
        for label, action, wait in (
            ("problem list, first page (ms)", lambda: page.click("#tabs a[data-tab=problems]"), "#list"),
            ("search the held-out replies (builds the index) (ms)", lambda: page.fill("#search", "reply 77"), "#list"),
            ("clear the search (ms)", lambda: page.fill("#search", ""), "#list"),
            ("filter 'wrong final answer' (ms)", lambda: page.check("#f-wrong"), "#list"),
            ("open one problem (ms)", lambda: page.locator("#list tbody tr").first.click(), "#problem-title"),
        ):
            t = time.perf_counter()
            action()
            page.wait_for_selector(wait)
            out[label] = 1000 * (time.perf_counter() - t)
        page.go_back()
        page.wait_for_selector("#count")
        out["problems left by the filter"] = float(page.text_content("#count").split(" of ")[0])
        browser.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=500, help="training and held-out problems each")
    ap.add_argument("--iterations", type=int, default=3, help="finetuning iterations")
    ap.add_argument("--reply-chars", type=int, default=600, help="pad replies to this length (0: the mock's own)")
    ap.add_argument("--keep", type=Path, default=None, help="build the run here and keep it (default: a temp dir)")
    args = ap.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="view-load-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        run_dir = make_run(folder, args.problems, args.iterations)
        print(f"mock run: {args.problems} + {args.problems} problems, {args.iterations} iterations, "
              f"{time.perf_counter() - t:.1f} s")  # fmt: skip
        if args.reply_chars:
            print(f"padded {pad_replies(run_dir, args.reply_chars)} replies to ~{args.reply_chars} characters")
        t = time.perf_counter()
        page = write_view(run_dir, folder / "view.html")
        build_s = time.perf_counter() - t
        size = page.stat().st_size
        print(f"page: {size / 1e6:.2f} MB, built in {build_s:.1f} s ({page})")
        timings = browser_timings(page)
        for k, v in (timings or {}).items():
            print(f"  {k}: {v:.0f}" if v >= 10 else f"  {k}: {v:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
