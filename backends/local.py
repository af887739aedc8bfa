"""The ``local`` backend (llama.cpp inference + LoRA training worker) and the ``auto`` choice.

``local`` is what a machine without an API key runs: the bundled Qwen2.5-Coder-0.5B-Instruct
(or the GGUF of ``model_path``) served by :mod:`backends.llamacpp`, with fine-tuning jobs placed by
:mod:`backends.local_jobs` (one ``python -m backends.hf JOB_DIR`` process per job, one job at a time:
torch never loads into the serving process) and served as GGUF LoRA adapters on the same base.

Recipe options: :class:`backends.options.LocalOptions` (the llama.cpp inference options plus
the trainer's); ``auto`` takes :class:`backends.options.AutoOptions`.

``auto``: the OpenAI backend when ``OPENAI_API_KEY`` is set, otherwise ``local``; it logs which.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agentsoc.backend import Backend, Capabilities, FatalBackendError
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs
from backends.hf import HF_PIP, InProcess
from backends.job_folder import JobInput
from backends.llamacpp import LlamaCppBackend
from backends.local_jobs import Launcher, LocalJobs, Subprocess
from backends.options import DEFAULT_TARGETS, AutoOptions, LocalOptions
from backends.refs import split_ref

log = logging.getLogger(__name__)


def peft_dir_of(adapter_gguf: Path) -> Path:
    """Where the PEFT twin of a GGUF adapter lives (``peft/`` beside it in the job's output folder)."""
    return adapter_gguf.parent / "peft"


@dataclass(frozen=True)
class TrainBase:
    """What every job of a local backend trains from: the base and the trainer's settings."""

    gguf: Path  #: the base llama.cpp serves (adapters are converted for it)
    hf_dir: Path | None = None  #: a transformers folder of the same model, loaded instead of the GGUF
    threads: int | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    hf_cache: bool = True
    bf16: bool | None = None

    def job_input(self, base: ModelRef) -> JobInput:
        """``job.json`` of a job that finetunes ``base`` (continuing from its adapter, if it has one)."""
        _, adapter = split_ref(base)
        init = None
        if adapter is not None:
            init = peft_dir_of(Path(adapter))
            if not (init / "adapter_config.json").is_file():
                raise FatalBackendError(
                    f"continued finetuning from {adapter} needs its PEFT adapter at {init} (written by this backend)"
                )
        return JobInput(
            base_model=self.hf_dir or self.gguf,
            init_adapter=init,
            device="cpu",
            precision="auto" if self.bf16 is None else "bf16" if self.bf16 else "fp32",
            threads=self.threads,
            lora_targets=self.lora_targets,
            serve_gguf=self.gguf,
            cache_base=self.hf_cache,
        )


class LocalBackend:
    """llama.cpp for ``complete``/``score``; a local job queue for ``submit/poll_finetune``."""

    name = "local"
    capabilities = Capabilities(finetune=True, score=True, adapters=True)

    def __init__(self, llama: LlamaCppBackend, jobs: LocalJobs, base: TrainBase) -> None:
        self.llama = llama
        self.jobs = jobs
        self.base = base

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
        job = self.base.job_input(base)
        return await asyncio.to_thread(self.jobs.submit, job, base, examples, spec, key)

    async def poll_finetune(self, job: Job) -> Job:
        return self.jobs.poll(job)

    async def release(self, models: Sequence[ModelRef]) -> None:
        await self.llama.release(models)

    async def aclose(self) -> None:
        # a running training job is ended, not waited for: its state stays "running" on disk and a
        # resumed run restarts it (LocalJobs docs)
        await asyncio.to_thread(self.jobs.close, 10.0)
        await self.llama.aclose()


def create(options: LocalOptions, run_dir: Path) -> LocalBackend:
    from backends import bundled

    path = bundled.resolve_model_path(options.model_path, options.model)
    llama = LlamaCppBackend(path, model_name=options.model, options=options)
    base = TrainBase(
        gguf=path,
        hf_dir=options.hf_dir.expanduser() if options.hf_dir else None,
        threads=options.train_threads,
        lora_targets=options.lora_targets,
        hf_cache=options.hf_cache,
        bf16=options.train_bf16,
    )
    launch: Launcher = InProcess() if options.train_in_process else Subprocess("backends.hf")
    return LocalBackend(llama, LocalJobs(run_dir / "local-jobs", launch), base)


def create_auto(options: AutoOptions, run_dir: Path) -> Backend:
    """OpenAI when ``OPENAI_API_KEY`` is set, else the local fallback; logs which."""
    if os.environ.get("OPENAI_API_KEY"):
        log.info("backend 'auto' -> openai (OPENAI_API_KEY is set)")
        factory = importlib.import_module("backends.openai").create
        backend: Backend = factory(options.openai, run_dir)
        return backend
    log.info(
        "backend 'auto' -> local (no OPENAI_API_KEY): bundled Qwen2.5-Coder-0.5B-Instruct on CPU "
        "via llama.cpp, LoRA finetuning with transformers+peft"
    )
    return create(options.local, run_dir)
