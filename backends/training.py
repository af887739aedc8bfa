"""What every trainer shares: loss masks, the optimizer-step schedule, and the machine's CPUs.

Imported by the CPU trainer (:mod:`backends.hf`), the TRL job (:mod:`backends.trl_train`) and any
trainer that only needs a tokenizer (a hosted-LoRA backend): nothing here imports torch.

Loss masks — :func:`encode_examples` turns chat examples into token ids and per-token loss weights,
rendered with the model's own chat template (the one the server uses at inference). Only assistant
messages are trained, with their ``weight`` (``None`` = 1, ``0`` = masked); system/user turns and
the template's scaffolding before an assistant message are always masked; the assistant's
end-of-turn token is trained so the model learns to stop. Pure Python: it takes two functions,
``render`` and ``tokenize`` (:func:`tokenizer_functions` makes them from a transformers tokenizer),
so tests use fakes.

Schedule — :func:`schedule` is the one definition of "how many optimizer steps, how many of them
warm up" (transformers' own: ``ceil(batches / accumulation)`` steps per epoch, warmup
``ceil(warmup_ratio × steps)``); the CPU loop follows it and the TRL job hands it to its trainer as
whole numbers, so one recipe means the same schedule to both.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agentsoc.types import ChatExample, FinetuneSpec, Message

#: render(messages as dicts, add_generation_prompt) -> text
Render = Callable[[list[dict[str, str]], bool], str]
#: tokenize(text) -> (token ids, (start, end) character offsets per token)
Tokenize = Callable[[str], tuple[list[int], list[tuple[int, int]]]]

#: build_example's max_len for the untruncated example (to count what truncation cut)
NO_LIMIT = 1 << 30


# --------------------------------------------------------------------------- the machine


def usable_cpus() -> int:
    """CPUs this process may run on (affinity/cgroup-aware where the OS says so)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AMX/AVX512-BF16): there bf16 autocast is 1.7x
    faster (measured 102 -> 173 training tokens/s on 2 cores); elsewhere emulated bf16 is slower."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


# --------------------------------------------------------------------------- loss masks


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


@dataclass(frozen=True)
class EncodedSet:
    """The rows to train on and what ``max_seq_len`` and the weights cost (reported in result.json)."""

    rows: list[Encoded]
    truncated: int  #: trained span cut by max_seq_len, part of it kept
    dropped_too_long: int  #: every trained token lay beyond max_seq_len
    dropped_no_target: int  #: no assistant message with weight > 0

    def assistant_masks(self) -> list[list[int]]:
        return [[1 if w > 0 else 0 for w in row.weights] for row in self.rows]

    def counts(self, given: int) -> dict[str, int]:
        """What became of the ``given`` examples, under the names ``result.json`` uses."""
        return {
            "examples": given,
            "examples_trained": len(self.rows),
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_too_long,
            "dropped_no_target": self.dropped_no_target,
        }

    def nothing_to_train(self, given: int, max_len: int) -> str | None:
        """Why no example is left to train (the one message both trainers give), or None."""
        if self.rows:
            return None
        return (
            f"no trainable example among {given}: {self.dropped_no_target} have no assistant message with "
            f"weight > 0, {self.dropped_too_long} have every trained token beyond max_seq_len {max_len}"
        )


def encode_examples(examples: Sequence[ChatExample], render: Render, tokenize: Tokenize, max_len: int) -> EncodedSet:
    """Chat examples -> token ids and per-token loss weights, each example cut at ``max_len``.

    Every example is encoded twice — untruncated and at ``max_len`` — so the truncation counts come
    from the very function that builds the training rows.
    """
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


def tokenizer_functions(tokenizer: Any) -> tuple[Render, Tokenize]:
    """``render``/``tokenize`` for :func:`encode_examples` from a transformers tokenizer (a fast one:
    the mask needs its character offsets)."""

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))

    def tokenize(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    return render, tokenize


# --------------------------------------------------------------------------- the schedule


@dataclass(frozen=True)
class Schedule:
    """Optimizer steps of one job: ``per_epoch`` steps per pass over the data, ``total`` in all
    (``max_steps`` when the job sets one), the first ``warmup`` of them warming the learning rate up."""

    batches_per_epoch: int
    per_epoch: int
    total: int
    warmup: int

    def window(self, step_in_epoch: int, accumulation: int) -> int:
        """Micro-batches accumulated into optimizer step ``step_in_epoch`` (0-based) of an epoch: the
        last step of an epoch takes what is left, as in transformers' Trainer."""
        if step_in_epoch < self.per_epoch - 1:
            return accumulation
        return self.batches_per_epoch - accumulation * (self.per_epoch - 1)


def schedule(rows: int, spec: FinetuneSpec, max_steps: int | None = None) -> Schedule:
    """The one definition of a job's step count and warmup (transformers' Trainer's: an epoch is
    ``ceil(batches / gradient_accumulation_steps)`` optimizer steps, ``max_steps`` overrides the
    epochs, warmup is ``ceil(warmup_ratio × total)``)."""
    if rows < 1:
        raise ValueError("a schedule needs at least one training row")
    batches = math.ceil(rows / spec.batch_size)
    per_epoch = math.ceil(batches / spec.gradient_accumulation_steps)
    total = max_steps if max_steps is not None else per_epoch * spec.epochs
    return Schedule(
        batches_per_epoch=batches, per_epoch=per_epoch, total=total, warmup=math.ceil(spec.warmup_ratio * total)
    )
