"""Per-agent training data chosen by the vote, never by ground truth (algorithm.md §4).

For agent n and every problem whose debate produced a vote ŷ:

* D^G_n  ← (round-0 prompt, round-0 answer)          if ans(y⁰_n) ≡ ŷ
* D^C−_n ← the whole conversation                    if ans(y^last_n) ≡ ŷ and ans(y⁰_n) ≢ ans(y^last_n)
* D^C+_n ← the whole conversation                    if ans(y^last_n) ≡ ŷ and ans(y⁰_n) ≡ ans(y^last_n)

The critic set keeps all of D^C− and adds ⌈|D^C−|·(1−w)/w⌉ examples of D^C+ drawn with a seed, so
the share of D^C− is ``w``. The reference code's per-example coin flip gives w ≈ 2/3 on average
with a random count; an explicit w makes the mix a logged, reproducible choice. An agent with no
D^C− example gets no critic data that iteration — the same outcome as the reference code.

Loss weights: by default a critic learns only its answers of rounds ≥ 1 (round-0 assistant turn
weight 0), because in D^C− that first answer is the *wrong* one. ``all_turns`` reproduces the
reference (OpenAI/FastChat train on every assistant turn).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

from agentsoc.seeds import derive_seed
from agentsoc.transcript import Transcript
from agentsoc.types import ChatExample, Message


class AgentData(BaseModel):
    """The datasets selected for one agent slot, with the counts behind them."""

    model_config = ConfigDict(frozen=True)

    agent: int
    generator: tuple[ChatExample, ...]
    critic: tuple[ChatExample, ...]
    critic_minus: int
    critic_plus_available: int
    critic_plus_used: int


def _critic_example(messages: Sequence[Message], loss: Literal["later_rounds", "all_turns"]) -> ChatExample:
    out: list[Message] = []
    assistant_turn = 0
    for m in messages:
        if m.role == "assistant":
            weight = 0.0 if (loss == "later_rounds" and assistant_turn == 0) else 1.0
            out.append(m.model_copy(update={"weight": weight}))
            assistant_turn += 1
        else:
            out.append(m)
    return ChatExample(messages=tuple(out))


def select(
    transcripts: Iterable[Transcript],
    n_agents: int,
    is_equivalent: Callable[[str, str], bool],
    *,
    critic_mix: float = 2 / 3,
    critic_loss: Literal["later_rounds", "all_turns"] = "later_rounds",
    seed: int = 0,
) -> list[AgentData]:
    """Select every agent's generator and critic data from its own debate turns only."""
    gen: list[list[ChatExample]] = [[] for _ in range(n_agents)]
    minus: list[list[ChatExample]] = [[] for _ in range(n_agents)]
    plus: list[list[ChatExample]] = [[] for _ in range(n_agents)]
    for t in transcripts:
        target = t.vote.answer
        if target is None:
            continue
        for trace in t.agents:
            n = trace.agent
            first, final = trace.first, trace.final
            if first is not None and is_equivalent(first, target):
                gen[n].append(ChatExample(messages=(trace.messages[0], trace.messages[1])))
            if len(trace.answers) < 2 or final is None or not is_equivalent(final, target):
                continue
            example = _critic_example(trace.messages, critic_loss)
            if first is not None and is_equivalent(first, final):
                plus[n].append(example)
            else:
                minus[n].append(example)

    result = []
    for n in range(n_agents):
        rng = random.Random(derive_seed(seed, "select", n))
        want_plus = math.ceil(len(minus[n]) * (1 - critic_mix) / critic_mix - 1e-9)
        chosen_plus = rng.sample(plus[n], min(want_plus, len(plus[n])))
        critic = minus[n] + chosen_plus
        generator = list(gen[n])
        rng.shuffle(critic)
        rng.shuffle(generator)
        result.append(
            AgentData(
                agent=n,
                generator=tuple(generator),
                critic=tuple(critic),
                critic_minus=len(minus[n]),
                critic_plus_available=len(plus[n]),
                critic_plus_used=len(chosen_plus),
            )
        )
    return result
