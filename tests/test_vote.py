from __future__ import annotations

from agentsoc.vote import majority_vote


def eq(a: str, b: str) -> bool:
    return float(a) == float(b)


def test_majority_over_equivalence_clusters() -> None:
    v = majority_vote(["2", "2.0", "3"], eq, seed=0, problem_id="p")
    assert v.answer == "2" and not v.tie and v.support == 2
    assert [c.members for c in v.clusters] == [(0, 1), (2,)]


def test_unparseable_answers_do_not_vote() -> None:
    assert majority_vote([None, None, "5"], eq, seed=0, problem_id="p").answer == "5"
    none = majority_vote([None, None], eq, seed=0, problem_id="p")
    assert none.answer is None and none.clusters == ()


def test_ties_are_seeded_reproducible_and_not_always_the_first_agent() -> None:
    winners = [majority_vote(["1", "2", "3"], eq, seed=0, problem_id=f"p{i}").answer for i in range(40)]
    assert set(winners) == {"1", "2", "3"}  # no agent is favoured systematically
    again = [majority_vote(["1", "2", "3"], eq, seed=0, problem_id=f"p{i}").answer for i in range(40)]
    assert winners == again
    v = majority_vote(["1", "2"], eq, seed=0, problem_id="p0")
    assert v.tie
