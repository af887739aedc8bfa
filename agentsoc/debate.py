"""One multiagent debate over many problems (algorithm.md §2), async with bounded concurrency.

Semantics that the reference code got wrong and we keep right:

* In round m ≥ 1 every agent sees the *other* agents' round m−1 answers — never a mix of rounds,
  whatever order the agents are processed in (the summarizer included).
* Each agent continues its own conversation: its previous prompts and answers stay in context.
* Round 0 uses the slot's generator; rounds ≥ 1 its critic (or the generator again when the
  ``critic`` switch is off).
* Every call gets its own seed derived from (seed, phase, problem, agent, round, kind): agents with
  identical prompts still sample independently, reruns are reproducible, and the call cache keys
  differ per agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from pydantic import BaseModel, ConfigDict

from agentsoc.backend import Backend, TransientBackendError
from agentsoc.concurrency import gather_all
from agentsoc.prompts import PromptSet, fill
from agentsoc.seeds import derive_seed
from agentsoc.tasks.base import Problem, Task
from agentsoc.transcript import AgentSlot, AgentTrace, Transcript
from agentsoc.types import Completion, Message, ModelRef, Sampling, Usage
from agentsoc.vote import TieBreak, majority_vote


class DebateSettings(BaseModel):
    """What shapes a debate, apart from the models."""

    model_config = ConfigDict(frozen=True)

    rounds: int = 2
    summarize: bool = True
    critic: bool = True
    summarizer: ModelRef
    sampling: Sampling = Sampling()
    seed: int = 0
    #: distinguishes debates of one run (``iter-1/train``), so their seeds differ
    phase: str = "debate"
    #: prefix every agent call with :func:`agent_id_message` (Unique ID ablation); the stored
    #: conversation stays without it, selection adds it back to the training data
    unique_id: bool = False
    #: a reply cut off at ``max_tokens`` abstains (our rule) instead of voting its last number (the paper)
    abstain_truncated: bool = True
    #: how a tied vote is decided: a seeded draw (ours) or the largest answer string (MAFT's code)
    tie_break: TieBreak = "seeded"


def stated_answer(task: Task, out: Completion, *, abstain_truncated: bool = True) -> str | None:
    """The answer a reply states, or ``None`` when it was cut off at ``max_tokens`` (unless
    ``abstain_truncated`` is off: the paper's parser reads the last number of any text).

    A cut-off reply has not reached its answer: the last number in it is an intermediate result
    (measured on the local demo: 0.5B critics that wrote step-by-step essays were cut off at 96
    tokens, their "answers" were partial products, and the final vote fell from 85% to 55%).
    Such an agent abstains from the vote, and selection never trains on the reply.
    """
    return None if abstain_truncated and out.finish_reason == "length" else task.parse_answer(out.text)


def agent_id_message(agent: int, role: str) -> Message:
    """The system message that tells a shared model which agent and role it plays (Unique ID).

    The paper feeds "a unique ID token to each agent, corresponding to a generation or critic
    agent"; the exact format is not published — this wording is our reconstruction.
    """
    return Message(role="system", content=f"You are agent {agent + 1} ({role}).")


def calls_per_problem(n_agents: int, settings: DebateSettings) -> int:
    """Model calls one debate makes: every agent every round, plus a summary per agent per later round."""
    summaries = n_agents * (settings.rounds - 1) if settings.summarize and n_agents > 1 else 0
    return n_agents * settings.rounds + summaries


def debate_message(prompts: PromptSet, problem: Problem, others: Sequence[str], summary: str | None) -> str:
    """The user message an agent receives in round m ≥ 1."""
    fields = problem.template_fields()
    if not others:
        return fill(prompts.self_only, fields)
    if summary is not None:
        return fill(prompts.summary_message, {**fields, "summary": summary})
    blocks = "".join(fill(prompts.debate_block, {**fields, "other_response": o}) for o in others)
    return fill(prompts.debate_prefix, fields) + blocks + fill(prompts.debate_suffix, fields)


def summarizer_request(prompts: PromptSet, problem: Problem, others: Sequence[str]) -> str:
    fields = problem.template_fields()
    blocks = "".join(fill(prompts.summarizer_block, {**fields, "other_response": o}) for o in others)
    return fill(prompts.summarizer_prefix, fields) + blocks + fill(prompts.summarizer_suffix, fields)


async def debate_one(
    backend: Backend,
    task: Task,
    prompts: PromptSet,
    slots: Sequence[AgentSlot],
    problem: Problem,
    settings: DebateSettings,
    on_call: Callable[[Completion], None] | None = None,
) -> Transcript:
    """Run one debate: round 0 alone, then M−1 rounds of revision against the others.

    ``on_call`` sees every completion as it arrives: progress is counted per model call, since one
    problem of a slow model can take minutes."""
    n_agents = len(slots)
    usage = Usage()

    def sampling_for(agent: int, round_: int, kind: str) -> Sampling:
        seed = derive_seed(settings.seed, settings.phase, problem.id, agent, round_, kind)
        return settings.sampling.model_copy(update={"seed": seed})

    first_prompt = fill(prompts.round0, problem.template_fields())
    histories: list[list[Message]] = [[Message(role="user", content=first_prompt)] for _ in slots]
    answers: list[list[str | None]] = [[] for _ in slots]
    models: list[list[ModelRef]] = [[] for _ in slots]
    summaries: list[tuple[str, ...]] = []

    async def answer(agent: int, round_: int) -> None:
        nonlocal usage
        slot = slots[agent]
        use_generator = round_ == 0 or not settings.critic
        model = slot.generator if use_generator else slot.critic
        request = histories[agent]
        if settings.unique_id:
            request = [agent_id_message(agent, "generator" if use_generator else "critic"), *request]
        out = await backend.complete(model, request, sampling_for(agent, round_, "answer"))
        if on_call is not None:
            on_call(out)
        usage = usage + out.usage
        histories[agent].append(Message(role="assistant", content=out.text))
        answers[agent].append(stated_answer(task, out, abstain_truncated=settings.abstain_truncated))
        models[agent].append(model)

    async def summarize(agent: int, round_: int, others: Sequence[str]) -> str:
        nonlocal usage
        request = [Message(role="user", content=summarizer_request(prompts, problem, others))]
        out = await backend.complete(settings.summarizer, request, sampling_for(agent, round_, "summary"))
        if on_call is not None:
            on_call(out)
        usage = usage + out.usage
        return out.text

    await asyncio.gather(*(answer(n, 0) for n in range(n_agents)))
    for round_ in range(1, settings.rounds):
        # Freeze round m-1 before anyone speaks in round m: every agent (and the summarizer)
        # sees the same previous-round answers regardless of scheduling order.
        previous = [histories[n][-1].content for n in range(n_agents)]
        others = [[previous[k] for k in range(n_agents) if k != n] for n in range(n_agents)]
        if settings.summarize and n_agents > 1:
            round_summaries = tuple(await asyncio.gather(*(summarize(n, round_, others[n]) for n in range(n_agents))))
            summaries.append(round_summaries)
        for n in range(n_agents):
            summary = summaries[-1][n] if settings.summarize and n_agents > 1 else None
            histories[n].append(Message(role="user", content=debate_message(prompts, problem, others[n], summary)))
        await asyncio.gather(*(answer(n, round_) for n in range(n_agents)))

    round_votes = tuple(
        majority_vote(
            [answers[n][m] for n in range(n_agents)],
            task.is_equivalent,
            seed=settings.seed,
            problem_id=f"{settings.phase}:{problem.id}:{m}",
            tie_break=settings.tie_break,
        )
        for m in range(settings.rounds)
    )
    traces = tuple(
        AgentTrace(agent=n, messages=tuple(histories[n]), answers=tuple(answers[n]), models=tuple(models[n]))
        for n in range(n_agents)
    )
    return Transcript(
        problem=problem,
        phase=settings.phase,
        agents=traces,
        summaries=tuple(summaries),
        vote=round_votes[-1],
        round_votes=round_votes,
        usage=usage,
    )


async def debate(
    backend: Backend,
    task: Task,
    prompts: PromptSet,
    slots: Sequence[AgentSlot],
    problems: Sequence[Problem],
    settings: DebateSettings,
    *,
    on_done: Callable[[Transcript], None] | None = None,
    on_failure: Callable[[Problem, TransientBackendError], None] | None = None,
    on_call: Callable[[Completion], None] | None = None,
) -> list[Transcript]:
    """Debate every problem, all in flight at once; the backend's limiter bounds real concurrency.

    ``on_done`` is called as each problem finishes (the society stores the transcript there, one
    transaction per problem, so a crash loses at most the debates still in flight). With
    ``on_failure``, a problem whose call used up its retries on a transient error is handed to it and
    left out, and the other problems go on (the caller retries the failed ones at the end of the
    stage); without it, that error ends the debate. A fatal error always ends it.
    """

    async def run(problem: Problem) -> Transcript | None:
        try:
            transcript = await debate_one(backend, task, prompts, slots, problem, settings, on_call)
        except TransientBackendError as e:
            if on_failure is None:
                raise
            on_failure(problem, e)
            return None
        if on_done is not None:
            on_done(transcript)
        return transcript

    return [t for t in await gather_all([run(p) for p in problems]) if t is not None]
