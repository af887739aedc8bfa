"""The tinker backend against the fake Tinker service (tests/fakes/fake_tinker.py), the real ``tinker``
SDK talking to it over HTTP on 127.0.0.1.

A tiny byte-level BPE tokenizer with a ChatML template is built in a temporary folder (nothing is
downloaded); the backend loads it as "the base model's tokenizer". What is asserted is what the fake
saw on the wire: the prompt tokens and stop token of a sample, and every datum of training (tokens,
targets, weights) against the backend's own loss masks of the dataset.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

tinker = pytest.importorskip("tinker")  # the `tinker` extra
from fakes.fake_tinker import FAKE_API_KEY, FakeTinker, SampleCall, ServedModel, text_sampler  # noqa: E402

from agentsoc.backend import FatalBackendError, TransientBackendError  # noqa: E402
from agentsoc.types import ChatExample, FinetuneSpec, Job, JobState, Message, Sampling  # noqa: E402
from backends.options import TinkerOptions  # noqa: E402
from backends.tinker import TinkerBackend, parse_ref  # noqa: E402
from backends.tinker_train import learning_rate, step_plan  # noqa: E402
from backends.training import schedule  # noqa: E402

BASE = "Qwen/Qwen3-8B"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the result of 12+3*4-5? The answer is 19. Compute it in one line, showing each step.",
    "Here is a summary of solutions from several other agents: agent one says 42, agent two says 7.",
    "user assistant system Can you verify that your answer is correct? 0123456789 + - * = ( ) .",
]


def build_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer with ChatML special tokens, saved as a transformers folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def arithmetic_sampler(folder: Path, wrong_every: int = 4) -> tuple[Any, Any]:
    """(sampler hook, decode) for the fake: answers the first expression of the prompt, wrong (off by
    one) for one seed in ``wrong_every`` so that votes and selection have something to do."""
    tok = load(folder)

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=False)["input_ids"])

    def decode(ids: Any) -> str:
        return str(tok.decode(list(ids), skip_special_tokens=False))

    def answer(prompt: str, call: SampleCall) -> str:
        found = re.search(r"\d+(?:[-+*]\d+)+", prompt)
        if found is None:
            return "Agents agree on 7."
        value = eval(found.group(0), {"__builtins__": {}})  # digits and + - * only (the regex)
        if call.seed % wrong_every == 0:
            value += 1
        return f"{found.group(0)} = {value}. The answer is {value}."

    return text_sampler(encode, decode, answer), decode


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")  # telemetry would carry the key in its headers


@pytest.fixture
def fake(tokenizer_dir: Path) -> Iterator[FakeTinker]:
    sampler, decode = arithmetic_sampler(tokenizer_dir)
    with FakeTinker(sampler=sampler, decode=decode, long_poll_s=0.2) as f:
        yield f


def backend(fake: FakeTinker, run_dir: Path, tokenizer_dir: Path, key: str = FAKE_API_KEY, **options: Any) -> Any:
    opts = TinkerOptions(base_url=fake.base_url, tokenizer=str(tokenizer_dir), **options)
    return TinkerBackend(opts, run_dir, key=key)


def example(question: str, answer: str, weight: float | None = None) -> ChatExample:
    return ChatExample(
        messages=(
            Message(role="user", content=question),
            Message(role="assistant", content=answer, weight=weight),
        )
    )


async def finish(b: TinkerBackend, job: Job, timeout_s: float = 120.0) -> Job:
    async def loop() -> Job:
        nonlocal job
        while not job.state.terminal:
            await asyncio.sleep(0.02)
            job = await b.poll_finetune(job)
        return job

    return await asyncio.wait_for(loop(), timeout_s)


# --------------------------------------------------------------------------- chat


async def test_complete_renders_the_chat_template_and_stops_at_end_of_turn(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    b = backend(fake, tmp_path, tokenizer_dir)
    messages = [Message(role="user", content="What is the result of 12+3*4?")]
    try:
        out = await b.complete(BASE, messages, Sampling(temperature=0.7, top_p=0.9, max_tokens=64, seed=5))
    finally:
        await b.aclose()
    tok = load(tokenizer_dir)
    rendered = tok.apply_chat_template(
        [m.model_dump(exclude={"weight"}) for m in messages], tokenize=False, add_generation_prompt=True
    )
    assert out.text == "12+3*4 = 24. The answer is 24."
    assert out.finish_reason == "stop"
    with fake.state.lock:
        sample = fake.state.samples[0]
    assert sample.prompt == tuple(tok(rendered, add_special_tokens=False)["input_ids"])
    assert sample.model_path is None and sample.base_model == BASE
    assert sample.params["stop"] == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert sample.params["seed"] == 5 and sample.params["max_tokens"] == 64
    assert out.usage.prompt_tokens == len(sample.prompt) and out.usage.completion_tokens == len(sample.outputs[0])


async def test_score_returns_one_logprob_per_response_token(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    b = backend(fake, tmp_path, tokenizer_dir)
    try:
        lp = await b.score(BASE, [Message(role="user", content="2+2?")], "The answer is 4.")
    finally:
        await b.aclose()
    n = len(load(tokenizer_dir)("The answer is 4.", add_special_tokens=False)["input_ids"])
    assert len(lp.tokens) == len(lp.logprobs) == n
    assert all(-4.1 < x < 0 for x in lp.logprobs)


# --------------------------------------------------------------------------- training


async def test_training_sends_the_datums_of_the_loss_masks_in_planned_batches(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    examples = [example(f"What is {i}+{i}?", f"{i}+{i} = {2 * i}. The answer is {2 * i}.") for i in range(7)]
    examples.append(example("What is 9*9?", "The answer is 81.", weight=0))  # masked: not trained
    examples.append(example("What is 2*3?", "The answer is 6.", weight=0.5))
    spec = FinetuneSpec(
        epochs=2,
        batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        lr_scheduler="cosine",
        warmup_ratio=0.25,
        weight_decay=0.01,
        lora_r=4,
        seed=3,
    )
    b = backend(fake, tmp_path, tokenizer_dir, save_every=2)
    try:
        job = await finish(b, await b.submit_finetune(BASE, examples, spec, key="t/iter-0/agent-0/generator"))
    finally:
        await b.aclose()
    assert job.state is JobState.SUCCEEDED, job.error
    rows = b.codec(BASE).encode(examples, spec.max_seq_len).rows
    assert len(rows) == 8  # the weight-0 example has nothing to train
    plan = step_plan(len(rows), spec)
    assert len(plan) == schedule(8, spec).total == 4  # 4 batches of 2 → 2 steps per epoch × 2 epochs

    with fake.state.lock:
        (run,) = fake.state.runs.values()
        datums = list(run.datums)
        params = list(run.optim_params)
        saves = dict(fake.state.saves)
    assert run.rank == 4 and run.base_model == BASE and run.step == 4
    assert saves == {"training": 2, "sampler": 1}
    # every datum is a row of the masks: input ids[:-1], targets ids[1:], the targets' weights
    expected = [rows[i] for step in plan for i in step]
    assert [d.tokens for d in datums] == [tuple(r.input_ids[:-1]) for r in expected]
    assert [d.target_tokens for d in datums] == [tuple(r.input_ids[1:]) for r in expected]
    assert [d.weights for d in datums] == [tuple(r.weights[1:]) for r in expected]
    assert {d.loss_fn for d in datums} == {"cross_entropy"}
    # batch shapes: one forward_backward request (one seq_id) per optimizer step, with that step's rows
    per_request = Counter(d.seq_id for d in datums)
    assert [per_request[s] for s in sorted(per_request)] == [len(step) for step in plan] == [4, 4, 4, 4]
    half = [d for d in datums if 0.5 in d.weights]
    assert half and all(set(d.weights) == {0.0, 0.5} for d in half)
    # only assistant tokens are weighted: the prompt's tokens never are
    tok = load(tokenizer_dir)
    first = datums[0]
    trained = [t for t, w in zip(first.target_tokens, first.weights, strict=True) if w > 0]
    assert tok.decode(trained).startswith(examples[0].messages[1].content[:3]) or "answer" in tok.decode(trained)
    assert tok.convert_tokens_to_ids("<|im_end|>") in trained  # the end of turn is learnt
    # Adam: the spec's lr under its schedule, weight decay; torch's betas
    assert [p["learning_rate"] for p in params] == pytest.approx([learning_rate(spec, s, 4) for s in range(4)])
    assert params[0]["learning_rate"] == 0.0 and params[1]["learning_rate"] == pytest.approx(1e-4)
    assert all(p["weight_decay"] == pytest.approx(0.01) and p["beta2"] == pytest.approx(0.999) for p in params)
    # the result: samples from its sampler weights, continues from its training state
    base, sampler, state = parse_ref(job.result or "")
    assert base == BASE and sampler and "/sampler_weights/" in sampler and state and "/weights/" in state
    assert len(job.losses) == 4 and job.progress == 1.0 and job.examples == 9 and job.dropped == 1


async def test_a_finetuned_model_samples_its_checkpoint_and_continues_from_its_state(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    spec = FinetuneSpec(epochs=1, batch_size=1)
    b = backend(fake, tmp_path, tokenizer_dir)
    try:
        first = await finish(b, await b.submit_finetune(BASE, [example("1+1?", "2")], spec, key="r/0"))
        assert first.result is not None
        await b.complete(first.result, [Message(role="user", content="3+4?")], Sampling(seed=1))
        second = await finish(b, await b.submit_finetune(first.result, [example("1+2?", "3")], spec, key="r/1"))
    finally:
        await b.aclose()
    _, sampler, state = parse_ref(first.result)
    with fake.state.lock:
        assert fake.state.samples[-1].model_path == sampler
        continued = [r for r in fake.state.runs.values() if r.loaded_from == state]
    assert len(continued) == 1 and not continued[0].optimizer_restored  # weights only: a new job's optimizer
    assert second.state is JobState.SUCCEEDED and second.result != first.result


async def test_a_finished_job_is_adopted_by_its_key_without_a_request(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    spec = FinetuneSpec(epochs=1)
    b = backend(fake, tmp_path, tokenizer_dir)
    try:
        done = await finish(b, await b.submit_finetune(BASE, [example("1+1?", "2")], spec, key="k"))
    finally:
        await b.aclose()
    with fake.state.lock:
        before = sum(fake.state.requests.values())
    again = backend(fake, tmp_path, tokenizer_dir)  # a new process on the same run directory
    try:
        adopted = await again.submit_finetune(BASE, [example("1+1?", "2")], spec, key="k")
    finally:
        await again.aclose()
    assert adopted.state is JobState.SUCCEEDED and adopted.result == done.result and adopted.id == done.id
    with fake.state.lock:
        assert sum(fake.state.requests.values()) == before  # not one request: nothing paid twice


async def test_a_job_stopped_mid_training_resumes_from_its_last_saved_state(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    fake.configure(delays={"forward_backward": 0.2})  # a margin: the stop lands before step 6 is saved
    examples = [example(f"{i}+1?", f"The answer is {i + 1}.") for i in range(10)]
    spec = FinetuneSpec(epochs=1, batch_size=1)  # 10 steps
    b = backend(fake, tmp_path, tokenizer_dir, save_every=3)
    job = await b.submit_finetune(BASE, examples, spec, key="kill")
    while fake.state.optim_steps < 5:  # mid-way, after the save at step 3
        await asyncio.sleep(0.01)
    await b.aclose()  # the task dies like a killed process: nothing after the last save is recorded
    with fake.state.lock:
        trained_before = fake.state.optim_steps
    again = backend(fake, tmp_path, tokenizer_dir, save_every=3)
    try:
        done = await finish(again, await again.poll_finetune(job))  # a resumed run polls, never resubmits
    finally:
        await again.aclose()
    assert done.state is JobState.SUCCEEDED
    with fake.state.lock:
        resumed = [r for r in fake.state.runs.values() if r.loaded_from]
        total = fake.state.optim_steps
    assert len(resumed) == 1 and resumed[0].optimizer_restored and str(resumed[0].loaded_from).endswith("-step-3")
    assert len(resumed[0].optim_params) == 10 - 3  # it trained steps 4..10, no more
    repeated = total - 10
    assert 0 <= repeated < 3 and trained_before >= 5  # at most one checkpoint interval paid twice


async def test_a_failed_attempt_is_continued_by_the_next_attempt_from_its_saved_state(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    fake.configure(delays={"forward_backward": 0.2})  # the failure lands before steps 5-6 are done
    examples = [example(f"{i}+1?", f"The answer is {i + 1}.") for i in range(6)]
    spec = FinetuneSpec(epochs=1, batch_size=1)
    b = backend(fake, tmp_path, tokenizer_dir, save_every=2)
    try:
        job = await b.submit_finetune(BASE, examples, spec, key="a")
        while fake.state.saves["training"] < 2:
            await asyncio.sleep(0.01)
        fake.fail_future("forward_backward", "GPU fell over", category="server", count=50)
        failed = await finish(b, job)
        fake.configure(delays={})
        with fake.state.lock:  # no more failures queued beyond the one that hit
            fake.state._next_failures.clear()
        assert failed.state is JobState.FAILED and failed.retryable and "GPU fell over" in (failed.error or "")
        retried = await finish(b, await b.submit_finetune(BASE, examples, spec, key="a#attempt-2"))
    finally:
        await b.aclose()
    assert retried.state is JobState.SUCCEEDED, retried.error
    with fake.state.lock:
        continued = [r for r in fake.state.runs.values() if r.loaded_from]
    assert len(continued) == 1 and str(continued[0].loaded_from).endswith("-step-4")
    assert len(continued[0].optim_params) == 2


async def test_nothing_to_train_fails_the_job_permanently_before_any_request(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    b = backend(fake, tmp_path, tokenizer_dir)
    try:
        job = await finish(b, await b.submit_finetune(BASE, [example("1?", "1", weight=0)], FinetuneSpec(), key="z"))
    finally:
        await b.aclose()
    assert job.state is JobState.FAILED and not job.retryable and "no trainable example" in (job.error or "")
    with fake.state.lock:
        assert fake.state.requests["create_model"] == 0


# --------------------------------------------------------------------------- start-up errors


async def _check_error(b: TinkerBackend, models: list[str]) -> str:
    try:
        with pytest.raises(FatalBackendError) as err:
            await b.check(models)
    finally:
        await b.aclose()
    line = str(err.value)
    assert "\n" not in line and FAKE_API_KEY not in line
    return line


async def test_a_wrong_key_is_one_line_before_any_paid_call(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    line = await _check_error(backend(fake, tmp_path, tokenizer_dir, key="tml-wrong-key-0000"), [BASE])
    assert "TINKER_API_KEY" in line and "refused" in line and "tml-wrong-key-0000" not in line
    with fake.state.lock:
        assert fake.state.requests["create_model"] == 0 and fake.state.requests["asample"] == 0


async def test_an_unknown_base_model_is_one_line(fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path) -> None:
    line = await _check_error(backend(fake, tmp_path, tokenizer_dir), ["acme/NoSuchModel-7B"])
    assert "unknown base model 'acme/NoSuchModel-7B'" in line and BASE in line
    with fake.state.lock:
        assert fake.state.requests["create_model"] == 0


async def test_a_model_the_provider_does_not_serve_for_training_is_one_line(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    only = ServedModel("Qwen/Qwen3-235B-A22B-Instruct-2507", trainable=False)
    with FakeTinker(models=[only, ServedModel(BASE)]) as fake:
        line = await _check_error(backend(fake, tmp_path, tokenizer_dir), [only.name])
        with fake.state.lock:
            assert fake.state.requests["create_model"] == 0
    assert "does not serve" in line and "finetune" in line


async def test_no_key_and_no_tokenizer_are_one_line_each(fake: FakeTinker, tmp_path: Path) -> None:
    line = await _check_error(TinkerBackend(TinkerOptions(base_url=fake.base_url), tmp_path, key=None), [BASE])
    assert "TINKER_API_KEY is not set" in line
    missing = TinkerOptions(base_url=fake.base_url, tokenizer=str(tmp_path / "nope"))
    line = await _check_error(TinkerBackend(missing, tmp_path, key=FAKE_API_KEY), [BASE])
    assert "no tokenizer" in line and "backend.options.tokenizer" in line


async def test_a_failed_sample_is_transient_and_a_refused_one_fatal(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    b = backend(fake, tmp_path, tokenizer_dir)
    messages = [Message(role="user", content="1+1?")]
    try:
        fake.fail_future("asample", "sampler crashed", category="server")
        with pytest.raises(TransientBackendError, match="sampler crashed"):
            await b.complete(BASE, messages, Sampling(seed=1))
        fake.fail_future("asample", "prompt too long", category="user")
        with pytest.raises(FatalBackendError, match="prompt too long"):
            await b.complete(BASE, messages, Sampling(seed=2))
        assert (await b.complete(BASE, messages, Sampling(seed=3))).text
    finally:
        await b.aclose()


async def test_full_finetuning_is_refused_before_any_request(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    b = backend(fake, tmp_path, tokenizer_dir)
    try:
        with pytest.raises(FatalBackendError, match="LoRA adapters only"):
            await b.submit_finetune(BASE, [example("1?", "1")], FinetuneSpec(method="full"), key="f")
    finally:
        await b.aclose()
    with fake.state.lock:
        assert fake.state.requests["create_model"] == 0


async def test_a_key_the_sdk_refuses_outright_is_one_line_without_the_key(
    fake: FakeTinker, tmp_path: Path, tokenizer_dir: Path
) -> None:
    line = await _check_error(backend(fake, tmp_path, tokenizer_dir, key="sk-not-a-tinker-key"), [BASE])
    assert "sk-not-a-tinker-key" not in line and "tinker" in line
    with fake.state.lock:
        assert fake.state.auth_failures == 0  # never sent
