"""Deterministic simulated agents for tests and docs — never for results.

Nothing this backend produces says anything about language models. It exists so that the loop's
logic (debate plumbing, voting, selection, job bookkeeping, resume) can be tested offline, fast and
reproducibly, and so that the fake OpenAI server can answer with something that parses.

The simulation, in short:

* A model ref is ``mock:<skill>`` (``mock:0.6``) or, after finetuning, ``mock:<skill>@<job id>``.
  ``skill`` is the probability that an answer is correct.
* The problem is read from the first user message: an arithmetic expression (``3+4*5-2``) is
  evaluated; other tasks need an ``answers`` table (question text → answer).
* Round 0: correct with probability ``skill``, otherwise a plausible mistake (left-to-right
  evaluation, or an off-by-a-few slip).
* Later rounds: with probability ``skill`` the agent re-derives the right answer; otherwise it
  moves to the most common answer among its own and the others' (read from the debate message or
  the summary).
* The summarizer lists the answers it was shown.
* System messages (the Unique ID ablation's "You are agent 2 (critic).") are ignored.
* Sampling temperature T ≠ 1 scales the skill to ``skill ** T`` (hotter = more mistakes), so the
  temperature-2 ablation has something to show.
* ``score`` (the diversity metrics' log-probabilities) is pure simulation: whitespace tokens, each
  scored against four made-up alternatives with logits hashed from (model, token). The same model
  always agrees with itself (KL 0); two different model refs (two finetunes) disagree.
* A finetune raises ``skill`` towards 1 in proportion to how many of the training examples end on
  the correct answer, and lowers it for wrong ones.

Every draw comes from a RNG seeded by the call's seed and the model, so the same call gives the
same text. With ``state_dir`` the "server side" (jobs, a log of every call and submission) lives
in files, so a test can kill the client process and check what a resumed run sends again.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import math
import operator
import os
import random
import re
import signal
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agentsoc.atomic import write_atomic
from agentsoc.backend import Capabilities, FatalBackendError
from agentsoc.types import (
    ChatExample,
    Completion,
    FinetuneSpec,
    Job,
    JobState,
    Message,
    ModelRef,
    Sampling,
    TokenLogprobs,
    Usage,
)
from backends.options import MockOptions

_EXPR = re.compile(r"-?\d+(?:\s*[-+*]\s*-?\d+)+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_BLOCK = re.compile(r"One agent (?:response|solution): (.*?)(?=\n\n One agent|\n\n [A-Z]|$)", re.S)
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _eval(expr: str) -> int:
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return int(_OPS[type(node.op)](walk(node.left), walk(node.right)))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        raise ValueError(expr)

    return walk(ast.parse(expr, mode="eval").body)


def _left_to_right(expr: str) -> int:
    tokens = re.findall(r"\d+|[-+*]", expr.replace(" ", ""))
    value = int(tokens[0])
    for op, num in zip(tokens[1::2], tokens[2::2], strict=False):
        value = _OPS[{"+": ast.Add, "-": ast.Sub, "*": ast.Mult}[op]](value, int(num))
    return value


def parse_ref(model: ModelRef) -> float:
    """The skill encoded in a mock model ref (``mock:0.6`` or ``mock:0.71@job-3``)."""
    m = re.fullmatch(r"mock:([01](?:\.\d+)?)(?:@[\w.-]+)?", model)
    if m is None:
        raise FatalBackendError(f"mock backend: unknown model {model!r} (expected 'mock:<skill>', e.g. 'mock:0.6')")
    return float(m.group(1))


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text.replace(",", ""))
    return found[-1] if found else None


class MockBrain:
    """The pure simulation, shared by the mock backend and the fake OpenAI server."""

    def __init__(self, answers: Mapping[str, str] | None = None) -> None:
        self.answers = dict(answers or {})

    def truth(self, question: str) -> str | None:
        for q, a in self.answers.items():
            if q in question:
                return a
        m = _EXPR.search(question)
        return str(_eval(m.group(0))) if m else None

    def _wrong(self, question: str, truth: str, rng: random.Random) -> str:
        m = _EXPR.search(question)
        if m is not None and rng.random() < 0.5:
            slip = _left_to_right(m.group(0))
            if str(slip) != truth:
                return str(slip)
        try:
            return str(int(float(truth)) + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10]))
        except ValueError:
            return truth + "'"

    def reply(
        self, model: ModelRef, messages: Sequence[Mapping[str, str]], seed: int | None, temperature: float = 1.0
    ) -> str:
        skill = parse_ref(model)
        if temperature != 1.0:
            skill = skill**temperature
        messages = [m for m in messages if m["role"] != "system"]
        rng = random.Random(f"{model}|{seed}|{len(messages)}")
        last = messages[-1]["content"]
        if "opinions from different agents" in last:
            blocks = _BLOCK.findall(last)
            answers = [a for a in (_last_number(b) for b in blocks) if a is not None]
            return "Summary of the other agents: they answered " + ", ".join(answers or ["nothing"]) + "."
        question = messages[0]["content"]
        truth = self.truth(question)
        if truth is None:
            return "I cannot tell what the answer is."
        if len(messages) == 1:
            answer = truth if rng.random() < skill else self._wrong(question, truth, rng)
        elif rng.random() < skill / 2:
            answer = truth
        else:
            own = _last_number(messages[-2]["content"])
            seen = [a for a in (_last_number(b) for b in _BLOCK.findall(last)) if a is not None]
            if not seen and "answered" in last:
                seen = _NUMBER.findall(last.split("answered", 1)[1])
            pool = Counter([own, *seen] if own else seen)
            answer = pool.most_common(1)[0][0] if pool else self._wrong(question, truth, rng)
        return f"Working through it step by step, the result is {answer}. The answer is \\boxed{{{answer}}}."

    def train(self, base: ModelRef, examples: Sequence[ChatExample], job_id: str) -> ModelRef:
        skill = parse_ref(base)
        good = bad = 0
        for ex in examples:
            truth = self.truth(next(m.content for m in ex.messages if m.role == "user"))
            for m in ex.messages:
                if m.role != "assistant" or m.weight == 0:
                    continue
                if truth is not None and _last_number(m.content) == truth:
                    good += 1
                else:
                    bad += 1
        total = good + bad
        if total:
            skill = skill + (1 - skill) * 0.25 * (good / total) * min(1.0, total / 40) - 0.25 * skill * (bad / total)
        return f"mock:{min(max(skill, 0.0), 0.999):.4f}@{job_id}"

    @staticmethod
    def score(model: ModelRef, response: str, alternatives: int = 4) -> TokenLogprobs:
        """Simulated teacher-forced log-probabilities (see the module docstring); not a language model."""
        parse_ref(model)

        def logit(token: str) -> float:
            digest = hashlib.sha256(f"{model}|{token}".encode()).digest()
            return 4.0 * int.from_bytes(digest[:4], "big") / 2**32

        tokens = tuple(response.split())
        logprobs, top = [], []
        for k, tok in enumerate(tokens):
            cands = [tok, *(f"<alt{k % 7}-{a}>" for a in range(alternatives))]
            logits = {c: logit(c) for c in cands}
            z = math.log(sum(math.exp(v) for v in logits.values()))
            dist = {c: v - z for c, v in logits.items()}
            logprobs.append(dist[tok])
            top.append(dist)
        return TokenLogprobs(tokens=tokens, logprobs=tuple(logprobs), top=tuple(top))


class MockBackend:
    """The Backend over :class:`MockBrain`, with optional file-backed server state."""

    name = "mock"
    capabilities = Capabilities(finetune=True, score=True)

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        latency_s: float = 0.0,
        polls_to_finish: int = 2,
        answers: Mapping[str, str] | None = None,
        die_after_calls: int | None = None,
        die_after_polls: int | None = None,
        fail_jobs: bool = False,
        flaky_jobs: int = 0,
    ) -> None:
        self.brain = MockBrain(answers)
        self.state_dir = state_dir
        self.latency_s = latency_s
        self.polls_to_finish = polls_to_finish
        self.die_after_calls = die_after_calls
        self.die_after_polls = die_after_polls
        self.fail_jobs = fail_jobs
        self.flaky_jobs = flaky_jobs
        self.calls = 0
        self.polls = 0
        self.submissions = 0
        self._jobs: dict[str, dict[str, Any]] = {}
        if state_dir is not None:
            (state_dir / "jobs").mkdir(parents=True, exist_ok=True)

    # -- "server side" persistence ------------------------------------------------------------
    def _log(self, name: str, line: str) -> None:
        if self.state_dir is not None:
            with (self.state_dir / name).open("a", encoding="utf-8") as f:
                f.write(line + "\n")

    def _job_path(self, job_id: str) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "jobs" / f"{job_id}.json"

    def _save(self, rec: dict[str, Any]) -> None:
        self._jobs[rec["id"]] = rec
        path = self._job_path(rec["id"])
        if path is not None:
            write_atomic(path, json.dumps(rec))

    def _load(self, job_id: str) -> dict[str, Any] | None:
        path = self._job_path(job_id)
        if path is not None and path.exists():
            rec: dict[str, Any] = json.loads(path.read_text())
            return rec
        return self._jobs.get(job_id)

    @staticmethod
    def _job_id(key: str) -> str:
        return "mockjob-" + hashlib.sha256(key.encode()).hexdigest()[:12]

    # -- Backend ------------------------------------------------------------------------------
    async def complete(self, model: ModelRef, messages: Sequence[Message], sampling: Sampling) -> Completion:
        if self.die_after_calls is not None and self.calls >= self.die_after_calls:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        self.calls += 1
        text = self.brain.reply(model, [m.model_dump() for m in messages], sampling.seed, sampling.temperature)
        fingerprint = hashlib.sha256(
            json.dumps([model, [m.content for m in messages], sampling.model_dump()]).encode()
        ).hexdigest()[:16]
        self._log("calls.log", fingerprint)
        prompt_tokens = sum(len(m.content.split()) for m in messages)
        return Completion(
            text=text,
            model=model,
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=len(text.split())),
            finish_reason="stop",
        )

    async def score(self, model: ModelRef, messages: Sequence[Message], response: str) -> TokenLogprobs:
        """Simulated log-probabilities of ``response`` (the prompt does not enter the simulation)."""
        return self.brain.score(model, response)

    async def submit_finetune(
        self, base: ModelRef, examples: Sequence[ChatExample], spec: FinetuneSpec, *, key: str
    ) -> Job:
        parse_ref(base)
        job_id = self._job_id(key)
        rec = self._load(job_id)
        if rec is None:  # adopt-before-create: a job with this key already exists on the "server"
            self.submissions += 1
            self._log("submissions.log", key)
            # a simulated max_seq_len: whitespace words are the tokens, and a longer example is left out
            kept = [e for e in examples if sum(len(m.content.split()) for m in e.messages) <= spec.max_seq_len]
            result = self.brain.train(base, kept, job_id)
            flaky = self._submitted_so_far() <= self.flaky_jobs
            rec = {
                "id": job_id,
                "key": key,
                "base": base,
                "result": result,
                "polls_left": self.polls_to_finish,
                "flaky": flaky,
                "examples": len(examples),
                "dropped": len(examples) - len(kept),
            }
            self._save(rec)
        return self._to_job(rec)

    async def poll_finetune(self, job: Job) -> Job:
        rec = self._load(job.id)
        if rec is None:
            raise FatalBackendError(f"mock backend: no fine-tuning job {job.id!r}")
        self.polls += 1
        if self.die_after_polls is not None and self.polls > self.die_after_polls:
            os.kill(os.getpid(), signal.SIGKILL)
        if rec["polls_left"] > 0:
            rec["polls_left"] -= 1
            self._save(rec)
        return self._to_job(rec)

    def _to_job(self, rec: dict[str, Any]) -> Job:
        if rec["polls_left"] > 0:
            return Job(key=rec["key"], backend=self.name, id=rec["id"], base=rec["base"], state=JobState.RUNNING)
        if self.fail_jobs or rec.get("flaky"):
            return Job(
                key=rec["key"],
                backend=self.name,
                id=rec["id"],
                base=rec["base"],
                state=JobState.FAILED,
                error="simulated server_error: the job failed on the server"
                if rec.get("flaky")
                else "simulated failure: training file rejected",
                retryable=bool(rec.get("flaky")),
            )
        return Job(
            key=rec["key"],
            backend=self.name,
            id=rec["id"],
            base=rec["base"],
            state=JobState.SUCCEEDED,
            result=rec["result"],
            losses=_simulated_losses(rec.get("examples", 0)),
            progress=1.0,
            examples=rec.get("examples"),
            truncated=0 if "examples" in rec else None,
            dropped=rec.get("dropped"),
        )

    def _submitted_so_far(self) -> int:
        """Jobs this "server" has created, this one included (persisted with ``state_dir``)."""
        if self.state_dir is not None and (self.state_dir / "submissions.log").exists():
            return len((self.state_dir / "submissions.log").read_text().splitlines())
        return self.submissions

    async def release(self, models: Sequence[ModelRef]) -> None:
        return None

    async def aclose(self) -> None:
        return None


def create(options: MockOptions, run_dir: Path) -> MockBackend:
    """The mock from its recipe options (:class:`backends.options.MockOptions`).

    The simulated server's jobs live in ``state_dir`` inside the run directory by default, so a
    run stopped during fine-tuning resumes like one on a real provider. The crash-test hooks come
    from the environment, not the recipe, so that the resumed run of a killed test run uses the
    very same recipe: ``AGENTSOC_MOCK_DIE_AFTER_CALLS`` and ``AGENTSOC_MOCK_DIE_AFTER_POLLS`` make
    the process SIGKILL itself at that point.
    """
    die_calls = os.environ.get("AGENTSOC_MOCK_DIE_AFTER_CALLS")
    die_polls = os.environ.get("AGENTSOC_MOCK_DIE_AFTER_POLLS")
    return MockBackend(
        state_dir=run_dir / options.state_dir,
        latency_s=options.latency_s,
        polls_to_finish=options.polls_to_finish,
        die_after_calls=int(die_calls) if die_calls else None,
        die_after_polls=int(die_polls) if die_polls else None,
        fail_jobs=options.fail_jobs,
        flaky_jobs=options.flaky_jobs,
    )


def _simulated_losses(examples: int) -> tuple[float, ...]:
    """A made-up falling curve, one point per example (at most 20): the mock shows where losses appear
    (the job line, the report, the run browser); it never claims anything about learning."""
    steps = max(1, min(examples, 20))
    return tuple(round(2.0 / (1 + 0.3 * i), 4) for i in range(steps))
