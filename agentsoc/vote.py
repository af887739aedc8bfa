"""Majority vote over equivalence clusters, with an explicit seeded tie-break.

The reference code broke ties by the lexicographically largest answer string (MAFT) or by the
earliest agent (Du et al.); both are arbitrary, and the second biases data selection towards agent 0.
By default (``tie_break = "seeded"``) a tie is broken by a random draw seeded from (seed, problem id),
so it is fair across agents and identical on every rerun; ``tie_break = "largest"`` is MAFT's rule, for
runs that reproduce the paper's tables (``society.tie_break`` in a recipe).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict

#: how a tie between equally large clusters is broken: a seeded draw (ours) or MAFT's largest answer string
TieBreak = Literal["seeded", "largest"]


class Cluster(BaseModel):
    model_config = ConfigDict(frozen=True)

    #: the first answer that formed the cluster (its representative)
    answer: str
    #: indices of the agents whose answers fell in this cluster
    members: tuple[int, ...]


class Vote(BaseModel):
    model_config = ConfigDict(frozen=True)

    #: the winning answer, or None when no agent gave a parseable answer
    answer: str | None
    clusters: tuple[Cluster, ...] = ()
    #: True when several clusters shared the top count and the seeded draw decided
    tie: bool = False

    @property
    def support(self) -> int:
        return max((len(c.members) for c in self.clusters), default=0)


def majority_vote(
    answers: Sequence[str | None],
    is_equivalent: Callable[[str, str], bool],
    *,
    seed: int,
    problem_id: str,
    tie_break: TieBreak = "seeded",
) -> Vote:
    """Cluster parsed answers by equivalence and return the biggest cluster's representative.

    ``None`` (unparseable) answers take no part. An answer joins the first cluster whose
    representative it is equivalent to; equivalence is expected to be symmetric.
    """
    reps: list[str] = []
    members: list[list[int]] = []
    for agent, ans in enumerate(answers):
        if ans is None:
            continue
        for k, rep in enumerate(reps):
            if is_equivalent(rep, ans):
                members[k].append(agent)
                break
        else:
            reps.append(ans)
            members.append([agent])
    clusters = tuple(Cluster(answer=r, members=tuple(m)) for r, m in zip(reps, members, strict=True))
    if not clusters:
        return Vote(answer=None)
    top = max(len(c.members) for c in clusters)
    tied = [c for c in clusters if len(c.members) == top]
    if len(tied) == 1:
        return Vote(answer=tied[0].answer, clusters=clusters)
    if tie_break == "largest":
        # MAFT sorts (count, answer) tuples and takes the last: the largest answer string among the tied
        return Vote(answer=max(c.answer for c in tied), clusters=clusters, tie=True)
    digest = hashlib.sha256(f"{seed}:{problem_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return Vote(answer=rng.choice(tied).answer, clusters=clusters, tie=True)
