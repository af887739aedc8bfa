"""The dry run: what a recipe will cost before it spends anything.

Counts follow the loop exactly (DESIGN §1): the base society is evaluated once, then each of the
L iterations debates the training problems, finetunes one job per agent and role, and evaluates
again. Each debate of one problem makes N round-0 calls and, per later round, N summaries (with
summarization) and N critic calls. Token counts are estimates: prompt lengths come from the task's
prompt templates filled with the real problems when the data is at hand (a typical problem length
otherwise), and each answer is taken as the task's typical answer length capped by
``sampling.max_tokens``. Training tokens assume every problem yields an example — an upper bound,
since the vote discards problems without a majority. Dollars come from :mod:`agentsoc.pricing`;
a model without a price shows "unknown".
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

from agentsoc.config import Recipe, backend_options, paper_deviations
from agentsoc.debate import debate_message, summarizer_request
from agentsoc.memory_plan import memory_plan, open_model
from agentsoc.pricing import PRICES_NOTE, TINKER_PRICES_NOTE, format_usd, training_cost, usage_cost
from agentsoc.prompts import PromptSet, fill
from agentsoc.tables import text_table
from agentsoc.tasks.base import Problem
from agentsoc.types import ModelRef, Usage

#: Typical answer length in tokens per task (the paper's models explain their reasoning).
TYPICAL_ANSWER_TOKENS = {"arithmetic": 80, "gsm8k": 220, "math": 400, "mmlu": 180}
#: Typical problem length in characters, used when the data files are not at hand.
TYPICAL_PROBLEM_CHARS = {"arithmetic": 20, "gsm8k": 240, "math": 200, "mmlu": 450}
#: A summary of the other agents' answers, in tokens.
SUMMARY_TOKENS = 150
#: Assumed seconds per hosted chat call, for the wall-time line.
SECONDS_PER_CALL = 3.0


def _tokens(text: str) -> int:
    return len(text) // 4 + 4


@dataclass
class Stage:
    """One row of the table: a debate phase or an iteration's fine-tuning."""

    name: str
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    jobs: int = 0
    trained_tokens: int = 0
    dollars: float | None = 0.0

    def add_cost(self, amount: float | None) -> None:
        self.dollars = None if amount is None or self.dollars is None else self.dollars + amount


@dataclass(frozen=True)
class _DebateShape:
    """Token counts of one problem's debate, per call kind."""

    round0_prompt: int
    answer: int
    summary_prompt: int
    summary: int
    debate_prompt: int  # the new user message of a later round (summary or the others' answers)

    def critic_conversation(self, round_: int) -> int:
        """Prompt tokens of an agent's call in ``round_`` ≥ 1: its whole conversation so far."""
        return self.round0_prompt + round_ * (self.answer + self.debate_prompt)


def _prompts_and_problem_chars(recipe: Recipe) -> tuple[PromptSet, float, str]:
    """The prompt set and mean problem length, from the real data when it can be loaded."""
    from agentsoc import tasks

    name = recipe.task.name
    try:
        task = tasks.create(name, recipe.task.options, base_dir=recipe.base_dir)
        split = task.load(recipe.task.n_train, recipe.task.n_test, recipe.seed)
        problems = [*split.train, *split.test]
        chars = sum(len(p.question) for p in problems) / max(len(problems), 1)
        return task.prompts.model_copy(update=recipe.prompts), chars, "problem lengths from the data"
    except (ValueError, OSError):
        preset: PromptSet = importlib.import_module(f"agentsoc.tasks.{name}").PRESET
        chars = TYPICAL_PROBLEM_CHARS.get(name, 300)
        return preset.model_copy(update=recipe.prompts), chars, f"data not found: typical {chars}-character problems"


def _shape(recipe: Recipe, prompts: PromptSet, problem_chars: float) -> _DebateShape:
    """Token counts of the debate's own messages (built by :mod:`agentsoc.debate`, so the estimate
    cannot drift from what a run sends) filled with placeholder text of typical length."""
    answer = min(TYPICAL_ANSWER_TOKENS.get(recipe.task.name, 250), recipe.sampling.max_tokens)
    summary = min(SUMMARY_TOKENS, recipe.sampling.max_tokens)
    problem = Problem(
        id="estimate", question="x" * int(problem_chars), fields={k: "x" * 20 for k in ("a", "b", "c", "d")}
    )
    others = ["x" * (answer * 4)] * (recipe.society.agents - 1)
    summarized = recipe.society.summarize and bool(others)
    message = debate_message(prompts, problem, others, "x" * (summary * 4) if summarized else None)
    return _DebateShape(
        round0_prompt=_tokens(fill(prompts.round0, problem.template_fields())),
        answer=answer,
        summary_prompt=_tokens(summarizer_request(prompts, problem, others)),
        summary=summary,
        debate_prompt=_tokens(message),
    )


def _batch(recipe: Recipe) -> bool:
    """Whether chat calls go through a Batch API (half price)."""
    return backend_options(recipe).batch_api()


def _debate(stage: Stage, recipe: Recipe, shape: _DebateShape, problems: int, agent_model: ModelRef) -> None:
    """Add the calls, tokens and dollars of debating ``problems`` to ``stage``."""
    s = recipe.society
    batch = _batch(recipe)
    summarizer = s.summarizer or s.base_models()[0]
    agent_usage = Usage(prompt_tokens=shape.round0_prompt, completion_tokens=shape.answer)
    summary_usage = Usage()
    for round_ in range(1, s.rounds):
        agent_usage += Usage(prompt_tokens=shape.critic_conversation(round_), completion_tokens=shape.answer)
        if s.summarize and s.agents > 1:
            summary_usage += Usage(prompt_tokens=shape.summary_prompt, completion_tokens=shape.summary)
    calls_per_problem = s.agents * s.rounds + (s.agents * (s.rounds - 1) if s.summarize and s.agents > 1 else 0)
    per_agents = Usage(
        prompt_tokens=agent_usage.prompt_tokens * s.agents * problems,
        completion_tokens=agent_usage.completion_tokens * s.agents * problems,
    )
    per_summaries = Usage(
        prompt_tokens=summary_usage.prompt_tokens * s.agents * problems,
        completion_tokens=summary_usage.completion_tokens * s.agents * problems,
    )
    stage.calls += calls_per_problem * problems
    stage.prompt_tokens += per_agents.prompt_tokens + per_summaries.prompt_tokens
    stage.completion_tokens += per_agents.completion_tokens + per_summaries.completion_tokens
    stage.add_cost(usage_cost(agent_model, per_agents, batch=batch))
    stage.add_cost(usage_cost(summarizer, per_summaries, batch=batch))


def _finetune(stage: Stage, recipe: Recipe, shape: _DebateShape) -> None:
    """One job per agent and role; generator examples are round 0, critic examples the whole debate."""
    s, f = recipe.society, recipe.finetune
    roles = ("generator", "critic") if s.critic else ("generator",)
    agents = s.agents if f.share == "none" else 1
    pool = 1 if f.share == "none" else s.agents  # a shared model trains on every agent's examples
    n = recipe.task.n_train * pool
    per_role = {
        "generator": n * (shape.round0_prompt + shape.answer),
        "critic": n * (shape.critic_conversation(s.rounds - 1) + shape.answer),
    }
    base = s.base_models()[0]
    for role in roles:
        tokens = per_role[role] * f.spec.epochs * agents
        stage.trained_tokens += tokens
        stage.add_cost(training_cost(base, tokens))
    stage.jobs += agents * (1 if f.share == "all" else len(roles))  # "all": one job on both roles' data


def estimate(recipe: Recipe) -> tuple[list[Stage], str]:
    """Rows per stage, and a note on where the problem lengths came from."""
    prompts, chars, source = _prompts_and_problem_chars(recipe)
    shape = _shape(recipe, prompts, chars)
    base = recipe.society.base_models()[0]
    finetuned = f"ft:{base}:estimate::x"
    # held-out problems: the evaluation task's when it has its own (zero-shot transfer), else the test split
    ev_task = recipe.evaluation.task
    held_out = ev_task.n_test if ev_task is not None else recipe.task.n_test
    stages = [Stage("iter-0/eval")]
    _debate(stages[0], recipe, shape, held_out, base)
    for it in range(1, recipe.finetune.iterations + 1):
        train, ft, ev = Stage(f"iter-{it}/train"), Stage(f"iter-{it}/finetune"), Stage(f"iter-{it}/eval")
        _debate(train, recipe, shape, recipe.task.n_train, base if it == 1 else finetuned)
        _finetune(ft, recipe, shape)
        _debate(ev, recipe, shape, held_out, finetuned)
        stages += [train, ft, ev]
    return stages, source


#: ASSUMED throughput of one H100-class GPU for a 7B model (scaled by size for others): vLLM with
#: many sequences in flight; training in bf16 at ~40% of ~990 TFLOP/s (6 FLOPs per parameter and
#: token in full finetuning, ~4 with LoRA: no weight gradients). Not measured here (no GPU):
#: bench/gpu_check.sh measures the training side on a lent GPU.
GPU_PROMPT_TOKENS_S_7B = 20_000
GPU_DECODE_TOKENS_S_7B = 2_500
GPU_TRAIN_FLOPS_S = 0.4 * 990e12


def model_params_b(model: str) -> float | None:
    found = open_model(model)
    return found.params_b if found is not None else None


def gpu_hours(recipe: Recipe, stages: list[Stage]) -> tuple[float, float] | None:
    """(inference, training) GPU-hours on one H100-class GPU, from the assumed throughputs above;
    None when the model's size is unknown."""
    params = model_params_b(recipe.society.base_models()[0])
    if params is None:
        return None
    scale = params / 7.0
    prompt = sum(s.prompt_tokens for s in stages)
    completion = sum(s.completion_tokens for s in stages)
    inference_s = scale * (prompt / GPU_PROMPT_TOKENS_S_7B + completion / GPU_DECODE_TOKENS_S_7B)
    flops_per_token = (6 if recipe.finetune.spec.method == "full" else 4) * params * 1e9
    training_s = sum(s.trained_tokens for s in stages) * flops_per_token / GPU_TRAIN_FLOPS_S
    return inference_s / 3600, training_s / 3600


def _fmt(n: int) -> str:
    return f"{n:,}" if n else "-"


def dry_run(recipe: Recipe) -> str:
    """A printable table of chat calls, tokens, fine-tuning jobs and dollars per stage."""
    stages, source = estimate(recipe)
    total = Stage("total")
    for st in stages:
        total.calls += st.calls
        total.prompt_tokens += st.prompt_tokens
        total.completion_tokens += st.completion_tokens
        total.jobs += st.jobs
        total.trained_tokens += st.trained_tokens
        total.add_cost(st.dollars)
    header = ["stage", "chat calls", "prompt tok", "completion tok", "ft jobs", "trained tok", "cost"]
    rows = [
        [
            st.name,
            _fmt(st.calls),
            _fmt(st.prompt_tokens),
            _fmt(st.completion_tokens),
            _fmt(st.jobs),
            _fmt(st.trained_tokens),
            format_usd(st.dollars),
        ]
        for st in [*stages, total]
    ]
    table = text_table(header, rows, numeric=True, total=True)
    s = recipe.society
    b = recipe.backend
    batch = _batch(recipe)
    minutes = math.ceil(total.calls / b.concurrency) * SECONDS_PER_CALL / 60
    notes = [
        f"dry run of recipe {recipe.name!r}: {s.agents} agents x {s.rounds} rounds, "
        f"{recipe.task.n_train} train / {recipe.task.n_test} test {recipe.task.name} problems, "
        f"{recipe.finetune.iterations} iterations, models {', '.join(sorted(set(s.base_models())))}",
        f"estimates: {source}; answers ~{TYPICAL_ANSWER_TOKENS.get(recipe.task.name, 250)} tokens "
        f"(max_tokens {recipe.sampling.max_tokens}); training tokens are an upper bound (every problem kept) "
        f"x {recipe.finetune.spec.epochs} epochs",
        f"chat wall time at concurrency {b.concurrency} and ~{SECONDS_PER_CALL:.0f} s/call: ~{minutes:.0f} min"
        + (" (Batch API: half price, up to 24 h per debate round)" if batch else "")
        + "; fine-tuning jobs add their queue and training time",
        TINKER_PRICES_NOTE if b.name == "tinker" else PRICES_NOTE,
    ]
    hours = gpu_hours(recipe, stages) if recipe.backend.name == "vllm" else None
    if hours is not None:
        notes.append(
            f"GPU time on one H100-class GPU, from ASSUMED throughputs (agentsoc.estimate; not measured): "
            f"inference ~{hours[0]:.1f} h, training ~{hours[1]:.1f} h"
            + (" (full finetuning)" if recipe.finetune.spec.method == "full" else " (LoRA)")
        )
    if recipe.backend.name == "vllm":
        notes += memory_plan(recipe)  # raises RecipeError, naming the setting, when it cannot fit
    # a dry run is where one decides whether a run reproduces a paper table: say where it will not
    deviations = paper_deviations(recipe)
    notes.append(
        "settings that differ from the paper: "
        + ("none" if not deviations else str(len(deviations)))
        + "".join(f"\n  - {d}" for d in deviations)
    )
    return "\n".join([table, "", *notes])
