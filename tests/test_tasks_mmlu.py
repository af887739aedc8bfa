"""MMLU: letter parsing (never a letter inside a word), CSV loading with located errors, preset."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from agentsoc.prompts import fill
from agentsoc.tasks import DataError, create
from agentsoc.tasks.mmlu import MmluTask, read_problems

PARSE_CASES = [
    ("The answer is (B).", "B"),
    ("Thus the correct option is (C)", "C"),
    ("**(B)**", "B"),
    ("Answer: C", "C"),
    ("**Answer:** D", "D"),
    ("Final answer: (a)", "A"),
    ("The answer is A.", "A"),
    ("The answer is **B**", "B"),
    ("So the answer would be D", "D"),
    ("(A) is wrong, (B) is wrong, so (D).", "D"),
    ("The answer is (B). Options (A), (C) and (D) are incorrect.", "B"),
    ("I first thought (A), but the others convinced me: (C)", "C"),
    ("\\boxed{C}", "C"),
    ("\\boxed{(D)}", "D"),
    ("After careful thought: B", "B"),
    ("After careful thought, B.", "B"),
    ("...therefore **C**", "C"),
    ("The answer is a bit tricky, but (D)", "D"),
    ("The answer is Definitely not obvious.", None),
    ("The answer is Both A and B? No: (A)", "A"),
    ("A cat sat on a mat.", None),
    ("Because of this, CAB", None),
    ("I cannot decide.", None),
    ("", None),
    ("(E)", None),
    ("Apples and Bananas", None),
    ("The answer is A-level physics? No.", None),
    ("answer: (c)", "C"),
    ("My answer is (B)\n\nExplanation: option (A) ignores friction.", "B"),
    ("Option (X) is a placeholder; the answer is (D)", "D"),
    ("The best choice is (A)", "A"),
    ("The answer is: B) Paris", "B"),
    ("It is caused by a lack of vitamin D.", None),
    ("Reasoning...\nB", "B"),
    ("Options:\nB\nare all plausible", None),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_answer(text: str, expected: str | None) -> None:
    assert MmluTask().parse_answer(text) == expected


#: critic replies that quote the other agents before giving their own letter. Written by hand (the bundled
#: model's demo debates arithmetic, not MMLU), after the way its arithmetic critics quote ("the same as the
#: previous agent's final answer") and the prompt's own "One agent solution" blocks.
CRITIC_CASES = [
    ("One agent's answer is (A), but the question asks about the long-run effect, so I conclude (C).", "C"),
    ("Agent 1: the answer is (B)\nAgent 2: the answer is (D)\nExamining both step by step, neither holds: (C)", "C"),
    ("My answer was (A). After examining the other agents' solutions, I now pick (C).", "C"),
    ("The answer is (B). Agent 3's answer is (A), which ignores friction.", "B"),
    ("According to the other agents, the answer is (D). Their reasoning skips step 2; I stay with (B) as before.", "B"),
    ("The answer is (B). One agent chose (A)", "B"),
    ("The other agents' answers were (A) and (B). My answer is (B) because the rate doubles.", "B"),
    ("Both agents chose (B), and I agree.", "B"),
    # issue 17: statements and choices the parser missed, and an option ruled out read as the answer
    ("The correct answer is option D", "D"),
    ("I'd go with D) 42 kg", "D"),
    ("Both agents chose B, and I agree", "B"),
    ("The best answer is C. Vitamin C deficiency causes bleeding gums, not scurvy (A).", "C"),
    ("The best answer is C. … not scurvy (A)", "C"),
    (
        "Agent 1 picked (A) and agent 2 picked (B). Examining it again, the mitochondria make ATP, so I choose (C).",
        "C",
    ),
    ("One agent's answer is (B), but that confuses mass with weight. The correct answer is option **D**.", "D"),
    ("After reviewing the other solutions, I'll go with B) Paris.", "B"),
    ("The other agents' answers were (A) and (D). I agree with the second agent: (D)", "D"),
    ("The answer is (B), rather than (C).", "B"),
    ("Both other agents selected (C), and after checking the math I also select (C).", "C"),
    ("It is not (A) but (C)", "C"),
    ("My final answer: **B**", "B"),
    ("Agent 2 went with C, which ignores the tax. I'd settle on A) 12%.", "A"),
]


@pytest.mark.parametrize(("text", "expected"), CRITIC_CASES)
def test_parse_critic_reply_takes_the_agents_own_answer(text: str, expected: str | None) -> None:
    assert MmluTask().parse_answer(text) == expected


def test_is_equivalent() -> None:
    task = MmluTask()
    assert task.is_equivalent("B", "B") and task.is_equivalent("b", "B") and task.is_equivalent("B", "b")
    assert not task.is_equivalent("A", "B")


def _write(path: Path, rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return path


def _rows(n: int, start: int = 0) -> list[list[str]]:
    return [[f"Question {i}?", f"a{i}", f"b{i}", f"c{i}", f"d{i}", "ABCD"[i % 4]] for i in range(start, n)]


def test_loads_a_file_and_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "test"
    folder.mkdir()
    _write(folder / "algebra_test.csv", _rows(10))
    _write(folder / "biology_test.csv", [["Multi-line\nquestion?", "x", "y", "z", "w", "d"], *_rows(15, start=10)])
    problems = read_problems(folder)
    assert len(problems) == 16
    assert problems[0].fields == {"a": "a0", "b": "b0", "c": "c0", "d": "d0"} and problems[0].answer == "A"
    assert problems[10].question == "Multi-line\nquestion?" and problems[10].answer == "D"
    task = create("mmlu", {"path": "test"}, base_dir=tmp_path)
    split = task.load(n_train=10, n_test=6, seed=0)
    assert not {p.question for p in split.train} & {p.question for p in split.test}


def test_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", [["Multi\nline?", "a", "b", "c", "d", "A"], ["q", "a", "b", "c", "A"]])
    with pytest.raises(DataError, match=r"bad\.csv:3: expected 6 columns"):
        read_problems(path)
    path = _write(tmp_path / "bad.csv", [*_rows(3), ["q", "a", "b", "c", "d", "E"]])
    with pytest.raises(DataError, match=r"bad\.csv:4: column 'answer': expected A, B, C or D, got 'E'"):
        read_problems(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.csv files"):
        read_problems(tmp_path / "empty")


def test_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"task 'mmlu': unknown option 'test_pth' \(did you mean 'test_path'\?\)"):
        create("mmlu", {"path": str(tmp_path), "test_pth": "x"})


def test_preset_renders_verbatim() -> None:
    prompts = MmluTask().prompts
    fields = {"question": "Capital of France", "a": "Paris", "b": "Rome", "c": "Oslo", "d": "Bern"}
    assert fill(prompts.round0, fields) == (
        "Can you answer the following question as accurately as possible? Capital of France: A) Paris, B) Rome, "
        "C) Oslo, D) Bern Explain your answer, putting the answer in the form (X) at the end of your response."
    )
    assert prompts.debate_prefix == "These are the solutions to the problem from other agents: "
    assert prompts.debate_block == "\n\n One agent solution: ```{other_response}```"
    assert prompts.debate_suffix == (
        "\n\n Using the reasoning from other agents as additional advice, can you give an updated answer? Examine "
        "your solution and that other agents step by step. Put your answer in the form (X) at the end of your response."
    )
    assert prompts.self_only == (
        "Can you double check that your answer is correct. Put your final answer in the form (X) at the end of your "
        "response."
    )
    assert prompts.summary_message.endswith(
        "Explain your reasoning. \n Put your answer in the form (X) at the end of your response."
    )
