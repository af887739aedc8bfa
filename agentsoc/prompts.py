"""Prompt templates of the debate, one :class:`PromptSet` per task.

Templates are ``str.format`` strings. Available fields: ``{question}`` plus every entry of
:attr:`agentsoc.tasks.base.Problem.fields` (MMLU's ``{a}``…``{d}``), ``{other_response}`` inside
the per-agent blocks and ``{summary}`` in :attr:`PromptSet.summary_message`. The paper's presets,
typos included (algorithm.md §2.3–2.6), live next to each task; a recipe may override any field.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class PromptSet(BaseModel):
    """Everything the debate says to an agent or to the summarizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: round 0, the agent answers alone
    round0: str
    #: round m >= 1 without summarization: prefix + one block per other agent + suffix
    debate_prefix: str
    debate_block: str
    debate_suffix: str
    #: round m >= 1 when the agent has no peers (N = 1)
    self_only: str
    #: the summarizer's single-turn request: prefix + one block per other agent + suffix
    summarizer_prefix: str
    summarizer_block: str
    summarizer_suffix: str
    #: round m >= 1 with summarization; ``{summary}`` is the summarizer's reply
    summary_message: str


def fill(template: str, fields: dict[str, str]) -> str:
    """Format ``template`` with ``fields``, leaving braces that are not fields alone.

    Problems contain LaTeX (``\\frac{1}{2}``) and templates contain ``\\boxed{answer}``; plain
    ``str.format`` would choke on both, so only the known ``{name}`` placeholders are replaced.
    """
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", value)
    return out
