"""Fakes for offline tests, and their pytest fixtures (import the fixture into a test module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakes.fake_openai import FakeOpenAI, serve

__all__ = ["FakeOpenAI", "fake_openai"]


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A fresh fake OpenAI server on 127.0.0.1 per test; tweak it with ``fake_openai.configure``."""
    yield from serve()
