"""The ``local`` backend (llama.cpp inference + LoRA training worker) and the ``auto`` choice.

``local`` is what a machine without an API key runs: the bundled Qwen2.5-Coder-0.5B-Instruct
(or the GGUF of ``model_path``) served by :mod:`backends.llamacpp`, with fine-tuning jobs run by
:mod:`backends.hf` in a background thread and served as GGUF LoRA adapters on the same base.

Recipe options: :class:`backends.options.LocalOptions` (the llama.cpp inference options plus
the trainer's); ``auto`` takes :class:`backends.options.AutoOptions`.

``auto``: the OpenAI backend when ``OPENAI_API_KEY`` is set, otherwise ``local``; it says which
on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentsoc.backend import Backend, Capabilities, FatalBackendError
from agentsoc.types import ChatExample, Completion, FinetuneSpec, Job, Message, ModelRef, Sampling, TokenLogprobs
from backends.hf import HF_PIP, LoraTrainer, TrainerOptions
from backends.llamacpp import LlamaCppBackend
from backends.local_jobs import LocalJobs, PermanentJobError, permanent
from backends.options import AutoOptions, LocalOptions
from backends.refs import adapter_ref, split_ref


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
                    "examples": result.examples,
                    "truncated": result.truncated,
                    "dropped": result.dropped,
                    "train_seconds": round(result.seconds, 2),
                    "base_load_seconds": trainer.load_seconds,
                    "continued_from": str(init) if init else None,
                },
                indent=2,
            )
        )
        return adapter_ref(name, out)

    return run


def _train_process_main(conn: Any, options: TrainerOptions, base_gguf: Path) -> None:
    """Body of the training subprocess: one trainer (base loaded once), jobs over a pipe."""
    trainer = LoraTrainer(options)
    run = make_runner(trainer, base_gguf)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        job_dir, base, examples_json, spec_json = msg
        try:
            examples = [ChatExample.model_validate_json(e) for e in examples_json]
            spec = FinetuneSpec.model_validate_json(spec_json)
            result = run(Path(job_dir), base, examples, spec, lambda i, n, loss: conn.send(("step", i, n, loss)))
            conn.send(("done", result))
        except BaseException as exc:
            import traceback

            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc(), permanent(exc)))


class TrainProcess:
    """Runs jobs in ONE long-lived subprocess that keeps the dequantised base loaded.

    Why a process and not a thread: torch's OpenMP pool and llama.cpp's live in separate OpenMP
    runtimes; once torch has run in a process, llama.cpp generation in that process measured
    ~33% slower (25.7 -> 17.2 tokens/s on 2 cores) for the rest of its life. Keeping torch out of
    the serving process avoids that, and returns the trainer's ~5 GB when the backend closes.
    """

    def __init__(self, options: TrainerOptions, base_gguf: Path) -> None:
        self.options = options
        self.base_gguf = base_gguf
        self._proc: Any = None
        self._conn: Any = None

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            return
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # no fork of a process holding llama.cpp threads
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_train_process_main, args=(child, self.options, self.base_gguf), name="agentsoc-train", daemon=True
        )
        self._proc.start()
        child.close()
        self._conn = parent

    def __call__(
        self,
        job_dir: Path,
        base: ModelRef,
        examples: list[ChatExample],
        spec: FinetuneSpec,
        on_step: Callable[[int, int, float], None],
    ) -> ModelRef:
        self._ensure()
        self._conn.send((str(job_dir), base, [e.model_dump_json() for e in examples], spec.model_dump_json()))
        while True:
            try:
                msg = self._conn.recv()
            except EOFError:
                self._proc = None
                raise RuntimeError("the training subprocess died (out of memory?)") from None
            if msg[0] == "step":
                on_step(msg[1], msg[2], msg[3])
            elif msg[0] == "done":
                return str(msg[1])
            else:
                (job_dir / "error.txt").write_text(msg[2])
                raise PermanentJobError(msg[1]) if msg[3] else RuntimeError(msg[1])

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._proc.join(5)
            if self._proc.is_alive():
                self._proc.terminate()
        self._proc = None


class LocalBackend:
    """llama.cpp for ``complete``/``score``; a local job queue for ``submit/poll_finetune``."""

    name = "local"
    capabilities = Capabilities(finetune=True, score=True, adapters=True)

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

    async def release(self, models: Sequence[ModelRef]) -> None:
        await self.llama.release(models)

    async def aclose(self) -> None:
        # a running training job is not waited for: its state stays "running" on disk and a
        # resumed run restarts it (LocalJobs docs)
        self.jobs.close(timeout=0)
        if isinstance(self.jobs.runner, TrainProcess):
            self.jobs.runner.close()
        await self.llama.aclose()


def create(options: LocalOptions, run_dir: Path) -> LocalBackend:
    from backends import bundled

    path = bundled.resolve_model_path(options.model_path, options.model)
    llama = LlamaCppBackend(path, model_name=options.model, options=options)
    trainer_options = TrainerOptions(
        model_path=path,
        hf_dir=options.hf_dir.expanduser() if options.hf_dir else None,
        threads=options.train_threads,
        lora_targets=options.lora_targets,
        hf_cache=options.hf_cache,
        bf16=options.train_bf16,
    )
    if options.train_in_process:
        trainer = LoraTrainer(trainer_options)
        return LocalBackend(llama, LocalJobs(run_dir / "local-jobs", make_runner(trainer, path)), trainer)
    return LocalBackend(llama, LocalJobs(run_dir / "local-jobs", TrainProcess(trainer_options, path)))


def create_auto(options: AutoOptions, run_dir: Path) -> Backend:
    """OpenAI when ``OPENAI_API_KEY`` is set, else the local fallback; prints which to stderr."""
    if os.environ.get("OPENAI_API_KEY"):
        print("agentsoc: backend 'auto' -> openai (OPENAI_API_KEY is set)", file=sys.stderr)
        factory = importlib.import_module("backends.openai").create
        backend: Backend = factory(options.openai, run_dir)
        return backend
    print(
        "agentsoc: backend 'auto' -> local (no OPENAI_API_KEY): bundled Qwen2.5-Coder-0.5B-Instruct on CPU "
        "via llama.cpp, LoRA finetuning with transformers+peft",
        file=sys.stderr,
    )
    return create(options.local, run_dir)
