"""One fine-tuning job = one process, trained with TRL's ``SFTTrainer`` (DESIGN §3b).

    python -m backends.trl_train JOB_DIR

The job folder — inputs (``job.json``, ``spec.json``, ``examples.jsonl``), outputs (``peft/`` or
``model/``, ``train.log``, ``result.json`` written last) and exit codes — is
:mod:`backends.job_folder`, the contract every trainer shares. This trainer writes ``peft/`` (a PEFT
LoRA adapter vLLM loads as is) or ``model/`` (a full transformers model with its tokenizer,
``method = "full"``).

Loss mask: the tokens and per-token weights come from :func:`backends.training.encode_examples` (the
same rendering and masking as the CPU trainer), and so does the step schedule. The tokens reach TRL
as a pre-tokenized dataset with an ``assistant_masks`` column; TRL 1.x folds that column into
``labels`` (-100 where the mask is 0) while preparing the dataset, with no config flag
(``assistant_only_loss`` stays off: it asks TRL to derive its own mask from ``{% generation %}``
markers in the chat template and needs a conversational, untokenized dataset). Because that
contract moved between TRL releases (the collator used to apply the mask), :func:`check_labels`
verifies the prepared labels against our
weights before training and refuses to train on anything else.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agentsoc.types import ChatExample, FinetuneSpec
from backends.job_folder import (
    JobError,
    JobInput,
    JobResult,
    ProgressLog,
    job_main,
    read_inputs,
    start_output,
    write_result,
)
from backends.training import (
    EncodedSet,
    Schedule,
    encode_examples,
    native_bf16,
    schedule,
    tokenizer_functions,
    usable_cpus,
)

TRL_PIP = "pip install 'trl==1.16.*'   (with torch, transformers>=5.20, peft, accelerate, datasets)"


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
    if device == "cuda" and torch.cuda.device_count() > 1 and world_size() == 1:
        # Trainer would wrap the model in nn.DataParallel, which TRL refuses; one process = one GPU.
        # Several GPUs per job run one process each under `accelerate launch` (FSDP / ZeRO-3).
        raise JobError(
            f"{torch.cuda.device_count()} GPUs are visible to one process; a job trains on one (num_gpus = 1), "
            "or on several with backend.options.accelerate_config = 'fsdp' or 'deepspeed'"
        )
    if job.precision != "auto":
        bf16 = job.precision == "bf16"
    elif device == "cuda":
        bf16 = bool(torch.cuda.is_bf16_supported())
    else:
        bf16 = native_bf16()
    checkpointing = job.gradient_checkpointing if job.gradient_checkpointing is not None else device == "cuda"
    return Placement(device=device, bf16=bf16, gradient_checkpointing=checkpointing)


def world_size() -> int:
    """Processes training this job together (``accelerate launch`` sets WORLD_SIZE; 1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 writes the job's outputs; the other ranks of a sharded job only compute."""
    return int(os.environ.get("RANK", "0")) == 0


def load_tokenizer(path: Path) -> Any:
    transformers: Any = importlib.import_module("transformers")
    if not (path / "config.json").is_file():
        if not path.exists():  # on a cluster: the driver's path is not on this node
            raise JobError(
                f"base_model {path} does not exist on node {socket.gethostname()}: on a Ray cluster the model "
                "folder must be on a disk every node mounts at the same path (backend.options.model)"
            )
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


def sft_config(job: JobInput, spec: FinetuneSpec, place: Placement, out: Path, steps: Schedule) -> Any:
    """Every knob set explicitly: TRL's defaults differ from transformers' (bf16 and gradient
    checkpointing on, lr 2e-5, logging every 10 steps) and would change under us between releases.
    The step count and warmup are :func:`backends.training.schedule`'s, as whole numbers."""
    trl: Any = importlib.import_module("trl")
    return trl.SFTConfig(
        output_dir=str(out / "trainer"),
        num_train_epochs=spec.epochs,
        max_steps=steps.total,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps,
        learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler,
        warmup_steps=steps.warmup,
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
    try:
        trainer = trl.SFTTrainer(
            model=model,
            args=sft_config(job, spec, place, out, schedule(len(encoded.rows), spec, job.max_steps)),
            train_dataset=to_dataset(encoded),
            processing_class=tokenizer,
            peft_config=lora_config(job, spec) if fresh_lora else None,
            callbacks=list(callbacks),
        )
    except Exception as exc:
        if type(exc).__name__ != "NoMatchingPeftModuleError":
            raise
        # the same job fails the same way every time: bad input (exit 2, not retried), with the fix
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ == "Linear"})
        raise JobError(
            f"lora_targets {list(job.lora_targets)} match no module of {job.base_model}: set "
            f"backend.options.lora_targets to some of its linear layers: {', '.join(linear[:12])}"
        ) from None
    # the default PrinterCallback prints every log dict to stdout; train.log is the progress channel
    trainer.remove_callback(importlib.import_module("transformers").PrinterCallback)
    check_labels(trainer.train_dataset, encoded)
    return trainer


# --------------------------------------------------------------------------- progress and token counts


def progress_callback(log: ProgressLog, losses: list[float]) -> Any:
    """A TrainerCallback writing one line per logging step to the job's ``train.log``.

    Built in a function so that importing this module needs no transformers (the launcher only
    wants :class:`JobInput`).
    """
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    class LogSteps(TrainerCallback):
        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, float] | None = None,
            **kwargs: Any,
        ) -> None:
            if not logs or "loss" not in logs or not state.is_world_process_zero:
                return  # the end-of-training summary carries train_loss, not a step loss; rank 0 logs
            losses.append(float(logs["loss"]))
            log.step(state.global_step, state.max_steps, losses[-1], logs.get("learning_rate"))

    return LogSteps()


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
    if world_size() > 1:
        # sharded (FSDP / ZeRO-3): every rank takes part in gathering the full weights, rank 0 writes
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        trainer.save_model(str(tmp))
        if not is_main_process():
            return final
        if spec.method == "full":
            tokenizer.save_pretrained(str(tmp))
    elif spec.method == "lora":
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


# --------------------------------------------------------------------------- the job


def train_job(job_dir: Path) -> JobResult:
    """Train the job in ``job_dir`` and write its result (:func:`backends.job_folder.run_job` calls
    this only while the job has no result yet)."""
    started = time.perf_counter()
    job, spec, examples = read_inputs(job_dir)
    if job.serve_gguf is not None:
        raise JobError("serve_gguf is the CPU trainer's (python -m backends.hf); this job writes PEFT adapters")
    check_binary_weights(examples)
    check_init_adapter(job, job_dir, spec)
    torch = _import_stack()
    place = decide_placement(job, torch)
    if place.device == "cpu":
        torch.set_num_threads(job.threads or usable_cpus())
    importlib.import_module("transformers").set_seed(spec.seed)
    tokenizer = load_tokenizer(job.resolve(job_dir, job.base_model))
    encoded = encode_examples(examples, *tokenizer_functions(tokenizer), spec.max_seq_len)
    problem = encoded.nothing_to_train(len(examples), spec.max_seq_len)
    if problem:
        raise JobError(problem)
    out = start_output(job_dir, job) if is_main_process() else job.out(job_dir)  # rank 0 clears it
    run = train(job, job_dir, spec, encoded, tokenizer, place, started, out)
    result = JobResult(
        method=spec.method,
        output=str(run.output),
        **run.numbers(),
        job_seconds=round(time.perf_counter() - started, 3),
        **encoded.counts(len(examples)),
        max_seq_len=spec.max_seq_len,
        continued_from=str(job.resolve(job_dir, job.init_adapter)) if job.init_adapter else None,
        device=place.device,
        bf16=place.bf16,
        versions=_versions(),
        peak_gpu_memory_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3) if place.device == "cuda" else None,
    )
    if is_main_process():
        write_result(job_dir, job, result)  # LAST: its presence means "done"
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
    out: Path,
) -> TrainRun:
    """Load, train with a progress log and a trained-token counter, save the adapter or model."""
    losses: list[float] = []
    callback = progress_callback(ProgressLog(out, started), losses)
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


def main(argv: Sequence[str] | None = None) -> int:
    return job_main("agentsoc-trl", train_job, argv)


if __name__ == "__main__":
    raise SystemExit(main())
