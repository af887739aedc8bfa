"""Every backend's ``[backend.options]`` as a pydantic model: unknown keys refused, types checked,
defaults and one line of help per field (the way TRL's ``SFTConfig`` documents its fields).

They live here, apart from the backends, because this module imports no SDK: the recipe loader
validates a recipe's options before any model, SDK or server is touched, so
``agentsoc run RECIPE --dry-run`` already names a misspelled option.

Fields marked :data:`RUNTIME` change how a run goes (how fast, how patient, which queue), never
what it produces; the recipe's resume fingerprint leaves them out, so a run can be resumed with
more patience than it was started with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: ``json_schema_extra`` of a field that does not change results (see the module docstring)
RUNTIME: dict[str, Any] = {"affects_results": False}

#: the bundled model's name (backends.bundled.DEFAULT_MODEL, repeated to keep this module light)
BUNDLED_MODEL = "qwen2.5-coder-0.5b-instruct"
#: LoRA target modules of the local and TRL trainers (attention projections)
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


class BackendOptions(BaseModel):
    """Base of every backend's options: strict, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def runtime_fields(cls) -> set[str]:
        """The fields that do not change results (left out of the resume fingerprint)."""
        return {
            name
            for name, info in cls.model_fields.items()
            if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("affects_results") is False
        }

    def results_view(self) -> dict[str, Any]:
        """The options that change results, defaults filled in (the recipe fingerprint's part)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.runtime_fields():
                continue
            value = getattr(self, name)
            out[name] = value.results_view() if isinstance(value, BackendOptions) else _jsonable(value)
        return out

    def batch_api(self) -> bool:
        """Whether chat calls go through a provider's Batch API (the dry run halves their price)."""
        return False


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


class MockOptions(BackendOptions):
    """Simulated agents (``backends/mock.py``): test plumbing, never results."""

    state_dir: str = Field(
        default="mock-server",
        description="folder of the simulated server's jobs and logs, relative to the run directory; it must "
        "outlive the process so that a resumed run finds its jobs",
    )
    latency_s: float = Field(default=0.0, ge=0, description="seconds each chat call takes", json_schema_extra=RUNTIME)
    polls_to_finish: int = Field(
        default=2, ge=0, description="polls a fine-tuning job stays running", json_schema_extra=RUNTIME
    )
    fail_jobs: bool = Field(default=False, description="every fine-tuning job fails for good (error-path tests)")
    flaky_jobs: int = Field(
        default=0, ge=0, description="the first N jobs the server creates fail with a transient server error"
    )


class OpenAIOptions(BackendOptions):
    """The OpenAI API, or any OpenAI-compatible server for inference (``backends/openai.py``)."""

    base_url: str | None = Field(default=None, description="API endpoint; None = OpenAI's")
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="environment variable holding the key (never the key itself)"
    )
    timeout_s: float = Field(default=120.0, gt=0, description="seconds per HTTP request", json_schema_extra=RUNTIME)
    batch: bool = Field(
        default=False,
        description="send chat calls through the Batch API (half price, hours)",
        json_schema_extra=RUNTIME,
    )
    batch_window_s: float = Field(
        default=2.0, gt=0, description="seconds to collect calls into one batch", json_schema_extra=RUNTIME
    )
    batch_poll_s: float = Field(
        default=30.0, gt=0, description="seconds between batch polls", json_schema_extra=RUNTIME
    )
    organization: str | None = Field(default=None, description="OpenAI organization id", json_schema_extra=RUNTIME)
    project: str | None = Field(default=None, description="OpenAI project id", json_schema_extra=RUNTIME)
    weight_support: bool = Field(
        default=True, description="send per-message training weights (false for providers that reject them)"
    )

    def batch_api(self) -> bool:
        return self.batch


class LlamaCppOptions(BackendOptions):
    """llama-cpp-python on one GGUF base with LoRA adapters (``backends/llamacpp.py``)."""

    model: str = Field(default=BUNDLED_MODEL, description="bundled model name (also the base model's label)")
    model_path: Path | None = Field(default=None, description="your own GGUF chat model instead of the bundled one")
    n_ctx: int = Field(default=4096, ge=64, description="context tokens per sequence")
    n_threads: int | None = Field(default=None, ge=1, description="CPU threads (None: every usable CPU)")
    n_batch: int = Field(default=512, ge=1, description="prompt tokens per llama_decode")
    extra_buffers: bool | None = Field(
        default=None, description="ggml's repacked weight buffers; None = off on AMX CPUs (they crash sandboxed)"
    )
    parallel: int = Field(default=8, ge=1, description="sequences decoded together (continuous batching)")
    deterministic: bool = Field(
        default=True,
        description=(
            "batch-invariant decoding: a call's text does not depend on what else is batched, so a fresh "
            "rerun reproduces a run (measured cost: none, bench/local_determinism.py); false: ggml's fastest kernels"
        ),
    )
    top_logprobs: int = Field(default=5, ge=1, description="alternatives per token returned by score() (KL metric)")
    verbose: bool = Field(default=False, description="llama.cpp's own log on stderr", json_schema_extra=RUNTIME)


class LocalOptions(LlamaCppOptions):
    """llama.cpp inference plus CPU LoRA jobs on the same base (``backends/local.py``)."""

    hf_dir: Path | None = Field(
        default=None, description="a transformers folder of the same model for training (else the GGUF is dequantised)"
    )
    train_threads: int | None = Field(default=None, ge=1, description="torch threads of the trainer")
    lora_targets: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1, description="LoRA target modules")
    hf_cache: bool = Field(
        default=True,
        description="cache a float32 transformers copy of the GGUF (~2.5 GB; saves a minute per training job)",
        json_schema_extra=RUNTIME,
    )
    train_bf16: bool | None = Field(
        default=None, description="bfloat16 autocast in training; None = where the CPU has native bf16"
    )
    train_in_process: bool = Field(
        default=False,
        description="train in this process, the base kept loaded across jobs, instead of one process per job",
        json_schema_extra=RUNTIME,
    )


class TinkerOptions(BackendOptions):
    """A Tinker-API service (Thinking Machines, Baseten's Loops): hosted LoRA sampling and training
    (``backends/tinker.py``). The key is read from ``TINKER_API_KEY`` only."""

    base_url: str | None = Field(
        default=None, description="API endpoint of a Tinker-API provider; None = $TINKER_BASE_URL, else Tinker's"
    )
    tokenizer: str | None = Field(
        default=None,
        description="the base model's tokenizer: a local folder, or a model id already in the local HF cache "
        "(never downloaded at run time); None = the base model's name in the local HF cache",
    )
    chat_template_kwargs: dict[str, bool | str | int] = Field(
        default_factory=dict, description="extra chat-template variables, e.g. { enable_thinking = false } for Qwen3"
    )
    stop_tokens: tuple[int, ...] = Field(
        default=(), description="end-of-turn token ids to stop at; () = the tokenizer's EOS / <|eot_id|> / <|im_end|>"
    )
    save_every: int = Field(
        default=4,
        ge=1,
        description="optimizer steps between save_state checkpoints: what a killed run can lose (and pay twice)",
        json_schema_extra=RUNTIME,
    )
    max_active_jobs: int | None = Field(
        default=None, ge=1, description="training jobs run at once (None: every agent and role together)",
        json_schema_extra=RUNTIME,
    )
    adam_beta1: float = Field(default=0.9, ge=0, lt=1, description="Adam beta1 (the spec gives lr and weight decay)")
    adam_beta2: float = Field(default=0.999, ge=0, lt=1, description="Adam beta2 (torch's default, as the trainers)")
    adam_eps: float = Field(default=1e-8, gt=0, description="Adam epsilon (torch's default, as the trainers)")
    grad_clip_norm: float = Field(default=1.0, ge=0, description="global gradient-norm clip; 0 = none (TRL: 1.0)")
    state_dir: str = Field(
        default="tinker",
        description="folder of the jobs' inputs and progress (step, checkpoint path), relative to the run directory",
    )


class AutoOptions(BackendOptions):
    """``auto``: OpenAI when ``OPENAI_API_KEY`` is set, else the local fallback — except that a set
    ``TINKER_API_KEY`` wins over OpenAI when OpenAI cannot finetune (from its cut-off day on, or
    ``openai_finetunes = false``).

    ``[backend.options.openai]``, ``[backend.options.local]`` and ``[backend.options.tinker]`` configure
    each side; a key written directly under ``[backend.options]`` goes to whichever of openai and local
    knows it (and must be known to one); tinker takes only its own table (its base_url is another API's).
    """

    openai: OpenAIOptions = Field(default_factory=OpenAIOptions, description="options if OpenAI is chosen")
    local: LocalOptions = Field(default_factory=LocalOptions, description="options if the local fallback is chosen")
    tinker: TinkerOptions = Field(default_factory=TinkerOptions, description="options if tinker is chosen")
    openai_finetunes: bool = Field(
        default=True,
        description="false when your OpenAI organisation cannot create fine-tuning jobs (never fine-tuned before "
        "2026-05-07, or no fine-tuned-model inference in the last 60 days): auto then prefers TINKER_API_KEY",
    )

    @model_validator(mode="before")
    @classmethod
    def _distribute(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sides: dict[str, type[BackendOptions]] = {"openai": OpenAIOptions, "local": LocalOptions}
        out: dict[str, Any] = {side: dict(data.get(side) or {}) for side in sides}
        if "tinker" in data:
            out["tinker"] = data["tinker"]
        for key, value in data.items():
            if key in sides or key == "tinker":
                continue
            owners = [side for side, model in sides.items() if key in model.model_fields]
            if not owners:
                out[key] = value  # refused by extra="forbid", with the key's name
            for side in owners:
                out[side].setdefault(key, value)
        return out

    def batch_api(self) -> bool:
        return bool(os.environ.get("OPENAI_API_KEY")) and self.openai.batch


class SocietyShape(NamedTuple):
    """What a backend may size itself by: ``agents`` agents, each finetuned in ``roles`` roles."""

    agents: int
    roles: int

    @property
    def adapters(self) -> int:
        """Finetuned models in use at once (one per agent and role)."""
        return self.agents * self.roles


class VllmOptions(BackendOptions):
    """A vLLM OpenAI-compatible server serving one base + LoRA adapters, with TRL training jobs
    placed by Ray (``backends/vllm.py``)."""

    # -- the server
    base_url: str | None = Field(
        default=None, description="a running vLLM server (http://host:8000/v1); None with serve = true"
    )
    serve: bool = Field(default=False, description="start the vLLM server as a child process for the run")
    python: str = Field(
        default=".venv-vllm/bin/python",
        description="interpreter of the environment vLLM is installed in (serve = true); relative to the cwd",
    )
    model: str = Field(
        default=BUNDLED_MODEL,
        description="the base model: a transformers folder, or the bundled model's name (its transformers copy)",
    )
    served_model_name: str | None = Field(default=None, description="the base model's name at the server")
    port: int | None = Field(default=None, ge=1, le=65535, description="server port (serve = true; None: a free one)")
    max_loras: int | None = Field(
        default=None, ge=1, description="adapters per batch (--max-loras); None: 2 × agents (every agent and role)"
    )
    max_lora_rank: int = Field(default=8, ge=1, description="--max-lora-rank; at least finetune.spec.lora_r")
    dtype: str = Field(default="bfloat16", description="--dtype of the served model")
    gpu_memory_utilization: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="--gpu-memory-utilization of each server; with method = 'full' every finetuned model gets a "
        "server of its own (2N + 1 on one GPU: e.g. 0.12 each)",
    )
    max_model_len: int = Field(default=4096, ge=64, description="--max-model-len")
    server_args: tuple[str, ...] = Field(default=(), description="more command-line arguments for the server")
    server_env: dict[str, str] = Field(
        default_factory=dict, description="more environment for the server (e.g. VLLM_CPU_KVCACHE_SPACE)"
    )
    startup_timeout_s: float = Field(
        default=600.0, gt=0, description="seconds to wait for /health", json_schema_extra=RUNTIME
    )
    api_key_env: str = Field(default="VLLM_API_KEY", description="environment variable with the server's key, if any")
    timeout_s: float = Field(default=600.0, gt=0, description="seconds per HTTP request", json_schema_extra=RUNTIME)
    # -- training
    ray_address: str = Field(
        default="",
        description="'' = a local Ray instance started for the run; 'auto' or ray://… / http://…:8265 = a cluster",
    )
    adapters_dir: Path | None = Field(
        default=None,
        description="where jobs write adapters; on a cluster a path every worker and the server can read "
        "(None: <run dir>/adapters)",
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per training job", json_schema_extra=RUNTIME)
    server_num_gpus: int = Field(
        default=0,
        ge=0,
        description="GPUs the vLLM server(s) use, reserved in Ray (a job on this node holds them while the run "
        "lives) so no training job is placed on them; the servers run on the devices Ray assigns. 0: Ray is not "
        "told (on one box keep them apart with server_env and train_devices)",
        json_schema_extra=RUNTIME,
    )
    accelerate_config: Literal["fsdp", "deepspeed"] | None = Field(
        default=None,
        description="shard each training job over its num_gpus GPUs with accelerate: 'fsdp' (FSDP full shard) "
        "or 'deepspeed' (ZeRO-3), bf16; for full finetuning of 7-8B models (None: one GPU per job)",
        json_schema_extra=RUNTIME,
    )
    gpu_memory_gb: float = Field(
        default=80.0,
        gt=0,
        description="memory of each GPU in GB, for the memory plan of agentsoc run --dry-run",
        json_schema_extra=RUNTIME,
    )
    train_devices: str | None = Field(
        default=None,
        description="CUDA_VISIBLE_DEVICES of the local Ray instance (its jobs): GPUs the servers do not use, "
        "e.g. '1,2,3' with server_env = { CUDA_VISIBLE_DEVICES = '0' }",
        json_schema_extra=RUNTIME,
    )
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per training job", json_schema_extra=RUNTIME)
    job_python: str | None = Field(
        default=None, description="interpreter of the training jobs on the workers (None: this one)"
    )
    lora_targets: tuple[str, ...] = Field(default=DEFAULT_TARGETS, min_length=1, description="LoRA target modules")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="training precision; auto = bf16 on CUDA and on CPUs with native bf16"
    )

