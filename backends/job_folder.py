"""The job folder: the one contract between whatever places a fine-tuning job and the trainer.

    python -m backends.hf JOB_DIR          the CPU LoRA trainer (backend ``local``)
    python -m backends.trl_train JOB_DIR   TRL's SFTTrainer (backend ``vllm``, placed by Ray)

A launcher (the local process queue, a Ray job, a person at a shell) writes the inputs with
:func:`write_inputs` and starts the trainer on the folder; the trainer trains, writes its outputs
and exits, so its memory is free between jobs. Nothing else passes between them: no pipe, no
arguments besides the folder.

Inputs (``JOB_DIR``):

- ``examples.jsonl`` — OpenAI chat format with per-message ``weight`` (``ChatExample.to_openai()``);
- ``spec.json`` — a :class:`~agentsoc.types.FinetuneSpec`: every training knob (epochs, batch,
  accumulation, lr, scheduler, warmup, weight decay, LoRA r/alpha/dropout, max_seq_len, seed), so
  one recipe means the same thing to every trainer;
- ``job.json`` — a :class:`JobInput`: base model, adapter to continue from, output folder,
  device/precision/threads, LoRA targets. Written last: a folder with it is a complete job.

Outputs (``JOB_DIR/<output_dir>``): ``peft/`` (a PEFT LoRA adapter) or ``model/`` (a full model);
the CPU trainer adds ``adapter.gguf`` for llama.cpp; ``train.log`` (one JSON line per optimizer
step, :class:`ProgressLog`); ``result.json`` (:class:`JobResult`) written atomically and LAST — its
presence means "done" to whoever adopts the job after a crash, so a trainer that finds it exits at
once without training again. A failed job leaves ``JOB_DIR/error.txt`` (the traceback).

Exit codes (:func:`job_main`): 0 done (or already done), 2 bad input / nothing to train, 3 out of
memory, 1 anything else; always one line on stderr. 2 and 3 are :data:`PERMANENT_EXITS`: the same
job would fail the same way again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.atomic import write_atomic
from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends.options import DEFAULT_TARGETS

JOB_FILE = "job.json"
SPEC_FILE = "spec.json"
EXAMPLES_FILE = "examples.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
ERROR_FILE = "error.txt"

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_OUT_OF_MEMORY = 3
#: exit codes after which training the same job again would fail again
PERMANENT_EXITS = frozenset({EXIT_BAD_INPUT, EXIT_OUT_OF_MEMORY})


class JobError(Exception):
    """A job that cannot run as specified: bad input, nothing to train. Exit code 2, no traceback needed."""


def slug(key: str) -> str:
    """A job key reduced to ``[A-Za-z0-9._-]`` (at most 80 of them), for people to read in paths,
    URLs and Ray ids; not unique on its own — add a hash of the key (:func:`key_slug`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-")[:80] or "job"


def key_slug(key: str) -> str:
    """A job's folder name: readable, and unique thanks to a short hash of the whole key (two keys
    that reduce alike stay apart)."""
    return f"{slug(key)}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- inputs


class JobInput(BaseModel):
    """``job.json``: what the launcher tells the job besides the examples and the spec.

    Relative paths are relative to the job directory, so a job directory can be moved or mounted
    elsewhere (a Ray worker may see the shared filesystem under another root).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: Path = Field(
        description="transformers model folder (config, weights, tokenizer with chat template); "
        "the CPU trainer also takes a GGUF file, dequantised when loaded"
    )
    init_adapter: Path | None = Field(default=None, description="PEFT adapter folder to continue training from")
    output_dir: Path = Field(default=Path("out"), description="where peft/ or model/, train.log, result.json go")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="auto: cuda when available")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="bf16 autocast or float32; auto: bf16 on CUDA and on CPUs with native bf16"
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: the usable CPUs)")
    lora_targets: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1, description="LoRA target modules")
    gradient_checkpointing: bool | None = Field(
        default=None, description="recompute activations to save memory; None: on for CUDA, off on CPU"
    )
    max_steps: int | None = Field(default=None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    serve_gguf: Path | None = Field(
        default=None,
        description="CPU trainer: the GGUF base llama.cpp serves; its chat template renders the loss mask and "
        "the adapter is also written as adapter.gguf for it",
    )
    cache_base: bool = Field(
        default=True,
        description="CPU trainer with a GGUF base_model: keep its dequantised float32 copy in the cache dir "
        "(the next job loads it in seconds instead of a minute)",
    )

    def write(self, job_dir: Path) -> Path:
        """Write ``job_dir/job.json`` atomically (a half-written file would be a broken job)."""
        path = job_dir / JOB_FILE
        write_atomic(path, self.model_dump_json(indent=2), durable=True)
        return path

    @classmethod
    def read(cls, job_dir: Path) -> JobInput:
        return read_model(cls, job_dir / JOB_FILE)

    def resolve(self, job_dir: Path, path: Path) -> Path:
        """An absolute path stays as it is; a relative one is taken from the job directory."""
        return job_dir / path

    def out(self, job_dir: Path) -> Path:
        return self.resolve(job_dir, self.output_dir)


def write_inputs(job_dir: Path, job: JobInput, examples: Sequence[ChatExample], spec: FinetuneSpec) -> None:
    """Everything a job needs, written the way the job reads it (the launcher's half of the contract).

    ``job.json`` is written last: a directory with it is a complete job.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(ex.to_openai()) + "\n" for ex in examples)
    write_atomic(job_dir / EXAMPLES_FILE, lines)
    write_atomic(job_dir / SPEC_FILE, spec.model_dump_json(indent=2))
    job.write(job_dir)


def read_inputs(job_dir: Path) -> tuple[JobInput, FinetuneSpec, list[ChatExample]]:
    """The trainer's half: job.json, spec.json and the examples, validated (a :class:`JobError` if not)."""
    return JobInput.read(job_dir), read_model(FinetuneSpec, job_dir / SPEC_FILE), read_examples(job_dir / EXAMPLES_FILE)


def read_examples(path: Path) -> list[ChatExample]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise JobError(f"no {path.name} in {path.parent}") from None
    out: list[ChatExample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(ChatExample(messages=tuple(Message(**m) for m in json.loads(line)["messages"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise JobError(f"{path}:{number}: not a chat example: {one_line(exc)}") from None
    return out


M = TypeVar("M", bound=BaseModel)


def read_model(model: type[M], path: Path) -> M:
    """One of the job's JSON files, validated; a missing or malformed file is a :class:`JobError`."""
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise JobError(f"no {path.name} in {path.parent}") from None
    except ValueError as exc:
        raise JobError(f"invalid {path}: {one_line(exc)}") from None


# --------------------------------------------------------------------------- progress


class ProgressLog:
    """``train.log`` in the output folder ``out``: one JSON line per optimizer step (step, total, loss,
    lr, elapsed_s since ``started``), appended as training goes, so a poller reads progress without
    talking to the trainer."""

    def __init__(self, out: Path, started: float) -> None:
        self.path = out / LOG_FILE
        self.started = started
        out.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def step(self, step: int, total: int, loss: float, lr: float | None) -> None:
        line = {
            "step": step,
            "total": total,
            "loss": round(loss, 5),
            "lr": lr,
            "elapsed_s": round(time.perf_counter() - self.started, 2),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")


def read_progress(job_dir: Path, last: int = 5) -> tuple[float | None, tuple[str, ...]]:
    """Progress (0..1, None before the first step) and the last ``last`` step lines of a job's
    ``train.log`` (a line torn by a write in progress is skipped)."""
    with contextlib.suppress(JobError):
        steps = []
        try:
            text = (JobInput.read(job_dir).out(job_dir) / LOG_FILE).read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                entry = json.loads(line)
                steps.append((int(entry["step"]), int(entry["total"]), float(entry["loss"])))
        if steps:
            step, total, _ = steps[-1]
            events = tuple(f"step {s}/{n} loss {loss:.4f}" for s, n, loss in steps[-last:])
            return (step / total if total > 0 else None), events
    return None, ()


# --------------------------------------------------------------------------- the result


class JobResult(BaseModel):
    """``result.json``: what a finished job made and what it cost. Trainers add fields of their own
    (device, versions, memory), kept as they are."""

    model_config = ConfigDict(extra="allow")

    method: Literal["lora", "full"]
    output: str = Field(description="the peft/ or model/ folder")
    adapter_gguf: str | None = Field(default=None, description="CPU trainer: the adapter as a GGUF LoRA for llama.cpp")
    steps: int
    losses: list[float]
    trained_tokens: int
    seconds: float
    examples: int
    examples_trained: int
    truncated: int
    dropped_too_long: int
    dropped_no_target: int
    continued_from: str | None = None

    def job_fields(self) -> dict[str, Any]:
        """The :class:`~agentsoc.types.Job` fields a finished job fills, the same for every backend."""
        return {
            "progress": 1.0,
            "trained_tokens": self.trained_tokens,
            "examples": self.examples,
            "truncated": self.truncated,
            "dropped": self.dropped_too_long + self.dropped_no_target,
            "losses": tuple(self.losses),
        }


def start_output(job_dir: Path, job: JobInput) -> Path:
    """An empty output folder: a crashed earlier attempt's partial outputs are dropped, because
    training restarts from scratch (no mid-job checkpoints)."""
    out = job.out(job_dir)
    if out.resolve() == job_dir.resolve() or (out / JOB_FILE).exists():
        raise JobError(f"output_dir {job.output_dir} must be a folder of its own, not the job folder")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


def write_result(job_dir: Path, job: JobInput, result: JobResult) -> Path:
    """Write ``result.json`` durably and atomically; the trainer's LAST write (its presence means done)."""
    path = job.out(job_dir) / RESULT_FILE
    write_atomic(path, result.model_dump_json(indent=2), durable=True)
    return path


def read_result(job_dir: Path) -> JobResult | None:
    """The finished job's result, or None while there is none (not started, running, failed)."""
    if not (job_dir / JOB_FILE).is_file():
        return None
    path = JobInput.read(job_dir).out(job_dir) / RESULT_FILE
    if not path.is_file():
        return None
    return read_model(JobResult, path)


# --------------------------------------------------------------------------- running a job


def is_out_of_memory(exc: BaseException) -> bool:
    """OOM surfaces as ``torch.OutOfMemoryError``, a MemoryError, or a RuntimeError saying so."""
    return (
        isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()
    )


def failure_line(prog: str, job_dir: Path, exc: BaseException) -> tuple[int, str]:
    """The exit code and the one stderr line for a failed job."""
    if isinstance(exc, JobError):
        return EXIT_BAD_INPUT, f"{prog}: job {job_dir}: {exc}"
    if is_out_of_memory(exc):
        return EXIT_OUT_OF_MEMORY, (
            f"{prog}: job {job_dir}: out of memory ({one_line(exc, 200)}). "
            "Retry with a smaller batch_size (raise gradient_accumulation_steps to keep the effective batch), "
            "a smaller lora_r or max_seq_len, or gradient_checkpointing=true"
        )
    return EXIT_FAILED, f"{prog}: job {job_dir}: {type(exc).__name__}: {one_line(exc, 500)}"


def run_job(prog: str, job_dir: Path, train: Callable[[Path], object]) -> tuple[int, str]:
    """Run ``train(job_dir)`` unless the job is done already: (exit code, one line to report).

    Used by :func:`job_main` in a trainer's own process, and by a launcher that trains in its
    process (``train_in_process``): both report a failure the same way.
    """
    try:
        if read_result(job_dir) is not None:
            return 0, f"{prog}: {job_dir}: already done ({RESULT_FILE} exists)"
        train(job_dir)
    except Exception as exc:
        code, line = failure_line(prog, job_dir, exc)
        if code != EXIT_BAD_INPUT:
            with contextlib.suppress(OSError):
                (job_dir / ERROR_FILE).write_text(traceback.format_exc())
        return code, line
    return 0, ""


def job_main(prog: str, train: Callable[[Path], object], argv: Sequence[str] | None = None) -> int:
    """``python -m <trainer> JOB_DIR``: train one job folder offline; the exit code says how it went."""
    parser = argparse.ArgumentParser(prog=prog, description="train one fine-tuning job folder")
    parser.add_argument("job_dir", type=Path, help=f"folder with {JOB_FILE}, {SPEC_FILE}, {EXAMPLES_FILE}")
    job_dir = parser.parse_args(argv).job_dir.resolve()
    # no model hub at run time: every path in job.json is local
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # this is the job process's command line: it shows the project's log on stderr, whose last line
    # is the job's one line of outcome (a launcher reports it: Ray's log tail, the local queue's error)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    project = logging.getLogger("backends")
    saved = project.level, project.handlers[:], project.propagate
    # its own handler only: called in a process whose CLI already routed "backends" (a test, an
    # in-process trainer), an added handler would print every line twice
    project.handlers[:], project.propagate = [handler], False
    project.setLevel(logging.INFO)
    try:
        code, line = run_job(prog, job_dir, train)
        if line:
            log.log(logging.ERROR if code else logging.INFO, line)
    finally:
        level, project.handlers[:], project.propagate = saved
        project.setLevel(level)
    return code


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An error's message on one line of at most ``limit`` characters (its type's name if it has none)."""
    text = " ".join(str(exc).split())
    return (text[:limit] + "…") if len(text) > limit else text or type(exc).__name__
