"""Where agentsoc deliberately differs from the paper, the difference is a named switch; recipes that
reproduce a paper table use the paper's setting, and a report says which switches a run used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agentsoc import tasks
from agentsoc.config import load_recipe, paper_deviations
from agentsoc.debate import stated_answer
from agentsoc.report import render
from agentsoc.society import Society
from agentsoc.types import Completion

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "recipe",
    [
        "arithmetic-gpt35.toml",
        "gsm8k-gpt35.toml",
        "math-gpt35.toml",
        "math-gpt4o-mini.toml",
        "math-mistral-vllm.toml",
        "gsm8k-llama3-vllm.toml",
        "arithmetic-phi3-vllm.toml",
    ],
)
def test_recipes_that_reproduce_a_paper_table_use_the_papers_settings(recipe: str) -> None:
    """Every switch at the paper's setting, except the two deviations these recipes keep on purpose, listed."""
    loaded = load_recipe(ROOT / "recipes" / recipe)
    deviations = paper_deviations(loaded)
    if loaded.backend.name == "openai":  # GPT: a reply cap, which the paper did not set
        assert [d.split(":")[0] for d in deviations] == [f"sampling.max_tokens = {loaded.sampling.max_tokens}"]
    else:  # open models: a trainable effective batch instead of the paper's 192
        assert [d.split(":")[0] for d in deviations] == ["finetune.spec"]
        assert "effective batch 16 (batch_size 4 x gradient_accumulation_steps 4)" in deviations[0]


def test_deviations_follow_the_switches(write_recipe: Any) -> None:
    def listed(**changes: Any) -> str:
        return "\n".join(paper_deviations(load_recipe(write_recipe(**changes))))

    assert "society.tie_break = seeded" in listed()
    assert "tie_break" not in listed(**{"society.tie_break": "largest"})
    gpt = {"society.models": ["gpt-4o-mini-2024-07-18"], "sampling.max_tokens": 1024}
    assert "sampling.max_tokens = 1024: GPT replies are capped (paper: no cap" in listed(**gpt)
    assert "sampling.max_tokens" not in listed()  # the mock is no GPT model
    star = {"selection.label": "ground_truth", "finetune.iterations": 2}
    assert "STaR restarts from the base model" in listed(**star)
    assert "STaR" not in listed(**star, **{"finetune.from_base": True})
    assert "STaR" not in listed(**{**star, "finetune.iterations": 1})  # iteration 1 starts from the base anyway


def test_dry_run_prints_the_deviations(capsys: pytest.CaptureFixture[str]) -> None:
    from agentsoc.cli import main

    assert main(["run", str(ROOT / "recipes" / "math-gpt35.toml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "settings that differ from the paper: 1\n  - sampling.max_tokens = 1024: GPT replies are capped" in out
    assert main(["run", "arithmetic-local", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for switch in ("selection.critic_loss", "society.tie_break = seeded", "finetune.spec: effective batch"):
        assert f"\n  - {switch}" in out


def test_tie_break_switch_decides_a_tied_vote() -> None:
    from agentsoc.vote import majority_vote

    def vote(answers: list[str | None], problem: str, tie_break: Any) -> str | None:
        return majority_vote(answers, str.__eq__, seed=0, problem_id=problem, tie_break=tie_break).answer

    # MAFT's rule: the largest answer string among the tied clusters, whatever the agent order or problem
    assert {vote(["7", "12", None], f"p{i}", "largest") for i in range(20)} == {"7"}  # "7" > "12" as strings
    assert vote(["12", "7", "7"], "p", "largest") == "7"  # no tie: the majority, not the largest
    # ours: a seeded draw, fair across agents and identical on a rerun
    draws = [vote(["7", "12"], f"p{i}", "seeded") for i in range(40)]
    assert set(draws) == {"7", "12"} and draws == [vote(["7", "12"], f"p{i}", "seeded") for i in range(40)]


async def test_the_tie_break_reaches_the_debates_vote(write_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(**{"society.tie_break": "largest", "finetune.iterations": 0}))
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        assert soc.debate_settings("eval").tie_break == "largest"


def test_the_demo_names_its_deviations() -> None:
    devs = "\n".join(paper_deviations(load_recipe("arithmetic-local")))
    for switch in ("selection.critic_loss", "society.abstain_truncated", "finetune.spec.method", "prompts"):
        assert switch in devs


def test_a_cut_off_reply_abstains_only_under_the_switch() -> None:
    task = tasks.create("arithmetic", {})
    cut = Completion(text="First 3*4 = 12, then 12 + 5 = 17, then 17 -", finish_reason="length")
    assert stated_answer(task, cut) is None
    assert stated_answer(task, cut, abstain_truncated=False) == "17"  # the paper's last-number rule


async def test_the_report_lists_the_switches_a_run_used(write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe(**{"finetune.iterations": 0, "evaluation.diversity": ["consensus"]})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        await soc.run()
    text = render(tmp_path / "run", plots=False).read_text()
    assert "## Settings that differ from the paper" in text and "society.abstain_truncated = true" in text


async def test_examples_lost_to_max_seq_len_are_counted_shown_and_warned_about(
    write_recipe: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from agentsoc.cli import summary_table

    # the mock counts whitespace words as tokens: critic trajectories (~90 words) exceed 40, answers do not
    recipe = write_recipe(**{"finetune.iterations": 1, "finetune.spec.max_seq_len": 40})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        results = await soc.run()
    n, cut, dropped = results[1].lost_examples()
    assert n > 0 and cut == 0 and 0 < dropped < n
    assert "max_seq_len 40 cut 0 and left out" in caplog.text
    assert f"0 / {dropped} of {n}" in summary_table(results)
    text = render(tmp_path / "run", plots=False).read_text()
    assert "cut / left out by max_seq_len (40)" in text and f"0 / {dropped} of {n}" in text


def test_the_tie_break_field_keeps_older_runs_resumable(write_recipe: Any) -> None:
    """A run started before ``society.tie_break`` existed recorded no such field: at its default the field
    stays out of the fingerprint (so that run still resumes); set to "largest" it is a different experiment."""
    seeded = load_recipe(write_recipe())
    assert "tie_break" not in seeded.results_view()["society"]
    largest = load_recipe(write_recipe(**{"society.tie_break": "largest"}))
    assert largest.results_view()["society"]["tie_break"] == "largest"
    assert largest.fingerprint() != seeded.fingerprint()
