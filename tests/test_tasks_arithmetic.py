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


#: critic replies (rounds >= 1), where the agent's own final statement must win over the other agents' answers
#: it restates. The first four are verbatim replies of the bundled Qwen2.5-Coder-0.5B: from the stored
#: transcripts of an `agentsoc demo --quick` run, and (the second) from a critic turn resampled on that run's
#: round-0 replies and summaries with the preset's "Explain your reasoning" summary message. The rest are
#: written in the phrasing of that run's summaries ("One agent's final answer is 117.", "The final answers
#: are 330 for agent 1 and 78 for agent 2.", "Both agents end up with 50 as the final answer.").
CRITIC_CASES = [
    # real: the "answer, it is" cue sits in a sentence about "the previous agent's final answer"; today's
    # parser read the 7 of the next line
    (
        "7 * 9 = 63\n63 * 5 = 315\n\\[63 + 15 = 78\\]\n\nThese solutions are provided by another agent. Since the "
        "final answer is the same as the previous agent's final answer, it is the same as the previous agent's "
        "solution.\n\nTherefore, the result of 7 * 9 + 3 * 5 is 78.",
        "78",
    ),
    # real: agent names ("Agent 5", "Agent 1") after the agent's own answer
    (
        "The reasoning is as follows:\n\n1. The initial value of the expression is 2*4=8.\n2. The expression then "
        "becomes 8+7*6=58.\n3. Therefore, the updated answer is 58.\n\nIn this updated answer, Agent 3 gave the "
        "same solution as Agent 1. In Agent 2, Agent 2 gave the same solution as Agent 1. In Agent 4, Agent 4 gave "
        "the same solution as Agent 1. In Agent 5, Agent 5 gave the same solution as Agent 1.\n\nThus, the updated "
        "answer is 58.",
        "58",
    ),
    ("9 * 3 + 3 * 3 = 9 + 9 = 18\n\nAnswer at the end: 18", "18"),  # real
    ("The updated answer is \\(117\\).", "117"),  # real, after "One agent's final answer is \\(117\\)."
    ("Agent 2's answer is 310, I get 312 as final", "312"),
    ("Agent 1: the answer is 57\nAgent 2: the answer is 49\n7*7 + 8*1 = 49 + 8 = 57", "57"),
    ("My answer is 78. Agent 1 says the answer is 330, which is wrong.", "78"),
    ("The answer was 310 at first.\nRechecking: 3*100 + 12 gives 312, so I get 312 as final.", "312"),
    ("The answer is 78.\nAccording to agent 1, the answer is 330, which forgets 3*5.", "78"),
    ("According to agent 1, the answer is 330.\nMy own working: 7*9 + 3*5 = 63 + 15 = 78", "78"),
    ("The final answers are 330 for agent 1 and 78 for agent 2. I agree with agent 2: 78.", "78"),
    ("The other agents' answers were 310 and 311, but my answer is 312.", "312"),
    ("Both agents end up with 50 as the final answer. 2*4 + 7*6 = 8 + 42 = 58", "58"),
    # an agent that only restates another adopts its answer; an agent's name is never one
    ("Agent 2's answer is 310 and I agree.", "310"),
    ("I agree with Agent 2.", None),
]


@pytest.mark.parametrize(("text", "expected"), CRITIC_CASES)
def test_parse_critic_reply_takes_the_agents_own_answer(text: str, expected: str | None) -> None:
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
