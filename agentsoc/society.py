"""The society and its loop: debate → vote → select → finetune every agent → swap models → repeat.

Resume is "run the same recipe again": every step is idempotent against the run store.

* Debates: a problem whose transcript is stored is not debated again; the rest are, and their
  calls hit the call cache for everything already paid for.
* Datasets are a pure function of the stored transcripts, rewritten identically.
* Jobs: each is recorded under its key the moment the backend returns it, before it is awaited;
  a resumed run polls the stored job (or the backend adopts it by key) instead of submitting again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import get_args

from tqdm import tqdm

from agentsoc.atomic import write_lines_atomic
from agentsoc.backend import Backend, RetriesExhaustedError, TransientBackendError, probe
from agentsoc.config import Recipe, RecipeError, check_backend, create_backend, load_recipe
from agentsoc.debate import DebateSettings, agent_id_message, calls_per_problem, debate
from agentsoc.diversity import measure
from agentsoc.evaluate import evaluate
from agentsoc.jobs import JobRunner
from agentsoc.lock import RunLock
from agentsoc.prompts import PromptSet
from agentsoc.records import DatasetRecord, EvalScores, IterationRecord, Role, Stage
from agentsoc.rundir import acquire, check_recipe, key_prefix, prepare_run_dir
from agentsoc.selection import AgentData, select
from agentsoc.star import rationalize
from agentsoc.store import RunStore
from agentsoc.tasks.base import Problem, Split, Task
from agentsoc.transcript import AgentSlot, Transcript
from agentsoc.types import ChatExample, Completion, Message, ModelRef
from agentsoc.vote import Vote
from agentsoc.wrappers import compose, current_stage

log = logging.getLogger(__name__)


ROLES: tuple[Role, ...] = get_args(Role)


def resolve_prompts(task: Task, overrides: dict[str, str], source: str = "recipe") -> PromptSet:
    unknown = sorted(set(overrides) - set(PromptSet.model_fields))
    if unknown:
        raise RecipeError(f"{source}: prompts.{unknown[0]}: unknown field (known: {', '.join(PromptSet.model_fields)})")
    return task.prompts.model_copy(update=overrides)


class Society:
    """N agent slots over one backend and one run store.

    Use as an async context manager; it opens the store and the backend and closes both. Every
    step is callable on its own (:meth:`debate`, :meth:`select`, :meth:`finetune`,
    :meth:`evaluate`); :meth:`run` chains them for the recipe's iterations.
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        run_dir: Path,
        backend: Backend,
        task: Task,
        split: Split | None = None,
        progress: bool = True,
        eval_task: Task | None = None,
        eval_split: Split | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = run_dir
        self.task = task
        self.prompts = resolve_prompts(task, recipe.prompts)
        self.split: Split = split or task.load(recipe.task.n_train, recipe.task.n_test, recipe.seed)
        self.progress = progress
        self._raw_backend = backend
        self._lock = RunLock(run_dir)
        self._store: RunStore | None = None
        self._backend: Backend | None = None
        #: other runs' directories whose call caches answer identical calls (see from_recipe)
        self.shared_calls: list[Path] = []
        self._shared_stores: list[RunStore] = []
        base = recipe.society.base_models()
        self.slots: list[AgentSlot] = [AgentSlot(index=n, generator=m, critic=m) for n, m in enumerate(base)]
        #: the finetuning iteration that made the current slots (0: the base models)
        self.slots_iteration = 0
        self.summarizer: ModelRef = recipe.society.summarizer or base[0]
        # the held-out side: the training task's test split, or another task's (zero-shot transfer)
        ev = recipe.evaluation
        if ev.task is None:
            self.eval_task = task
            self.eval_prompts = resolve_prompts(task, ev.prompts) if ev.prompts is not None else self.prompts
            self.eval_problems = self.split.test
        else:
            from agentsoc import tasks

            self.eval_task = eval_task or tasks.create(ev.task.name, ev.task.options, base_dir=recipe.base_dir)
            self.eval_prompts = resolve_prompts(self.eval_task, ev.prompts or {}, "evaluation")
            self.eval_problems = (eval_split or self.eval_task.load(ev.task.n_train, ev.task.n_test, recipe.seed)).test

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe | str | Path,
        *,
        run_dir: Path | str | None = None,
        resume: bool = False,
        progress: bool = True,
        shared_calls: Sequence[Path] = (),
    ) -> Society:
        """Build a society from a recipe; the backend and task come from their registries.

        ``shared_calls``: run directories whose stored calls answer this run's identical calls
        (``compare`` passes the methods it already ran); read only.

        Everything that can be checked is checked before the run directory is touched: a bad
        recipe, task file or backend name leaves no trace behind.
        """
        from agentsoc import tasks

        rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
        rdir = Path(run_dir) if run_dir is not None else Path("runs") / rec.name
        task = tasks.create(rec.task.name, rec.task.options, base_dir=rec.base_dir)
        resolve_prompts(task, rec.prompts)
        split = task.load(rec.task.n_train, rec.task.n_test, rec.seed)
        eval_task, eval_split = None, None
        if rec.evaluation.task is not None:
            ev = rec.evaluation.task
            eval_task = tasks.create(ev.name, ev.options, base_dir=rec.base_dir)
            resolve_prompts(eval_task, rec.evaluation.prompts or {}, "evaluation")
            eval_split = eval_task.load(ev.n_train, ev.n_test, rec.seed)
        check_backend(rec)
        fresh = not (rdir / "run.sqlite").exists()
        lock = prepare_run_dir(rdir, rec, resume=resume)
        try:
            backend = create_backend(rec, rdir)
        except BaseException:
            lock.release()
            if fresh:
                shutil.rmtree(rdir, ignore_errors=True)
            raise
        society = cls(
            rec,
            run_dir=rdir,
            backend=backend,
            task=task,
            split=split,
            progress=progress,
            eval_task=eval_task,
            eval_split=eval_split,
        )
        society._lock = lock
        society.shared_calls = [Path(p) for p in shared_calls]
        return society

    async def __aenter__(self) -> Society:
        if not self._lock.held:
            self._lock = acquire(self.run_dir)
        try:
            self._store = RunStore.open(self.run_dir)
            check_recipe(self._store, self.recipe, self.run_dir)
            self._shared_stores = [
                RunStore.open(d, readonly=True) for d in self.shared_calls if (d / "run.sqlite").exists()
            ]
            # a dead endpoint or a refused key: one line now, not minutes of silent retries later
            await probe(self._raw_backend, [*self.recipe.society.base_models(), self.summarizer])
        except BaseException:
            self._close_stores()
            await self._raw_backend.aclose()
            self._lock.release()
            raise
        b = self.recipe.backend
        self._backend = compose(
            self._raw_backend,
            self._store,
            concurrency=b.concurrency,
            max_attempts=b.max_attempts,
            max_backoff_s=b.max_backoff_s,
            shared=self._shared_stores,
        )
        return self

    def _close_stores(self) -> None:
        for s in [self._store, *self._shared_stores]:
            if s is not None:
                s.close()
        self._store, self._shared_stores = None, []

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._backend is not None:
                await self._backend.aclose()
        finally:
            self._close_stores()
            self._lock.release()

    @property
    def store(self) -> RunStore:
        if self._store is None:
            raise RuntimeError("use the society inside 'async with'")
        return self._store

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise RuntimeError("use the society inside 'async with'")
        return self._backend

    @property
    def key_prefix(self) -> str:
        return key_prefix(self.recipe)

    # -- steps ----------------------------------------------------------------------------------
    def debate_settings(self, phase: str, *, evaluation: bool = False) -> DebateSettings:
        """The debate's shape; with ``evaluation`` the recipe's ``[evaluation]`` overrides apply."""
        s, ev = self.recipe.society, self.recipe.evaluation
        rounds, summarize, sampling = s.rounds, s.summarize, self.recipe.sampling
        if evaluation:
            rounds = ev.rounds or rounds
            summarize = summarize if ev.summarize is None else ev.summarize
            if ev.temperature is not None:
                sampling = sampling.model_copy(update={"temperature": ev.temperature})
        return DebateSettings(
            rounds=rounds,
            summarize=summarize,
            critic=s.critic,
            summarizer=self.summarizer,
            sampling=sampling,
            seed=self.recipe.seed,
            phase=phase,
            unique_id=s.unique_id,
            abstain_truncated=s.abstain_truncated,
            tie_break=s.tie_break,
        )

    def eval_slots(self) -> list[AgentSlot]:
        """The slots that debate held-out problems: ``evaluation.agents`` of them, cycling the society."""
        n = self.recipe.evaluation.agents or len(self.slots)
        return [
            self.slots[i % len(self.slots)].model_copy(update={"index": i}) if i >= len(self.slots) else self.slots[i]
            for i in range(n)
        ]

    async def debate(self, problems: Sequence[Problem], phase: str, *, evaluation: bool = False) -> list[Transcript]:
        """Debate ``problems`` with the current slots; stored transcripts are reused as they are.

        ``evaluation`` debates with the ``[evaluation]`` overrides (task, agents, rounds, temperature).
        """
        done = self.store.transcripts(phase)
        todo = [p for p in problems if p.id not in done]
        settings = self.debate_settings(phase, evaluation=evaluation)
        task = self.eval_task if evaluation else self.task
        prompts = self.eval_prompts if evaluation else self.prompts
        slots = self.eval_slots() if evaluation else self.slots
        per_problem = calls_per_problem(len(slots), settings)
        # counted per model call, not per problem: a problem of a slow model can take minutes, and a
        # bar that sits at 0/3 for eight of them tells nothing (the tokens/s say whether work flows)
        bar = tqdm(
            total=len(problems) * per_problem,
            initial=(len(problems) - len(todo)) * per_problem,
            desc=f"debate {phase}",
            unit="call",
            disable=not self.progress,
            leave=True,
        )
        started, generated = time.perf_counter(), 0

        def called(out: Completion) -> None:
            nonlocal generated
            if not out.cached:
                generated += out.usage.completion_tokens
            elapsed = time.perf_counter() - started
            bar.update(1)
            if elapsed > 0 and generated:
                bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s", refresh=False)

        def finished(t: Transcript) -> None:
            self.store.put_transcript(t)

        failed: list[tuple[Problem, TransientBackendError]] = []

        async def attempt(problems: Sequence[Problem]) -> None:
            await debate(
                self.backend,
                task,
                prompts,
                slots,
                problems,
                settings,
                on_done=finished,
                on_failure=lambda p, e: failed.append((p, e)),
                on_call=called,
            )

        try:
            with self._stage(phase, work=bool(todo)):
                # a problem whose call used up its retries does not stop the others; the stage ends,
                # then the failed problems get one more round (their finished calls come from the cache)
                await attempt(todo)
                if failed:
                    again = [p for p, _ in failed]
                    failed.clear()
                    log.warning("%s: %d problem(s) used up their retries; trying them once more", phase, len(again))
                    await attempt(again)
        finally:
            bar.close()
        if failed:
            raise RetriesExhaustedError(
                f"{phase}: {len(failed)} of {len(problems)} problems still failed after their retries and one more "
                f"round ({failed[-1][1]}); finished work is saved: run the same command with --resume to continue "
                "(raise backend.max_attempts if the server stays unreliable)"
            )
        done = self.store.transcripts(phase)
        transcripts = [done[p.id] for p in problems]
        write_lines_atomic(self._phase_file(phase), [t.model_dump_json() for t in transcripts])
        return transcripts

    def _phase_file(self, phase: str) -> Path:
        iteration, kind = phase.split("/", 1) if "/" in phase else ("misc", phase)
        return self.run_dir / iteration / ("debate.jsonl" if kind == "train" else f"{kind}.jsonl")

    def select(self, transcripts: Sequence[Transcript]) -> list[AgentData]:
        """Each agent's data; ``selection.label = "ground_truth"`` (STaR) selects against the truth
        instead of the vote, ``society.unique_id`` puts the agent-ID system message in front."""
        sel = self.recipe.selection
        if sel.label == "ground_truth":
            transcripts = [t.model_copy(update={"vote": Vote(answer=t.problem.answer)}) for t in transcripts]
        data = select(
            transcripts,
            len(self.slots),
            self.task.is_equivalent,
            critic_mix=sel.critic_mix,
            critic_loss=sel.critic_loss,
            seed=self.recipe.seed,
        )
        if self.recipe.society.unique_id:
            data = [_with_ids(d) for d in data]
        return data

    def _write_datasets(self, iteration: int, data: Sequence[AgentData]) -> dict[tuple[str, str], list[ChatExample]]:
        """Export each agent's datasets and return the training sets keyed by (agent, role).

        ``finetune.share = "agents"`` pools the agents' sets into one per role (agent ``all``);
        ``"all"`` pools every agent's generator and critic data into one set (role ``model``).
        """
        roles: tuple[Role, ...] = ROLES if self.recipe.society.critic else ("generator",)
        out: dict[tuple[str, str], list[ChatExample]] = {}
        for d in data:
            for role in roles:
                examples = list(d.generator if role == "generator" else d.critic)
                path = self.run_dir / f"iter-{iteration}" / "data" / f"agent-{d.agent}-{role}.jsonl"
                write_lines_atomic(path, [json.dumps(e.to_openai(), ensure_ascii=False) for e in examples])
                critic = role == "critic"
                self.store.put_dataset(
                    DatasetRecord(
                        iteration=iteration,
                        agent=d.agent,
                        role=role,
                        size=len(examples),
                        path=str(path.relative_to(self.run_dir)),
                        critic_minus=d.critic_minus if critic else None,
                        critic_plus_available=d.critic_plus_available if critic else None,
                        critic_plus_used=d.critic_plus_used if critic else None,
                    )
                )
                out.setdefault((self._agent_key(d.agent), self._role_key(role)), []).extend(examples)
        return out

    async def finetune(self, iteration: int, data: Sequence[AgentData]) -> list[AgentSlot]:
        """One job per agent and role, all submitted at once; installs and returns the new slots.

        A role whose dataset is below ``selection.min_examples`` (or the backend's own minimum,
        e.g. OpenAI's 10) keeps its current model; at most ``backend.max_active_jobs`` jobs run
        at once. The slots are installed here, not by the caller, so a following
        :meth:`evaluate` can only score the models this iteration made; models no slot uses any
        more are released (a backend serving adapters unloads them).
        """
        if iteration != self.slots_iteration + 1:
            raise RuntimeError(
                f"finetune({iteration}): the society holds the models of iteration {self.slots_iteration}; "
                f"iteration {self.slots_iteration + 1} comes next"
            )
        sets = self._write_datasets(iteration, data)
        floor = max(self.recipe.selection.min_examples, self.backend.capabilities.min_finetune_examples)
        caps = [c for c in (self.recipe.backend.max_active_jobs, self.backend.capabilities.max_active_jobs) if c]
        base_models = self.recipe.society.base_models()
        spec = self.recipe.finetune.spec
        bar = tqdm(
            total=len(sets), desc=f"finetune iter-{iteration}", unit="job", disable=not self.progress, leave=True
        )
        runner = JobRunner(
            self.backend,
            self.store,
            max_job_attempts=self.recipe.backend.max_job_attempts,
            poll_interval_s=self.recipe.backend.poll_interval_s,
            job_patience_s=self.recipe.backend.job_patience_s,
            max_backoff_s=self.recipe.backend.max_backoff_s,
            max_active=min(caps) if caps else None,
            on_update=lambda job: bar.set_postfix_str(f"{job.key.rsplit('/', 2)[-2]} {job.state.value}"),
        )

        def job_key(agent_key: str, role: str) -> str:
            return f"{self.key_prefix}/iter-{iteration}/agent-{agent_key}/{role}"

        keys = [job_key(a, r) for (a, r), ex in sets.items() if len(ex) >= floor]

        async def one(agent_key: str, role: str, examples: list[ChatExample]) -> tuple[str, str, ModelRef | None]:
            if len(examples) < floor:
                log.info(
                    "iter-%d agent %s %s: %d examples < %d, not finetuned",
                    iteration,
                    agent_key,
                    role,
                    len(examples),
                    floor,
                )
                bar.update(1)
                return agent_key, role, None
            slot = self.slots[0 if agent_key == "all" else int(agent_key)]
            current = slot.critic if role == "critic" else slot.generator
            base = base_models[slot.index] if self.recipe.finetune.from_base else current
            labels = {"run": self.recipe.name, "iteration": str(iteration), "agent": agent_key, "role": role}
            job_spec = spec.model_copy(update={"metadata": labels})
            job = await runner.run(job_key(agent_key, role), base, examples, job_spec)
            bar.update(1)
            return agent_key, role, job.result

        try:
            with self._stage(f"iter-{iteration}/finetune", work=runner.pending(keys)):
                # every job runs to its end even when one fails: the others are paid for, and their true
                # state lands in the store (agentsoc jobs), so a resumed run adopts them
                outcomes = await asyncio.gather(*(one(a, r, ex) for (a, r), ex in sets.items()), return_exceptions=True)
        finally:
            bar.close()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        results = [o for o in outcomes if not isinstance(o, BaseException)]
        new = {(a, r): m for a, r, m in results if m is not None}
        previous = self.slots
        self.slots = [
            AgentSlot(
                index=slot.index,
                generator=new.get((self._agent_key(slot.index), self._role_key("generator")), slot.generator),
                critic=new.get((self._agent_key(slot.index), self._role_key("critic")), slot.critic),
            )
            for slot in previous
        ]
        self.slots_iteration = iteration
        in_use = {m for slot in self.slots for m in (slot.generator, slot.critic)}
        keep = in_use | {self.summarizer, *base_models}
        await self.backend.release(sorted({m for s in previous for m in (s.generator, s.critic)} - keep))
        return list(self.slots)

    def _agent_key(self, index: int) -> str:
        """The agent a job trains for: its index, or ``all`` when the agents share their models."""
        return str(index) if self.recipe.finetune.share == "none" else "all"

    def _role_key(self, role: Role) -> str:
        """The role a job trains: generator or critic, or ``model`` for the one model of every role."""
        return "model" if self.recipe.finetune.share == "all" else role

    @contextlib.contextmanager
    def _stage(self, phase: str, *, work: bool = True) -> Iterator[None]:
        """Run ``phase`` (``iter-1/train``) as the current stage: its calls are metered under its name,
        and the wall time of a timed stage (:data:`~agentsoc.records.Stage`) is recorded when this
        session does its work — a resumed stage with nothing left to do keeps the time measured
        when it was done."""
        token = current_stage.set(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            current_stage.reset(token)
        match = re.fullmatch(r"iter-(\d+)/(train|finetune|eval)", phase)
        if work and match:
            stage: Stage = match[2]  # type: ignore[assignment]
            self.store.put_wall_time(int(match[1]), stage, time.perf_counter() - start)

    async def evaluate(self, iteration: int) -> EvalScores | None:
        """Debate the held-out problems with the current slots, score the votes, measure diversity.

        ``iteration`` must be the one whose models the society holds (:meth:`finetune` installs
        them): storing the base models' scores as a later iteration's would be a silent lie.
        """
        if iteration != self.slots_iteration:
            raise RuntimeError(
                f"evaluate({iteration}): the society holds the models of iteration {self.slots_iteration}; "
                f"run finetune({iteration}, data) first"
            )
        transcripts = await self.debate(self.eval_problems, f"iter-{iteration}/eval", evaluation=True)
        scores = evaluate(transcripts, self.eval_task.is_equivalent)
        if scores is not None:
            self.store.put_scores(iteration, scores)
        self.store.put_slots(iteration, self.slots)
        ev = self.recipe.evaluation
        # a resumed run has the same transcripts, hence the same diversity: do not pay for scoring twice
        if ev.diversity and transcripts and self.store.iteration(iteration).diversity is None:
            with self._stage(f"iter-{iteration}/diversity"):
                div = await measure(
                    transcripts,
                    self.backend,
                    metrics=ev.diversity,
                    max_scored_problems=ev.diversity_problems,
                    unique_id=self.recipe.society.unique_id,
                )
            self.store.put_diversity(iteration, div)
        return scores

    async def iterate(self, iteration: int) -> IterationRecord:
        """One finetuning iteration: debate the training problems, select, finetune, evaluate."""
        train = await self.debate(self.split.train, f"iter-{iteration}/train")
        labelled = [t for t in train if t.vote.answer is not None]
        label_acc = evaluate(labelled, self.task.is_equivalent)
        if label_acc is not None:
            # How often the vote (the pseudo-label) matched ground truth: diagnostics only.
            self.store.put_label_accuracy(iteration, label_acc.debate)
        data = self.select(train)
        if self.recipe.selection.rationalize:
            data = await self._rationalize(iteration, train, data)
        await self.finetune(iteration, data)
        await self.evaluate(iteration)
        return self.store.iteration(iteration)

    async def _rationalize(self, iteration: int, train: Sequence[Transcript], data: list[AgentData]) -> list[AgentData]:
        """STaR: add each agent's rationalized examples (hint-free prompt → rationale) to its D^G."""
        with self._stage(f"iter-{iteration}/rationalize"):
            extra = await rationalize(
                self.backend,
                self.task,
                self.slots,
                train,
                self.recipe.sampling,
                seed=self.recipe.seed,
                phase=f"iter-{iteration}/rationalize",
            )
        self.store.put_rationalized(iteration, [len(e) for e in extra])
        if self.recipe.society.unique_id:
            extra = [[_prepend(ex, agent_id_message(n, "generator")) for ex in e] for n, e in enumerate(extra)]
        return [d.model_copy(update={"generator": d.generator + tuple(extra[d.agent])}) for d in data]

    async def run(self, on_iteration: Callable[[list[IterationRecord]], None] | None = None) -> list[IterationRecord]:
        """Evaluate the base society, then run every finetuning iteration of the recipe.

        ``on_iteration`` gets the records so far after each iteration: a run of hours shows each
        iteration's accuracy when it is known, not only at the end."""
        await self.evaluate(0)
        results = [self.store.iteration(0)]
        if on_iteration is not None:
            on_iteration(results)
        for iteration in range(1, self.recipe.finetune.iterations + 1):
            results.append(await self.iterate(iteration))
            if on_iteration is not None:
                on_iteration(results)
        self.store.set_meta("finished", "1")
        return results


def _prepend(example: ChatExample, message: Message) -> ChatExample:
    return ChatExample(messages=(message, *example.messages))


def _with_ids(d: AgentData) -> AgentData:
    """Unique ID: the agent-and-role system message the debate sent, in front of each example."""
    return d.model_copy(
        update={
            "generator": tuple(_prepend(e, agent_id_message(d.agent, "generator")) for e in d.generator),
            "critic": tuple(_prepend(e, agent_id_message(d.agent, "critic")) for e in d.critic),
        }
    )
