"""The run directory: one process at a time, created atomically, resumable with other run-time
settings, and a step API that cannot score the wrong models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from conftest import mock_recipe

from agentsoc import tasks
from agentsoc.config import RecipeError, load_recipe, recipe_from_dict
from agentsoc.rundir import RunDirError, prepare_run_dir
from agentsoc.society import Society


async def test_a_second_process_on_a_run_directory_is_refused_at_once(write_recipe: Any, tmp_path: Path) -> None:
    recipe, run_dir = write_recipe(), tmp_path / "run"
    async with Society.from_recipe(recipe, run_dir=run_dir, progress=False):
        with pytest.raises(RunDirError, match=r"in use by pid \d+"):
            Society.from_recipe(recipe, run_dir=run_dir, resume=True, progress=False)
    # released when the first one ends
    async with Society.from_recipe(recipe, run_dir=run_dir, resume=True, progress=False) as soc:
        assert soc.store.get_meta("fingerprint")


def test_creation_is_atomic_and_leftovers_of_a_killed_creation_do_not_block(write_recipe: Any, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe())
    run_dir = tmp_path / "run"
    # a process killed while creating left its temporary folder (and nothing at run_dir)
    stale = tmp_path / ".run.99999.creating"
    stale.mkdir()
    (stale / "recipe.toml").write_text("half")
    lock = prepare_run_dir(run_dir, recipe, resume=False)
    lock.release()
    assert not stale.exists()
    assert {p.name for p in run_dir.iterdir()} >= {"recipe.toml", "run.sqlite"}
    # a directory created but never run holds no work: it may be resumed, or started again (issue 20)
    prepare_run_dir(run_dir, recipe, resume=True).release()
    prepare_run_dir(run_dir, recipe, resume=False).release()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="holds no agentsoc run"):
        prepare_run_dir(other, recipe, resume=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        prepare_run_dir(tmp_path / "afile", recipe, resume=True)


async def test_resume_may_change_run_time_settings_but_names_fields_that_change_results(
    write_recipe: Any, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    async with Society.from_recipe(write_recipe(), run_dir=run_dir, progress=False) as soc:
        await soc.debate(soc.split.train[:1], "iter-1/train")  # work done: the run is bound to its recipe
    patient = write_recipe(
        "patient.toml",
        **{
            "backend.concurrency": 2,
            "backend.max_attempts": 20,
            "backend.poll_interval_s": 1.0,
            "backend.max_active_jobs": 1,
            "backend.options": {"state_dir": "server", "latency_s": 0.01},
        },
    )
    async with Society.from_recipe(patient, run_dir=run_dir, resume=True, progress=False):
        pass
    other = write_recipe("other.toml", **{"society.rounds": 3, "sampling.temperature": 0.7})
    with pytest.raises(RunDirError, match=r"these fields differ: sampling\.temperature, society\.rounds"):
        async with Society.from_recipe(other, run_dir=run_dir, resume=True, progress=False):
            pass


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("society.summarize", "yes", "society.summarize: Input should be a valid boolean"),
        ("seed", True, "seed: Input should be a valid integer"),
        ("task.n_train", "60", "task.n_train: Input should be a valid integer"),
        ("sampling.temperature", "1", "sampling.temperature: Input should be a valid number"),
        ("finetune.spec.epochs", 2.0, "finetune.spec.epochs: Input should be a valid integer"),
    ],
)
def test_recipe_types_are_strict(tmp_path: Path, field: str, value: Any, needle: str) -> None:
    path = tmp_path / "r.toml"
    path.write_text(tomli_w.dumps(mock_recipe(**{field: value})))
    with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
        load_recipe(path)


async def test_the_step_api_cannot_store_the_base_models_as_a_later_iteration(tmp_path: Path) -> None:
    recipe = recipe_from_dict(mock_recipe(**{"finetune.iterations": 1}))
    soc = Society(recipe, run_dir=tmp_path / "run", backend=_mock(tmp_path), task=tasks.create("arithmetic", {}))
    async with soc:
        with pytest.raises(RuntimeError, match=r"evaluate\(1\).*models of iteration 0"):
            await soc.evaluate(1)
        train = await soc.debate(soc.split.train, "iter-1/train")
        slots = await soc.finetune(1, soc.select(train))
        assert soc.slots == slots and soc.slots_iteration == 1  # installed, not just returned
        with pytest.raises(RuntimeError, match=r"finetune\(1\).*iteration 2 comes next"):
            await soc.finetune(1, soc.select(train))
        scores = await soc.evaluate(1)
        assert scores is not None and soc.store.iteration(1).slots == tuple(slots)


def _mock(tmp_path: Path) -> Any:
    from backends.mock import MockBackend

    return MockBackend(state_dir=tmp_path / "server", polls_to_finish=0)
