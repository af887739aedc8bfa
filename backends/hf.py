"""Local LoRA finetuning on CPU with transformers + peft: loss masks and the trainer.

Two layers, each usable alone:

- :func:`build_example` — tokens and per-token loss weights of one chat example, rendered with the
  model's own chat template (the same template llama.cpp uses at inference). Only assistant
  messages are trained, with their ``weight`` (``None`` = 1, ``0`` = masked); system/user turns
  and the template's scaffolding before an assistant message are always masked; the assistant's
  end-of-turn token is trained so the model learns to stop. Pure Python; tests use fakes.
- :class:`LoraTrainer` — keeps ONE dequantised base model (float32, loaded from the GGUF with
  ``gguf_file=``) across jobs; per job it injects fresh LoRA modules (or the previous adapter's
  weights, for continued finetuning), trains, saves the PEFT adapter, converts it to a GGUF LoRA
  adapter for llama.cpp (:mod:`backends.gguf_lora`) and removes the LoRA modules again.

The job queue that runs the trainer like a remote API is :mod:`backends.local_jobs`.

Full finetuning (``method = "full"``) is refused: llama.cpp serves LoRA adapters on the one
quantised base, and a full model would need a 1 GB f16 GGUF export per agent and role.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends.llamacpp import cpu_flags, usable_cpus
from backends.options import DEFAULT_TARGETS

HF_PIP = "pip install 'agentsoc[local,hf]'   (torch==2.13.0, transformers, peft, gguf)"

#: render(messages as dicts, add_generation_prompt) -> text
Render = Callable[[list[dict[str, str]], bool], str]
#: tokenize(text) -> (token ids, (start, end) character offsets per token)
Tokenize = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


# --------------------------------------------------------------------------- label masks


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    weights: list[float]  #: loss weight of predicting input_ids[i] (0 = masked)

    @property
    def n_trained(self) -> int:
        return sum(1 for w in self.weights if w > 0)


def assistant_spans(messages: Sequence[Message], render: Render) -> tuple[str, list[tuple[int, int, float]]]:
    """The rendered conversation and the character spans ``(start, end, weight)`` to train on.

    A span covers an assistant message's content and the template's end-of-turn marker, found as
    the difference between the conversation rendered up to that message and the same prefix
    rendered with the generation prompt (so the ``<|im_start|>assistant\\n`` header is masked).
    """
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    full = render(dicts, False)
    spans: list[tuple[int, int, float]] = []
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        weight = 1.0 if m.weight is None else float(m.weight)
        if weight <= 0:
            continue
        before = render(dicts[:i], True)
        upto = render(dicts[: i + 1], False)
        if not (full.startswith(before) and full.startswith(upto) and upto.startswith(before)):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently; cannot locate "
                f"assistant message {i} for the loss mask"
            )
        end = len(before) + len(upto[len(before) :].rstrip())
        spans.append((len(before), end, weight))
    return full, spans


def build_example(messages: Sequence[Message], render: Render, tokenize: Tokenize, max_len: int) -> Encoded:
    """Token ids and per-token loss weights (weight of the token *as a target*)."""
    text, spans = assistant_spans(messages, render)
    ids, offsets = tokenize(text)
    weights = [0.0] * len(ids)
    for t, (start, _end) in enumerate(offsets):
        for s, e, w in spans:
            if s <= start < e:
                weights[t] = w
                break
    return Encoded(input_ids=ids[:max_len], weights=weights[:max_len])


#: build_example's max_len for the untruncated example (to count what truncation cut)
NO_LIMIT = 1 << 30


@dataclass(frozen=True)
class EncodedSet:
    """The rows to train on and what ``max_seq_len`` and the weights cost (reported in result.json)."""

    rows: list[Encoded]
    truncated: int  #: trained span cut by max_seq_len, part of it kept
    dropped_too_long: int  #: every trained token lay beyond max_seq_len
    dropped_no_target: int  #: no assistant message with weight > 0

    def assistant_masks(self) -> list[list[int]]:
        return [[1 if w > 0 else 0 for w in row.weights] for row in self.rows]


def encode_examples(
    examples: Sequence[ChatExample],
    render: Callable[[list[dict[str, str]], bool], str],
    tokenize: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
    max_len: int,
) -> EncodedSet:
    """Encode with :func:`backends.hf.build_example` twice — untruncated and at ``max_len`` — so the
    truncation counts come from the very function that builds the training rows."""
    rows: list[Encoded] = []
    truncated = too_long = no_target = 0
    for ex in examples:
        full = build_example(ex.messages, render, tokenize, NO_LIMIT)
        cut = build_example(ex.messages, render, tokenize, max_len)
        if full.n_trained == 0:
            no_target += 1
        elif cut.n_trained == 0:
            too_long += 1
        else:
            truncated += cut.n_trained < full.n_trained
            rows.append(cut)
    return EncodedSet(rows=rows, truncated=truncated, dropped_too_long=too_long, dropped_no_target=no_target)


def tokenizer_functions(
    tokenizer: Any,
) -> tuple[Callable[[list[dict[str, str]], bool], str], Callable[[str], tuple[list[int], list[tuple[int, int]]]]]:
    """render/tokenize for build_example, exactly as :class:`backends.hf.LoraTrainer` defines them."""

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))

    def tokenize(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    return render, tokenize


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX/AVX512-BF16): there bf16 autocast is 1.7x
    faster (measured 102 -> 173 training tokens/s on 2 cores); elsewhere emulated bf16 is slower."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


# --------------------------------------------------------------------------- trainer


@dataclass
class TrainResult:
    peft_dir: Path
    steps: int
    losses: list[float]
    trained_tokens: int
    seconds: float
    #: examples given; of them, trained with a span cut by max_seq_len, and left out (nothing to train)
    examples: int = 0
    truncated: int = 0
    dropped: int = 0


@dataclass
class TrainerOptions:
    model_path: Path  #: the base GGUF (also what llama.cpp serves)
    hf_dir: Path | None = None  #: optional transformers folder of the same model (faster load, no dequant)
    threads: int | None = None
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS
    hf_cache: bool = True  #: keep a float32 transformers copy of the GGUF in the cache dir
    #: bfloat16 autocast for forward/backward (LoRA weights and optimizer stay float32); None = on
    #: where the CPU has native bf16 (AMX/AVX512-BF16): 1.7x faster there (measured 102 -> 173
    #: training tokens/s on 2 cores), slower than float32 elsewhere
    bf16: bool | None = None


class LoraTrainer:
    """One dequantised base model kept across jobs; LoRA modules swapped per job."""

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
        cache = self._hf_cache_dir()
        if self.options.hf_dir is not None:
            src: dict[str, Any] = {"pretrained_model_name_or_path": str(self.options.hf_dir)}
        elif cache is not None and (cache / "complete").is_file():
            src = {"pretrained_model_name_or_path": str(cache)}
        else:
            src = {
                "pretrained_model_name_or_path": str(self.options.model_path.parent),
                "gguf_file": self.options.model_path.name,
            }
        self.tokenizer = AutoTokenizer.from_pretrained(**src)
        # the template llama.cpp uses is the one inside the GGUF: use exactly that one
        template = _gguf_chat_template(self.options.model_path)
        if template is not None:
            self.tokenizer.chat_template = template
        self.model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        self.model.config.use_cache = False
        if "gguf_file" in src and cache is not None:
            self._save_cache(cache)
        self.load_seconds = time.perf_counter() - start

    def _bf16(self) -> bool:
        return self.options.bf16 if self.options.bf16 is not None else native_bf16()

    def _hf_cache_dir(self) -> Path | None:
        return hf_cache_dir(self.options.model_path) if self.options.hf_cache else None

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
            print(f"agentsoc: could not cache the dequantised model in {cache}: {exc}", file=sys.stderr)

    def encode(self, examples: Sequence[ChatExample], max_len: int) -> EncodedSet:
        return encode_examples(examples, *tokenizer_functions(self.tokenizer), max_len)

    def train(
        self,
        examples: Sequence[ChatExample],
        spec: FinetuneSpec,
        out_dir: Path,
        *,
        init_adapter: Path | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
    ) -> TrainResult:
        """Train a LoRA adapter on ``examples``; saves it to ``out_dir/peft`` and returns the result.

        A hand-written loop, not TRL's SFTTrainer: on this CPU the same job costs 13-29% more CPU time
        per trained token through TRL (bench/trl_vs_local_train.py); the TRL job (backends.trl_train)
        is the GPU path. Both take their tokens and loss mask from :func:`encode_examples`, and both
        follow the spec's schedule: AdamW with ``weight_decay``, transformers' ``lr_scheduler`` with
        ``warmup_ratio``, ``gradient_accumulation_steps`` micro-batches per optimizer step.
        """
        import torch
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import get_scheduler

        self.load()
        start = time.perf_counter()
        random.seed(spec.seed)
        torch.manual_seed(spec.seed)
        counted = self.encode(examples, spec.max_seq_len)
        encoded = counted.rows
        if not encoded:
            raise ValueError(
                f"no trainable example among {len(examples)}: {counted.dropped_no_target} have no assistant message "
                f"with weight > 0, {counted.dropped_too_long} have every trained token beyond max_seq_len "
                f"{spec.max_seq_len}"
            )
        if init_adapter is not None:
            model = PeftModel.from_pretrained(self.model, str(init_adapter), is_trainable=True)
        else:
            config = LoraConfig(
                r=spec.lora_r,
                lora_alpha=spec.lora_alpha,
                lora_dropout=spec.lora_dropout,
                target_modules=list(self.options.lora_targets),
                bias="none",
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(self.model, config)
        try:
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            optim = torch.optim.AdamW(params, lr=spec.learning_rate, weight_decay=spec.weight_decay)
            order_rng = random.Random(spec.seed)
            batches_per_epoch = (len(encoded) + spec.batch_size - 1) // spec.batch_size
            accumulate = spec.gradient_accumulation_steps
            total = math.ceil(batches_per_epoch * spec.epochs / accumulate)  # optimizer steps
            schedule = get_scheduler(
                spec.lr_scheduler,
                optim,
                num_warmup_steps=math.ceil(spec.warmup_ratio * total),
                num_training_steps=total,
            )
            losses: list[float] = []
            trained_tokens = 0
            step = micro = 0
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            for _epoch in range(spec.epochs):
                order = list(range(len(encoded)))
                order_rng.shuffle(order)
                for b in range(batches_per_epoch):
                    batch = [encoded[i] for i in order[b * spec.batch_size : (b + 1) * spec.batch_size]]
                    ids, mask, weights = _collate(batch, pad, torch)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._bf16()):
                        logits = model(input_ids=ids, attention_mask=mask).logits
                    # position t predicts token t+1; a token's weight applies where it is the target
                    logp = torch.log_softmax(logits[:, :-1, :].float(), dim=-1)
                    target = ids[:, 1:]
                    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    w = weights[:, 1:]
                    loss = (nll * w).sum() / w.sum().clamp_min(1e-8)
                    (loss / accumulate).backward()
                    micro += 1
                    trained_tokens += int((w > 0).sum())
                    if micro % accumulate and micro < batches_per_epoch * spec.epochs:
                        continue
                    optim.step()
                    schedule.step()
                    optim.zero_grad()
                    step += 1
                    losses.append(float(loss.detach()))
                    if on_step is not None:
                        on_step(step, total, losses[-1])
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
            examples=len(examples),
            truncated=counted.truncated,
            dropped=counted.dropped_too_long + counted.dropped_no_target,
        )


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
    print(f"agentsoc: writing a transformers copy of {gguf.name} to {cache} (once; 1-3 min)", file=sys.stderr)
    done = subprocess.run([sys.executable, "-m", "backends.hf", str(gguf)], capture_output=True, text=True)
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


if __name__ == "__main__":  # python -m backends.hf GGUF: write its transformers copy (see hf_copy)
    LoraTrainer(TrainerOptions(model_path=Path(sys.argv[1]))).load()
