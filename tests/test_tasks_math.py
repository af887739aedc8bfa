"""MATH: boxed-answer parsing, PRM800K-level normalisation, sympy equivalence, loading, preset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agentsoc.prompts import fill
from agentsoc.tasks import DataError, create
from agentsoc.tasks.boxed import last_boxed
from agentsoc.tasks.math import MathTask, read_problems
from agentsoc.tasks.math_equiv import is_equivalent, normalize

PARSE_CASES = [
    ("So the answer is \\boxed{5}.", "5"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac12}", "\\frac{1}{2}"),
    ("\\boxed{\\tfrac{3}{4}}", "\\frac{3}{4}"),
    ("First \\boxed{3}, then corrected: \\boxed{4}", "4"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{10\\text{ cm}}", "10"),
    ("\\boxed{90^\\circ}", "90"),
    ("\\boxed{90^{\\circ}}", "90"),
    ("\\boxed{\\$1,000}", "1000"),
    ("\\boxed{1{,}000}", "1000"),
    ("\\boxed{50\\%}", "50"),
    ("\\boxed{\\left(1, 2\\right)}", "(1,2)"),
    ("\\boxed{ 2 \\sqrt 3 }", "2\\sqrt{3}"),
    ("\\boxed{\\text{(C)}}", "(C)"),
    ("\\boxed{007}", "7"),
    ("\\boxed{5.}", "5"),
    ("\\boxed{5.50}", "5.5"),
    ("\\boxed{.5}", "0.5"),
    ("\\boxed{3/4}", "\\frac{3}{4}"),
    ("\\boxed{-3/4}", "-\\frac{3}{4}"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
    ("The answer is $\\boxed 5$.", "5"),
    ("\\fbox{7}", "7"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
    ("\\boxed{{5}}", "5"),
    ("\\boxed{\\textbf{Evelyn}}", "Evelyn"),
    ("\\boxed{[0, \\infty)}", "[0,\\infty)"),
    ("\\boxed{k = 2}", "2"),
    ("\\boxed{5 \\text{ square units}}", "5"),
    ("no box here, the answer is 5", None),
    ("\\boxed{}", None),
    ("\\boxed{unclosed", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_answer(text: str, expected: str | None) -> None:
    assert MathTask().parse_answer(text) == expected


#: issue 17: critic replies that quote other agents' boxes before (or after) their own
CRITIC_CASES = [
    ("My answer is \\boxed{18}. Agent 2's \\boxed{20} is incorrect", "18"),
    (
        "Agent 1 concluded $\\boxed{\\frac{1}{2}}$, but the probability of two heads is $\\frac{1}{4}$. "
        "Final answer: $\\boxed{\\frac{1}{4}}$",
        "\\frac{1}{4}",
    ),
    ("- Agent 1: \\boxed{3}\n- Agent 2: \\boxed{5}\n- My check: $x^2 = 9$ gives $x = 3$.\n\n\\boxed{3}", "3"),
    ("- Agent 1: \\boxed{3}\n- Agent 2: \\boxed{5}\n\nI agree with agent 1, since $x = 3$: \\boxed{3}", "3"),
    (
        "The other agents' answer of $\\boxed{12}$ misses the case $x=0$. Counting it, there are $\\boxed{13}$ "
        "solutions.",
        "13",
    ),
    ("I get \\boxed{7}, whereas Agent 3's \\boxed{8} counts the endpoint twice.", "7"),
    ("My final answer is $\\boxed{(2, 3)}$. One agent's answer, $\\boxed{(3, 2)}$, swaps the coordinates.", "(2,3)"),
    ("Both agents arrived at $\\boxed{5}$, and I agree.", "5"),  # nothing of its own: it adopts what it quotes
]


@pytest.mark.parametrize(("text", "expected"), CRITIC_CASES)
def test_parse_critic_reply_takes_the_agents_own_box(text: str, expected: str) -> None:
    task = MathTask()
    parsed = task.parse_answer(text)
    assert parsed is not None and task.is_equivalent(parsed, expected)


EQUIVALENT = [
    ("\\frac{1}{2}", "0.5"),
    ("\\frac12", "\\dfrac{1}{2}"),
    ("-\\frac{1}{2}", "-0.5"),
    ("\\frac{3}{6}", "\\frac{1}{2}"),
    ("0.25", "1/4"),
    ("x=5", "5"),
    ("10\\text{ cm}", "10"),
    ("90^\\circ", "90"),
    ("\\$1,000", "1000"),
    ("1,000", "1000"),
    ("3", "3.0"),
    ("007", "7"),
    ("(1,2)", "(1, 2)"),
    ("\\left(3,\\frac{1}{2}\\right)", "(3,0.5)"),
    ("[0,\\infty)", "[0, \\infty)"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("\\sqrt2", "\\sqrt{2}"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}{2}"),
    ("\\frac{\\pi}{2}", "\\pi/2"),
    ("x+1", "1+x"),
    ("2x+3", "3+2x"),
    ("2(x+1)", "2x+2"),
    ("x^2-1", "(x-1)(x+1)"),
    ("\\sqrt[3]{8}", "2"),
    ("\\text{(C)}", "(C)"),
    ("\\text{Evelyn}", "Evelyn"),
    ("5\\%", "5"),
    ("6\\cdot 7", "42"),
    ("1 \\text{ and } 2", "1, 2"),
    ("3 \\times 10^{2}", "300"),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"),
]

NOT_EQUIVALENT = [
    ("\\frac{1}{3}", "0.333"),
    ("(1,2)", "(2,1)"),
    ("[0,1)", "[0,1]"),
    ("(1,2)", "(1,2,3)"),
    ("(1,2)", "1"),
    ("5", "-5"),
    ("\\text{Alice}", "\\text{Celia}"),  # sympy would multiply letters: an anagram is not the same name
    ("x+1", "x-1"),
    ("\\sqrt{2}", "1.414"),
    ("2^{10^{10}}", "1"),
    ("\\frac{1}{0}", "\\frac{1}{0} + 1"),
    ("\\sin x", "\\cos x"),
    ("\\infty", "-\\infty"),
    ("x", "y"),
    ("1\\text{ and }2", "12"),
    ("1" * 120, "1" * 119 + "2"),
]


@pytest.mark.parametrize(("a", "b"), EQUIVALENT)
def test_equivalent_pairs(a: str, b: str) -> None:
    assert is_equivalent(a, b)
    assert is_equivalent(b, a)


@pytest.mark.parametrize(("a", "b"), NOT_EQUIVALENT)
def test_not_equivalent_pairs(a: str, b: str) -> None:
    assert not is_equivalent(a, b)
    assert not is_equivalent(b, a)


@pytest.mark.parametrize("answer", [a for pair in EQUIVALENT + NOT_EQUIVALENT for a in pair])
def test_normalize_is_idempotent(answer: str) -> None:
    assert normalize(normalize(answer)) == normalize(answer)


def test_hostile_answers_are_fast_and_never_crash() -> None:
    start = time.perf_counter()
    for a, b in [
        ("10^{10^{10}}", "10^{10^{10}}+1"),
        ("((((", ")))"),
        ("\\frac{", "}"),
        ("^^", "__"),
        ("x^{x^{x}}", "1"),
    ]:
        assert is_equivalent(a, b) is False
    assert time.perf_counter() - start < 5


def test_last_boxed_balances_braces() -> None:
    assert last_boxed("\\boxed{\\frac{a}{b}} and \\boxed{\\sqrt{\\frac{1}{2}}}") == "\\sqrt{\\frac{1}{2}}"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"
    assert last_boxed("\\boxedx") is None


def _record(i: int, level: int = 1) -> dict[str, str]:
    return {
        "problem": f"Compute ${i}+1$.",
        "solution": f"We add: ${i}+1=\\boxed{{{i + 1}}}$.",
        "level": f"Level {level}",
        "type": "Algebra",
    }


def test_loads_jsonl_and_json_list_with_levels(tmp_path: Path) -> None:
    records = [_record(i, level=i % 5 + 1) for i in range(50)] + [{**_record(99), "level": "Level ?"}]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (tmp_path / "math.json").write_text(json.dumps(records), encoding="utf-8")
    for name in ("math.jsonl", "math.json"):
        everything = read_problems(tmp_path / name)
        assert len(everything) == 51
        easy = read_problems(tmp_path / name, levels=(1, 2, 3))
        assert len(easy) == 30
        assert {p.fields["level"] for p in easy} == {"Level 1", "Level 2", "Level 3"}
        assert easy[0].answer == "1" and easy[0].fields["type"] == "Algebra"
    task = create("math", {"path": "math.jsonl", "levels": [1, 2, 3]}, base_dir=tmp_path)
    split = task.load(n_train=20, n_test=10, seed=0)
    assert all(task.is_equivalent(p.answer or "", str(int(p.question[9:-4]) + 1)) for p in split.train + split.test)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"problem": "p", "solution": "no box", "level": "Level 1", "type": "Algebra"}\n',
         "math.jsonl:2: field 'solution': no \\boxed{...} answer"),
        ('{"problem": "p", "level": "Level 1", "type": "Algebra"}\n', "math.jsonl:2: field 'solution': missing"),
        ("not json\n", "math.jsonl:2: invalid JSON"),
    ],
)  # fmt: skip
def test_bad_records_name_file_line_and_field(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "math.jsonl"
    path.write_text(json.dumps(_record(1)) + "\n" + content, encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_problems(path)
    assert message in str(info.value)


def test_level_may_be_a_number_and_is_required_only_for_filtering(tmp_path: Path) -> None:
    path = tmp_path / "math.jsonl"
    rows = [{**_record(1), "level": 2}, {"problem": "p", "solution": "\\boxed{1}"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [p.fields["level"] for p in read_problems(path)] == ["Level 2", ""]
    with pytest.raises(DataError, match=r"math\.jsonl:2: field 'level': missing"):
        read_problems(path, levels=(2,))


def test_bad_json_list_item_is_located(tmp_path: Path) -> None:
    path = tmp_path / "math.json"
    path.write_text(json.dumps([_record(1), {"problem": "p"}]), encoding="utf-8")
    with pytest.raises(DataError, match=r"math\.json: item 1: field 'solution': missing"):
        read_problems(path)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"path": "m.jsonl", "levels": [0]}, "task 'math': option 'levels': Value error, expected a non-empty list"),
        ({"path": "m.jsonl", "level": [1]}, "task 'math': unknown option 'level' (did you mean 'levels'?)"),
        ({"path": "m.jsonl", "test_path": "missing.jsonl"}, "task 'math': option 'test_path': no such file"),
    ],
)
def test_option_errors(tmp_path: Path, options: dict[str, object], message: str) -> None:
    (tmp_path / "m.jsonl").write_text(json.dumps(_record(1)) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        create("math", options, base_dir=tmp_path)
    assert message in str(info.value)


def test_preset_is_the_maft_text() -> None:
    prompts = MathTask().prompts
    fields = {"question": "What is $1+1$?"}
    assert fill(prompts.round0, fields) == (
        "Can you solve the following math problem? What is $1+1$? Provide a bullet point summary of your reasoning. "
        "Your final answer should be a single answer, in the form \\boxed{answer}, at the end of your response."
    )
    assert prompts.debate_prefix == "Here is are solution from other agents: "
    assert prompts.debate_block == "\n\n One agent response: {other_response}"
    assert fill(prompts.debate_suffix, fields) == (
        "\n\n Using each response as additional advice, can you give an updated bullet by bullet answer to "
        "What is $1+1$?? Your final answer should be be in the form \\boxed{answer} given at the end of your response."
    )
    assert prompts.self_only == (
        "Can you double check that your answer is correct? Please reiterate your answer, with your final answer a "
        "single answer of the form \\boxed{answer} at the end of your response."
    )
    assert prompts.summarizer_prefix == "Here are a list of opinions from different agents: "
    assert prompts.summarizer_block == "\n\n One agent response: ```{other_response}```"
    assert prompts.summarizer_suffix == (
        "\n\n Write a summary of the different opinions from each of the individual agent and explain the reasoning "
        "in each solution."
    )
    assert fill(prompts.summary_message, {**fields, "summary": "S"}) == (
        "Here is a summary of solutions from several other agents: S\n\n Examine each these solutions as additional "
        "advice, can solve What is $1+1$? and give your updated answer? Explain your reasoning. \n Your final answer "
        "should be be in the form \\boxed{answer} given at the end of your response."
    )
