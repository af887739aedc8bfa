"""One fine-tuning job = one process, trained with TRL's ``SFTTrainer`` (DESIGN §3b).

    python -m backends.trl_train JOB_DIR

The launcher (a Ray task, or anything that can start a process) writes three files into ``JOB_DIR``
with :func:`write_inputs` and starts this module; the process trains, writes its outputs and exits,
so a GPU's memory is free between jobs:

- ``examples.jsonl`` — OpenAI chat format with per-message ``weight`` (``ChatExample.to_openai()``);
- ``spec.json`` — a :class:`~agentsoc.types.FinetuneSpec`;
- ``job.json`` — a :class:`JobInput`: base model folder, optional adapter to continue from, output
  folder, device/precision/threads, LoRA targets. Every training knob (epochs, batch, gradient
  accumulation, lr, scheduler, warmup, weight decay, LoRA r/alpha/dropout, max_seq_len, seed) comes
  from the spec, so one recipe means the same thing to every backend.

Outputs under ``output_dir``: ``peft/`` (a PEFT LoRA adapter vLLM loads as is) or ``model/`` (a
full transformers model with its tokenizer, ``method = "full"``); ``train.log`` (one JSON line
per optimizer step: step, total, loss, lr, elapsed_s — the format of :mod:`backends.hf`'s log);
``result.json`` written atomically and LAST — its presence means "done" to whoever adopts the job
after a crash, so a job that finds it exits at once without training again.

Loss mask: the tokens and per-token weights come from :func:`backends.hf.build_example` (the same
rendering and masking as the CPU trainer). They reach TRL as a pre-tokenized dataset with an
``assistant_masks`` column; TRL 1.x folds that column into ``labels`` (-100 where the mask is 0)
while preparing the dataset, with no config flag (``assistant_only_loss`` stays off: it asks TRL to
derive its own mask from ``{% generation %}`` markers in the chat template and needs a
conversational, untokenized dataset). Because that contract moved between TRL releases (the
collator used to apply the mask), :func:`check_labels` verifies the prepared labels against our
weights before training and refuses to train on anything else.

Exit codes: 0 done (or already done), 2 bad input / nothing to train, 3 out of memory, 1 anything
else; always one line on stderr, the traceback in ``JOB_DIR/error.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from agentsoc.atomic import write_atomic
from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends.hf import EncodedSet, encode_examples, native_bf16, tokenizer_functions
from backends.llamacpp import usable_cpus
from backends.options import DEFAULT_TARGETS

JOB_FILE = "job.json"
SPEC_FILE = "spec.json"
EXAMPLES_FILE = "examples.jsonl"
RESULT_FILE = "result.json"
LOG_FILE = "train.log"
ERROR_FILE = "error.txt"
TRL_PIP = "pip install 'trl==1.16.*'   (with torch, transformers>=5.20, peft, accelerate, datasets)"


class JobError(Exception):
    """A job that cannot run as specified: bad input, nothing to train. Exit code 2, no traceback needed."""


# --------------------------------------------------------------------------- the job.json schema


class JobInput(BaseModel):
    """``job.json``: what the launcher tells the job besides the examples and the spec.

    Relative paths are relative to the job directory, so a job directory can be moved or mounted
    elsewhere (a Ray worker may see the shared filesystem under another root).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: Path = Field(description="transformers model folder (config, weights, tokenizer with chat template)")
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


def write_inputs(job_dir: Path, job: JobInput, examples: Sequence[ChatExample], spec: FinetuneSpec) -> None:
    """Everything a job needs, written the way the job reads it (the launcher's half of the contract).

    ``job.json`` is written last: a directory with it is a complete job.
    """
    job_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(ex.to_openai()) + "\n" for ex in examples)
    write_atomic(job_dir / EXAMPLES_FILE, lines)
    write_atomic(job_dir / SPEC_FILE, spec.model_dump_json(indent=2))
    job.write(job_dir)


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
            raise JobError(f"{path}:{number}: not a chat example: {_one_line(exc)}") from None
    return out


M = TypeVar("M", bound=BaseModel)


def read_model(model: type[M], path: Path) -> M:
    """One of the job's JSON inputs, validated; a missing or malformed file is a :class:`JobError`."""
    try:
        return model.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise JobError(f"no {path.name} in {path.parent}") from None
    except ValueError as exc:
        raise JobError(f"invalid {path}: {_one_line(exc)}") from None


# --------------------------------------------------------------------------- examples -> token rows


def check_binary_weights(examples: Sequence[ChatExample]) -> None:
    """TRL's loss mask is 0/1 per token; a fractional weight cannot be honoured, so refuse it."""
    for i, ex in enumerate(examples):
        for m in ex.messages:
            if m.role == "assistant" and m.weight not in (None, 0, 1):
                raise JobError(f"example {i}: assistant weight {m.weight} is not 0 or 1; TRL trains a 0/1 mask")


def to_dataset(encoded: EncodedSet) -> Any:
    """The pre-tokenized dataset TRL recognises (an ``input_ids`` column) with our mask as
    ``assistant_masks``, the column TRL folds into the labels unconditionally."""
    datasets: Any = importlib.import_module("datasets")
    return datasets.Dataset.from_dict(
        {"input_ids": [row.input_ids for row in encoded.rows], "assistant_masks": encoded.assistant_masks()}
    )


def check_labels(prepared: Any, encoded: EncodedSet) -> None:
    """Refuse to train unless TRL's prepared labels are -100 exactly where our weight is 0.

    This pins the mask contract to the installed TRL: a release that ignored or renamed the mask
    column would otherwise train silently on the prompts.
    """
    if len(prepared) != len(encoded.rows):
        raise RuntimeError(f"TRL kept {len(prepared)} of {len(encoded.rows)} examples while preparing the dataset")
    for i, row in enumerate(encoded.rows):
        item = prepared[i]
        want = [t if w > 0 else -100 for t, w in zip(row.input_ids, row.weights, strict=True)]
        if list(item["input_ids"]) != row.input_ids or list(item.get("labels", [])) != want:
            raise RuntimeError(
                f"TRL's prepared labels of example {i} do not follow the assistant mask; this TRL version "
                "handles the assistant_masks column differently — pin trl==1.16.*"
            )


# --------------------------------------------------------------------------- model, config, trainer


@dataclass(frozen=True)
class Placement:
    """Where and how the job computes, decided once from the job and the machine."""

    device: Literal["cuda", "cpu"]
    bf16: bool
    gradient_checkpointing: bool


def decide_placement(job: JobInput, torch: Any) -> Placement:
    """bf16 on CUDA (where the GPU supports it); on CPU only where it is native (AMX/AVX512-BF16) —
    elsewhere emulated bf16 is slower than float32 (the rule of :class:`backends.hf.LoraTrainer`)."""
    cuda = torch.cuda.is_available()
    if job.device == "cuda" and not cuda:
        raise JobError("device 'cuda' requested but torch sees no CUDA device")
    device: Literal["cuda", "cpu"] = "cuda" if job.device == "cuda" or (job.device == "auto" and cuda) else "cpu"
    if device == "cuda" and torch.cuda.device_count() > 1:
        # Trainer would wrap the model in nn.DataParallel, which TRL refuses; one job = one GPU
        raise JobError(
            f"{torch.cuda.device_count()} GPUs are visible; a job trains on one (give it num_gpus=1, or set "
            "CUDA_VISIBLE_DEVICES)"
        )
    if job.precision != "auto":
        bf16 = job.precision == "bf16"
    elif device == "cuda":
        bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        bf16 = native_bf16()
    checkpointing = job.gradient_checkpointing if job.gradient_checkpointing is not None else device == "cuda"
    return Placement(device=device, bf16=bf16, gradient_checkpointing=checkpointing)


def load_tokenizer(path: Path) -> Any:
    transformers: Any = importlib.import_module("transformers")
    if not (path / "config.json").is_file():
        raise JobError(f"base_model {path} is not a transformers model folder (no config.json)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.chat_template:
        raise JobError(f"the tokenizer in {path} has no chat template; the loss mask is built from it")
    return tokenizer


def load_model(job: JobInput, job_dir: Path, spec: FinetuneSpec, place: Placement, torch: Any) -> Any:
    """The base model, with the init adapter attached (trainable) for continued LoRA finetuning.

    A frozen LoRA base on CUDA is loaded in bf16 (half the memory; only the adapters, kept float32 by
    peft, are updated). Full finetuning keeps float32 master weights under bf16 autocast: the
    paper's lr 1e-5 updates would mostly round away in bf16 weights.
    """
    transformers: Any = importlib.import_module("transformers")
    lora_bf16 = spec.method == "lora" and place.device == "cuda" and place.bf16
    dtype = torch.bfloat16 if lora_bf16 else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(str(job.resolve(job_dir, job.base_model)), dtype=dtype)
    model.config.use_cache = False
    if job.init_adapter is None:
        return model
    peft: Any = importlib.import_module("peft")
    return peft.PeftModel.from_pretrained(model, str(job.resolve(job_dir, job.init_adapter)), is_trainable=True)


def check_init_adapter(job: JobInput, job_dir: Path, spec: FinetuneSpec) -> None:
    """Before anything is loaded: continued finetuning needs a LoRA job and a PEFT adapter folder."""
    if job.init_adapter is None:
        return
    if spec.method != "lora":
        raise JobError("init_adapter is a LoRA adapter but method is 'full'; point base_model at the previous model")
    adapter = job.resolve(job_dir, job.init_adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise JobError(f"init_adapter {adapter} is not a PEFT adapter folder (no adapter_config.json)")


def lora_config(job: JobInput, spec: FinetuneSpec) -> Any:
    peft: Any = importlib.import_module("peft")
    return peft.LoraConfig(
        r=spec.lora_r,
        lora_alpha=spec.lora_alpha,
        lora_dropout=spec.lora_dropout,
        target_modules=list(job.lora_targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def sft_config(job: JobInput, spec: FinetuneSpec, place: Placement, out: Path) -> Any:
    """Every knob set explicitly: TRL's defaults differ from transformers' (bf16 and gradient
    checkpointing on, lr 2e-5, logging every 10 steps) and would change under us between releases."""
    trl: Any = importlib.import_module("trl")
    return trl.SFTConfig(
        output_dir=str(out / "trainer"),
        num_train_epochs=spec.epochs,
        max_steps=job.max_steps or -1,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        weight_decay=spec.weight_decay,
        bf16=place.bf16,
        fp16=False,
        use_cpu=place.device == "cpu",
        gradient_checkpointing=place.gradient_checkpointing,
        max_length=spec.max_seq_len,
        packing=False,
        padding_free=False,
        assistant_only_loss=False,  # the mask arrives as the assistant_masks column (module docstring)
        completion_only_loss=False,
        seed=spec.seed,
        data_seed=spec.seed,
        logging_strategy="steps",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def build_trainer(
    job: JobInput,
    job_dir: Path,
    spec: FinetuneSpec,
    encoded: EncodedSet,
    tokenizer: Any,
    place: Placement,
    callbacks: Sequence[Any] = (),
) -> Any:
    """An ``SFTTrainer`` ready to train, its prepared labels checked against our mask."""
    import torch

    trl: Any = importlib.import_module("trl")
    out = job.resolve(job_dir, job.output_dir)
    model = load_model(job, job_dir, spec, place, torch)
    fresh_lora = spec.method == "lora" and job.init_adapter is None
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_config(job, spec, place, out),
        train_dataset=to_dataset(encoded),
        processing_class=tokenizer,
        peft_config=lora_config(job, spec) if fresh_lora else None,
        callbacks=list(callbacks),
    )
    # the default PrinterCallback prints every log dict to stdout; train.log is the progress channel
    trainer.remove_callback(importlib.import_module("transformers").PrinterCallback)
    check_labels(trainer.train_dataset, encoded)
    return trainer


# --------------------------------------------------------------------------- progress and token counts


def progress_callback(log_path: Path, started: float, losses: list[float]) -> Any:
    """A TrainerCallback writing one JSON line per logging step (a poller tails ``train.log``).

    Built in a function so that importing this module needs no transformers (the launcher only
    wants :class:`JobInput`).
    """
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    class ProgressLog(TrainerCallback):
        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            if not logs or "loss" not in logs:
                return  # the end-of-training summary carries train_loss, not a step loss
            losses.append(float(logs["loss"]))
            line = {
                "step": state.global_step,
                "total": state.max_steps,
                "loss": round(float(logs["loss"]), 5),
                "lr": logs.get("learning_rate"),
                "elapsed_s": round(time.perf_counter() - started, 2),
            }
            with log_path.open("a") as f:
                f.write(json.dumps(line) + "\n")

    return ProgressLog()


class TrainedTokens:
    """Forward pre-hook counting the target tokens the model is actually trained on.

    It reads the ``labels`` each training forward receives (position t's label is a target when
    t ≥ 1 and it is not -100 — the shift every causal LM loss applies), so the count is exact under
    shuffling, max_steps and gradient accumulation, and matches ``LoraTrainer``'s count of
    ``weights[:, 1:] > 0``.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        labels = kwargs.get("labels")
        if labels is not None and module.training:
            self.count += int((labels[:, 1:] != -100).sum())


# --------------------------------------------------------------------------- outputs


def save_outputs(trainer: Any, tokenizer: Any, spec: FinetuneSpec, place: Placement, out: Path) -> Path:
    """Write ``peft/`` or ``model/`` under a temporary name and rename it into place."""
    final = out / ("peft" if spec.method == "lora" else "model")
    tmp = out / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model = trainer.model
    if spec.method == "lora":
        model.save_pretrained(str(tmp))
    else:
        import torch

        # serve what was trained: bf16 weights where training ran in bf16 (half the disk, what vLLM loads)
        if place.bf16 and place.device == "cuda":
            model = model.to(torch.bfloat16)
        model.config.use_cache = True
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def clear_stale(out: Path) -> None:
    """A crashed earlier attempt left partial outputs: training restarts from scratch, so drop them."""
    for name in ("peft", "model", ".peft.tmp", ".model.tmp", "trainer"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / LOG_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------- the job


def run_job(job_dir: Path) -> dict[str, Any]:
    """Train one job described by ``job_dir``; returns what it wrote to result.json."""
    started = time.perf_counter()
    job = JobInput.read(job_dir)
    out = job.resolve(job_dir, job.output_dir)
    if (out / RESULT_FILE).is_file():
        print(f"agentsoc-trl: {job_dir}: already done ({out / RESULT_FILE} exists)", file=sys.stderr)
        return dict(json.loads((out / RESULT_FILE).read_text()))
    spec = read_model(FinetuneSpec, job_dir / SPEC_FILE)
    examples = read_examples(job_dir / EXAMPLES_FILE)
    check_binary_weights(examples)
    check_init_adapter(job, job_dir, spec)
    torch = _import_stack()
    place = decide_placement(job, torch)
    if place.device == "cpu":
        torch.set_num_threads(job.threads or usable_cpus())
    importlib.import_module("transformers").set_seed(spec.seed)
    tokenizer = load_tokenizer(job.resolve(job_dir, job.base_model))
    encoded = encode_examples(examples, *tokenizer_functions(tokenizer), spec.max_seq_len)
    if not encoded.rows:
        raise JobError(
            f"no trainable example among {len(examples)}: {encoded.dropped_no_target} have no assistant message "
            f"with weight > 0, {encoded.dropped_too_long} have all trained tokens beyond max_seq_len "
            f"{spec.max_seq_len}"
        )
    clear_stale(out)
    run = train(job, job_dir, spec, encoded, tokenizer, place, started)
    result = {
        "method": spec.method,
        "output": str(run.output),
        **run.numbers(),
        "job_seconds": round(time.perf_counter() - started, 3),
        "examples": len(examples),
        "examples_trained": len(encoded.rows),
        "truncated": encoded.truncated,
        "dropped_too_long": encoded.dropped_too_long,
        "dropped_no_target": encoded.dropped_no_target,
        "max_seq_len": spec.max_seq_len,
        "continued_from": str(job.resolve(job_dir, job.init_adapter)) if job.init_adapter else None,
        "device": place.device,
        "bf16": place.bf16,
        "versions": _versions(),
        "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if place.device == "cuda" else None,
    }
    write_atomic(out / RESULT_FILE, json.dumps(result, indent=2), durable=True)  # LAST: its presence means "done"
    return result


@dataclass(frozen=True)
class TrainRun:
    """What one ``trainer.train()`` did, for result.json."""

    output: Path
    steps: int
    losses: list[float]
    trained_tokens: int
    seconds: float
    cpu_seconds: float  #: all threads; comparable on a shared machine where wall time is not
    load_seconds: float

    def numbers(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "losses": self.losses,
            "trained_tokens": self.trained_tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_s": round(self.trained_tokens / self.seconds, 2) if self.seconds > 0 else None,
            "cpu_seconds": round(self.cpu_seconds, 3),
            "load_seconds": round(self.load_seconds, 3),
        }


def train(
    job: JobInput,
    job_dir: Path,
    spec: FinetuneSpec,
    encoded: EncodedSet,
    tokenizer: Any,
    place: Placement,
    started: float,
) -> TrainRun:
    """Load, train with a progress log and a trained-token counter, save the adapter or model."""
    out = job.resolve(job_dir, job.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG_FILE).write_text("")
    losses: list[float] = []
    callback = progress_callback(out / LOG_FILE, started, losses)
    trainer = build_trainer(job, job_dir, spec, encoded, tokenizer, place, [callback])
    load_seconds = time.perf_counter() - started
    counter = TrainedTokens()
    hook = trainer.model.register_forward_pre_hook(counter, with_kwargs=True)
    train_start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, cpu_seconds = time.perf_counter() - train_start, time.process_time() - cpu_start
    hook.remove()
    final = save_outputs(trainer, tokenizer, spec, place, out)
    shutil.rmtree(out / "trainer", ignore_errors=True)
    return TrainRun(
        output=final,
        steps=int(trainer.state.global_step),
        losses=losses,
        trained_tokens=counter.count,
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        load_seconds=load_seconds,
    )


def _import_stack() -> Any:
    """torch, with TRL's stack checked up front so a missing package is one clear line."""
    missing = [m for m in ("torch", "transformers", "peft", "trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise JobError(f"TRL training needs {', '.join(missing)}. Fix: {TRL_PIP}")
    _quiet()
    return importlib.import_module("torch")


def _quiet() -> None:
    """No progress bars or advisory warnings in a job's stderr: its last line is the error, if any."""
    import warnings

    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    importlib.import_module("datasets").disable_progress_bars()
    importlib.import_module("datasets.utils.logging").set_verbosity_error()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets")}


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM surfaces as ``torch.OutOfMemoryError`` or, from some kernels, a RuntimeError saying so."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def failure_line(job_dir: Path, exc: BaseException) -> tuple[int, str]:
    """The exit code and the one stderr line for a failed job."""
    if isinstance(exc, JobError):
        return 2, f"agentsoc-trl: job {job_dir}: {exc}"
    if is_out_of_memory(exc):
        return 3, (
            f"agentsoc-trl: job {job_dir}: out of memory ({_one_line(exc)[:200]}). "
            "Retry with a smaller batch_size (raise gradient_accumulation_steps to keep the effective batch), "
            "a smaller lora_r or max_seq_len, or gradient_checkpointing=true"
        )
    return 1, f"agentsoc-trl: job {job_dir}: {type(exc).__name__}: {_one_line(exc)[:500]}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.trl_train", description=__doc__.split("\n")[0])
    parser.add_argument("job_dir", type=Path, help="folder with job.json, spec.json, examples.jsonl")
    job_dir = parser.parse_args(argv).job_dir.resolve()
    # no model hub at run time: every path in job.json is local
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        run_job(job_dir)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        code, line = failure_line(job_dir, exc)
        if code != 2:
            _write_traceback(job_dir)
        print(line, file=sys.stderr)
        return code
    return 0


def _write_traceback(job_dir: Path) -> None:
    with contextlib.suppress(OSError):
        (job_dir / ERROR_FILE).write_text(traceback.format_exc())


if __name__ == "__main__":
    sys.exit(main())
