"""Debate semantics: who sees what, in which round, with which model and seed."""

from __future__ import annotations

import re
from collections.abc import Sequence

from conftest import RecordingBackend

from agentsoc import tasks
from agentsoc.debate import DebateSettings, debate, debate_one
from agentsoc.prompts import PromptSet
from agentsoc.seeds import derive_seed
from agentsoc.tasks.base import Problem
from agentsoc.transcript import AgentSlot
from agentsoc.types import Completion, Message, ModelRef, Sampling

TASK = tasks.create("arithmetic", {})
PROMPTS = PromptSet(
    round0="Q: {question}",
    debate_prefix="OTHERS:",
    debate_block="[{other_response}]",
    debate_suffix=" REDO {question}",
    self_only="CHECK {question}",
    summarizer_prefix="SUMMARIZE:",
    summarizer_block="<{other_response}>",
    summarizer_suffix=" END",
    summary_message="SUMMARY {summary} REDO {question}",
)
PROBLEM = Problem(id="p1", question="1+2", answer="3")


def scripted(model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> str:
    """Agent answers name the model and the round, so inputs can be traced back to outputs."""
    if messages[-1].content.startswith("SUMMARIZE"):
        return "S(" + ",".join(re.findall(r"<(.*?)>", messages[-1].content)) + ")"
    round_ = (len(messages) - 1) // 2
    return f"{model} r{round_} answer {10 * round_ + int(model[-1])}"


def slots(n: int) -> list[AgentSlot]:
    return [AgentSlot(index=i, generator=f"gen{i}", critic=f"crit{i}") for i in range(n)]


async def test_round_m_sees_only_others_round_m_minus_1_answers() -> None:
    backend = RecordingBackend(scripted)
    settings = DebateSettings(rounds=3, summarize=False, summarizer="base", seed=7)
    t = await debate_one(backend, TASK, PROMPTS, slots(3), PROBLEM, settings)
    # agent 0's round-2 message holds agents 1 and 2's round-1 answers, in agent order, nothing else
    msg = t.agents[0].messages[4].content
    assert msg == "OTHERS:[crit1 r1 answer 11][crit2 r1 answer 12] REDO 1+2"
    # agent 2's round-1 message holds agents 0 and 1's round-0 answers
    assert t.agents[2].messages[2].content == "OTHERS:[gen0 r0 answer 0][gen1 r0 answer 1] REDO 1+2"
    # each agent keeps its own conversation: prompt, answer, prompt, answer, ...
    assert [m.role for m in t.agents[1].messages] == ["user", "assistant"] * 3
    assert t.agents[1].models == ("gen1", "crit1", "crit1")
    assert t.agents[1].answers == ("1", "11", "21")


async def test_summarizer_gets_others_previous_round_and_base_model() -> None:
    backend = RecordingBackend(scripted)
    settings = DebateSettings(rounds=2, summarize=True, summarizer="base", seed=0)
    t = await debate_one(backend, TASK, PROMPTS, slots(3), PROBLEM, settings)
    summarizer_calls = [c for c in backend.calls if c[0] == "base"]
    assert len(summarizer_calls) == 3  # one per receiving agent
    assert t.summaries == (
        (
            "S(gen1 r0 answer 1,gen2 r0 answer 2)",
            "S(gen0 r0 answer 0,gen2 r0 answer 2)",
            "S(gen0 r0 answer 0,gen1 r0 answer 1)",
        ),
    )
    assert t.agents[0].messages[2].content == "SUMMARY S(gen1 r0 answer 1,gen2 r0 answer 2) REDO 1+2"
    for _, messages, _ in summarizer_calls:
        assert len(messages) == 1  # a fresh single-turn chat


async def test_single_agent_double_checks_and_critic_switch() -> None:
    backend = RecordingBackend(scripted)
    t = await debate_one(backend, TASK, PROMPTS, slots(1), PROBLEM, DebateSettings(rounds=2, summarizer="b"))
    assert t.agents[0].messages[2].content == "CHECK 1+2"
    assert not [c for c in backend.calls if c[0] == "b"]  # nothing to summarize
    t = await debate_one(
        backend, TASK, PROMPTS, slots(2), PROBLEM, DebateSettings(rounds=2, critic=False, summarizer="b")
    )
    assert t.agents[1].models == ("gen1", "gen1")


async def test_seeds_differ_per_agent_round_and_are_reproducible() -> None:
    backend = RecordingBackend(scripted)
    settings = DebateSettings(rounds=2, summarize=True, summarizer="base", seed=3, phase="iter-1/train")
    await debate_one(backend, TASK, PROMPTS, slots(3), PROBLEM, settings)
    seeds = [c[2].seed for c in backend.calls]
    assert len(set(seeds)) == len(seeds) == 9  # 3 answers + 3 summaries + 3 answers
    first_round = [c[2].seed for c in backend.calls[:3]]
    assert first_round == [derive_seed(3, "iter-1/train", "p1", n, 0, "answer") for n in range(3)]
    again = RecordingBackend(scripted)
    await debate_one(again, TASK, PROMPTS, slots(3), PROBLEM, settings)
    assert [c[2].seed for c in again.calls] == seeds
    other_phase = RecordingBackend(scripted)
    await debate_one(other_phase, TASK, PROMPTS, slots(3), PROBLEM, settings.model_copy(update={"phase": "x"}))
    assert not set(c[2].seed for c in other_phase.calls) & set(seeds)


async def test_votes_per_round_and_many_problems() -> None:
    backend = RecordingBackend(lambda model, messages, s: "the answer is 3")
    problems = [Problem(id=f"p{i}", question=f"{i}+1", answer=str(i + 1)) for i in range(5)]
    done: list[str] = []
    out = await debate(
        backend,
        TASK,
        PROMPTS,
        slots(3),
        problems,
        DebateSettings(summarizer="b"),
        on_done=lambda t: done.append(t.problem.id),
    )
    assert [t.problem.id for t in out] == [p.id for p in problems]
    assert sorted(done) == sorted(p.id for p in problems)
    assert all(t.vote.answer == "3" and len(t.round_votes) == 2 for t in out)


async def test_a_reply_cut_off_at_max_tokens_abstains() -> None:
    class Truncating(RecordingBackend):
        async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
            out = await super().complete(model, messages, sampling)
            # agent 0 always runs out of tokens in the middle of its working
            return out.model_copy(update={"finish_reason": "length" if model.endswith("0") else "stop"})

    backend = Truncating(lambda model, messages, s: "7*8 = 56 and then 5" if model.endswith("0") else "it is 61")
    (t,) = await debate(
        backend,
        TASK,
        PROMPTS,
        slots(3),
        [Problem(id="p", question="7*8+5", answer="61")],
        DebateSettings(summarizer="b"),
    )
    assert [list(a.answers) for a in t.agents] == [[None, None], ["61", "61"], ["61", "61"]]
    assert t.vote.answer == "61"
