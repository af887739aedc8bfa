"""Diversity metrics on constructed responses with a known ordering, and the mock's simulated scores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import RecordingBackend
from transcripts import make_transcript

from agentsoc.diversity import (
    _tfidf,
    consensus,
    distinct_agents,
    embedding_dissimilarity,
    likelihood_and_kl,
    measure,
    token_kl,
)
from agentsoc.society import Society
from agentsoc.types import TokenLogprobs
from backends.mock import MockBackend, MockBrain


def test_consensus_counts_answers_agreeing_with_the_vote() -> None:
    agree = make_transcript("1", "4", [["4"], ["4"], ["4"]])
    two_of_three = make_transcript("2", "4", [["4"], ["4"], ["5"]])
    unparsed = make_transcript("3", "4", [["4"], [None], ["4"]])
    assert consensus([agree]) == 1.0
    assert consensus([two_of_three]) == pytest.approx(2 / 3)
    assert consensus([unparsed]) == pytest.approx(2 / 3)  # an unparsed answer does not agree
    assert consensus([agree, two_of_three]) == pytest.approx(5 / 6)
    nothing = make_transcript("4", "4", [[None], [None], [None]])
    assert consensus([nothing]) == 0.0 and consensus([]) is None
    debate = make_transcript("5", "4", [["1", "4"], ["2", "4"], ["3", "4"]])
    assert consensus([debate]) == 1.0 and consensus([debate], 0) == pytest.approx(1 / 3)


@pytest.mark.parametrize("embedder", [None, _tfidf()], ids=["default", "tfidf"])
def test_embedding_dissimilarity_orders_identical_similar_different(embedder: Any) -> None:
    same = [["We add 3 and 4 to get 7.", "We add 3 and 4 to get 7.", "We add 3 and 4 to get 7."]]
    close = [["We add 3 and 4 to get 7.", "We add 3 and 4 to get 7 here.", "First we add 3 and 4 to get 7."]]
    far = [["We add 3 and 4 to get 7.", "Multiplying twelve by nine yields 108.", "Cannot tell; no idea at all!"]]
    d_same, name = embedding_dissimilarity(same, embedder)
    d_close, _ = embedding_dissimilarity(close, embedder)
    d_far, _ = embedding_dissimilarity(far, embedder)
    assert d_same is not None and d_close is not None and d_far is not None
    assert abs(d_same) < 1e-6 < d_close < d_far <= 1.0 + 1e-9
    assert name  # the embedder used is named in the output
    assert embedding_dissimilarity([["only one agent"]], embedder)[0] is None
    both, _ = embedding_dissimilarity(same + far, embedder)
    assert both == pytest.approx((d_same + d_far) / 2)


def test_token_kl_is_zero_for_equal_distributions_and_positive_otherwise() -> None:
    p = TokenLogprobs(tokens=("a",), logprobs=(-0.1,), top=({"a": -0.1, "b": -2.4},))
    q = TokenLogprobs(tokens=("a",), logprobs=(-1.0,), top=({"a": -1.0, "c": -0.5},))
    assert token_kl(p, p) == pytest.approx(0.0)
    kl = token_kl(p, q)
    assert kl is not None and kl > 0.1
    assert token_kl(TokenLogprobs(tokens=("a",), logprobs=(-0.1,)), q) is None


def test_mock_scores_are_deterministic_and_model_specific() -> None:
    brain = MockBrain()
    a1, a2 = brain.score("mock:0.5", "the answer is 7"), brain.score("mock:0.5", "the answer is 7")
    b = brain.score("mock:0.5@job-1", "the answer is 7")
    assert a1 == a2 and a1.tokens == ("the", "answer", "is", "7")
    assert a1.logprobs != b.logprobs
    assert all(lp < 0 for lp in a1.logprobs) and a1.top is not None and len(a1.top[0]) == 5


async def test_likelihood_and_kl_separate_one_shared_model_from_distinct_models() -> None:
    texts = [["I get 7 by adding."], ["Adding gives 7 overall."], ["So the total is 7."]]
    shared = make_transcript("1", "7", [["7"], ["7"], ["7"]], texts=texts, models=["mock:0.5"] * 3)
    distinct = make_transcript(
        "1", "7", [["7"], ["7"], ["7"]], texts=texts, models=["mock:0.4", "mock:0.5", "mock:0.6"]
    )
    backend = MockBackend()
    same = await likelihood_and_kl(backend, [shared])
    diff = await likelihood_and_kl(backend, [distinct])
    assert same["kl"] == pytest.approx(0.0) and diff["kl"] is not None and diff["kl"] > 0.05
    assert same["likelihood_nll"] is not None and same["likelihood_nll"] > 0


async def test_measure_skips_scoring_metrics_when_the_backend_cannot_score() -> None:
    ts = [make_transcript("1", "7", [["7"], ["8"], ["7"]])]
    out = await measure(ts, RecordingBackend(lambda *a: ""))
    assert out.consensus == pytest.approx(2 / 3) and out.answer_diversity == pytest.approx(1 / 3)
    assert out.likelihood_nll is None and out.kl is None
    assert any("not available for backend recording" in n for n in out.notes)
    scored = await measure(ts, MockBackend(), metrics=["likelihood", "kl"])
    assert scored.kl is not None and scored.likelihood_nll is not None and scored.consensus is None


async def test_single_agent_ft_loses_kl_diversity_multiagent_keeps_it(write_recipe: Any, tmp_path: Path) -> None:
    out = {}
    for name, single in (("multi", False), ("single", True)):
        recipe = write_recipe(
            f"{name}.toml", **{"finetune.iterations": 1, "finetune.share": "all" if single else "none"}
        )
        async with Society.from_recipe(recipe, run_dir=tmp_path / name, progress=False) as soc:
            await soc.run()
            div = soc.store.iteration(1).diversity
            assert div is not None
            out[name] = div
    # one shared model: its agents' KL is 0 by construction, reported as not applicable, not as 0
    assert out["single"].kl is None and out["single"].likelihood_nll is None
    assert any("not applicable" in n for n in out["single"].notes)
    assert out["multi"].kl is not None and out["multi"].kl > 0.1
    assert out["multi"].embedder and out["multi"].scored_problems == 20


def test_term_vectors_stay_sparse_so_memory_grows_with_the_words_used() -> None:
    import tracemalloc

    # 2,000 problems x 3 agents, each response with words of its own: a dense term matrix would be
    # 6,000 x ~18,000 floats (0.9 GB); sparse, it is a few MB
    responses = [[f"agent {n} says w{p}x{n}a w{p}x{n}b w{p}x{n}c so 42" for n in range(3)] for p in range(2000)]
    tracemalloc.start()
    value, name = embedding_dissimilarity(responses, _tfidf())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert value is not None and 0 < value < 1 and "term-frequency" in name
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MB"


def test_agents_sharing_weights_differ_only_through_an_id_prompt() -> None:
    shared = make_transcript("1", "4", [["4"], ["5"], ["4"]], models=["m", "m", "m"])
    assert distinct_agents([make_transcript("1", "4", [["4"], ["5"], ["4"]])], unique_id=False)
    assert not distinct_agents([shared], unique_id=False)
    assert distinct_agents([shared], unique_id=True)  # same weights, a different "You are agent n" prompt
