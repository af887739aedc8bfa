"""Attribution: which parts of a critic reply restate another agent (the parsers skip them), which do not."""

from __future__ import annotations

import pytest

from agentsoc.tasks.attribution import quoted_spans, within


def _quoted(text: str, part: str) -> bool:
    """Whether the first occurrence of ``part`` in ``text`` starts inside a restatement."""
    return within(quoted_spans(text), text.index(part))


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("Agent 2's answer is 310, I get 312 as final", "310"),
        ("one agent's answer is (A)", "(A)"),
        ("The other agents' answers were 310 and 311.", "311"),
        ("their answer is 5; mine is 6", "5"),
        ("Agent 1: answer is 42\nMy answer: 40", "42"),
        ("Agent 1: I think 42.", "42"),
        ("- **Agent 2's response**: 40", "40"),
        ("Agent 2 says the answer is 310.", "310"),
        ("Both agents, on the other hand, got 310.", "310"),
        ("The summary states 117.", "117"),
        ("According to Agent 2, the answer is 310.", "310"),
        ("For agent 1, the result is 42.", "42"),
        ("The final answers are 330 for agent 1 and 78 for agent 2.", "330"),
        ("The final answers are 330 for agent 1 and 78 for agent 2.", "78"),
        ("I agree with Agent 2.", "2"),
    ],
)
def test_restatements_of_other_agents(text: str, part: str) -> None:
    assert _quoted(text, part)


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("Agent 2's answer is 310, I get 312 as final", "312"),
        ("The other agents' answers were 310 and 311, but my answer is 312.", "312"),
        ("Agent 2's answer is wrong, the correct answer is 312.", "312"),
        ("Agent 1: answer is 42. So the answer is 40.", "40"),
        ("Based on the other agents' solutions, the answer is 312.", "312"),
        ("Using the reasoning from other agents as additional advice, the answer is 312.", "312"),
        ("I agree with Agent 2 that the answer is 310.", "310"),
        ("In summary, the answer is 312.", "312"),
        ("In other words, the answer is 3.", "3"),
        ("Summary: 2*4 + 7*6 = 58", "58"),
        # the people and agents of GSM8K and MMLU questions are no debaters
        ("She gets 9 eggs, so they have 18.", "18"),
        ("A real estate agent gets 3% of $200,000, that is 6000.", "6000"),
        ("The oxidizing agent has (B) as its product.", "(B)"),
    ],
)
def test_own_statements(text: str, part: str) -> None:
    assert not _quoted(text, part)
