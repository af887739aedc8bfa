"""agentsoc: multiagent finetuning of language models (Subramaniam et al., 2025).

The public surface is listed in ``__all__``; ``tests/test_public_api.py`` keeps the two in step.
"""

from agentsoc.config import Recipe, RecipeError, load_recipe
from agentsoc.debate import DebateSettings, debate
from agentsoc.evaluate import evaluate
from agentsoc.records import EvalScores, IterationRecord, Score
from agentsoc.selection import AgentData, select
from agentsoc.society import Society
from agentsoc.transcript import AgentSlot, Transcript
from agentsoc.vote import Vote, majority_vote

__all__ = [
    "AgentData",
    "AgentSlot",
    "DebateSettings",
    "EvalScores",
    "IterationRecord",
    "Recipe",
    "RecipeError",
    "Score",
    "Society",
    "Transcript",
    "Vote",
    "debate",
    "evaluate",
    "load_recipe",
    "majority_vote",
    "select",
]
