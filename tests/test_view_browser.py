"""The run browser in a real headless Chromium (Debian's ``chromium`` driven by Playwright): the page of
a mock run with a hostile reply opens from disk, its filters and search change the list, navigation
to a problem and back works, and nothing in the model text executes."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from view_helpers import HOSTILE, agentsoc, inject_hostile, mock_run, real_run

from agentsoc.store import RunStore

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("AGENTSOC_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: generous: a loaded 2-core machine
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="Playwright is not installed (pip install -e '.[browser]')"
    )
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set AGENTSOC_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=TIMEOUT_MS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    folder = tmp_path_factory.mktemp("browser")
    run_dir = mock_run(folder)
    hostile = inject_hostile(run_dir)
    page = folder / "view.html"
    agentsoc("view", str(run_dir), "--out", str(page))
    return run_dir, page, hostile.problem.id


def open_page(browser: Any, page_path: Path) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(page_path.as_uri())
    page.wait_for_selector("body[data-ready]")
    return page, errors


def count(page: Any) -> int:
    return int(page.text_content("#count").split(" of ")[0])


def test_filters_search_navigation_and_no_script_from_model_text(browser: Any, site: tuple[Path, Path, str]) -> None:
    run_dir, page_path, hostile_id = site
    store = RunStore.open(run_dir, readonly=True)
    try:
        last = store.transcripts("iter-2/eval")
    finally:
        store.close()
    wrong = sorted(pid for pid, t in last.items() if t.vote.answer != t.problem.answer)
    changed = sorted(pid for pid, t in last.items() if t.round_votes[0].answer != t.vote.answer)

    page, errors = open_page(browser, page_path)
    assert "Per iteration" in page.text_content("main")
    page.click("#tabs a[data-tab=problems]")
    page.wait_for_selector("#list")
    assert count(page) == 60  # every held-out problem; 50 rows on the first page
    assert page.locator("#list tbody tr").count() == 50

    # filters change the list, to exactly the problems the store says
    page.check("#f-wrong")
    assert count(page) == len(wrong)
    shown = sorted(page.locator("#list tbody tr td:first-child").all_text_contents())
    assert shown == wrong
    page.uncheck("#f-wrong")
    page.check("#f-changed")
    assert count(page) == len(changed)
    page.uncheck("#f-changed")
    page.select_option("#split", "train")
    assert count(page) == 60
    page.select_option("#split", "held-out")

    # search finds the hostile reply (text search over replies), and only it
    page.fill("#search", "window.pwned")
    assert count(page) == 1
    row = page.locator("#list tbody tr").first
    assert row.locator("td").first.text_content() == hostile_id

    # navigation: to the problem and back (browser history), the filters kept
    row.click()
    page.wait_for_selector("#problem-title")
    assert hostile_id in page.text_content("#problem-title")
    body = page.text_content("main")
    assert HOSTILE.replace("\u2028", "") in body.replace("\u2028", "")  # the reply shows literally
    assert "<i>question</i>" in page.text_content("#question")
    assert page.locator("main img").count() == 0 and page.locator("main script").count() == 0
    assert page.locator("main b", has_text="not bold").count() == 0
    assert page.locator("mark").count() > 0  # parsed answers highlighted
    page.go_back()
    page.wait_for_selector("#list")
    assert count(page) == 1 and page.input_value("#search") == "window.pwned"

    # ... and by the page's own back link
    page.locator("#list tbody tr").first.click()
    page.click("#back")
    page.wait_for_selector("#list")
    assert count(page) == 1

    # the training view: one loss curve per job
    page.click("#tabs a[data-tab=training]")
    page.wait_for_selector("svg.loss")
    assert page.locator("svg.loss").count() == 12

    assert page.evaluate("typeof window.pwned") == "undefined"
    assert errors == []
    page.close()


def test_small_sample_says_too_small_to_judge(browser: Any, tmp_path: Path, write_recipe: Any) -> None:
    recipe = write_recipe(**{"task.n_test": 5, "finetune.iterations": 0})
    agentsoc("run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet")
    agentsoc("view", str(tmp_path / "run"))
    page, errors = open_page(browser, tmp_path / "run" / "view.html")
    text = page.text_content("main")
    assert "too small to judge" in text and "± 0.00" not in text
    assert errors == []
    page.close()


def test_real_model_run_opens_and_shows_the_model_text(browser: Any, tmp_path: Path) -> None:
    """A run of the bundled 0.5B model (tests/data): its problems, filters and replies in the browser."""
    run = real_run(tmp_path)
    agentsoc("view", str(run))
    store = RunStore.open(run, readonly=True)
    try:
        stored = store.transcripts("iter-0/eval")
    finally:
        store.close()
    page, errors = open_page(browser, run / "view.html")
    assert "too small to judge" in page.text_content("main")
    page.click("#tabs a[data-tab=problems]")
    page.wait_for_selector("#list")
    assert count(page) == 3
    page.check("#f-unparsable")
    unparsable = [pid for pid, t in stored.items() if any(x is None for a in t.agents for x in a.answers)]
    assert count(page) == len(unparsable) > 0
    page.locator("#list tbody tr").first.click()
    page.wait_for_selector("#problem-title")
    pid = page.text_content("#problem-title").split(" ")[0]
    replies = page.locator("pre.reply").all_text_contents()
    t = stored[pid]
    assert replies == [t.agents[n].response(m) for m in range(2) for n in range(3)]  # round by round
    assert page.locator(".chip", has_text="∅ (none)").count() >= 1
    page.go_back()
    page.wait_for_selector("#list")
    assert count(page) == len(unparsable)
    assert errors == []
    page.close()


def test_compare_folder_shows_each_problem_under_every_method(browser: Any, tmp_path: Path, write_recipe: Any) -> None:
    recipe = write_recipe(**{"finetune.iterations": 1, "task.n_test": 10, "task.n_train": 10})
    out = tmp_path / "cmp"
    agentsoc("compare", str(recipe), "--methods", "ours,majority", "--out", str(out), "--quiet", "--no-plots")
    agentsoc("view", str(out))
    page, errors = open_page(browser, out / "view.html")
    assert "Methods (final vote after the last iteration)" in page.text_content("main")
    page.click("#tabs a[data-tab=problems]")
    page.wait_for_selector("#list")
    assert count(page) == 10
    headers = page.locator("#list thead th").all_text_contents()
    assert [h for h in headers if "vote per iteration" in h] == [
        "Multiagent FT (Ours): vote per iteration",
        "Majority: vote per iteration",
    ]
    page.select_option("#run", "1")
    assert len(page.locator("#list thead th").all_text_contents()) == len(headers) - 1
    page.select_option("#run", "all")
    page.locator("#list tbody tr").first.click()
    page.wait_for_selector("#problem-title")
    blocks = page.locator(".block h3").all_text_contents()
    # ours: iterations 0 and 1; majority: iteration 0 — the same problem under every method and iteration
    assert [b.split(" · vote")[0] for b in blocks] == [
        "Multiagent FT (Ours) · iteration 0",
        "Multiagent FT (Ours) · iteration 1",
        "Majority · iteration 0",
    ]
    assert errors == []
    page.close()


def test_real_model_comparison_page_opens(browser: Any, tmp_path: Path) -> None:
    """The committed real-model result (Qwen2.5-0.5B, docs/results/arithmetic-compare): its page shows
    every method's score and the three plots; its run directories are not committed, so no debates."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "real.html"
    agentsoc("view", str(root / "docs" / "results" / "arithmetic-compare"), "--out", str(out))
    page, errors = open_page(browser, out)
    text = page.text_content("main")
    assert "Multiagent FT (Ours)" in text and "53.33 ± 9.11" in text and "not here: scores only" in text
    assert page.locator("img.plot").count() == 3
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    assert errors == []
    page.close()
