"""Arithmetic: generation (determinism, disjointness, ground truth), parsing and the prompt preset."""

from __future__ import annotations

import numpy as np
import pytest

from agentsoc.prompts import fill
from agentsoc.tasks import create
from agentsoc.tasks.arithmetic import ArithmeticTask, Options, evaluate

PARSE_CASES = [
    ("The result is 35.", "35"),
    ("3+4*5+6-7*8 = 3+20+6-56 = -27", "-27"),
    ("So the answer is −27.", "-27"),
    ("The final answer is **-27**.", "-27"),
    ("Answer: 1,234", "1234"),
    ("**Answer:** 550", "550"),
    ("The answer is $550$.", "550"),
    ("\\boxed{550}", "550"),
    ("We get \\boxed{-14} in the end", "-14"),
    ("550.", "550"),
    ("550.00", "550"),
    ("The answer is 42. I hope this helps with step 3.", "42"),
    ("Step 1: 4*5 = 20\nStep 2: 7*8 = 56\nStep 3: 3+20+6-56 = -27\nThe result is -27", "-27"),
    ("First 12*3 = 36, then 36+5 = 41.", "41"),
    ("The value is 10-3", "3"),
    ("Total: 3, 4", "4"),
    ("I don't know.", None),
    ("", None),
    ("The answer is twelve.", None),
    ("0", "0"),
    ("-0", "0"),
    ("Result = 1,000,000", "1000000"),
    ("answer: 3*4 = 12", "12"),
    ("The final result would be 99 (after subtracting).", "99"),
    ("We compute: 2 + 3 * 4 = 2 + 12 = 14. Therefore 14 is the result.", "14"),
    ("Result: **-5**", "-5"),
    ("The answer should be 7\n\nLet me know if you need anything else for problem 2.", "7"),
    ("The expression equals 25 - 30 = −5.", "-5"),
    ("It is 1.5", "1.5"),
    ("It is 2.50", "2.5"),
    ("My answer was 17, but after checking, the answer is 18.", "18"),
    ("\\boxed{x} so the result is 4", "4"),
    ("The result of 3+5*2 is 13.", "13"),
]


@pytest.mark.parametrize(("text", "expected"), PARSE_CASES)
def test_parse_answer(text: str, expected: str | None) -> None:
    assert ArithmeticTask(Options()).parse_answer(text) == expected


def test_is_equivalent_is_numeric_and_symmetric() -> None:
    task = ArithmeticTask(Options())
    for a, b, same in [("14", "14.0000001", True), ("14", "15", False), ("-3", "3", False), ("0.5", "1/2", True)]:
        assert task.is_equivalent(a, b) is same
        assert task.is_equivalent(b, a) is same


def test_generation_matches_reference_draws() -> None:
    split = ArithmeticTask(Options()).load(n_train=3, n_test=2, seed=0)
    rng = np.random.RandomState(0)
    a, b, c, d, e, f = (int(v) for v in rng.randint(0, 30, size=6))
    first = split.train[0]
    assert first.question == f"{a}+{b}*{c}+{d}-{e}*{f}"
    assert first.answer == str(a + b * c + d - e * f)


def test_generation_is_deterministic_and_seeded() -> None:
    task = ArithmeticTask(Options())
    assert task.load(20, 10, seed=3) == task.load(20, 10, seed=3)
    assert task.load(20, 10, seed=3).train != task.load(20, 10, seed=4).train


def test_generation_is_disjoint_and_duplicate_free() -> None:
    task = ArithmeticTask(Options(pattern="a+b", low=0, high=4))  # 16 possible problems
    split = task.load(n_train=10, n_test=6, seed=0)
    questions = [p.question for p in split.train + split.test]
    assert len(questions) == len(set(questions)) == 16
    assert len({p.id for p in split.train + split.test}) == 16


def test_too_many_problems_for_the_pattern() -> None:
    with pytest.raises(ValueError, match="only 16 distinct problems"):
        ArithmeticTask(Options(pattern="a+b", low=0, high=4)).load(n_train=10, n_test=7, seed=0)


def test_ground_truth_for_every_generated_problem() -> None:
    for problem in ArithmeticTask(Options(pattern="a*b-c", low=-5, high=5)).load(30, 10, seed=1).train:
        assert problem.answer == str(evaluate(problem.question))
        assert problem.id.startswith("arith-")


@pytest.mark.parametrize(("expression", "value"), [("2+3*4", 14), ("10-2*3-4", 0), ("3+-5", -2), ("7--2", 9)])
def test_evaluate(expression: str, value: int) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", ["__import__('os')", "2**8", "6/3", "1.5+1", "x+1"])
def test_evaluate_rejects_everything_but_integer_arithmetic(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expression)


def test_round0_prompt_shows_the_expression() -> None:
    task = create("arithmetic", {})
    problem = task.load(1, 0, seed=0).train[0]
    assert fill(task.prompts.round0, problem.template_fields()) == (
        f"What is the result of {problem.question}? Make sure to state your answer at the end of the response."
    )
    assert task.prompts.debate_prefix == "These are the recent/updated opinions from other agents: "
    assert task.prompts.debate_block == "\n\n One agent response: ```{other_response}```"
    assert task.prompts.debate_suffix == (
        "\n\n Use these opinions carefully as additional advice, can you provide an updated answer? "
        "Make sure to state your answer at the end of the response."
    )
    assert task.prompts.self_only == (
        "Can you verify that your answer is correct. Please reiterate your answer, making sure to state your "
        "answer at the end of the response."
    )
    assert task.prompts.summary_message.endswith(
        "Explain your reasoning. \n Make sure to state your answer at the end of the response."
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"patern": "a+b"}, "task 'arithmetic': unknown option 'patern' (did you mean 'pattern'?)"),
        ({"pattern": "a/b"}, "task 'arithmetic': option 'pattern'"),
        ({"low": 5, "high": 5}, "high (5) must be greater than low (5)"),
        ({"high": "many"}, "option 'high'"),
    ],
)
def test_option_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as info:
        create("arithmetic", options)
    assert message in str(info.value)
