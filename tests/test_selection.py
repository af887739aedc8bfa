"""Data selection on hand-built transcripts: who gets which example, with which loss weights."""

from __future__ import annotations

import json
from pathlib import Path

from agentsoc.atomic import write_lines_atomic
from agentsoc.selection import select
from agentsoc.tasks.base import Problem
from agentsoc.transcript import AgentTrace, Transcript
from agentsoc.types import Message
from agentsoc.vote import majority_vote


def eq(a: str, b: str) -> bool:
    return a == b


def transcript(pid: str, answers: list[tuple[str | None, str | None]]) -> Transcript:
    """answers[n] = (round-0 answer, round-1 answer) of agent n; the vote is taken over round 1."""
    traces = []
    for n, (a0, a1) in enumerate(answers):
        msgs = (
            Message(role="user", content=f"q {pid}"),
            Message(role="assistant", content=f"agent {n} says {a0}"),
            Message(role="user", content="others said ..."),
            Message(role="assistant", content=f"agent {n} now says {a1}"),
        )
        traces.append(AgentTrace(agent=n, messages=msgs, answers=(a0, a1), models=("g", "c")))
    vote = majority_vote([a1 for _, a1 in answers], eq, seed=0, problem_id=pid)
    return Transcript(
        problem=Problem(id=pid, question=f"q {pid}", answer="ignored"),
        phase="x",
        agents=tuple(traces),
        vote=vote,
        round_votes=(vote, vote),
    )


TRANSCRIPTS = [
    # vote 5: a0 right throughout (G, C+); a1 corrected (C-); a2 wrong at the end (nothing)
    transcript("p1", [("5", "5"), ("4", "5"), ("5", "6")]),
    # vote 7: a0 corrected from unparseable (C-); a1 right throughout; a2 right throughout
    transcript("p2", [(None, "7"), ("7", "7"), ("7", "7")]),
    # no parseable final answer: no vote, no data for anyone
    transcript("p3", [("1", None), ("2", None), ("3", None)]),
]


def test_counts_per_agent_use_only_own_turns_and_the_vote() -> None:
    data = select(TRANSCRIPTS, 3, eq, critic_mix=0.5)
    assert [len(d.generator) for d in data] == [1, 1, 2]
    assert [(d.critic_minus, d.critic_plus_available) for d in data] == [(1, 1), (1, 1), (0, 1)]
    # w = 0.5: as many C+ as C-, when available; agent 2 has no C- and therefore no critic data
    assert [len(d.critic) for d in data] == [2, 2, 0]
    assert all(
        "agent 0" in m.content
        for ex in data[0].generator + data[0].critic
        for m in ex.messages
        if m.role == "assistant"
    )


def test_generator_examples_are_round0_pairs() -> None:
    data = select(TRANSCRIPTS, 3, eq)
    ex = data[1].generator[0]
    assert [m.role for m in ex.messages] == ["user", "assistant"]
    assert ex.messages[1].content == "agent 1 says 7"


def test_critic_loss_weights() -> None:
    later = select(TRANSCRIPTS, 3, eq, critic_mix=0.5)[1].critic
    assert all([m.weight for m in ex.messages if m.role == "assistant"] == [0.0, 1.0] for ex in later)
    faithful = select(TRANSCRIPTS, 3, eq, critic_mix=0.5, critic_loss="all_turns")[1].critic
    assert all([m.weight for m in ex.messages if m.role == "assistant"] == [1.0, 1.0] for ex in faithful)


def test_mix_weight_sets_share_of_corrected_trajectories() -> None:
    many = [transcript(f"m{i}", [("1", "2"), ("2", "2"), ("2", "2")]) for i in range(6)]  # a0: C- x6
    many += [transcript(f"p{i}", [("2", "2"), ("2", "2"), ("3", "2")]) for i in range(10)]  # a0: C+ x10
    for w, expected_plus in [(2 / 3, 3), (0.5, 6), (1.0, 0), (0.25, 10)]:
        d = select(many, 3, eq, critic_mix=w)[0]
        assert d.critic_minus == 6 and d.critic_plus_used == expected_plus, w
        assert len(d.critic) == 6 + expected_plus
    # the draw is seeded: same data on every call, different with another seed
    a = select(many, 3, eq, critic_mix=0.5, seed=1)[0].critic
    assert a == select(many, 3, eq, critic_mix=0.5, seed=1)[0].critic


def test_jsonl_is_openai_chat_format_with_weights(tmp_path: Path) -> None:
    d = select(TRANSCRIPTS, 3, eq, critic_mix=0.5)[0]
    path = tmp_path / "agent-0-critic.jsonl"
    write_lines_atomic(path, [json.dumps(e.to_openai()) for e in d.critic])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row) == {"messages"}
        roles = [m["role"] for m in row["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]
        assert [m.get("weight") for m in row["messages"]] == [None, 0, None, 1]
