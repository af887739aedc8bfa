"""``auto`` prefers a set TINKER_API_KEY over OpenAI when OpenAI cannot finetune, and only then."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

import backends
from backends.options import AutoOptions, TinkerOptions
from backends.tinker_auto import create_auto, openai_can_finetune

BEFORE, CUT_OFF = dt.date(2026, 12, 5), dt.date(2027, 1, 6)


@pytest.fixture
def chosen(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Records which side auto builds, with which options (no SDK, no model)."""
    import backends.local as local
    import backends.tinker as tinker

    seen: dict[str, Any] = {}
    monkeypatch.setattr(tinker, "create", lambda options, run_dir: seen.setdefault("tinker", options))
    monkeypatch.setattr(local, "create_auto", lambda options, run_dir: seen.setdefault("local.create_auto", options))
    return seen


def test_the_last_day_openai_takes_jobs_is_2027_01_05() -> None:
    options = AutoOptions()
    assert openai_can_finetune(options, dt.date(2027, 1, 5))
    assert not openai_can_finetune(options, CUT_OFF)
    assert not openai_can_finetune(AutoOptions(openai_finetunes=False), BEFORE)


@pytest.mark.parametrize(
    ("openai_key", "tinker_key", "openai_finetunes", "today", "side"),
    [
        (True, True, True, CUT_OFF, "tinker"),  # nobody can finetune at OpenAI any more
        (True, True, False, BEFORE, "tinker"),  # this organisation cannot
        (True, True, True, BEFORE, "local.create_auto"),  # OpenAI can: the old choice (openai)
        (True, False, True, CUT_OFF, "local.create_auto"),  # no Tinker key: the old choice (its refusal names tinker)
        (False, True, True, CUT_OFF, "local.create_auto"),  # no OpenAI key: the local fallback, as before
    ],
)
def test_auto_prefers_tinker_only_when_openai_cannot_finetune(
    chosen: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    openai_key: bool,
    tinker_key: bool,
    openai_finetunes: bool,
    today: dt.date,
    side: str,
) -> None:
    for env, on in (("OPENAI_API_KEY", openai_key), ("TINKER_API_KEY", tinker_key)):
        if on:
            monkeypatch.setenv(env, "tml-x" if env.startswith("TINKER") else "sk-x")
        else:
            monkeypatch.delenv(env, raising=False)
    options = AutoOptions.model_validate({"openai_finetunes": openai_finetunes, "tinker": {"save_every": 3}})
    create_auto(options, tmp_path, today=today)
    assert list(chosen) == [side]
    if side == "tinker":
        assert chosen["tinker"] == TinkerOptions(save_every=3)


def test_the_registry_routes_auto_and_tinker() -> None:
    assert "tinker" in backends.names()
    assert backends.options_model("tinker") is TinkerOptions
    with pytest.raises(ValueError, match="save_everyy"):
        backends.parse("tinker", {"save_everyy": 1})
    with pytest.raises(ValueError, match="base_url"):  # tinker takes only its own table under auto
        AutoOptions.model_validate({"tinker": {"base_url": 1}})
