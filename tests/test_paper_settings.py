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
    assert paper_deviations(load_recipe(ROOT / "recipes" / recipe)) == []


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
