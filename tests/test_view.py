"""``agentsoc view`` without a browser: what the page embeds, how it escapes model text, and the numbers
behind its filters and training-data view, each checked against the run store independently."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe
from view_helpers import HOSTILE, inject_hostile, mock_run, real_run

from agentsoc import cli
from agentsoc.store import RunStore
from agentsoc.view import embed_json, server, write_view
from agentsoc.view_data import build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = mock_run(tmp_path_factory.mktemp("view"))
    inject_hostile(run)
    return run


def test_embedded_json_cannot_end_its_script_block_and_round_trips() -> None:
    data = {"reply": "</script><script>alert(1)</script><!-- & \u2028\u2029", "n": [1, None]}
    text = embed_json(data)
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert json.loads(text) == data


def test_page_is_one_file_whose_data_holds_the_hostile_reply_only_escaped(run_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "out" / "page.html"
    assert cli.main(["view", str(run_dir), "--out", str(page)]) == 0
    html = page.read_text(encoding="utf-8")
    assert "window.pwned" in html  # the reply is there ...
    assert "<script>window.pwned" not in html and "<img src=x" not in html  # ... but never as markup
    # exactly our two script blocks: the inert data block and the page's program, allowed by its hash
    assert len(re.findall(r"<script\b", html)) == 2
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', html)
    assert csp and "default-src 'none'" in csp.group(1) and "script-src 'sha256-" in csp.group(1)
    assert "unsafe-inline" not in csp.group(1).split("script-src")[1]
    # nothing is fetched: no http(s) URL is referenced by the page itself
    program = html.split('<script type="application/json"')[0]
    assert "http://" not in program and "https://" not in program
    data = json.loads(html.split('id="data">', 1)[1].split("</script>", 1)[0])
    assert any(HOSTILE in s for s in data["S"])


def test_filter_flags_match_the_store(run_dir: Path) -> None:
    data = build(run_dir)
    store = RunStore.open(run_dir, readonly=True)
    try:
        last = store.transcripts("iter-2/eval")
    finally:
        store.close()
    cells = {p["id"]: c for p in data["problems"] if p["split"] == "held-out" for c in p["cells"] if c["it"] == 2}
    assert set(cells) == set(last)
    wrong = {pid for pid, t in last.items() if t.vote.answer is None or int(t.vote.answer) != int(t.problem.answer)}
    changed = {pid for pid, t in last.items() if t.round_votes[0].answer != t.vote.answer}
    right_to_wrong = {
        (pid, a.agent)
        for pid, t in last.items()
        for a in t.agents
        if a.first == t.problem.answer and a.final != t.problem.answer
    }
    assert wrong and changed  # the mock run has both, so the comparison below means something
    assert {pid for pid, c in cells.items() if c["flags"] & 1} == wrong
    assert {pid for pid, c in cells.items() if c["flags"] & 2} == changed
    assert {(pid, n) for pid, c in cells.items() for n in c["rw"]} == right_to_wrong
    # the parsed answer is highlighted where it stands in the reply
    for c in cells.values():
        for a in c["agents"]:
            for resp, ans, hl in zip(a["resp"], a["ans"], a["hl"], strict=True):
                if hl is not None:
                    assert data["S"][resp][hl[0] : hl[1]] == ans


def test_selection_reasons_add_up_to_the_exported_datasets(run_dir: Path) -> None:
    """Each agent's D^G / D^C− / drawn D^C+ tags on the training debates count exactly the examples of
    the dataset the run exported — the page's 'why selected' agrees with selection.py."""
    data = build(run_dir)
    for it in (1, 2):
        tags: dict[tuple[int, str], int] = {}
        for p in data["problems"]:
            for c in p["cells"]:
                if p["split"] == "train" and c["it"] == it:
                    for n, a in enumerate(c["agents"]):
                        for tag in (a["sel"] or "").split():
                            role = "generator" if tag == "G" else "critic"
                            tags[(n, role)] = tags.get((n, role), 0) + (tag != "c+")
        sizes = {
            (d["agent"], d["role"]): d["size"]
            for t in data["runs"][0]["training"]
            if t["it"] == it
            for d in t["datasets"]
        }
        assert sizes and all(tags.get(k, 0) == v for k, v in sizes.items()), (tags, sizes)


def test_training_view_has_jobs_with_their_losses_and_truncation(run_dir: Path) -> None:
    training = build(run_dir)["runs"][0]["training"]
    jobs = [j for t in training for j in t["jobs"]]
    assert len(jobs) == 12 and all(j["state"] == "succeeded" for j in jobs)
    assert all(len(j["losses"]) > 1 and j["cut"] == 0 and j["examples"] for j in jobs)


def test_small_held_out_sample_is_marked_in_the_data(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"task.n_test": 5, "finetune.iterations": 0})))
    assert cli.main(["run", str(recipe), "--run-dir", str(tmp_path / "run"), "--quiet"]) == 0
    row = build(tmp_path / "run")["runs"][0]["summary"]["rows"][0]
    assert row["debate"]["n"] == 5  # the page prints "n < 20: too small to judge" for it (browser test)


def test_compare_folder_lists_every_method_and_each_problem_under_each(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(tomli_w.dumps(mock_recipe(**{"finetune.iterations": 1, "task.n_test": 10, "task.n_train": 10})))
    out = tmp_path / "cmp"
    assert (
        cli.main(["compare", str(recipe), "--methods", "ours,majority", "--out", str(out), "--quiet", "--no-plots"])
        == 0
    )
    data = build(out)
    assert data["kind"] == "compare" and [r["label"] for r in data["runs"]] == ["Multiagent FT (Ours)", "Majority"]
    held_out = [p for p in data["problems"] if p["split"] == "held-out"]
    assert len(held_out) == 10
    assert all({c["run"] for c in p["cells"]} == {0, 1} for p in held_out)


def test_committed_comparison_without_run_directories_shows_scores_and_plots() -> None:
    """docs/results/arithmetic-compare holds the real-model result but not its run directories: the
    page still shows every method's score and the plots, and says the transcripts are not there."""
    folder = ROOT / "docs" / "results" / "arithmetic-compare"
    data = build(folder)
    assert data["runs"] == [] and data["problems"] == []
    assert [m["label"] for m in data["missing"]][:2] == ["Multiagent FT (Ours)", "Single-agent FT"]
    assert data["missing"][0]["score"]["n"] == 30
    assert len(data["plots"]) == 3 and all(p["uri"].startswith("data:image/png;base64,iVBOR") for p in data["plots"])


def test_real_model_run_every_reply_and_its_flags(tmp_path: Path) -> None:
    """The committed run of the bundled 0.5B model: every reply is embedded verbatim, the reply cut off
    before its answer counts as unparsable, and the problem whose critics left a right round-0 majority
    is flagged as both 'critics changed the vote' and 'wrong'."""
    run = real_run(tmp_path)
    data = build(run)
    store = RunStore.open(run, readonly=True)
    try:
        stored = store.transcripts("iter-0/eval")
    finally:
        store.close()
    assert data["runs"][0]["backend"] == "local" and data["mock"] is None
    assert len(data["problems"]) == 3
    for p in data["problems"]:
        (cell,) = p["cells"]
        t = stored[p["id"]]
        for a, trace in zip(cell["agents"], t.agents, strict=True):
            assert [data["S"][i] for i in a["resp"]] == [trace.response(m) for m in range(len(trace.answers))]
        assert bool(cell["flags"] & 8) == any(x is None for a in t.agents for x in a.answers)
    undone = [(p, c) for p in data["problems"] for c in p["cells"] if c["flags"] & 2 and c["flags"] & 1]
    assert undone and all(c["rounds"][0] == p["truth"] for p, c in undone)  # round 0 was right


def test_not_a_run_directory_is_one_line(tmp_path: Path, capsys: Any) -> None:
    assert cli.main(["view", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "compare folder" in err
    assert cli.main(["view", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err


def test_serve_answers_on_localhost(run_dir: Path, tmp_path: Path) -> None:
    page = write_view(run_dir, tmp_path / "v.html")
    httpd = server(page)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert httpd.server_address[0] == "127.0.0.1"
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v.html"
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.read() == page.read_bytes()
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_view_serve_prints_its_address_serves_the_page_and_stops_on_ctrl_c(run_dir: Path, tmp_path: Path) -> None:
    page = tmp_path / "served.html"
    cmd = [sys.executable, "-m", "agentsoc.cli", "view", str(run_dir), "--out", str(page), "--serve"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until the server is up (or the command died)
        match = re.search(r"serving (http://127\.0\.0\.1:\d+/served\.html)", line)
        assert match, line + proc.stderr.read()
        with urllib.request.urlopen(match.group(1), timeout=30) as r:
            assert r.read() == page.read_bytes()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
