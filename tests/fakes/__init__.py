"""Fakes for offline tests, and their pytest fixtures (import the fixture into a test module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakes.fake_openai import FakeOpenAI, serve
from fakes.fake_vllm import FakeVllm, serve_vllm

__all__ = ["FakeOpenAI", "FakeVllm", "fake_openai", "fake_vllm"]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A fresh fake OpenAI server on 127.0.0.1 per test; tweak it with ``fake_openai.configure``."""
    yield from serve()


@pytest.fixture
def fake_vllm() -> Iterator[FakeVllm]:
    """A fresh fake vLLM server on 127.0.0.1 per test (no adapters; base ``qwen2.5-coder-0.5b-instruct``)."""
    yield from serve_vllm()
