"""``auto`` with a Tinker key: prefer the tinker backend over OpenAI when OpenAI cannot finetune.

OpenAI's fine-tuning is closing (``backends.openai.OPENAI_GATES``): an organisation that cannot create
jobs any more — every one from the cut-off day on, or one the recipe declares with
``openai_finetunes = false`` — would debate on OpenAI and then fail at the first job. With
``TINKER_API_KEY`` set, ``auto`` takes the tinker backend instead. Otherwise the choice is the one
:func:`backends.local.create_auto` makes (OpenAI when its key is set, else the local fallback).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from pathlib import Path

from agentsoc.backend import Backend
from backends.options import AutoOptions

log = logging.getLogger(__name__)


def openai_can_finetune(options: AutoOptions, today: dt.date | None = None) -> bool:
    from backends.openai import NO_NEW_JOBS_FROM  # openai is a core dependency; imported only here

    day = today or dt.datetime.now(dt.UTC).date()
    return options.openai_finetunes and day < NO_NEW_JOBS_FROM


def create_auto(options: AutoOptions, run_dir: Path, *, today: dt.date | None = None) -> Backend:
    """tinker when both keys are set and OpenAI cannot finetune; else local.create_auto's choice."""
    keys = os.environ.get("OPENAI_API_KEY") and os.environ.get("TINKER_API_KEY")
    if keys and not openai_can_finetune(options, today):
        log.info("backend 'auto' -> tinker (TINKER_API_KEY is set and OpenAI cannot create fine-tuning jobs)")
        from backends.tinker import create

        return create(options.tinker, run_dir)
    from backends.local import create_auto as local_auto

    return local_auto(options, run_dir)
