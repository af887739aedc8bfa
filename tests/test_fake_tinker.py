"""The real ``tinker`` SDK against tests/fakes/fake_tinker.py over HTTP on 127.0.0.1.

These pin the fake to the SDK's wire protocol (sessions, futures, protobuf bodies, error shapes)
and show what the SDK does with the faults the tinker backend must survive: the SDK's own retries
(counted here), a failed future, a lost response, a slow forward_backward, a wrong key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest

tinker = pytest.importorskip("tinker")  # the `tinker` extra
from fakes.fake_tinker import (  # noqa: E402
    FAKE_API_KEY,
    FakeTinker,
    Faults,
    SampleCall,
    ServedModel,
    serve_tinker,
    text_sampler,
)
from tinker import types  # noqa: E402

BASE = "Qwen/Qwen3-8B"
EOT = 151645  # Qwen's <|im_end|>: the stop token the backend will send


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # Telemetry goes to the same base URL (the fake accepts it); off here so request counts are exact.
    monkeypatch.setenv("TINKER_TELEMETRY", "0")


@pytest.fixture
def fake() -> Iterator[FakeTinker]:
    yield from serve_tinker()


@contextmanager
def service(fake: FakeTinker, api_key: str = FAKE_API_KEY) -> Iterator[Any]:
    sc = tinker.ServiceClient(base_url=fake.base_url, api_key=api_key)
    try:
        yield sc
    finally:
        sc.close("success").result(timeout=30)


def datum(tokens: list[int], weights: list[float]) -> Any:
    """A next-token datum: model_input = tokens[:-1], targets = tokens[1:] (the cookbook's shape)."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )


ADAM = types.AdamParams(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-8)


def test_training_records_the_datums_exactly_and_counts_steps(fake: FakeTinker) -> None:
    batch = [datum([10, 11, 12, 13, 14], [0.0, 0.0, 1.0, 1.0]), datum([20, 21, 22], [1.0, 0.5])]
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=8).result()
        first = tc.forward_backward(batch, "cross_entropy")
        tc.optim_step(ADAM).result()
        second = tc.forward_backward(batch, "cross_entropy").result()
        first_out = first.result()
        assert tc.get_info().lora_rank == 8 and tc.get_info().model_data.model_name == BASE

    with fake.state.lock:
        run = fake.state.runs[tc.model_id]
        assert run.base_model == BASE and run.rank == 8 and run.step == 1 and run.forward_backwards == 2
        got = [(d.tokens, d.target_tokens, d.weights, d.loss_fn) for d in run.datums[:2]]
        assert run.optim_params[0]["learning_rate"] == pytest.approx(1e-4)
        assert run.optim_params[0]["eps"] == pytest.approx(1e-8)
        assert fake.state.tokens["trained"] == 2 * (4 + 2)
        assert fake.state.finished == {fake.state.sessions[0]: "success"}  # ServiceClient.close's reason
    assert got == [
        ((10, 11, 12, 13), (11, 12, 13, 14), (0.0, 0.0, 1.0, 1.0), "cross_entropy"),
        ((20, 21), (21, 22), (1.0, 0.5), "cross_entropy"),
    ]
    # one output per datum and position; the weighted loss falls after the optimizer step
    assert [o["logprobs"].to_numpy().shape for o in first_out.loss_fn_outputs] == [(4,), (2,)]
    logprobs = first_out.loss_fn_outputs[0]["logprobs"].to_numpy()
    manual = float(-(logprobs * np.array([0, 0, 1, 1])).sum()) - float(
        (first_out.loss_fn_outputs[1]["logprobs"].to_numpy() * np.array([1, 0.5])).sum()
    )
    assert first_out.metrics["loss:sum"] == pytest.approx(manual, rel=1e-5)
    assert second.metrics["loss:sum"] == pytest.approx(0.9 * first_out.metrics["loss:sum"], rel=1e-5)


def test_a_datum_whose_targets_do_not_match_its_input_fails_as_a_user_error(fake: FakeTinker) -> None:
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]},
    )
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        with pytest.raises(tinker.RequestFailedError) as err:
            tc.forward_backward([bad], "cross_entropy").result()
    assert err.value.category == types.RequestErrorCategory.User
    assert "must both be [3]" in str(err.value)
    assert fake.state.datums == []


def test_save_state_then_a_new_session_continues_from_the_saved_step(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4, user_metadata={"key": "it0/a0/gen"}).result()
        for _ in range(2):
            tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy")
            tc.optim_step(ADAM)
        saved = tc.save_state("iter-0-step-2", user_metadata={"job": "k1"}).result()
        tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy")
        tc.optim_step(ADAM).result()  # a step after the save: lost when the client dies
        assert fake.steps(tc.model_id) == 3
    assert saved.path == f"tinker://{tc.model_id}/weights/iter-0-step-2"

    with service(fake) as sc:  # a new process would do the same: a new session, the saved path
        resumed = sc.create_training_client_from_state_with_optimizer(saved.path).result()
        assert fake.steps(resumed.model_id) == 2
        resumed.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy")
        resumed.optim_step(ADAM).result()
        rest = tinker.RestClient(base_url=fake.base_url, api_key=FAKE_API_KEY)
        info = rest.get_weights_info_by_tinker_path(saved.path).result()
        listed = rest.list_checkpoints(tc.model_id).result()
        runs = rest.list_training_runs().result().training_runs
    with fake.state.lock:
        run = fake.state.runs[resumed.model_id]
        assert (run.step, run.loaded_from, run.optimizer_restored) == (3, saved.path, True)
        assert fake.state.loads == 1 and fake.state.saves["training"] == 1
        assert fake.state.optim_steps == 4  # 3 + 1: the step after the save was paid twice
        assert len(fake.state.sessions) == 2 and resumed.model_id.startswith(fake.state.sessions[1])
    assert (info.base_model, info.lora_rank) == (BASE, 4)
    assert [c.tinker_path for c in listed.checkpoints] == [saved.path]
    assert listed.checkpoints[0].user_metadata == {"job": "k1"}
    assert [(r.training_run_id, r.user_metadata) for r in runs] == [
        (resumed.model_id, None),
        (tc.model_id, {"key": "it0/a0/gen"}),
    ]
    assert runs[1].last_checkpoint is not None and runs[1].last_checkpoint.tinker_path == saved.path


def test_the_deprecated_load_state_also_restores_the_step(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        tc.optim_step(ADAM)
        path = tc.save_state("one").result().path
        other = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        with pytest.warns(FutureWarning):
            other.load_state(path).result()
        assert fake.steps(other.model_id) == 1
        with pytest.raises(tinker.RequestFailedError, match="already exists"):
            tc.save_state("one").result()  # same name, no overwrite


def test_an_unknown_checkpoint_is_refused(fake: FakeTinker) -> None:
    with service(fake) as sc:
        with pytest.raises(tinker.RequestFailedError, match="not found"):
            sc.create_training_client_from_state("tinker://nope:train:0/weights/x").result()
        with pytest.raises(tinker.NotFoundError):
            sc.create_sampling_client(model_path="tinker://nope:train:0/sampler_weights/x").result()


def _sample(client: Any, prompt: list[int], seed: int | None, **params: Any) -> list[list[int]]:
    params.setdefault("max_tokens", 32)
    sampling = types.SamplingParams(seed=seed, stop=params.pop("stop", [EOT]), **params)
    response = client.sample(types.ModelInput.from_ints(prompt), 2, sampling).result()
    return [list(s.tokens) for s in response.sequences]


def test_sampling_is_deterministic_by_seed_and_differs_by_checkpoint(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        first = tc.save_weights_for_sampler("agent-0-iter-0").result().path
        tc.optim_step(ADAM)
        second = tc.save_weights_for_sampler("agent-0-iter-1").result().path
        a, b = (sc.create_sampling_client(model_path=p).result() for p in (first, second))
        base = sc.create_sampling_client(base_model=BASE).result()
        prompt = [100, 200, 300]
        same = _sample(a, prompt, 7), _sample(a, prompt, 7)
        assert same[0] == same[1]
        assert same[0][0] != same[0][1]  # the two samples of one request differ
        assert _sample(a, prompt, 8) != same[0]
        assert _sample(b, prompt, 7) != same[0]
        assert _sample(base, prompt, 7) not in (same[0], _sample(b, prompt, 7))
        assert _sample(a, prompt, None) != _sample(a, prompt, None)  # unseeded: fresh each time
        greedy = _sample(a, prompt, 1, temperature=0.0), _sample(a, prompt, 2, temperature=0.0)
        assert greedy[0] == greedy[1]
        assert a.get_base_model() == BASE
    with fake.state.lock:
        assert first == f"tinker://{tc.model_id}/sampler_weights/agent-0-iter-0"
        assert fake.state.checkpoints[second].step == 1
        assert fake.state.samples[0].model_path == first and fake.state.samples[0].prompt == (100, 200, 300)
        assert fake.state.tokens["prefill"] == 3 * len(fake.state.samples)


def test_stop_tokens_max_tokens_and_logprobs(fake: FakeTinker) -> None:
    with service(fake) as sc:
        base = sc.create_sampling_client(base_model=BASE).result()
        prompt = types.ModelInput.from_ints([5, 6, 7, 8])
        stopped = base.sample(prompt, 1, types.SamplingParams(max_tokens=64, seed=1, stop=[EOT])).result()
        cut = base.sample(prompt, 1, types.SamplingParams(max_tokens=2, seed=1, stop=[EOT])).result()
        scored = base.compute_logprobs(prompt).result()
        tail = base.compute_logprobs(prompt, prompt_logprobs_last_n=2).result()
    seq = stopped.sequences[0]
    assert seq.stop_reason == "stop" and seq.tokens[-1] == EOT and EOT not in seq.tokens[:-1]
    assert len(seq.logprobs) == len(seq.tokens) and all(-4.1 < lp < 0 for lp in seq.logprobs)
    assert cut.sequences[0].stop_reason == "length" and cut.sequences[0].tokens == seq.tokens[:2]
    assert scored[0] is None and all(v is not None and v < 0 for v in scored[1:])
    assert tail[:2] == [None, None] and tail[2:] == scored[2:]


def test_a_sampler_hook_answers_and_stop_strings_need_a_decoder() -> None:
    # A toy tokenizer: token = 1000 + ord(char). The hook answers the sum of the prompt's two numbers.
    def encode(text: str) -> list[int]:
        return [1000 + ord(c) for c in text]

    def decode(tokens: Any) -> str:
        return "".join(chr(t - 1000) for t in tokens)

    def arithmetic(call: SampleCall) -> list[int]:
        a, b = decode(call.prompt).split("+")
        return encode(f"The answer is {int(a) + int(b)}.\nDone")

    def by_text(prompt: str, call: SampleCall) -> str:
        a, b = prompt.split("*")
        return f"{int(a) * int(b)} (seed {call.seed})"

    with FakeTinker(sampler=arithmetic, decode=decode) as fake, service(fake) as sc:
        base = sc.create_sampling_client(base_model=BASE).result()
        params = types.SamplingParams(max_tokens=50, seed=0, stop=["\n"])
        out = base.sample(types.ModelInput.from_ints(encode("12+30")), 1, params).result()
    assert decode(out.sequences[0].tokens) == "The answer is 42.\n"
    assert out.sequences[0].stop_reason == "stop"
    with FakeTinker(sampler=text_sampler(encode, decode, by_text)) as fake, service(fake) as sc:
        base = sc.create_sampling_client(base_model=BASE).result()
        params = types.SamplingParams(max_tokens=50, seed=9, stop=[EOT])
        out = base.sample(types.ModelInput.from_ints(encode("2*21")), 1, params).result()
    assert out.sequences[0].tokens == [*encode("42 (seed 9)"), EOT]
    with FakeTinker() as fake, service(fake) as sc:
        base = sc.create_sampling_client(base_model=BASE).result()
        with pytest.raises(tinker.RequestFailedError, match="decode="):
            base.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(stop=["\n"])).result()


def test_sampling_a_training_checkpoint_fails_like_the_live_service(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        state_path = tc.save_state("s").result().path
        sampler = sc.create_sampling_client(model_path=state_path).result()
        with pytest.raises(tinker.RequestFailedError) as err:
            sampler.sample(types.ModelInput.from_ints([1]), 1, types.SamplingParams(max_tokens=4)).result()
    assert err.value.category == types.RequestErrorCategory.User


async def test_async_variants(fake: FakeTinker) -> None:
    sc = tinker.ServiceClient(base_url=fake.base_url, api_key=FAKE_API_KEY)
    try:
        tcs = await asyncio.gather(*(sc.create_lora_training_client(base_model=BASE, rank=4) for _ in range(3)))
        futures = [
            tc.forward_backward([datum([1, 2, 3, i], [1.0, 1.0, 1.0])], "cross_entropy") for i, tc in enumerate(tcs)
        ]
        steps = [tc.optim_step(ADAM) for tc in tcs]
        outputs = await asyncio.gather(*futures, *steps)
        paths = await asyncio.gather(*(tc.save_weights_for_sampler(f"agent-{i}") for i, tc in enumerate(tcs)))
        sampler = await sc.create_sampling_client(model_path=paths[0].path)
        response = await sampler.sample(types.ModelInput.from_ints([1, 2]), 1, types.SamplingParams(seed=3))
        logprobs = await sampler.compute_logprobs(types.ModelInput.from_ints([1, 2, 3]))
    finally:
        await sc.close("success")
    assert len({tc.model_id for tc in tcs}) == 3
    assert all(fake.steps(tc.model_id) == 1 for tc in tcs)
    assert outputs[0].metrics["loss:sum"] > 0 and len(response.sequences[0].tokens) > 0
    assert logprobs[0] is None and len(logprobs) == 3


def test_a_wrong_key_is_one_fast_authentication_error(fake: FakeTinker) -> None:
    start = time.monotonic()
    with pytest.raises(tinker.AuthenticationError) as err:
        tinker.ServiceClient(base_url=fake.base_url, api_key="tml-not-the-key").create_lora_training_client(
            base_model=BASE
        )
    elapsed = time.monotonic() - start
    assert err.value.status_code == 401 and "Invalid API key" in str(err.value)
    assert "tml-not-the-key" not in str(err.value)
    # counts prove it; the bound only guards against a retry loop (the SDK's would take ≥ 57 s)
    assert elapsed < 10.0, f"a 401 must not be retried ({elapsed:.1f}s)"
    with fake.state.lock:
        assert fake.state.auth_failures == 1  # the first request (client config); nothing retried
        assert fake.state.requests["create_model"] == 0
    # a key without the provider's prefix never leaves the process
    with pytest.raises(tinker.TinkerError, match="tml-"):
        tinker.ServiceClient(base_url=fake.base_url, api_key="sk-wrong").create_lora_training_client(base_model=BASE)
    assert fake.state.auth_failures == 1


def test_unknown_and_unserved_models_are_refused(fake: FakeTinker) -> None:
    rest = tinker.RestClient(base_url=fake.base_url, api_key=FAKE_API_KEY)
    served = rest.get_server_capabilities().result().supported_models
    assert {m.model_name for m in served} == {BASE, "meta-llama/Llama-3.1-8B-Instruct"}
    with service(fake) as sc:
        start = time.monotonic()
        with pytest.raises(tinker.BadRequestError, match="not supported for training"):
            sc.create_lora_training_client(base_model="acme/NoSuchModel-7B").result()
        assert time.monotonic() - start < 10.0  # not retried (see the request counts below)
        with pytest.raises(tinker.BadRequestError, match="not available for sampling"):
            sc.create_sampling_client(base_model="acme/NoSuchModel-7B").result()
    with fake.state.lock:
        assert fake.state.runs == {}
        assert fake.state.requests["create_model"] == 1 and fake.state.retries_seen["create_model"] == 0

    only_sampling = ServedModel("Qwen/Qwen3-235B-A22B-Instruct-2507", trainable=False)
    with FakeTinker(models=[only_sampling], unknown_model="future") as other, service(other) as sc:
        with pytest.raises(tinker.RequestFailedError) as err:
            sc.create_lora_training_client(base_model=only_sampling.name).result()
        assert err.value.category == types.RequestErrorCategory.User
        sc.create_sampling_client(base_model=only_sampling.name).result()


def test_a_failed_future_surfaces_as_request_failed_and_changes_nothing(fake: FakeTinker) -> None:
    fake.fail_future("forward_backward", "GPU fell over", category="server")
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        with pytest.raises(tinker.RequestFailedError, match="GPU fell over") as err:
            tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy").result()
        assert err.value.category == types.RequestErrorCategory.Server
        fresh = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        fresh.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy").result()
    with fake.state.lock:
        assert fake.state.runs[tc.model_id].forward_backwards == 0
        assert len(fake.state.datums) == 1


def test_lost_responses_are_retried_by_the_sdk_and_applied_once(fake: FakeTinker) -> None:
    fake.fail_next("forward_backward", "drop_after")  # processed, answer lost
    fake.fail_next("optim_step", "drop")  # cut before processing
    fake.fail_next("save_weights", "drop_after")
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy")
        tc.optim_step(ADAM).result()
        tc.save_state("after-drop").result()
    with fake.state.lock:
        assert fake.state.requests["forward_backward"] == 2 and fake.state.duplicates["forward_backward"] == 1
        assert fake.state.requests["optim_step"] == 2 and fake.state.duplicates["optim_step"] == 0
        assert fake.state.duplicates["save_weights"] == 1 and fake.state.saves["training"] == 1
        assert len(fake.state.datums) == 1 and fake.state.runs[tc.model_id].step == 1


def test_a_slow_forward_backward_is_polled_until_ready() -> None:
    with FakeTinker(delays={"forward_backward": 1.2}, long_poll_s=0.4) as fake, service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        start = time.monotonic()
        tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy").result()
        elapsed = time.monotonic() - start
        polls = fake.state.requests["retrieve_future"]
    assert elapsed > 1.1
    assert polls >= 1 + 3  # create_model's future, then try_again twice before the answer


def test_rate_limits_and_server_errors_are_survived_by_the_sdk_retries() -> None:
    faults = Faults(rate=0.2, kinds=("429", "500", "503", "drop", "drop_after"), seed=3)
    with FakeTinker(faults=faults) as fake, service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        for step in range(4):
            tc.forward_backward([datum([1, 2, 3, step], [1.0, 1.0, 1.0])], "cross_entropy")
            tc.optim_step(ADAM)
        path = tc.save_weights_for_sampler("final").result().path
        sampler = sc.create_sampling_client(model_path=path).result()
        tokens = _sample(sampler, [1, 2, 3], 5)
    with fake.state.lock:
        injected = sum(fake.state.faults_injected.values())
        assert injected >= 3, fake.state.faults_injected
        assert fake.state.runs[tc.model_id].step == 4 and len(fake.state.datums) == 4
        assert sum(fake.state.retries_seen.values()) > 0
    with FakeTinker() as clean, service(clean) as sc:
        ctc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        for step in range(4):
            ctc.forward_backward([datum([1, 2, 3, step], [1.0, 1.0, 1.0])], "cross_entropy")
            ctc.optim_step(ADAM)
        cpath = ctc.save_weights_for_sampler("final").result().path
        csampler = sc.create_sampling_client(model_path=cpath).result()
        # the same run in a fresh fake without faults: same path, same answers — the faults changed nothing
        assert cpath == path
        assert _sample(csampler, [1, 2, 3], 5) == tokens


def test_big_batches_are_split_and_compressed_requests_are_read() -> None:
    batch = [datum([i, i + 1, i + 2], [1.0, 1.0]) for i in range(5)]
    with FakeTinker(fwdbwd_max_chunk_len=2, compress_fwdbwd=True) as fake, service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        out = tc.forward_backward(batch, "cross_entropy").result()
    assert len(out.loss_fn_outputs) == 5
    with fake.state.lock:
        assert fake.state.requests["forward_backward"] == 3
        assert sorted(d.tokens for d in fake.state.datums) == [(i, i + 1) for i in range(5)]


def test_the_sdk_retries_429_and_5xx_itself_and_never_a_400(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        fake.fail_next("forward_backward", 429, count=3)  # retried by the HTTP client (retry-after-ms)
        fake.fail_next("retrieve_future", 500, count=2)  # polled again by the future
        tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy").result()
        fake.fail_next("forward_backward", 400)
        with pytest.raises(tinker.BadRequestError):
            tc.forward_backward([datum([1, 2, 3], [1.0, 1.0])], "cross_entropy").result()
    with fake.state.lock:
        assert fake.state.requests["forward_backward"] == 4 + 1
        assert fake.state.retries_seen["forward_backward"] == 3  # the SDK's own x-stainless-retry-count
        assert fake.state.faults_injected == {
            "forward_backward:429": 3,
            "retrieve_future:500": 2,
            "forward_backward:400": 1,
        }
        assert len(fake.state.datums) == 1


def test_sdk_telemetry_carries_the_key_on_a_fatal_error_unless_turned_off(
    fake: FakeTinker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the backend must know: the SDK reports a fatal future error to the provider's
    # /api/v1/telemetry with the request headers, X-API-Key included. TINKER_TELEMETRY=0 stops it.
    for setting, expect_key in (("1", True), ("0", False)):
        monkeypatch.setenv("TINKER_TELEMETRY", setting)
        with service(fake) as sc:
            tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
            fake.fail_next("retrieve_future", 403)
            with pytest.raises(ValueError, match="403"):
                tc.save_state(f"telemetry-{setting}").result()
        with fake.state.lock:
            sent = repr(fake.state.telemetry)
            fake.state.telemetry.clear()
        assert (FAKE_API_KEY in sent) is expect_key


def test_state_survives_a_server_restart(fake: FakeTinker) -> None:
    with service(fake) as sc:
        tc = sc.create_lora_training_client(base_model=BASE, rank=4).result()
        tc.optim_step(ADAM)
        path = tc.save_state("before-restart").result().path
    fake.stop()
    fake.start()  # same port, same checkpoints: like the live service after a client crash
    with service(fake) as sc:
        resumed = sc.create_training_client_from_state(path).result()
    assert fake.steps(resumed.model_id) == 1
