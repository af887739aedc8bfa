"""Accuracy ± SE on hand-computed cases, unparsable = wrong, paired differences, [evaluation] overrides."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from transcripts import eq, make_transcript

from agentsoc.config import recipe_from_dict
from agentsoc.evaluate import correctness, evaluate, paired, score
from agentsoc.society import Society


def test_score_hand_computed() -> None:
    s = score([True, True, True, False])
    assert s.accuracy == 0.75 and s.n == 4
    assert s.se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert str(s) == "75.00 ± 21.65"
    assert score([True] * 5).se == 0.0
    assert score([]).n == 0


def test_evaluate_counts_unparsable_as_wrong() -> None:
    ts = [
        make_transcript("1", "7", [["7", "7"], ["7", "7"], ["3", "7"]]),  # right in both rounds
        make_transcript("2", "5", [["5", "4"], ["4", "4"], ["5", "4"]]),  # debate talked them out of it
        make_transcript("3", "9", [[None, None], [None, None], [None, None]]),  # nothing parsed: wrong
        make_transcript("4", "2", [["1", "2"], [None, "2"], ["2", None]]),
    ]
    out = evaluate(ts, eq)
    assert out is not None
    assert out.debate.accuracy == 0.5 and out.debate.n == 4  # problems 1 and 4; 3 stays in the denominator
    assert out.rounds[0].accuracy == 0.5  # problems 1 and 2
    assert out.rounds[1].accuracy == 0.5
    # single answers, agents x problems = 12: round-0 right answers: 2 + 2 + 0 + 1
    assert out.single_agent.accuracy == pytest.approx(5 / 12) and out.single_agent.n == 12
    assert correctness(ts, eq) == {"1": True, "2": False, "3": False, "4": True}


def test_paired_difference_and_se() -> None:
    a = {"p1": True, "p2": True, "p3": False, "p4": True, "only_a": True}
    b = {"p1": True, "p2": False, "p3": False, "p4": False, "only_b": False}
    d = paired(a, b)
    # d = [0, 1, 0, 1] on the 4 shared problems: mean 0.5, population variance 0.25
    assert d.n == 4 and d.diff == 0.5 and d.se == pytest.approx(0.25)
    assert (d.a_only, d.b_only) == (2, 0)
    assert str(d) == "+50.00 ± 25.00"
    same = paired(a, a)
    assert same.diff == 0 and same.se == 0
    assert paired({}, {}).n == 0


async def test_evaluation_overrides_shape_only_the_held_out_debate(write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe(
        **{
            "finetune.iterations": 1,
            "evaluation.agents": 1,
            "evaluation.rounds": 1,
            "evaluation.temperature": 2.0,
        }
    )
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        await soc.run()
        assert soc.debate_settings("x", evaluation=True).sampling.temperature == 2.0
        assert soc.debate_settings("x").sampling.temperature == 1.0
        for t in soc.store.transcripts("iter-1/eval").values():
            assert len(t.agents) == 1 and len(t.agents[0].answers) == 1
        for t in soc.store.transcripts("iter-1/train").values():
            assert len(t.agents) == 3 and len(t.agents[0].answers) == 2
        scores = soc.store.iteration(1).scores
        assert scores is not None and scores.debate.n == 20


async def test_evaluation_agents_beyond_the_society_cycle_its_slots(write_recipe: Any, tmp_path: Path) -> None:
    recipe = write_recipe(**{"finetune.iterations": 0, "evaluation.agents": 5})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        slots = soc.eval_slots()
        assert [s.index for s in slots] == [0, 1, 2, 3, 4]
        assert slots[3].generator == soc.slots[0].generator and slots[4].critic == soc.slots[1].critic


async def test_zero_shot_transfer_evaluates_on_another_task(write_recipe: Any, tmp_path: Path) -> None:
    other = {"name": "arithmetic", "n_train": 5, "n_test": 12, "options": {"pattern": "a+b"}}
    recipe = write_recipe(**{"finetune.iterations": 1, "evaluation.task": other})
    async with Society.from_recipe(recipe, run_dir=tmp_path / "run", progress=False) as soc:
        await soc.run()
        evals = list(soc.store.transcripts("iter-1/eval").values())
        trains = list(soc.store.transcripts("iter-1/train").values())
    assert len(evals) == 12 and len(trains) == 20
    assert all(t.problem.question.count("+") == 1 and "*" not in t.problem.question for t in evals)
    assert all("*" in t.problem.question for t in trains)


def test_evaluation_section_is_validated() -> None:
    from conftest import mock_recipe

    from agentsoc.config import RecipeError

    with pytest.raises(RecipeError, match=r"evaluation\.agnets: unknown field"):
        recipe_from_dict(mock_recipe(**{"evaluation.agnets": 1}))
    with pytest.raises(RecipeError, match=r"evaluation\.temperature"):
        recipe_from_dict(mock_recipe(**{"evaluation.temperature": 3.0}))
