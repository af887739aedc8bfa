"""How far each finetuned agent has moved from the base model (the paper's Figure 8).

Figure 8 plots "KL-divergence between likelihoods of responses from finetuned agents and base LLM
agents", with likelihoods computed by a separate model (Gemma-2 2B); the exact recipe is not
published (algorithm.md §9). agentsoc uses no third model: for each agent and role it teacher-forces
the agent's own held-out responses through the agent's finetuned model and through the base model
and averages the per-token KL(p_finetuned ‖ p_base) — the same top-k approximation as the KL between
agents (:func:`agentsoc.diversity.token_kl`). Generators are scored on their round-0 answers,
critics on their answers of rounds ≥ 1 (the conversation up to that turn as the prompt); "critic"
is the role of rounds ≥ 1, which under ``society.critic = false`` the generator plays. The paper's
qualitative finding to check: critics drift further from the base model than generators.

An agent whose model IS the base model (iteration 0, or a role left unfinetuned for lack of data)
has KL 0 by construction and is not scored.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict

from agentsoc.backend import Backend
from agentsoc.concurrency import gather_all
from agentsoc.diversity import token_kl
from agentsoc.transcript import Transcript
from agentsoc.types import ModelRef


class Drift(BaseModel):
    """Mean per-token KL(agent's model ‖ base model) of one agent and role over its responses."""

    model_config = ConfigDict(frozen=True)

    agent: int
    role: str
    #: the model scored (the agent's model in that role at this evaluation)
    model: ModelRef
    #: None when the backend returned no top-k distributions
    kl: float | None
    #: responses scored; 0 when the model is the base model (KL 0 by construction)
    responses: int


async def kl_from_base(
    backend: Backend, transcripts: Sequence[Transcript], base_models: Sequence[ModelRef]
) -> list[Drift]:
    """One :class:`Drift` per agent and role over ``transcripts`` (an evaluation's debates).

    ``base_models[n % len(base_models)]`` is agent n's base model, as the society assigns them. The
    caller checks ``backend.capabilities.score`` and caps the number of transcripts (each response
    costs two scoring passes).
    """
    # (agent, role) -> [(model, prompt messages, response)] to score
    work: dict[tuple[int, str], list[tuple[ModelRef, int, int, int]]] = {}
    for p, t in enumerate(transcripts):
        for trace in t.agents:
            for m, model in enumerate(trace.models):
                role = "generator" if m == 0 else "critic"
                work.setdefault((trace.agent, role), []).append((model, p, trace.agent, m))
    kls: dict[tuple[int, str], list[float]] = {}

    async def one(key: tuple[int, str], model: ModelRef, p: int, agent: int, m: int) -> None:
        trace = transcripts[p].agents[agent]
        base = base_models[agent % len(base_models)]
        prompt, response = trace.messages[: 2 * m + 1], trace.response(m)
        mine = await backend.score(model, prompt, response)
        theirs = await backend.score(base, prompt, response)
        kl = token_kl(mine, theirs)
        if kl is not None:
            kls.setdefault(key, []).append(kl)

    jobs = [
        one(key, model, p, agent, m)
        for key, items in work.items()
        for model, p, agent, m in items
        if model != base_models[agent % len(base_models)]
    ]
    await gather_all(jobs)
    out = []
    for (agent, role), items in sorted(work.items()):
        models = sorted({model for model, *_ in items})
        base = base_models[agent % len(base_models)]
        scored = [i for i in items if i[0] != base]
        values = kls.get((agent, role), [])
        out.append(
            Drift(
                agent=agent,
                role=role,
                model=", ".join(models),
                kl=(sum(values) / len(values) if values else None) if scored else 0.0,
                responses=len(scored),
            )
        )
    return out
