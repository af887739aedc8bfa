"""The recipe: one TOML file that says everything a run does, validated by pydantic.

Unknown or mistyped fields are errors that name the file and the field (``recipe.toml: society.
agnets: unknown field``), because a silently ignored typo in a multi-hour run is the worst kind of
bug. The resolved recipe is written into the run directory and hashed, so a resumed run can tell
whether it is still the same experiment.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agentsoc.backend import Backend
from agentsoc.options import OptionsError
from agentsoc.types import FinetuneSpec, Sampling
from agentsoc.vote import TieBreak

if TYPE_CHECKING:
    from backends.options import BackendOptions


#: the recipes that ship inside the package (loadable by name from anywhere)
SHIPPED = Path(__file__).resolve().parent / "recipes"


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the field."""


#: recipe fields that change how a run goes, never what it produces: a run that died of exhausted
#: retries may be resumed with more of them
RUNTIME_FIELDS = (
    "backend.concurrency",
    "backend.max_attempts",
    "backend.max_backoff_s",
    "backend.poll_interval_s",
    "backend.job_patience_s",
    "backend.max_active_jobs",
    "backend.max_job_attempts",
)


#: fields added after runs already existed, with the default that does what those runs did: left out of
#: the fingerprint at that default, so a run started before the field existed still resumes
LATER_DEFAULTS: dict[str, Any] = {"society.tie_break": "seeded"}


def differing_fields(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted paths at which two JSON-like values differ (for "which setting changed?")."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += differing_fields(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class _Section(BaseModel):
    """Strict: ``summarize = "yes"``, ``seed = true`` or ``n_train = "60"`` are errors, not casts."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TaskConfig(_Section):
    """Which benchmark, how many problems. Train and held-out problems never overlap."""

    name: str
    n_train: int = Field(default=500, ge=1)
    n_test: int = Field(default=500, ge=1)
    #: task-specific options (file paths, arithmetic difficulty); checked by the task itself
    options: dict[str, Any] = Field(default_factory=dict)


class BackendConfig(_Section):
    """Which backend serves the models, and the one retry/concurrency policy around it."""

    name: str = "auto"
    #: calls in flight at once (one semaphore around the backend)
    concurrency: int = Field(default=8, ge=1)
    #: attempts per call for transient errors (429, 5xx, timeouts), including the first
    max_attempts: int = Field(default=6, ge=1)
    #: upper bound of one exponential back-off wait, seconds
    max_backoff_s: float = Field(default=30.0, gt=0)
    #: seconds between two polls of a fine-tuning job
    poll_interval_s: float = Field(default=10.0, gt=0)
    #: seconds a fine-tuning job call (submit, poll) may keep failing before the run stops; the first
    #: failure is told at once. A job trains on meanwhile, and a resumed run picks it up by its key
    job_patience_s: float = Field(default=600.0, gt=0)
    #: attempts per fine-tuning job: a job that fails transiently (a server error) is submitted again,
    #: under a new key, until this many have failed; a permanent failure is never retried
    max_job_attempts: int = Field(default=3, ge=1)
    #: fine-tuning jobs submitted and running at once (None: all of an iteration's jobs at once).
    #: Providers cap active jobs per organisation (OpenAI: a handful); past the cap creation
    #: fails with 429 for as long as the earlier jobs run, longer than any retry budget.
    max_active_jobs: int | None = Field(default=None, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class SocietyConfig(_Section):
    """The debating society: N agents, M rounds, and the ablation switches of DESIGN §4."""

    agents: int = Field(default=3, ge=1)
    rounds: int = Field(default=2, ge=1)
    #: base model; one entry serves every agent, N entries give a heterogeneous society
    models: list[str] = Field(min_length=1)
    #: summarizer model; empty means the base model of agent 0 (the paper's choice)
    summarizer: str = ""
    #: summarize the other agents' answers (the paper's method) or paste them raw
    summarize: bool = True
    #: critics answer rounds >= 1; False keeps the generators in every round (w/o critic ablation)
    critic: bool = True
    #: one shared model told which agent and role it plays by a system message ("You are agent 2
    #: (critic).") in debate and training data (Unique ID ablation, paper Table 5); use with
    #: finetune.share = "all"
    unique_id: bool = False
    #: a reply cut off at sampling.max_tokens abstains from the vote and from training data (our
    #: rule: its last number is an intermediate result); false reads it anyway, as the paper did
    abstain_truncated: bool = True
    #: how a tied vote is decided: "seeded", a draw seeded by (seed, problem) (ours: fair to every agent),
    #: or "largest", the largest answer string among the tied (MAFT's code, for paper reproductions)
    tie_break: TieBreak = "seeded"

    @model_validator(mode="after")
    def _models_match_agents(self) -> SocietyConfig:
        if len(self.models) not in (1, self.agents):
            raise ValueError(f"models: give 1 model or one per agent ({self.agents}), got {len(self.models)}")
        return self

    def base_models(self) -> list[str]:
        return self.models * self.agents if len(self.models) == 1 else list(self.models)


class SelectionConfig(_Section):
    """How the vote selects training data (algorithm.md §4)."""

    #: w: target share of "started wrong, corrected" (D^C-) examples in each critic set. The
    #: reference code's coin flip gives about 2/3; all of D^C- is always kept.
    critic_mix: float = Field(default=2 / 3, gt=0.0, le=1.0)
    #: train critics on rounds >= 1 only (default) or on every assistant turn (paper-faithful)
    critic_loss: Literal["later_rounds", "all_turns"] = "later_rounds"
    #: a role whose dataset is smaller than this is not finetuned this iteration (kept as is)
    min_examples: int = Field(default=1, ge=1)
    #: the label that selects data: the debate's majority vote (the method; no ground truth) or the
    #: ground-truth answer (the STaR baseline)
    label: Literal["vote", "ground_truth"] = "vote"
    #: STaR's rationalization: re-ask an agent that answered wrong with the correct answer as a hint
    #: and keep the rationale (trained on the prompt WITHOUT the hint) if it reaches the answer
    rationalize: bool = False


class FinetuneConfig(_Section):
    iterations: int = Field(default=2, ge=0)
    #: finetune each iteration from the base model instead of the slot's previous model
    from_base: bool = False
    #: who shares a finetuned model. "none": every agent its own generator and critic (the method);
    #: "all": ONE model trained on every agent's generator and critic data and used by every agent in
    #: every round (the paper's single-agent FT, Table 2 / Fig. 1); "agents": one generator and one
    #: critic, each shared by all agents (our variant between the two)
    share: Literal["none", "agents", "all"] = "none"
    spec: FinetuneSpec = FinetuneSpec()


DiversityMetric = Literal["consensus", "embedding", "likelihood", "kl"]


def _all_diversity() -> list[DiversityMetric]:
    return ["consensus", "embedding", "likelihood", "kl"]


class EvaluationConfig(_Section):
    """How held-out problems are debated; every field left out means "as in training".

    ``task`` evaluates on another benchmark (zero-shot transfer, e.g. train on MATH, test on GSM8K).
    ``agents`` smaller than the society uses the first slots; larger reuses them cyclically.
    """

    task: TaskConfig | None = None
    agents: int | None = Field(default=None, ge=1)
    rounds: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    summarize: bool | None = None
    #: prompt overrides for the evaluation task (defaults to the recipe's ``prompts`` when the
    #: evaluation task is the training task)
    prompts: dict[str, str] | None = None
    #: diversity metrics computed on every evaluation (agentsoc.diversity); likelihood and kl need a
    #: backend that can score responses and are skipped, with a note, when it cannot
    diversity: list[DiversityMetric] = Field(default_factory=_all_diversity)
    #: at most this many held-out problems feed the likelihood/KL metrics (each costs 2·N·(N−1) scores)
    diversity_problems: int = Field(default=50, ge=1)


#: numpy's seed range (``RandomState`` draws the arithmetic problems): 0 … 2**32 − 1
SEED_MAX = 2**32 - 1
#: societies larger than this get a warning with the dry run's cost (the paper debates with 3; 5 at most)
LARGE_SOCIETY = 10


class Recipe(_Section):
    """A whole experiment."""

    name: str
    seed: int = 0
    task: TaskConfig
    backend: BackendConfig = BackendConfig()
    society: SocietyConfig
    sampling: Sampling = Sampling()
    selection: SelectionConfig = SelectionConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    #: overrides of the task's prompt preset, by PromptSet field name
    prompts: dict[str, str] = Field(default_factory=dict)
    #: the folder of the recipe file; relative paths in task options resolve against it
    base_dir: Path = Path(".")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\\0") or v.startswith("."):
            raise ValueError("must be a non-empty file-name-safe string")
        return v

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, v: int) -> int:
        if not 0 <= v <= SEED_MAX:
            raise ValueError(f"must be a whole number from 0 to {SEED_MAX} (numpy's seed range)")
        return v

    def results_view(self) -> dict[str, Any]:
        """The recipe less what does not change results: where the file lives, how many calls fly at
        once, how patient retries and polls are (:data:`RUNTIME_FIELDS`, and the backend options
        marked RUNTIME), with the backend's options filled with their defaults."""
        data = self.model_dump(mode="json", exclude={"base_dir"})
        for dotted in RUNTIME_FIELDS:
            section, field = dotted.split(".")
            data[section].pop(field, None)
        for dotted, default in LATER_DEFAULTS.items():
            section, field = dotted.split(".")
            if data[section].get(field) == default:
                data[section].pop(field)
        data["backend"]["options"] = backend_options(self).results_view()
        return data

    def fingerprint(self) -> str:
        """A hash of what determines results; a resumed run must have the same one."""
        blob = json.dumps(self.results_view(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_toml_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = self.model_dump(mode="json", exclude={"base_dir"}, exclude_none=True)
        return data


#: backends that finetune open models themselves (the paper finetuned those in full)
OPEN_MODEL_BACKENDS = ("local", "vllm", "auto", "tinker")
#: the paper's effective training batch for open models (ft.sh: 3 per device x 16 accumulation x 4 GPUs)
PAPER_OPEN_BATCH = 192
#: OpenAI's GPT models, base or finetuned: the paper sampled them without max_tokens
_GPT = re.compile(r"^(?:ft:)?gpt-")


def paper_deviations(recipe: Recipe) -> list[str]:
    """Where a recipe deliberately differs from the paper's setting, as named switches.

    Each is an improvement we believe in (algorithm.md §12), but a run that claims to reproduce a
    paper table must not use one silently, so the report lists them.
    """
    out = []
    if recipe.selection.critic_loss == "later_rounds":
        out.append(
            "selection.critic_loss = later_rounds: critics learn only their answers of rounds >= 1 "
            "(paper: every assistant turn, the wrong round-0 answer of a corrected trajectory included)"
        )
    if recipe.society.abstain_truncated:
        out.append(
            "society.abstain_truncated = true: a reply cut off at max_tokens abstains from the vote "
            "(paper: its last number votes)"
        )
    if recipe.backend.name in OPEN_MODEL_BACKENDS and recipe.finetune.spec.method == "lora":
        out.append("finetune.spec.method = lora: LoRA adapters (paper: full finetuning of open models)")
    if recipe.prompts:
        out.append(f"prompts: {', '.join(sorted(recipe.prompts))} differ from the task's paper preset")
    if recipe.society.tie_break == "seeded":
        out.append(
            "society.tie_break = seeded: a tied vote is decided by a draw seeded by (seed, problem) "
            "(paper's code: the largest answer string, tie_break = largest)"
        )
    if any(_GPT.match(m) for m in recipe.society.base_models()):
        out.append(
            f"sampling.max_tokens = {recipe.sampling.max_tokens}: GPT replies are capped (paper: no cap; the cap keeps "
            "OpenAI's per-minute token budget, which counts max_tokens, from throttling the run)"
        )
    spec = recipe.finetune.spec
    batch = spec.batch_size * spec.gradient_accumulation_steps
    if recipe.backend.name in OPEN_MODEL_BACKENDS and batch != PAPER_OPEN_BATCH:
        out.append(
            f"finetune.spec: effective batch {batch} (batch_size {spec.batch_size} x gradient_accumulation_steps "
            f"{spec.gradient_accumulation_steps}) (paper's open models: {PAPER_OPEN_BATCH} = 3 x 16 x 4 GPUs, "
            "1-3 optimizer steps on a few hundred examples)"
        )
    if recipe.selection.label == "ground_truth" and not recipe.finetune.from_base and recipe.finetune.iterations > 1:
        out.append(
            "finetune.from_base = false with ground-truth labels (STaR): each iteration continues from the "
            "previous model (STaR restarts from the base model every iteration; finetune.from_base = true)"
        )
    return out


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        value = e.get("input")
        if isinstance(value, float) and not math.isfinite(value):
            msg = f"must be a finite number, not {value}"  # pydantic would say "less than or equal to 2" of nan
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def set_dotted(data: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` (a recipe as a dict) with dotted fields set in place (``society.rounds``), sections
    made where missing: the one way recipes are shrunk and varied (``--quick``, methods, tests)."""
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return data


def recipe_from_dict(data: dict[str, Any], *, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
    try:
        recipe = Recipe.model_validate({**data, "base_dir": base_dir or Path(".")})
    except ValidationError as e:
        raise RecipeError(_format_errors(source, e)) from None
    check_backend(recipe, source)
    return recipe


def shipped_recipes() -> list[str]:
    """The names of the recipes that ship inside the package (``agentsoc/recipes/*.toml``)."""
    return sorted(p.name.removesuffix(".toml") for p in SHIPPED.iterdir() if p.name.endswith(".toml"))


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe; every problem is reported against ``path``.

    A bare name that is not a file (``arithmetic-mock``) is looked up among the recipes shipped in
    the package, so examples work from any directory and from an installed wheel.
    """
    p = Path(path)
    shipped = SHIPPED / f"{p.name.removesuffix('.toml')}.toml"
    if not p.exists() and p.parent == Path(".") and shipped.is_file():
        p = shipped
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            f"{p}: no such recipe file (shipped recipes, usable by name: {', '.join(shipped_recipes())})"
        ) from None
    except IsADirectoryError:
        raise RecipeError(f"{p}: is a directory; give a recipe's .toml file") from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f"{p}: not UTF-8 text (byte {e.start} is {e.object[e.start]:#04x}); save it as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: invalid TOML: {e}") from None
    return recipe_from_dict(data, source=str(p), base_dir=p.resolve().parent)


def recipe_warnings(recipe: Recipe) -> list[str]:
    """What a recipe allows but a person most likely did not mean, one line each (printed at start).

    One agent has no debate and no vote (the method needs several); a society far beyond the
    paper's size multiplies every call, so the warning carries the dry run's count and cost.
    """
    out = []
    agents = recipe.society.agents
    if agents == 1:
        out.append(
            "society.agents = 1: one agent has no debate and no majority vote; this finetunes a single agent "
            "on its own answers (use 3, the paper's society, for multiagent finetuning)"
        )
    elif agents > LARGE_SOCIETY:
        from agentsoc.estimate import estimate  # lazily: the estimate imports this module
        from agentsoc.pricing import format_usd

        try:
            stages, _ = estimate(recipe)
        except Exception:  # the warning must not fail the run: say it without the numbers
            cost = "see agentsoc run RECIPE --dry-run"
        else:
            dollars = None if any(s.dollars is None for s in stages) else sum(s.dollars or 0.0 for s in stages)
            usd = "an unknown cost (no price for the model)" if dollars is None else format_usd(dollars)
            cost = f"the dry run estimates {sum(s.calls for s in stages):,} chat calls, {usd}"
        out.append(
            f"society.agents = {agents}: far beyond the paper's 3 (5 at most); every problem costs "
            f"{agents} x {recipe.society.rounds} rounds of calls — {cost}"
        )
    return out


# The registry lookups: the only place in the core that reaches into ``backends/`` (DESIGN §2),
# lazily, so that importing the core never imports a backend; the options models import no SDK.


def backend_options(recipe: Recipe) -> BackendOptions:
    """The recipe's ``[backend.options]`` validated by the backend's own options model."""
    import backends

    return backends.parse(recipe.backend.name, recipe.backend.options)


def check_backend(recipe: Recipe, source: str = "<recipe>") -> None:
    """Fail before anything is written or loaded when the recipe names a backend that does not exist
    or gives it an option it does not have; the message names the file and the field."""
    import backends

    if recipe.backend.name not in backends.names():
        raise RecipeError(
            f"{source}: backend.name: unknown backend {recipe.backend.name!r}; known backends: "
            f"{', '.join(backends.names())}"
        )
    try:
        backend_options(recipe)
    except OptionsError as e:
        raise RecipeError("\n".join(f"{source}: backend.options.{p.field}: {p.problem}" for p in e.problems)) from None


def create_backend(recipe: Recipe, run_dir: Path) -> Backend:
    import backends
    from backends.options import SocietyShape

    s, f = recipe.society, recipe.finetune
    roles = 1 if f.share == "all" or not s.critic else 2  # "all": one model on both roles' data
    shape = SocietyShape(agents=s.agents if f.share == "none" else 1, roles=roles)
    return backends.create(recipe.backend.name, backend_options(recipe), run_dir, society=shape)
