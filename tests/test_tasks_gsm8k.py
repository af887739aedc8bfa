"""GSM8K: number parsing (the reference bugs of algorithm.md §11.2 fixed), loading, splits, preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agentsoc.prompts import fill
from agentsoc.tasks import DataError, create
from agentsoc.tasks.gsm8k import Gsm8kTask, read_problems

PARSE_CASES = [
    ("She has 18 dollars left. The answer is \\boxed{18}.", "18"),
    ("\\boxed{1,234}", "1234"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{\\$18.50}", "18.5"),
    ("\\boxed{-5}", "-5"),
    ("\\boxed{−5}", "-5"),
    ("\\boxed{12\\%}", "12"),
    ("\\boxed{18 \\text{ dollars}}", "18"),
    ("\\boxed{\\frac{3}{4}}", "0.75"),
    ("\\boxed{\\dfrac{1}{3}}", "1/3"),
    ("The answer is \\boxed{3}, earlier I wrote \\boxed{2}", "2"),
    ("Answer: $1,200.50", "1200.5"),
    ("The answer is 12%.", "12"),
    ("He loses 5 dollars, so the change is -5.", "-5"),
    ("The temperature drops to −3 degrees.", "-3"),
    ("Janet sells 16 - 3 - 4 = 9 eggs, making 9 * 2 = $18 a day.", "18"),
    ("The answers for the two parts are 3, 4", "4"),
    ("He buys 3,4 and 5 apples.", "5"),
    ("The total is **550** dollars.", "550"),
    ("The total is 550.", "550"),
    ("The total is 550.00", "550"),
    ("So she earns $1,234,567 in total.", "1234567"),
    ("Final answer: 0.5", "0.5"),
    ("Final answer: 007", "7"),
    ("The answer is 72. Let me know if you have questions about step 2.", "72"),
    ("Step 1: 48/2 = 24\nStep 2: 48 + 24 = 72\nNatalia sold 72 clips in April and May.", "72"),
    ("Therefore x = 10 hours for 2 days.", "10"),
    ("There is no way to know.", None),
    ("", None),
    ("\\boxed{}", None),
    ("The answer is \\boxed{12", "12"),
    ("1,2345", "2345"),
    ("The ratio is 10-3", "3"),
    ("She pays $-5$? No, she receives \\boxed{5}", "5"),
    ("The result is 3.14159", "3.14159"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_answer(text: str, expected: str | None) -> None:
    assert Gsm8kTask().parse_answer(text) == expected


#: critic replies that restate another agent's answer (written in the phrasing the local model's critics and
#: summaries use, see tests/test_tasks_arithmetic.py), and questions whose people and agents are no debaters
CRITIC_CASES = [
    (
        "One agent's answer is 20 dollars, since it forgot the 4 muffins. Janet sells 16 - 3 - 4 = 9 eggs, so she "
        "makes 9 * 2 = 18 dollars.",
        "18",
    ),
    ("My answer is 18. The first agent's result was 20 because it forgot the muffins.", "18"),
    ("Their answer is $20, but the muffins use 4 eggs: the answer is $18.", "18"),
    ("The agent gets 3% of $200,000, so the answer is 6000.", "6000"),
    ("She gets 9 eggs to sell, so she makes $18.", "18"),
    ("They get 3 each, so in total 6.", "6"),
    ("He gives 3 to others and has 5 left.", "5"),
]


@pytest.mark.parametrize(("text", "expected"), CRITIC_CASES)
def test_parse_critic_reply_takes_the_agents_own_answer(text: str, expected: str | None) -> None:
    assert Gsm8kTask().parse_answer(text) == expected


#: issue 17: a critic that quotes another agent's \boxed{} is read as its own box, never the quoted one; and
#: thousands grouped by spaces (plain, thin, no-break, LaTeX ``\,``) are one number
OWN_BOX_AND_SPACES_CASES = [
    ("My answer is \\boxed{18}. Agent 2's \\boxed{20} is incorrect", "18"),
    ("My answer is \\boxed{18}. Agent 2's \\boxed{20} is incorrect because it forgot the 4 muffins.", "18"),
    (
        "Agent 2's $\\boxed{20}$ double-counts the muffins. Janet sells 16 - 3 - 4 = 9 eggs at $2 each, so she makes "
        "\\boxed{18} dollars.",
        "18",
    ),
    (
        "Looking at the other agents' solutions: one agent got \\boxed{20} and another got \\boxed{18}. Recomputing: "
        "16 - 3 - 4 = 9 eggs, 9 * 2 = 18.\n\nFinal answer: \\boxed{18}",
        "18",
    ),
    ("Agent 1's answer, \\boxed{20}, is wrong: she uses 4 eggs for muffins. 9 * 2 = 18, so the answer is 18.", "18"),
    ("I get \\boxed{7}, whereas Agent 3's \\boxed{8} counts the last day twice.", "7"),
    ("Both agents got \\boxed{18}, and I agree.", "18"),  # nothing of its own: it adopts what it quotes
    ("The distance is 1 000 000 meters.", "1000000"),
    ("So the answer is 1 000 000.", "1000000"),
    ("The distance is 1 000 000 meters, so the answer is \\boxed{1 000 000}.", "1000000"),
    ("In total the company earns 1\u2009250\u2009000 dollars.", "1250000"),
    ("The population grows to 2\u202f400 people.", "2400"),
    ("It costs 3\u00a0500 dollars.", "3500"),
    ("He pays $1\\,200 in rent.", "1200"),
    ("So the farmer has 1 500 chickens.", "1500"),
    ("Agent 2 says the total is 1 000; after adding the 200 bonus I get 1 200.", "1200"),
    ("The numbers 3 4 5 add up to 12.", "12"),  # single digits are a list, not thousands
    ("She buys 12 345 678 stamps? No: 12 packs of 345 stamps, so 4140.", "4140"),
]


@pytest.mark.parametrize(("text", "expected"), OWN_BOX_AND_SPACES_CASES)
def test_own_box_wins_and_spaced_thousands(text: str, expected: str | None) -> None:
    assert Gsm8kTask().parse_answer(text) == expected


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [("18", "18.0", True), ("18", "18.0000001", True), ("18", "18.01", False), ("-5", "5", False),
     ("0.75", "3/4", True), ("1/3", "0.333333", True), ("1/3", "0.33", False), ("x", "x", True), ("x", "1", False)],
)  # fmt: skip
def test_is_equivalent_with_tolerance_and_symmetric(a: str, b: str, same: bool) -> None:
    task = Gsm8kTask()
    assert task.is_equivalent(a, b) is same
    assert task.is_equivalent(b, a) is same


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1:,}"} for i in range(start, n)]


def test_ground_truth_after_hashes(tmp_path: Path) -> None:
    path = _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "lots of work\n#### -1,200"}])
    assert read_problems(path)[0].answer == "-1200"


def test_split_from_one_file_is_seeded_and_disjoint(tmp_path: Path) -> None:
    _write(tmp_path / "gsm.jsonl", _rows(50) + _rows(5))  # five duplicate questions
    task = create("gsm8k", {"path": "gsm.jsonl"}, base_dir=tmp_path)
    split = task.load(n_train=30, n_test=20, seed=0)
    assert len(split.train) == 30 and len(split.test) == 20
    assert not {p.question for p in split.train} & {p.question for p in split.test}
    assert split == task.load(n_train=30, n_test=20, seed=0)
    assert split != task.load(n_train=30, n_test=20, seed=1)
    with pytest.raises(DataError, match=r"gsm\.jsonl has 50 distinct problems, fewer than n_train \+ n_test"):
        task.load(n_train=30, n_test=21, seed=0)


def test_split_with_test_file_drops_overlap(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", _rows(10))
    _write(tmp_path / "test.jsonl", _rows(20, start=5))  # 5 questions shared with train
    task = create("gsm8k", {"path": "train.jsonl", "test_path": "test.jsonl"}, base_dir=tmp_path)
    split = task.load(n_train=4, n_test=10, seed=0)
    assert len(split.test) == 10
    assert all(int(p.answer or 0) > 6 for p in split.test)
    assert split.test == task.load(n_train=8, n_test=10, seed=0).test  # held-out set independent of n_train
    with pytest.raises(DataError, match=r"test\.jsonl has 10 distinct problems, fewer than n_test = 11"):
        task.load(n_train=4, n_test=11, seed=0)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "answer": "4"}', "field 'answer': no final '#### <number>' line"),
        ('{"question": "q"}', "field 'answer': missing"),
        ('{"answer": "#### 4"}', "field 'question': missing"),
        ('{"question": 3, "answer": "#### 4"}', "field 'question': expected a non-empty string"),
        ('{"question": "q", "answer": "#### four"}', "field 'answer'"),
        ('{"question": "q", answer: 1}', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "fine", "answer": "#### 1"})
    path.write_text(f"{good}\n\n{good.replace('fine', 'ok')}\n{line}\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_problems(path)
    assert f"bad.jsonl:4: {message}" in str(info.value)


def test_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^task 'gsm8k': .*unknown option 'pth' \(did you mean 'path'\?\)"):
        create("gsm8k", {"pth": "x.jsonl"})
    with pytest.raises(ValueError, match="task 'gsm8k': option 'path': missing; give a local file, or 'hf_dataset'"):
        create("gsm8k", {})
    with pytest.raises(ValueError, match=r"task 'gsm8k': option 'path': no such file or directory: .*nope\.jsonl"):
        create("gsm8k", {"path": "nope.jsonl"}, base_dir=tmp_path)


def test_preset_renders_verbatim() -> None:
    prompts = Gsm8kTask().prompts
    fields = {"question": "What is 2+2?"}
    assert fill(prompts.round0, fields) == (
        "Can you solve the following math problem? What is 2+2? Explain your reasoning. Your final answer should "
        "be a single numerical number, in the form \\boxed{answer}, at the end of your response. "
    )
    assert prompts.debate_prefix == "These are the solutions to the problem from other agents: "
    assert prompts.debate_block == "\n\n One agent solution: ```{other_response}```"
    assert fill(prompts.debate_suffix, fields) == (
        "\n\n Using the solutions from other agents as additional information, can you provide your answer to the "
        "math problem? \n The original math problem is What is 2+2?. Your final answer should be a single "
        "numerical number, in the form \\boxed{answer}, at the end of your response."
    )
    assert prompts.self_only == (
        "Can you double check that your answer is correct. Please reiterate your answer, with your final answer a "
        "single numerical number, in the form \\boxed{answer}."
    )
    assert fill(prompts.summary_message, {**fields, "summary": "S"}) == (
        "Here is a summary of solutions from several other agents: S\n\n Examine each these solutions as additional "
        "advice, can solve What is 2+2? and give your updated answer? Explain your reasoning. \n Your final answer "
        "should be a single numerical number, in the form \\boxed{answer}, at the end of your response."
    )
