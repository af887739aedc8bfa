"""Error messages of the OpenAI backend say what happened (issue 10 item 10): a 404 from a wrong
base URL names the URL and says there is no such route, the "shut down" hint appears only for a
model that really was shut down, a connection error names the URL, and the hint points at recipes
that exist and use the backends it names."""

from __future__ import annotations

import datetime as dt
import socket
import tomllib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fakes import FakeOpenAI, fake_openai
from openai import AsyncOpenAI

from agentsoc.backend import FatalBackendError, ModelNotFoundError, TransientBackendError
from agentsoc.types import Message, Sampling
from backends.openai import _LOCAL_HINT, OpenAIBackend

__all__ = ["fake_openai"]

ROOT = Path(__file__).resolve().parents[1]
AFTER_SHUTDOWN = dt.date(2026, 11, 1)  # gpt-3.5-turbo shut down 2026-10-23, gpt-4o-mini not until 2027-01-14
ASK = [Message(role="user", content="What is 1+1?")]

MakeBackend = Callable[..., OpenAIBackend]


@pytest.fixture
async def make(fake_openai: FakeOpenAI, tmp_path: Path) -> AsyncIterator[MakeBackend]:
    made: list[OpenAIBackend] = []

    def build(base_url: str | None = None, today: dt.date = AFTER_SHUTDOWN) -> OpenAIBackend:
        client = AsyncOpenAI(
            api_key=fake_openai.state.api_key, base_url=base_url or fake_openai.base_url, max_retries=0, timeout=2
        )
        made.append(OpenAIBackend(client, run_dir=tmp_path, secret=fake_openai.state.api_key, today=today))
        return made[-1]

    yield build
    for b in made:
        await b.aclose()


async def test_wrong_base_url_names_the_url_not_a_shutdown(make: MakeBackend, fake_openai: FakeOpenAI) -> None:
    wrong = fake_openai.base_url.removesuffix("/v1") + "/api"  # a server, but not under this path
    with pytest.raises(ModelNotFoundError) as info:  # still the 404 class the vllm backend catches
        await make(wrong).complete("gpt-4o-mini-2024-07-18", ASK, Sampling(seed=1))
    text = str(info.value)
    assert wrong in text and "no such route" in text and "base_url" in text
    assert "shut" not in text and "local recipe" not in text


async def test_unknown_model_is_not_called_shut_down(make: MakeBackend, fake_openai: FakeOpenAI) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await make().complete("my-typo-model", ASK, Sampling(seed=1))
    text = str(info.value)
    assert "my-typo-model" in text and fake_openai.base_url in text and "shut" not in text


async def test_model_before_its_shutdown_is_not_called_shut_down(make: MakeBackend, fake_openai: FakeOpenAI) -> None:
    fake_openai.configure(models={})  # this server does not have it, but OpenAI has not shut it down
    with pytest.raises(ModelNotFoundError) as info:
        await make().complete("gpt-4o-mini-2024-07-18", ASK, Sampling(seed=1))
    assert "shut" not in str(info.value)


@pytest.mark.parametrize("model", ["gpt-3.5-turbo-0125", "ft:gpt-3.5-turbo-0125:org:i1-a0-generator:abc123"])
async def test_shut_down_model_gets_the_hint(make: MakeBackend, fake_openai: FakeOpenAI, model: str) -> None:
    fake_openai.configure(models={})  # OpenAI answers 404 for a shut-down model and its finetunes
    with pytest.raises(ModelNotFoundError) as info:
        await make().complete(model, ASK, Sampling(seed=1))
    text = str(info.value)
    assert "shut" in text and "2026-10-23" in text and model in text
    assert "recipes/arithmetic-local.toml" in text and "recipes/arithmetic-vllm.toml" in text
    assert "arithmetic-mock" not in text


async def test_preflight_of_a_missing_base_model_is_not_called_shut_down(
    make: MakeBackend, fake_openai: FakeOpenAI
) -> None:
    with pytest.raises(FatalBackendError) as info:
        await make().preflight("gpt-2-gone", "job k")
    text = str(info.value)
    assert "gpt-2-gone" in text and "does not exist" in text and "shut" not in text


async def test_connection_error_names_the_url(make: MakeBackend) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(TransientBackendError) as info:
        await make(url).complete("gpt-4o-mini-2024-07-18", ASK, Sampling(seed=1))
    assert url in str(info.value)


def test_hint_names_recipes_of_the_backends_it_describes() -> None:
    assert "arithmetic-mock" not in _LOCAL_HINT
    for name, backend in [("arithmetic-local", "local"), ("arithmetic-vllm", "vllm")]:
        assert f"recipes/{name}.toml" in _LOCAL_HINT
        recipe = tomllib.loads((ROOT / "recipes" / f"{name}.toml").read_text())
        assert recipe["backend"]["name"] == backend
