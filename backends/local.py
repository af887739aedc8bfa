"""The ``local`` backend (llama.cpp inference + LoRA training worker) and the ``auto`` choice.

``local`` is what a machine without an API key runs: the bundled Qwen2.5-Coder-0.5B-Instruct
(or the GGUF of ``model_path``) served by :mod:`backends.llamacpp`, with fine-tuning jobs run by
:mod:`backends.hf` in a background thread and served as GGUF LoRA adapters on the same base.

Recipe options (``[backend.options]``), all optional:

- ``model`` — bundled model name (``qwen2.5-coder-0.5b-instruct``); ``model_path`` — your own GGUF
  (a chat model with a template in its metadata); ``hf_dir`` — a transformers folder of the same
  model for training (otherwise the GGUF is dequantised, ~1 min per process).
- inference: ``n_ctx`` (4096), ``n_threads``, ``n_batch``, ``extra_buffers``, ``reuse_prefix``,
  ``top_logprobs`` (see :class:`backends.llamacpp.LlamaOptions`).
- training: ``train_threads``, ``lora_targets`` (default q/k/v/o projections), ``hf_cache`` (keep a
  float32 transformers copy of the GGUF in the cache dir: ~2.5 GB, saves the minute of dequantising).

``auto``: the OpenAI backend when ``OPENAI_API_KEY`` is set, otherwise ``local``; it says which
on stderr. Options may hold an ``[backend.options.openai]`` and a ``[backend.options.local]``
table for each side; keys outside them go to whichever is chosen.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agentsoc.backend import Backend, FatalBackendError
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs
from backends.hf import DEFAULT_TARGETS, HF_PIP, LocalJobs, LoraTrainer, TrainerOptions
from backends.llamacpp import LlamaCppBackend, LlamaOptions, adapter_ref, split_ref


def peft_dir_of(adapter_gguf: Path) -> Path:
    """Where the PEFT twin of a GGUF adapter lives (``<job dir>/peft``)."""
    return adapter_gguf.parent / "peft"


def make_runner(trainer: LoraTrainer, base_gguf: Path) -> Callable[..., ModelRef]:
    """The job body: train (continuing from the base's adapter if any), convert, describe."""

    def run(
        job_dir: Path,
        base: ModelRef,
        examples: list[ChatExample],
        spec: FinetuneSpec,
        on_step: Callable[[int, int, float], None],
    ) -> ModelRef:
        from backends.gguf_lora import peft_to_gguf

        name, adapter = split_ref(base)
        init = None
        if adapter is not None:
            init = peft_dir_of(Path(adapter))
            if not (init / "adapter_config.json").is_file():
                raise FatalBackendError(
                    f"continued finetuning from {adapter} needs its PEFT adapter at {init} (written by this backend)"
                )
        result = trainer.train(examples, spec, job_dir, init_adapter=init, on_step=on_step)
        out = peft_to_gguf(result.peft_dir, job_dir / "adapter.gguf", base_gguf=base_gguf, name=job_dir.name)
        (job_dir / "result.json").write_text(
            json.dumps(
                {
                    "steps": result.steps,
                    "losses": result.losses,
                    "trained_tokens": result.trained_tokens,
                    "train_seconds": round(result.seconds, 2),
                    "base_load_seconds": trainer.load_seconds,
                    "continued_from": str(init) if init else None,
                },
                indent=2,
            )
        )
        return adapter_ref(name, out)

    return run


class LocalBackend:
    """llama.cpp for ``complete``/``score``; a local job queue for ``submit/poll_finetune``."""

    name = "local"
    can_finetune = True

    def __init__(self, llama: LlamaCppBackend, jobs: LocalJobs, trainer: LoraTrainer | None = None) -> None:
        self.llama = llama
        self.jobs = jobs
        self.trainer = trainer  #: the training worker's model holder (benchmarks, tests)

    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        return await self.llama.complete(model, messages, sampling)

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        return await self.llama.score(model, messages, response)

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        if spec.method != "lora":
            raise FatalBackendError(
                f"job {key}: the local backend trains LoRA adapters only (method={spec.method!r}); llama.cpp "
                "serves adapters on the one quantised base. Set method = 'lora'."
            )
        missing = [m for m in ("torch", "transformers", "peft", "gguf") if importlib.util.find_spec(m) is None]
        if missing:
            raise FatalBackendError(f"job {key}: local finetuning needs {', '.join(missing)}. Fix: {HF_PIP}")
        return await asyncio.to_thread(self.jobs.submit, base, examples, spec, key)

    async def poll_finetune(self, job: Job) -> Job:
        return self.jobs.poll(job)

    async def aclose(self) -> None:
        # a running training job is not waited for: its state stays "running" on disk and a
        # resumed run restarts it (LocalJobs docs)
        self.jobs.close(timeout=0)
        await self.llama.aclose()


def create(options: Mapping[str, Any], run_dir: Path) -> LocalBackend:
    from backends import bundled

    model = str(options.get("model", bundled.DEFAULT_MODEL))
    path = bundled.resolve_model_path(options.get("model_path"), model)
    llama = LlamaCppBackend(path, model_name=model, options=LlamaOptions.from_options(options))
    hf_dir = options.get("hf_dir")
    trainer = LoraTrainer(
        TrainerOptions(
            model_path=path,
            hf_dir=Path(hf_dir).expanduser() if hf_dir else None,
            threads=options.get("train_threads"),
            lora_targets=tuple(options.get("lora_targets", DEFAULT_TARGETS)),
            hf_cache=bool(options.get("hf_cache", True)),
        )
    )
    jobs = LocalJobs(run_dir / "local-jobs", make_runner(trainer, path))
    return LocalBackend(llama, jobs, trainer)


def create_auto(options: Mapping[str, Any], run_dir: Path) -> Backend:
    """OpenAI when ``OPENAI_API_KEY`` is set, else the local fallback; prints which to stderr."""
    common = {k: v for k, v in options.items() if k not in ("openai", "local")}
    if os.environ.get("OPENAI_API_KEY"):
        print("agentsoc: backend 'auto' -> openai (OPENAI_API_KEY is set)", file=sys.stderr)
        factory = importlib.import_module("backends.openai").create
        backend: Backend = factory({**common, **dict(options.get("openai", {}))}, run_dir)
        return backend
    print(
        "agentsoc: backend 'auto' -> local (no OPENAI_API_KEY): bundled Qwen2.5-Coder-0.5B-Instruct on CPU "
        "via llama.cpp, LoRA finetuning with transformers+peft",
        file=sys.stderr,
    )
    return create({**common, **dict(options.get("local", {}))}, run_dir)
