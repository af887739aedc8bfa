"""The summarization path of the debate, shared by every task's preset.

Only MATH has official MAFT prompts (algorithm.md §2.3). For the other tasks we follow the
reconstruction of §12: the MATH summarizer request is reused unchanged, and the summary message keeps
MATH's wording (typos included) but ends with the task's own answer-format sentence.
"""

from __future__ import annotations

SUMMARIZER_PREFIX = "Here are a list of opinions from different agents: "
SUMMARIZER_BLOCK = "\n\n One agent response: ```{other_response}```"
SUMMARIZER_SUFFIX = (
    "\n\n Write a summary of the different opinions from each of the individual agent and explain the "
    "reasoning in each solution."
)


def summary_message(answer_sentence: str) -> str:
    """MATH's round >= 1 summary message, ending with ``answer_sentence`` instead of MATH's."""
    return (
        "Here is a summary of solutions from several other agents: {summary}\n\n Examine each these solutions "
        "as additional advice, can solve {question} and give your updated answer? Explain your reasoning. \n "
        + answer_sentence
    )
