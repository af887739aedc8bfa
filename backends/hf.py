"""The CPU LoRA trainer: transformers + peft and a hand-written loop, one job folder per process.

    python -m backends.hf JOB_DIR

It trains the job folder of :mod:`backends.job_folder` (the contract it shares with the TRL job)
and exits, so the serving process never loads torch and a finished job's memory is returned.
:class:`LoraTrainer` loads the base (float32: a transformers folder, the cached dequantised copy of
the GGUF, or the GGUF itself, dequantised and cached for the next job), injects fresh LoRA
modules (or the previous adapter's weights, for continued finetuning), trains, saves the PEFT
adapter and removes the LoRA modules again; with ``serve_gguf`` the adapter is also converted to a
GGUF LoRA adapter for llama.cpp (:mod:`backends.gguf_lora`) and the loss mask is rendered with that
GGUF's chat template (the one llama.cpp uses at inference). Masks and the step schedule come from
:mod:`backends.training`.

What places these jobs is :mod:`backends.local_jobs`. Full finetuning (``method = "full"``) is
refused: llama.cpp serves LoRA adapters on the one quantised base, and a full model would need a
1 GB f16 GGUF export per agent and role.
"""

from __future__ import annotations

import json
import logging
import math
import random
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec
from backends.job_folder import (
    JobError,
    JobInput,
    JobResult,
    ProgressLog,
    job_main,
    read_inputs,
    run_job,
    start_output,
    write_result,
)
from backends.options import DEFAULT_TARGETS
from backends.training import (
    Encoded,
    EncodedSet,
    encode_examples,
    native_bf16,
    schedule,
    tokenizer_functions,
    usable_cpus,
)

log = logging.getLogger(__name__)

HF_PIP = "pip install -e '.[local,hf]' in the agentsoc checkout   (torch==2.13.0, transformers, peft, gguf)"
PROG = "agentsoc-train"
#: the file name of the GGUF twin of the PEFT adapter, beside ``peft/`` in the output folder
ADAPTER_GGUF = "adapter.gguf"
DEQUANTISE = "--dequantise"


@dataclass
class TrainResult:
    peft_dir: Path
    steps: int
    losses: list[float]
    trained_tokens: int
    seconds: float
    #: examples given; of them, trained, with a span cut by max_seq_len, and left out (EncodedSet.counts)
    counts: dict[str, int]


@dataclass(frozen=True)
class TrainerOptions:
    """Where the base comes from; what a :class:`LoraTrainer` keeps loaded across the jobs it trains."""

    #: the GGUF llama.cpp serves: its chat template renders the mask; loaded (dequantised) without hf_dir
    model_path: Path | None
    hf_dir: Path | None = None  #: a transformers folder of the same model (faster load, no dequant)
    threads: int | None = None
    hf_cache: bool = True  #: keep a float32 transformers copy of the GGUF in the cache dir

    @classmethod
    def of_job(cls, job: JobInput, job_dir: Path) -> TrainerOptions:
        base = job.resolve(job_dir, job.base_model)
        serve = job.resolve(job_dir, job.serve_gguf) if job.serve_gguf is not None else None
        if base.is_file():  # a GGUF: dequantised when loaded
            return cls(model_path=serve or base, threads=job.threads, hf_cache=job.cache_base)
        if not (base / "config.json").is_file():
            raise JobError(f"base_model {base} is neither a GGUF file nor a transformers folder (no config.json)")
        return cls(model_path=serve, hf_dir=base, threads=job.threads, hf_cache=job.cache_base)


class LoraTrainer:
    """One float32 base model kept across jobs; LoRA modules swapped per job."""

    def __init__(self, options: TrainerOptions) -> None:
        self.options = options
        self.model: Any = None
        self.tokenizer: Any = None
        self.load_seconds: float | None = None

    def load(self) -> None:
        if self.model is not None:
            return
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:
            raise FatalBackendError(f"local finetuning needs torch, transformers and peft. Fix: {HF_PIP}") from exc
        torch.set_num_threads(self.options.threads or usable_cpus())
        _quiet_transformers()
        start = time.perf_counter()
        gguf = self.options.model_path
        cache = hf_cache_dir(gguf) if gguf is not None and self.options.hf_cache else None
        if self.options.hf_dir is not None:
            src: dict[str, Any] = {"pretrained_model_name_or_path": str(self.options.hf_dir)}
        elif cache is not None and (cache / "complete").is_file():
            src = {"pretrained_model_name_or_path": str(cache)}
        elif gguf is not None:
            src = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
        else:
            raise JobError("no base model: give a transformers folder or a GGUF file")
        self.tokenizer = AutoTokenizer.from_pretrained(**src)
        # the template llama.cpp uses is the one inside the GGUF: use exactly that one
        template = _gguf_chat_template(gguf) if gguf is not None else None
        if template is not None:
            self.tokenizer.chat_template = template
        self.model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        self.model.config.use_cache = False
        if "gguf_file" in src and cache is not None:
            self._save_cache(cache)
        self.load_seconds = time.perf_counter() - start

    def _save_cache(self, cache: Path) -> None:
        """Save the dequantised model atomically (temp dir + rename); a failure only costs speed."""
        import shutil
        import tempfile

        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".", suffix=".tmp", dir=cache.parent))
            # save_pretrained refuses a model loaded "quantized with gguf"; the weights are plain
            # float32 after dequantising, so write them and a config without the GGUF marker
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            config = self.model.config.to_dict()
            config.pop("quantization_config", None)
            config["architectures"] = [type(self.model).__name__]
            config["use_cache"] = True
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            self.tokenizer.save_pretrained(str(tmp))
            (tmp / "complete").write_text(str(self.options.model_path) + "\n")
            try:
                tmp.rename(cache)
            except OSError:  # another process won the race
                shutil.rmtree(tmp, ignore_errors=True)
        except Exception as exc:  # disk full, read-only cache: train anyway
            log.warning("could not cache the dequantised model in %s: %s", cache, exc)

    def encode(self, examples: Sequence[ChatExample], max_len: int) -> EncodedSet:
        try:
            return encode_examples(examples, *tokenizer_functions(self.tokenizer), max_len)
        except ValueError as exc:  # a template the mask cannot follow: the same job would fail again
            raise JobError(str(exc)) from None

    def train(
        self,
        examples: Sequence[ChatExample],
        spec: FinetuneSpec,
        out_dir: Path,
        *,
        init_adapter: Path | None = None,
        lora_targets: Sequence[str] = DEFAULT_TARGETS,
        bf16: bool | None = None,
        max_steps: int | None = None,
        log: ProgressLog | None = None,
    ) -> TrainResult:
        """Train a LoRA adapter on ``examples``; saves it to ``out_dir/peft`` and returns the result.

        A hand-written loop, not TRL's SFTTrainer: on this CPU the same job costs 13-29% more CPU time
        per trained token through TRL (bench/trl_vs_local_train.py); the TRL job (backends.trl_train)
        is the GPU path. Both take their tokens and loss mask from :func:`encode_examples` and their
        step count and warmup from :func:`backends.training.schedule`: AdamW with ``weight_decay``,
        transformers' ``lr_scheduler``, ``gradient_accumulation_steps`` micro-batches per optimizer
        step (the last step of an epoch takes what is left). ``bf16``: autocast (LoRA weights and
        optimizer stay float32); None = where the CPU has native bf16.
        """
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import get_scheduler

        self.load()
        start = time.perf_counter()
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        counted = self.encode(examples, spec.max_seq_len)
        problem = counted.nothing_to_train(len(examples), spec.max_seq_len)
        if problem:
            raise JobError(problem)
        encoded = counted.rows
        steps = schedule(len(encoded), spec, max_steps)
        autocast = native_bf16() if bf16 is None else bf16
        if init_adapter is not None:
            model = PeftModel.from_pretrained(self.model, str(init_adapter), is_trainable=True)
        else:
            config = LoraConfig(
                r=spec.lora_r,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=list(lora_targets),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(self.model, config)
        try:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optim = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
            lr_schedule = get_scheduler(
                spec.lr_scheduler, optim, num_warmup_steps=steps.warmup, num_training_steps=steps.total
            )
            order_rng = random.Random(spec.seed)
            losses: list[float] = []
            trained_tokens = step = 0
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for _epoch in range(math.ceil(steps.total / steps.per_epoch)):
                order = list(range(len(encoded)))
                order_rng.shuffle(order)
                batches = [
                    order[b * spec.batch_size : (b + 1) * spec.batch_size] for b in range(steps.batches_per_epoch)
                ]
                for k in range(min(steps.per_epoch, steps.total - step)):
                    window = steps.window(k, spec.gradient_accumulation_steps)
                    first = k * spec.gradient_accumulation_steps
                    for rows in batches[first : first + window]:
                        loss, targets = _micro_batch(model, [encoded[i] for i in rows], pad, autocast, torch)
                        (loss / window).backward()
                        trained_tokens += targets
                    lr = float(lr_schedule.get_last_lr()[0])
                    optim.step()
                    lr_schedule.step()
                    optim.zero_grad()
                    step += 1
                    losses.append(float(loss.detach()))
                    if log is not None:
                        log.step(step, steps.total, losses[-1], lr)
            peft_dir = out_dir / "peft"
            model.save_pretrained(str(peft_dir))
        finally:
            # take the LoRA modules out again so the next job starts from the clean base
            self.model = model.unload()
            self.model.eval()
        return TrainResult(
            peft_dir=peft_dir,
            steps=step,
            losses=losses,
            trained_tokens=trained_tokens,
            seconds=time.perf_counter() - start,
            counts=counted.counts(len(examples)),
        )


def _micro_batch(model: Any, batch: Sequence[Encoded], pad: int, bf16: bool, torch: Any) -> tuple[Any, int]:
    """The weighted mean loss of one micro-batch and how many target tokens it trained."""
    ids, mask, weights = _collate(batch, pad, torch)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=ids, attention_mask=mask).logits
    # position t predicts token t+1; a token's weight applies where it is the target
    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
    target = ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    w = weights[:, 1:]
    return (nll * w).sum() / w.sum().clamp_min(1e-8), int((w > 0).sum())


# --------------------------------------------------------------------------- the job


def train_job(job_dir: Path, trainer: LoraTrainer | None = None) -> LoraTrainer:
    """Train the job in ``job_dir`` and write its result; returns the trainer, its base still loaded.

    ``trainer`` is reused when it holds the job's base already (a launcher that trains in its own
    process keeps one across jobs); otherwise a new one loads it."""
    started = time.perf_counter()
    job, spec, examples = read_inputs(job_dir)
    if spec.method != "lora":
        raise JobError(f"the CPU trainer trains LoRA adapters only (method={spec.method!r}); set method = 'lora'")
    if job.device == "cuda" or job.gradient_checkpointing:
        raise JobError("the CPU trainer trains on the CPU without gradient checkpointing; use backends.trl_train")
    init = job.resolve(job_dir, job.init_adapter) if job.init_adapter is not None else None
    if init is not None and not (init / "adapter_config.json").is_file():
        raise JobError(f"init_adapter {init} is not a PEFT adapter folder (no adapter_config.json)")
    options = TrainerOptions.of_job(job, job_dir)
    if trainer is None or trainer.options != options:
        trainer = LoraTrainer(options)
    trainer.load()
    out = start_output(job_dir, job)
    bf16 = {"auto": None, "bf16": True, "fp32": False}[job.precision]
    trained = trainer.train(
        examples,
        spec,
        out,
        init_adapter=init,
        lora_targets=job.lora_targets,
        bf16=bf16,
        max_steps=job.max_steps,
        log=ProgressLog(out, started),
    )
    adapter_gguf = None
    if job.serve_gguf is not None:
        from backends.gguf_lora import LoraConversionError, peft_to_gguf

        try:
            adapter_gguf = peft_to_gguf(
                trained.peft_dir, out / ADAPTER_GGUF, base_gguf=job.resolve(job_dir, job.serve_gguf), name=job_dir.name
            )
        except LoraConversionError as exc:
            raise JobError(f"the adapter does not convert to GGUF for llama.cpp: {exc}") from None
    result = JobResult(
        method="lora",
        output=str(trained.peft_dir),
        adapter_gguf=str(adapter_gguf) if adapter_gguf is not None else None,
        steps=trained.steps,
        losses=trained.losses,
        trained_tokens=trained.trained_tokens,
        seconds=round(trained.seconds, 3),
        load_seconds=round(trainer.load_seconds or 0.0, 3),
        job_seconds=round(time.perf_counter() - started, 3),
        **trained.counts,
        max_seq_len=spec.max_seq_len,
        continued_from=str(init) if init is not None else None,
        device="cpu",
    )
    write_result(job_dir, job, result)  # LAST: its presence means "done"
    return trainer


class InProcess:
    """Trains job folders in the calling process with one :class:`LoraTrainer` kept across jobs
    (``train_in_process``): no model load per job, but torch shares the process with llama.cpp."""

    def __init__(self) -> None:
        self.trainer: LoraTrainer | None = None

    def __call__(self, job_dir: Path) -> tuple[int, str]:
        return run_job(PROG, job_dir, self._train)

    def _train(self, job_dir: Path) -> None:
        self.trainer = train_job(job_dir, self.trainer)

    def stop(self) -> None:
        """A job training in this process cannot be ended early; it ends with the process."""


def hf_cache_dir(gguf: Path) -> Path:
    """Where the dequantised transformers copy of a GGUF is kept.

    Dequantising the GGUF takes about a minute per process; the float32 copy (~2.5 GB) loads in
    seconds, and vLLM and the TRL jobs use it as the base model's folder. Keyed by the GGUF's name,
    size and mtime, so a changed file is never served stale.
    """
    from backends.bundled import cache_dir

    st = gguf.stat()
    return cache_dir() / f"hf-{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"


def hf_copy(gguf: Path) -> Path:
    """The transformers copy of ``gguf`` (with the GGUF's own chat template), made once.

    It is made in a subprocess, so torch never loads into the calling process (a run's server
    process stays small and its OpenMP runtime untouched).
    """
    cache = hf_cache_dir(gguf)
    if (cache / "complete").is_file():
        return cache
    log.info("writing a transformers copy of %s to %s (once; 1-3 min)", gguf.name, cache)
    done = subprocess.run([sys.executable, "-m", "backends.hf", DEQUANTISE, str(gguf)], capture_output=True, text=True)
    if done.returncode != 0 or not (cache / "complete").is_file():
        last = "\n".join((done.stderr or done.stdout).strip().splitlines()[-10:])
        raise FatalBackendError(f"could not write the transformers copy of {gguf} to {cache}:\n{last}")
    return cache


def _quiet_transformers() -> None:
    """No per-tensor progress bars or known-harmless warnings in the middle of a run's output."""
    import importlib
    import warnings

    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message="Could not find a config file")


def _collate(batch: Sequence[Encoded], pad: int, torch: Any) -> tuple[Any, Any, Any]:
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, e in enumerate(batch):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        weights[row, :n] = torch.tensor(e.weights, dtype=torch.float32)
    return ids, mask, weights


def _gguf_chat_template(path: Path) -> str | None:
    try:
        import gguf
    except ImportError:
        return None
    reader = gguf.GGUFReader(str(path))
    f = reader.fields.get("tokenizer.chat_template")
    if f is None:
        return None
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backends.hf JOB_DIR`` trains a job folder; ``--dequantise GGUF`` writes the GGUF's
    transformers copy to the cache (:func:`hf_copy`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == [DEQUANTISE] and len(args) == 2:
        LoraTrainer(TrainerOptions(model_path=Path(args[1]))).load()
        return 0
    return job_main(PROG, train_job, args)


if __name__ == "__main__":
    raise SystemExit(main())
