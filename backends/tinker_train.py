"""One fine-tuning job on a Tinker service: the training loop the client drives, and its resume.

A job trains one LoRA on one dataset. Its inputs (examples, spec, base) and its progress live in
files under the backend's state folder in the run directory, so a job outlives the process that
started it:

``input.json``
    written once, before any paid call: key, base ref, spec, examples.
``progress.json``
    rewritten atomically (and fsynced) after every ``save_state``: the optimizer steps done, the
    ``tinker://…/weights/…`` path they are saved at, the loss curve, and at the end the sampler path.

Nothing is paid twice: a killed run resumed continues from ``progress.json``'s saved state (weights
*and* optimizer moments, ``create_training_client_from_state_with_optimizer``) at the next step of
the same deterministic plan, so a kill costs at most the steps after the last save (``save_every``).

The plan is the trainers' common one (:func:`backends.training.schedule`): per epoch the rows are
shuffled by ``spec.seed``, cut into batches of ``batch_size``, and ``gradient_accumulation_steps``
batches go into one ``forward_backward`` (Tinker sums the loss over datums: one request is the
accumulated gradient) followed by one ``optim_step`` with the scheduled learning rate.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agentsoc.atomic import write_atomic
from agentsoc.types import ChatExample, FinetuneSpec, JobState, Message
from backends.training import Encoded, schedule


@dataclass
class Progress:
    """What a job has done so far (``progress.json``)."""

    state: str = JobState.QUEUED.value
    step: int = 0  #: optimizer steps trained *and saved* (what a resumed job starts after)
    total: int | None = None
    state_path: str | None = None  #: tinker:// path of the last save_state
    sampler_path: str | None = None  #: tinker:// path of the final sampler weights
    losses: list[float] = field(default_factory=list)
    error: str | None = None
    retryable: bool = True
    examples: int | None = None
    truncated: int | None = None
    dropped: int | None = None
    trained_tokens: int = 0
    resumed_from: str | None = None  #: the state a resumed attempt started from


@dataclass(frozen=True)
class JobFiles:
    """The files of one job under ``<state dir>/jobs/<id>/``."""

    folder: Path

    @property
    def input(self) -> Path:
        return self.folder / "input.json"

    @property
    def progress_file(self) -> Path:
        return self.folder / "progress.json"

    def write_input(self, key: str, base: str, examples: Sequence[ChatExample], spec: FinetuneSpec) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        data = {
            "key": key,
            "base": base,
            "spec": spec.model_dump(mode="json"),
            "examples": [ex.to_openai() for ex in examples],
        }
        write_atomic(self.input, json.dumps(data), durable=True)

    def read_input(self) -> tuple[str, str, list[ChatExample], FinetuneSpec]:
        data = json.loads(self.input.read_text())
        examples = [ChatExample(messages=tuple(Message(**m) for m in ex["messages"])) for ex in data["examples"]]
        return data["key"], data["base"], examples, FinetuneSpec(**data["spec"])

    def read(self) -> Progress | None:
        if not self.progress_file.exists():
            return None
        return Progress(**json.loads(self.progress_file.read_text()))

    def write(self, progress: Progress) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.progress_file, json.dumps(asdict(progress)), durable=True)


def step_plan(rows: int, spec: FinetuneSpec) -> list[list[int]]:
    """Row indices of each optimizer step, for every epoch: the same for a job and its resume."""
    sched = schedule(rows, spec)
    plan: list[list[int]] = []
    for epoch in range(spec.epochs):
        order = list(range(rows))
        random.Random(f"{spec.seed}/{epoch}").shuffle(order)
        batches = [order[i : i + spec.batch_size] for i in range(0, rows, spec.batch_size)]
        at = 0
        for s in range(sched.per_epoch):
            n = sched.window(s, spec.gradient_accumulation_steps)
            plan.append([i for b in batches[at : at + n] for i in b])
            at += n
    return plan


def learning_rate(spec: FinetuneSpec, step: int, total: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based), transformers' schedules (one cycle of
    cosine for ``cosine_with_restarts``, power 1 for ``polynomial``)."""
    warmup = math.ceil(spec.warmup_ratio * total)
    base = spec.learning_rate
    kind = spec.lr_scheduler
    if kind == "constant":
        return base
    if step < warmup:
        return base * step / max(1, warmup)
    if kind == "constant_with_warmup":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if kind in ("cosine", "cosine_with_restarts"):
        return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return base * max(0.0, 1.0 - progress)  # linear, polynomial (power 1)


def datum(row: Encoded, types: Any) -> Any:
    """A next-token datum: input ``ids[:-1]``, targets ``ids[1:]``, weights of those targets."""
    return types.Datum(
        model_input=types.ModelInput.from_ints(row.input_ids[:-1]),
        loss_fn_inputs={"target_tokens": row.input_ids[1:], "weights": row.weights[1:]},
    )


@dataclass(frozen=True)
class Adam:
    """Adam's constants (the spec carries the learning rate and weight decay)."""

    beta1: float
    beta2: float
    eps: float
    grad_clip_norm: float


async def train(
    files: JobFiles,
    progress: Progress,
    rows: Sequence[Encoded],
    spec: FinetuneSpec,
    *,
    open_client: Callable[[Progress], Awaitable[Any]],
    adam: Adam,
    save_every: int,
    name: str,
    types: Any,
) -> Progress:
    """Train ``rows`` from ``progress.step`` to the end of the plan; returns the finished progress.

    ``open_client(progress)`` gives the training client: restored from ``progress.state_path`` when
    there is one, else a fresh LoRA (or the previous iteration's weights). Progress is written after
    each save, so an exception (or a kill) anywhere loses only the steps since the last save.
    """
    plan = step_plan(len(rows), spec)
    progress.total = len(plan)
    progress.state = JobState.RUNNING.value
    files.write(progress)
    client = await open_client(progress)
    for step in range(progress.step, len(plan)):
        batch = [rows[i] for i in plan[step]]
        weight = sum(sum(r.weights[1:]) for r in batch)
        # submitted back to back: the service runs them in order, the client waits once per step
        fb = client.forward_backward([datum(r, types) for r in batch], "cross_entropy")
        params = types.AdamParams(
            learning_rate=learning_rate(spec, step, len(plan)),
            beta1=adam.beta1,
            beta2=adam.beta2,
            eps=adam.eps,
            weight_decay=spec.weight_decay,
            grad_clip_norm=adam.grad_clip_norm,
        )
        optim = client.optim_step(params)
        out = await fb
        await optim
        progress.losses.append(float(out.metrics.get("loss:sum", 0.0)) / max(weight, 1e-9))
        progress.trained_tokens += sum(len(r.input_ids) - 1 for r in batch)
        done = step + 1
        if done % save_every == 0 or done == len(plan):
            saved = await client.save_state(f"{name}-step-{done}")
            progress.step, progress.state_path = done, saved.path
            files.write(progress)  # durable before the next paid step
    sampler = await client.save_weights_for_sampler(f"{name}-final")
    progress.sampler_path = sampler.path
    progress.state = JobState.SUCCEEDED.value
    files.write(progress)
    return progress
