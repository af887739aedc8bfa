"""The GPU memory plan of `agentsoc run --dry-run` for vllm recipes (issue 16 item 5): every GPU
recipe prints a plan that fits the 80 GB GPU count it names; a plan that cannot fit is refused
with the setting to change."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from agentsoc.config import RecipeError, recipe_from_dict
from agentsoc.estimate import dry_run
from agentsoc.memory_plan import memory_plan

ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPES = sorted(p for p in (ROOT / "recipes").glob("*-vllm.toml") if p.name != "arithmetic-vllm.toml")


def load(path: Path, **options: Any) -> Any:
    data = tomllib.loads(path.read_text())
    data["backend"]["options"].update(options)
    return recipe_from_dict(data, source=str(path), base_dir=path.parent)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.name)
def test_every_gpu_recipe_plans_a_fit_on_the_80gb_gpus_it_names(path: Path) -> None:
    plan = "\n".join(memory_plan(load(path)))
    assert "80 GB GPUs" in plan and plan.endswith("the plan fits")
    assert " = 8 x 80 GB" in plan  # one 8-GPU box, servers and training together
    assert "GPU memory plan" in dry_run(load(path))


def test_the_arithmetic_cpu_recipe_has_no_gpu_plan() -> None:
    assert memory_plan(load(ROOT / "recipes/arithmetic-vllm.toml")) == []


def test_full_finetuning_of_8b_on_one_gpu_is_refused_naming_the_shard_setting() -> None:
    path = ROOT / "recipes/gsm8k-llama3-vllm.toml"
    with pytest.raises(RecipeError) as err:
        memory_plan(load(path, num_gpus=1, accelerate_config=None))
    assert "~139 GB per GPU" in str(err.value) and "num_gpus = 2 with accelerate_config = 'fsdp'" in str(err.value)
    with pytest.raises(RecipeError, match=r"needs backend\.options\.accelerate_config"):
        memory_plan(load(path, accelerate_config=None))


def test_servers_that_do_not_fit_their_share_or_their_gpus_are_refused() -> None:
    path = ROOT / "recipes/math-mistral-vllm.toml"
    with pytest.raises(RecipeError, match=r"gpu_memory_utilization = 0\.13 gives it 10\.4 GB.*at least 0\.22"):
        memory_plan(load(path, gpu_memory_utilization=0.13))  # the old recipes' setting
    with pytest.raises(RecipeError, match=r"7 servers share a GPU.*give the servers 3 GPUs"):
        memory_plan(load(path, server_env={"CUDA_VISIBLE_DEVICES": "0"}))
    assert memory_plan(load(path, gpu_memory_gb=141.0, num_gpus=1, accelerate_config=None))[-1] == "  the plan fits"
