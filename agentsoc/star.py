"""STaR's data (Zelikman et al. 2022), built on the debate's own transcripts (algorithm.md §8).

STaR keeps the agent's rationales that reach the *ground-truth* answer (the society does that by
relabelling each transcript's vote with the truth, see :meth:`agentsoc.society.Society.select`) and
adds *rationalization*: an agent whose round-0 answer was wrong is asked again with the correct
answer as a hint; if its new rationale reaches that answer, it is trained on the ORIGINAL prompt
(without the hint) followed by that rationale — the model learns to produce it unaided.

The hint wording is ours (STaR's few-shot rationalization prompts do not carry over to chat).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from agentsoc.backend import Backend
from agentsoc.concurrency import gather_all
from agentsoc.debate import stated_answer
from agentsoc.seeds import derive_seed
from agentsoc.tasks.base import Task
from agentsoc.transcript import AgentSlot, Transcript
from agentsoc.types import ChatExample, Message, Sampling

HINT = (
    "\n\nHint: the correct answer is {answer}. Explain step by step how to arrive at it, as if you had "
    "solved the problem yourself, without mentioning the hint."
)


def needs_rationale(t: Transcript, agent: int, is_equivalent: Callable[[str, str], bool]) -> bool:
    """Whether ``agent`` answered wrong in round 0 of a problem that has a ground truth."""
    truth = t.problem.answer
    first = t.agents[agent].first
    return truth is not None and (first is None or not is_equivalent(first, truth))


async def rationalize(
    backend: Backend,
    task: Task,
    slots: Sequence[AgentSlot],
    transcripts: Sequence[Transcript],
    sampling: Sampling,
    *,
    seed: int,
    phase: str,
) -> list[list[ChatExample]]:
    """Per agent, the rationalized generator examples (hint-free prompt → rationale)."""
    out: list[list[ChatExample]] = [[] for _ in slots]

    async def one(t: Transcript, agent: int) -> None:
        truth = t.problem.answer
        assert truth is not None
        prompt = t.agents[agent].messages[0]
        hinted = Message(role="user", content=prompt.content + HINT.replace("{answer}", truth))
        call_seed = derive_seed(seed, phase, "rationalize", t.problem.id, agent)
        reply = await backend.complete(
            slots[agent].generator, [hinted], sampling.model_copy(update={"seed": call_seed})
        )
        parsed = stated_answer(task, reply)
        if parsed is not None and task.is_equivalent(parsed, truth):
            out[agent].append(ChatExample(messages=(prompt, Message(role="assistant", content=reply.text))))

    await gather_all(
        [
            one(t, n)
            for t in transcripts
            for n in range(min(len(slots), len(t.agents)))
            if needs_rationale(t, n, task.is_equivalent)
        ]
    )
    # transcripts arrive in a fixed order but calls finish in any order: sort for reproducible data
    for examples in out:
        examples.sort(key=lambda e: e.messages[0].content)
    return out
