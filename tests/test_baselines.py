"""Every baseline is a recipe switch; each one's data flow on small mock runs; compare() resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import mock_recipe

from agentsoc.baselines import LABELS, METHODS, compare, cooperative_prompts, resolve, transfer, with_changes
from agentsoc.config import Recipe, RecipeError, recipe_from_dict
from agentsoc.society import Society
from agentsoc.star import HINT
from backends.mock import MockBrain


def recipe(**overrides: Any) -> Recipe:
    base = {"finetune.iterations": 1, **overrides}
    return recipe_from_dict(mock_recipe(**base), base_dir=Path("."))


def test_every_method_is_a_valid_recipe_transform_with_a_paper_row() -> None:
    r = recipe()
    names = set()
    for name, transform in METHODS.items():
        out = transform(r)
        assert isinstance(out, Recipe) and out.name == f"t-{name}"
        assert transform.__doc__ and LABELS[name]
        assert out.task == r.task and out.seed == r.seed  # same problems for every method
        names.add(out.fingerprint())
    assert len(names) == len(METHODS)
    assert {"ours", "base", "majority", "debate", "star", "majority_ft", "single_agent_ft"} <= set(METHODS)
    assert {"single_agent_ft_no_debate", "no_summary", "no_critic", "cooperative", "unique_id"} <= set(METHODS)
    assert {"agents_5", "single_agent_ft_t2"} <= set(METHODS)


def test_method_switches() -> None:
    r = recipe()
    b = METHODS["base"](r)
    assert (b.society.agents, b.society.rounds, b.finetune.iterations, b.society.models) == (1, 1, 0, ["mock:0.45"])
    m = METHODS["majority"](r)
    assert (m.society.agents, m.society.rounds, m.finetune.iterations) == (3, 1, 0)
    d = METHODS["debate"](r)
    assert (d.society.rounds, d.finetune.iterations, d.society.summarize) == (2, 0, True)
    s = METHODS["star"](r)
    assert (s.selection.label, s.selection.rationalize, s.society.rounds, s.finetune.share) == (
        "ground_truth",
        True,
        1,
        "all",
    )
    assert METHODS["majority_ft"](r).selection.label == "vote"
    assert METHODS["single_agent_ft"](r).finetune.share == "all"  # ONE model for every agent and round
    assert METHODS["shared_roles_ft"](r).finetune.share == "agents"
    nd = METHODS["single_agent_ft_no_debate"](r)
    assert nd.finetune.share == "all" and (nd.evaluation.agents, nd.evaluation.rounds) == (1, 1)
    assert nd.society.rounds == 2  # trained on debate data, evaluated alone
    assert METHODS["no_summary"](r).society.summarize is False
    assert METHODS["no_critic"](r).society.critic is False
    u = METHODS["unique_id"](r)
    assert u.society.unique_id and u.finetune.share == "all"
    five = METHODS["agents_5"](r)
    assert five.society.agents == 5 and len(five.society.base_models()) == 5
    # Table 4's other rows: the same baselines with 5 agents (heterogeneous models reused cyclically)
    d5 = METHODS["debate_agents_5"](r)
    assert (d5.society.agents, d5.society.rounds, d5.finetune.iterations) == (5, 2, 0)
    assert d5.society.base_models() == ["mock:0.45", "mock:0.5", "mock:0.55", "mock:0.45", "mock:0.5"]
    m5 = METHODS["majority_ft_agents_5"](r)
    assert (m5.society.agents, m5.society.rounds, m5.finetune.share, m5.finetune.iterations) == (5, 1, "all", 1)
    t2 = METHODS["single_agent_ft_t2"](r)
    assert t2.evaluation.temperature == 2.0 and t2.sampling.temperature == 1.0 and t2.finetune.share == "all"
    assert METHODS["cooperative_base"](r).finetune.iterations == 0
    moved = transfer(r, {"name": "arithmetic", "n_test": 7})
    assert moved.evaluation.task is not None and moved.evaluation.task.n_test == 7


def test_cooperative_prompts_ask_to_work_together_and_keep_the_answer_format() -> None:
    p = cooperative_prompts(recipe())
    assert "together" in p["debate_prefix"] and "together" in p["summary_message"]
    assert "state your answer at the end" in p["debate_suffix"]  # the task's answer-format sentence survives
    assert "{summary}" in p["summary_message"]
    custom = cooperative_prompts(recipe(**{"prompts": {"round0": "Compute {question}."}}))
    assert custom["round0"] == "Compute {question}."


def test_unknown_method_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="unknown method 'bogus'"):
        resolve(["ours", "bogus"])
    assert resolve(["ours", "base", "ours"]) == ["ours", "base"]


async def run(rec: Recipe, run_dir: Path) -> Society:
    soc = Society.from_recipe(rec, run_dir=run_dir, progress=False)
    async with soc:
        await soc.run()
    return soc


def spy_on_requests(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[str, str]]]:
    """Record every message list the mock brain is asked to answer."""
    seen: list[list[dict[str, str]]] = []
    original = MockBrain.reply

    def reply(self: MockBrain, model: str, messages: Any, seed: Any, temperature: float = 1.0) -> str:
        seen.append([dict(m) for m in messages])
        return original(self, model, messages, seed, temperature)

    monkeypatch.setattr(MockBrain, "reply", reply)
    return seen


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_single_agent_ft_trains_one_model_on_the_union_of_agents_data(tmp_path: Path) -> None:
    rec = METHODS["single_agent_ft"](recipe())
    async with Society.from_recipe(rec, run_dir=tmp_path / "s", progress=False) as soc:
        train = await soc.debate(soc.split.train, "iter-1/train")
        data = soc.select(train)
        sets = soc._write_datasets(1, data)
    assert set(sets) == {("all", "model")}  # one training set: every agent's generator and critic data
    assert len(sets[("all", "model")]) == sum(len(d.generator) + len(d.critic) for d in data) > 0
    soc = await run(rec, tmp_path / "run")
    assert len({m for s in soc.slots for m in (s.generator, s.critic)}) == 1  # every agent, every round


async def test_no_critic_uses_generators_in_every_round(tmp_path: Path) -> None:
    soc = await run(METHODS["no_critic"](recipe()), tmp_path / "run")
    store_dir = tmp_path / "run"
    from agentsoc.store import RunStore

    store = RunStore.open(store_dir)
    try:
        assert all(j.key.endswith("/generator") for j in store.jobs())
        for t in store.transcripts("iter-1/eval").values():
            for a in t.agents:
                assert a.models == (soc.slots[a.agent].generator,) * 2
    finally:
        store.close()


async def test_star_selects_by_ground_truth_and_rationalizes_without_the_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_on_requests(monkeypatch)
    rec = METHODS["star"](recipe(**{"society.models": ["mock:0.3"]}))
    run_dir = tmp_path / "run"
    await run(rec, run_dir)
    from agentsoc.store import RunStore

    store = RunStore.open(run_dir)
    try:
        rationalized = store.iteration(1).rationalized
        assert rationalized is not None
        train = store.transcripts("iter-1/train")
        assert sum(rationalized) > 0
        hinted = [r for r in seen if "Hint: the correct answer is" in r[-1]["content"]]
        assert len(hinted) >= sum(rationalized)  # wrong agents were re-asked with the answer as a hint
        assert not any(j.key.endswith("/critic") for j in store.jobs())  # one round: no critic data
        truths = {t.problem.question: t.problem.answer for t in train.values()}
    finally:
        store.close()
    examples = [ex for n in range(3) for ex in read_jsonl(run_dir / f"iter-1/data/agent-{n}-generator.jsonl")]
    # every training rationale ends on the ground truth (the vote would have let wrong answers in)...
    for ex in examples:
        user, assistant = ex["messages"][0]["content"], ex["messages"][-1]["content"]
        assert HINT.split("{")[0].strip() not in user  # ...and is trained on the prompt WITHOUT the hint
        question = next(q for q in truths if q in user)
        assert assistant.rstrip(".}").endswith(str(truths[question]))
    # more examples than the agents' own correct answers: rationalization added some
    own_right = sum(1 for t in train.values() for a in t.agents if a.first is not None and a.first == t.problem.answer)
    assert len(examples) == own_right + sum(rationalized)


async def test_majority_ft_has_no_critic_data_and_votes_independent_samples(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    await run(METHODS["majority_ft"](recipe()), run_dir)
    from agentsoc.store import RunStore

    store = RunStore.open(run_dir)
    try:
        assert all(d.size == 0 for d in store.datasets() if d.role == "critic")
        assert [j.key.rsplit("/", 2)[1:] for j in store.jobs()] == [["agent-all", "model"]]
        assert all(len(a.answers) == 1 for t in store.transcripts("iter-1/eval").values() for a in t.agents)
    finally:
        store.close()


async def test_unique_id_feeds_the_agent_id_in_debate_and_training_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = spy_on_requests(monkeypatch)
    run_dir = tmp_path / "run"
    await run(METHODS["unique_id"](recipe()), run_dir)
    gen = read_jsonl(run_dir / "iter-1/data/agent-1-generator.jsonl")
    cri = read_jsonl(run_dir / "iter-1/data/agent-1-critic.jsonl")
    assert gen and all(e["messages"][0] == {"role": "system", "content": "You are agent 2 (generator)."} for e in gen)
    assert cri and all(e["messages"][0] == {"role": "system", "content": "You are agent 2 (critic)."} for e in cri)
    from agentsoc.store import RunStore

    store = RunStore.open(run_dir)
    try:
        agent_calls = [
            r for r in seen if r[0]["role"] != "user" or "opinions from different agents" not in r[0]["content"]
        ]
        assert all(r[0]["role"] == "system" for r in agent_calls)  # every agent call carries its ID
        assert any(r[0]["content"] == "You are agent 3 (critic)." and len(r) == 4 for r in agent_calls)
        assert [j.key.rsplit("/", 2)[1:] for j in store.jobs()] == [["agent-all", "model"]]  # ONE model
    finally:
        store.close()


def sent(run_dir: Path) -> int:
    """Calls the mock server of ``run_dir`` answered."""
    log = run_dir / "server" / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


async def test_compare_runs_methods_on_the_same_problems_and_resumes(tmp_path: Path) -> None:
    rec = recipe()
    out = tmp_path / "cmp"
    results = await compare(rec, ["ours", "debate", "majority", "base"], out)
    by = {r.method: r for r in results}
    assert set(by) == {"ours", "debate", "majority", "base"} and (out / "compare.json").exists()
    from agentsoc.store import RunStore

    store = RunStore.open(out / "ours")
    try:
        scores = store.iteration(0).scores
        assert scores is not None and scores.debate == by["debate"].score  # same problems, same seeds
        eval_ids = set(store.transcripts("iter-0/eval"))
    finally:
        store.close()
    for name in ("debate", "majority", "base"):
        s = RunStore.open(out / name)
        try:
            assert set(s.transcripts("iter-0/eval")) == eval_ids
        finally:
            s.close()
    assert by["ours"].vs_reference is None and by["base"].vs_reference is not None
    assert by["base"].vs_reference.n == 20
    calls = sum(sent(out / n) for n in by)
    again = await compare(rec, ["ours", "debate", "majority", "base"], out)
    assert [r.score for r in again] == [r.score for r in results]
    assert sum(sent(out / n) for n in by) == calls


def test_with_changes_revalidates() -> None:
    with pytest.raises(ValueError, match="models"):
        with_changes(recipe(), None, **{"society.agents": 2})


async def test_compare_answers_a_call_another_method_paid_for_from_its_store(tmp_path: Path) -> None:
    rec = recipe()
    out = tmp_path / "cmp"
    await compare(rec, ["ours", "debate", "majority", "base"], out)
    # the base society's debate of the held-out problems is ours' iteration 0: nothing is sent again
    assert sent(out / "ours") > 0
    assert sent(out / "debate") == sent(out / "majority") == sent(out / "base") == 0
    # ... and each run directory is complete on its own, with the results of the method run alone
    await run(METHODS["debate"](rec), tmp_path / "debate-alone")
    assert sent(tmp_path / "debate-alone") > 0
    from agentsoc.store import RunStore

    a, b = RunStore.open(out / "debate", readonly=True), RunStore.open(tmp_path / "debate-alone", readonly=True)
    try:
        assert a.transcripts("iter-0/eval") == b.transcripts("iter-0/eval")
        assert a.count_calls() == b.count_calls()
    finally:
        a.close()
        b.close()
