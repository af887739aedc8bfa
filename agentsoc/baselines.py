"""Every baseline and ablation of the paper as a recipe transform on the same machinery.

A method is a function ``Recipe → Recipe`` that flips switches (agents, rounds, iterations,
selection label, model sharing, evaluation overrides, prompts) — never a copy of the loop. Each
transformed recipe is an ordinary run: :func:`compare` gives each method its own run directory
under one folder, so a rerun resumes every method from its caches, and all methods see the same
seeded training and held-out problems (same task config and seed).

Definitions follow algorithm.md §8; where the paper does not pin a detail down, the docstring
says which choice we made.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from agentsoc.atomic import write_atomic
from agentsoc.config import Recipe, RecipeError, set_dotted
from agentsoc.evaluate import PairedScore, correctness, paired
from agentsoc.records import Score
from agentsoc.stats import paired_text

Transform = Callable[[Recipe], Recipe]

METHODS: dict[str, Transform] = {}
#: the paper's row name of each method (Tables 1–5, Fig. 10)
LABELS: dict[str, str] = {}


def _method(name: str, label: str) -> Callable[[Transform], Transform]:
    def register(fn: Transform) -> Transform:
        METHODS[name] = fn
        LABELS[name] = label
        return fn

    return register


def with_changes(recipe: Recipe, name: str | None = None, **dotted: Any) -> Recipe:
    """``recipe`` with dotted fields replaced (``society.rounds=1``), validated again as a whole."""
    data = set_dotted(recipe.model_dump(mode="python"), dotted)
    if name is not None:
        data["name"] = name
    return Recipe.model_validate(data)


def _named(recipe: Recipe, method: str) -> str:
    return f"{recipe.name}-{method}"


def _shape(recipe: Recipe, method: str, **dotted: Any) -> Recipe:
    """Apply a method's switches; the evaluation shape follows the society's unless set here."""
    dotted.setdefault("evaluation.agents", None)
    dotted.setdefault("evaluation.rounds", None)
    return with_changes(recipe, _named(recipe, method), **dotted)


@_method("ours", "Multiagent FT (Ours)")
def ours(recipe: Recipe) -> Recipe:
    """Multiagent finetuning as the recipe says (Table 1/2 "Ours")."""
    return with_changes(recipe, _named(recipe, "ours"))


@_method("base", "Base")
def base(recipe: Recipe) -> Recipe:
    """Table 1 "Base": one agent, one sampled answer, no debate, no finetuning.

    A heterogeneous society is represented by its first model.
    """
    return _shape(
        recipe,
        "base",
        **{
            "society.agents": 1,
            "society.rounds": 1,
            "society.models": recipe.society.models[:1],
            "finetune.iterations": 0,
        },
    )


@_method("majority", "Majority")
def majority(recipe: Recipe) -> Recipe:
    """Table 1 "Majority": N independent samples (round 0 only), majority vote; no finetuning."""
    return _shape(recipe, "majority", **{"society.rounds": 1, "finetune.iterations": 0})


@_method("debate", "Debate")
def debate(recipe: Recipe) -> Recipe:
    """Table 1 "Debate": the base model, N agents, M rounds, vote of the final round; no finetuning."""
    return _shape(recipe, "debate", **{"finetune.iterations": 0})


@_method("star", "STaR")
def star(recipe: Recipe) -> Recipe:
    """Table 1 "STaR" (Zelikman et al.): one model finetuned on its own rationales that reach the
    GROUND-TRUTH answer, plus rationalization (wrong answers re-asked with the answer as a hint,
    trained without the hint). Our choices: N independent samples per problem (no debate) both to
    make data and to evaluate (majority vote), like Majority FT; one model for every agent. Each
    iteration restarts from the base model on the data the latest model made, as STaR does."""
    return _shape(
        recipe,
        "star",
        **{
            "society.rounds": 1,
            "finetune.share": "all",
            "finetune.from_base": True,
            "selection.label": "ground_truth",
            "selection.rationalize": True,
        },
    )


@_method("majority_ft", "Majority FT")
def majority_ft(recipe: Recipe) -> Recipe:
    """Table 1 "Majority FT": one model finetuned on its independent samples (round 0, no debate)
    that agree with their majority vote; evaluated by majority vote of N samples. No critic data
    exists without later rounds."""
    return _shape(recipe, "majority_ft", **{"society.rounds": 1, "finetune.share": "all"})


@_method("single_agent_ft", "Single-agent FT")
def single_agent_ft(recipe: Recipe) -> Recipe:
    """Table 2 / Fig. 1 "Single-agent FT": ONE model finetuned on all the vote-selected responses
    (every agent's generator and critic data), then used as every agent in every round (§2.2)."""
    return _shape(recipe, "single_agent_ft", **{"finetune.share": "all"})


@_method("shared_roles_ft", "Shared-roles FT (ours)")
def shared_roles_ft(recipe: Recipe) -> Recipe:
    """Not in the paper: one generator and one critic, each trained on all agents' data of its role
    and shared by every agent — roles stay apart, agents do not."""
    return _shape(recipe, "shared_roles_ft", **{"finetune.share": "agents"})


@_method("single_agent_ft_no_debate", "Single-agent FT w/o debate")
def single_agent_ft_no_debate(recipe: Recipe) -> Recipe:
    """Table 2 "Single-agent FT w/o debate": trained as Single-agent FT (with debate data), then
    evaluated as one agent answering alone (evaluation.agents = 1, rounds = 1)."""
    return _shape(
        recipe,
        "single_agent_ft_no_debate",
        **{"finetune.share": "all", "evaluation.agents": 1, "evaluation.rounds": 1},
    )


@_method("no_summary", "Multiagent FT w/o summary")
def no_summary(recipe: Recipe) -> Recipe:
    """Table 2 "w/o summary": the other agents' answers are pasted raw, in training and evaluation."""
    return _shape(recipe, "no_summary", **{"society.summarize": False, "evaluation.summarize": None})


@_method("no_critic", "Multiagent FT w/o critic")
def no_critic(recipe: Recipe) -> Recipe:
    """Table 2 "w/o critic": no critic models; the (finetuned) generators answer every round."""
    return _shape(recipe, "no_critic", **{"society.critic": False})


COOPERATIVE_NOTE = (
    "Cooperative prompts are OUR RECONSTRUCTION: the paper's cooperative prompts (Table 3) are not "
    "published. Round 0 is unchanged; the debate-round messages ask the agents to work together."
)
_COOP_PREFIX = (
    "You are solving this problem together with the other agents, as one team; you are not competing "
    "with them. These are your teammates' latest solutions: "
)
_COOP_SUFFIX = (
    "\n\n Work together with the other agents: combine the correct steps of everyone's reasoning, fix "
    "any mistake the team made, and give the team's best answer."
)
_COOP_SUMMARY = "You are solving this problem together with the other agents, as one team. "


def cooperative_prompts(recipe: Recipe) -> dict[str, str]:
    """The recipe's prompt overrides turned cooperative (task answer-format sentences are kept)."""
    from agentsoc import tasks

    task = tasks.create(recipe.task.name, recipe.task.options, base_dir=recipe.base_dir)
    current = task.prompts.model_copy(update=recipe.prompts)
    return {
        **recipe.prompts,
        "debate_prefix": _COOP_PREFIX,
        "debate_suffix": _COOP_SUFFIX + current.debate_suffix,
        "summary_message": _COOP_SUMMARY + current.summary_message,
    }


@_method("cooperative", "Cooperative (FT)")
def cooperative(recipe: Recipe) -> Recipe:
    """Table 3 "Cooperative (FT)": multiagent finetuning with agents told to work together instead
    of debating. The prompts are our reconstruction (see ``COOPERATIVE_NOTE``)."""
    return _shape(recipe, "cooperative", prompts=cooperative_prompts(recipe))


@_method("cooperative_base", "Cooperative (Base)")
def cooperative_base(recipe: Recipe) -> Recipe:
    """Table 3 "Cooperative (Base)": the cooperative debate with the base model, no finetuning."""
    return _shape(recipe, "cooperative_base", prompts=cooperative_prompts(recipe), **{"finetune.iterations": 0})


@_method("unique_id", "Unique ID")
def unique_id(recipe: Recipe) -> Recipe:
    """Table 5 "Unique ID": ONE model, finetuned on all agents' data, told which agent and role it
    plays by a system message ("You are agent 2 (critic).") in every debate call and in every
    training example — diversity from an ID instead of from separate weights."""
    return _shape(recipe, "unique_id", **{"finetune.share": "all", "society.unique_id": True})


def _five_agents(recipe: Recipe) -> dict[str, Any]:
    """Table 4's society: 5 agents, a heterogeneous model list reused cyclically."""
    models = recipe.society.models
    if len(models) > 1:
        models = [models[i % len(models)] for i in range(5)]
    return {"society.agents": 5, "society.models": models}


@_method("agents_5", "Multiagent FT, 5 agents")
def agents_5(recipe: Recipe) -> Recipe:
    """Table 4 "Ours": the method with 5 agents."""
    return _shape(recipe, "agents_5", **_five_agents(recipe))


@_method("debate_agents_5", "Debate, 5 agents")
def debate_agents_5(recipe: Recipe) -> Recipe:
    """Table 4 "Debate": the base model debating with 5 agents, M rounds; no finetuning."""
    return _shape(recipe, "debate_agents_5", **{**_five_agents(recipe), "finetune.iterations": 0})


@_method("majority_ft_agents_5", "Majority FT, 5 agents")
def majority_ft_agents_5(recipe: Recipe) -> Recipe:
    """Table 4 "Majority FT": as :func:`majority_ft` (one model, round-0 data agreeing with the
    vote, evaluated by majority vote) with 5 independent samples per problem."""
    return _shape(
        recipe, "majority_ft_agents_5", **{**_five_agents(recipe), "society.rounds": 1, "finetune.share": "all"}
    )


@_method("single_agent_ft_t2", "Single-agent FT, temperature 2")
def single_agent_ft_t2(recipe: Recipe) -> Recipe:
    """Fig. 10: Single-agent FT evaluated at sampling temperature 2, to buy diversity with noise."""
    return _shape(recipe, "single_agent_ft_t2", **{"finetune.share": "all", "evaluation.temperature": 2.0})


def transfer(recipe: Recipe, task: dict[str, Any]) -> Recipe:
    """Zero-shot transfer (Figs. 5, 12, 13): train on the recipe's task, evaluate on ``task``
    (a ``[task]`` table, e.g. ``{"name": "gsm8k", "n_test": 1000, "options": {...}}``)."""
    return with_changes(recipe, None, **{"evaluation.task": task})


def resolve(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise RecipeError(f"unknown method {unknown[0]!r}; known methods: {', '.join(METHODS)}")
    if not names:
        raise RecipeError("no methods given")
    return list(dict.fromkeys(names))


class MethodResult(BaseModel):
    """One method's headline number: the final-round vote after its last iteration."""

    model_config = ConfigDict(frozen=True)

    method: str
    label: str
    task: str
    run_dir: str
    iterations: int
    score: Score
    #: paired difference to the reference method on the same held-out problems (None for itself)
    vs_reference: PairedScore | None = None

    def vs_text(self) -> str:
        """The paired difference with its discordant counts and exact McNemar p (``-`` for the reference)."""
        vs = self.vs_reference
        return "-" if vs is None else paired_text(vs.diff, vs.se, vs.a_only, vs.b_only)


async def compare(
    recipe: Recipe,
    methods: Sequence[str],
    out_dir: Path,
    *,
    reference: str = "ours",
    progress: bool = False,
) -> list[MethodResult]:
    """Run every method on the same problems, each in ``out_dir/<method>`` (resumable), and store
    the results in ``out_dir/compare.json``."""
    from agentsoc.society import Society

    names = resolve(methods)
    out_dir.mkdir(parents=True, exist_ok=True)
    correct: dict[str, dict[str, bool]] = {}
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        rec = METHODS[name](recipe)
        run_dir = out_dir / name
        # the methods share one base model and one seed: a call another method already paid for
        # (the base society's debates, above all) is answered from that method's store
        shared = [out_dir / other for other in names[:i] + names[i + 1 :]]
        society = Society.from_recipe(rec, run_dir=run_dir, resume=True, progress=progress, shared_calls=shared)
        async with society:
            results = await society.run()
            last = results[-1]
            if last.scores is None:
                raise RecipeError(f"compare: method {name!r} has no held-out problems to score (task.n_test)")
            transcripts = list(society.store.transcripts(f"iter-{last.iteration}/eval").values())
            correct[name] = correctness(transcripts, society.eval_task.is_equivalent)
            rows.append(
                {
                    "method": name,
                    "label": LABELS[name],
                    "task": society.eval_task.name,
                    "run_dir": name,
                    "iterations": last.iteration,
                    "score": last.scores.debate,
                }
            )
    out = []
    for row in rows:
        ref = correct.get(reference)
        vs = None if ref is None or row["method"] == reference else paired(correct[row["method"]], ref)
        out.append(MethodResult(**row, vs_reference=vs))
    payload = {
        "recipe": recipe.name,
        "reference": reference,
        "methods": [r.model_dump(mode="json") for r in out],
    }
    write_atomic(out_dir / "compare.json", json.dumps(payload, indent=2))
    return out
