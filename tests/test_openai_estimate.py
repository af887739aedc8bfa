"""The dry run and the shipped OpenAI/vLLM recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentsoc.config import load_recipe, recipe_from_dict
from agentsoc.estimate import dry_run, estimate

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["math-gpt35", "gsm8k-gpt35", "arithmetic-gpt35", "math-gpt4o-mini"]
OPEN_MODEL_RECIPES = ["math-mistral-vllm", "gsm8k-llama3-vllm", "arithmetic-phi3-vllm"]


def recipe(**society: object) -> dict[str, object]:
    return {
        "name": "est",
        "task": {"name": "arithmetic", "n_train": 10, "n_test": 20},
        "backend": {"name": "openai", "options": {"base_url": "http://127.0.0.1:1/v1"}},
        "society": {"agents": 3, "rounds": 2, "models": ["gpt-4o-mini-2024-07-18"], **society},
        "finetune": {"iterations": 2},
    }


def test_counts_follow_the_loop() -> None:
    stages, source = estimate(recipe_from_dict(recipe()))
    by_name = {s.name: s for s in stages}
    # per problem: 3 round-0 answers + 3 summaries + 3 critic answers
    assert by_name["iter-0/eval"].calls == 9 * 20
    assert by_name["iter-1/train"].calls == 9 * 10
    assert by_name["iter-2/finetune"].jobs == 6
    assert [s.name for s in stages] == [
        "iter-0/eval", "iter-1/train", "iter-1/finetune", "iter-1/eval",
        "iter-2/train", "iter-2/finetune", "iter-2/eval",
    ]  # fmt: skip
    assert all(s.dollars and s.dollars > 0 for s in stages if s.calls or s.jobs)
    assert source == "problem lengths from the data"
    no_summary = estimate(recipe_from_dict(recipe(summarize=False)))[0]
    assert no_summary[0].calls == 6 * 20


def test_unknown_prices_read_unknown() -> None:
    text = dry_run(recipe_from_dict(recipe(models=["my-local-model"])))
    assert "unknown" in text and "$0.00" not in text
    assert "must be checked" in text


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_load_and_estimate(name: str) -> None:
    r = load_recipe(ROOT / "recipes" / f"{name}.toml")
    assert r.backend.name == "openai"
    text = dry_run(r)
    assert "total" in text
    head = (ROOT / "recipes" / f"{name}.toml").read_text().split("\nname =")[0]
    assert "Table 1" in head and "Dry run" in head and "duration" in head
    if "gpt35" in name:
        assert "shut down on 2026-10-23" in head


@pytest.mark.parametrize("name", OPEN_MODEL_RECIPES)
def test_open_model_recipes_estimate_gpu_hours_and_carry_their_figures(name: str) -> None:
    r = load_recipe(ROOT / "recipes" / f"{name}.toml")
    assert r.backend.name == "vllm" and r.finetune.spec.method == "full"  # the paper's setting
    text = dry_run(r)
    hours = next(line for line in text.splitlines() if line.startswith("GPU time"))
    assert "ASSUMED" in hours and "inference ~" in hours and "training ~" in hours
    head = (ROOT / "recipes" / f"{name}.toml").read_text().split("\nname =")[0]
    assert "Table 1" in head and "Dry run" in head and "GPU time" in head
    total = next(line for line in text.splitlines() if line.startswith("total")).split()
    assert f"{int(total[1].replace(',', '')):,}" in head  # the header quotes the dry run's own figure
