"""The GPU memory plan of a vllm recipe: does each training job and each vLLM server fit its GPUs?

Printed by ``agentsoc run --dry-run`` for the ``vllm`` backend, and a plan that cannot fit is
refused there (a :class:`~agentsoc.config.RecipeError` naming the setting to change) — before
anyone rents GPUs for it. Figures are ESTIMATES from parameter counts, not measurements:

- training, LoRA: the frozen base in bf16 (2 bytes per parameter) + activations + CUDA context;
- training, full (the paper's setting): float32 master weights, float32 gradients and AdamW's two
  float32 moments — 16 bytes per parameter — sharded over the job's ``num_gpus`` GPUs by FSDP or
  DeepSpeed ZeRO-3 (``accelerate_config``), + activations of one micro-batch + CUDA context;
- activations with gradient checkpointing: ~0.12 MB per token per billion parameters (the saved
  hidden states and the float32 logits of a micro-batch of ``batch_size x max_seq_len`` tokens);
- a vLLM server: bf16 weights + the KV cache of one ``max_model_len`` sequence + ~2.5 GB of
  activations, CUDA graphs and LoRA slots, inside ``gpu_memory_utilization x gpu_memory_gb``;
  full finetuning runs 2N + 1 servers, spread one per device over the servers' GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from agentsoc.config import Recipe, RecipeError, backend_options


@dataclass(frozen=True)
class OpenModel:
    params_b: float  #: parameters, billions
    kv_kb_per_token: float  #: KV cache per token in bf16: 2 x layers x kv_heads x head_dim x 2 bytes


#: the open models the recipes name, matched by a lower-case substring of the model name
OPEN_MODELS = {
    "phi-3-mini": OpenModel(3.8, 384),  # 32 layers, 32 KV heads of 96
    "mistral-7b": OpenModel(7.2, 128),  # 32 layers, 8 KV heads of 128
    "llama-3-8b": OpenModel(8.0, 128),  # 32 layers, 8 KV heads of 128
    "qwen2.5-coder-0.5b": OpenModel(0.5, 12),  # 24 layers, 2 KV heads of 64
    "qwen2.5-coder-1.5b": OpenModel(1.5, 28),  # 28 layers, 2 KV heads of 128
}
FULL_BYTES_PER_PARAM = 16  # fp32 weights + fp32 grads + AdamW m and v
BF16_BYTES_PER_PARAM = 2
ACTIVATION_MB_PER_TOKEN_PER_B = 0.12
CUDA_CONTEXT_GB = 3.0  # per process: context, allocator slack, NCCL buffers
SERVER_OVERHEAD_GB = 2.5
VLLM_DEFAULT_UTILIZATION = 0.9
MAX_UTILIZATION_PER_GPU = 0.95  # what vLLM servers sharing one GPU may claim together


def open_model(name: str) -> OpenModel | None:
    lowered = name.lower()
    return next((m for key, m in OPEN_MODELS.items() if key in lowered), None)


def _devices(value: str | None) -> int | None:
    return len([d for d in value.split(",") if d.strip()]) if value else None


def memory_plan(recipe: Recipe) -> list[str]:
    """The plan's lines; raises :class:`RecipeError` when a job or a server cannot fit."""
    o: Any = backend_options(recipe)
    model = open_model(recipe.society.base_models()[0])
    if model is None or not o.num_gpus:
        return []  # an unknown model size, or training on CPUs: nothing to plan
    spec, s, gpu = recipe.finetune.spec, recipe.society, float(o.gpu_memory_gb)
    where = "backend.options"
    lines = [f"GPU memory plan ({gpu:g} GB GPUs; ESTIMATES from {model.params_b:g}B parameters, not measured):"]
    problems: list[str] = []

    # -- one training job
    g = int(o.num_gpus)
    tokens = spec.batch_size * spec.max_seq_len
    activations = tokens * ACTIVATION_MB_PER_TOKEN_PER_B * model.params_b / 1000
    if spec.method == "full":
        states = FULL_BYTES_PER_PARAM * model.params_b / max(g, 1)
        what = f"fp32 weights+grads+AdamW {FULL_BYTES_PER_PARAM * model.params_b:.0f} GB / {g} GPU(s)"
    else:
        states = BF16_BYTES_PER_PARAM * model.params_b * 1.02
        what = "bf16 frozen base + LoRA"
    per_gpu = states + activations + CUDA_CONTEXT_GB
    sharded = f", {o.accelerate_config} over {g} GPUs" if g > 1 else ""
    lines.append(
        f"  training job ({spec.method}{sharded}): {what} {states:.1f} + activations {activations:.1f} "
        f"({spec.batch_size} x {spec.max_seq_len} tokens) + CUDA {CUDA_CONTEXT_GB:g} = {per_gpu:.1f} GB per GPU"
    )
    if g > 1 and o.accelerate_config is None:
        problems.append(
            f"{where}.num_gpus = {g} needs {where}.accelerate_config = 'fsdp' (or 'deepspeed'): without "
            "sharding a job uses one GPU"
        )
    if g != o.num_gpus:
        problems.append(f"{where}.num_gpus = {o.num_gpus:g}: a GPU job needs a whole number of GPUs")
    if per_gpu > gpu:
        if spec.method == "full":
            need = math.ceil(FULL_BYTES_PER_PARAM * model.params_b / (gpu - activations - CUDA_CONTEXT_GB))
            fix = (
                f"set {where}.num_gpus = {need} with accelerate_config = 'fsdp' (shards the 16 bytes per "
                "parameter), or lower finetune.spec.batch_size / max_seq_len"
                if gpu > activations + CUDA_CONTEXT_GB
                else "lower finetune.spec.batch_size or max_seq_len"
            )
        else:
            fix = "lower finetune.spec.batch_size or max_seq_len"
        problems.append(f"a training job needs ~{per_gpu:.0f} GB per GPU, more than {gpu:g} GB: {fix}")

    # -- the vLLM servers
    servers = 2 * s.agents + 1 if spec.method == "full" else 1
    server_gpus = o.server_num_gpus or _devices(o.server_env.get("CUDA_VISIBLE_DEVICES")) or 1
    share = o.gpu_memory_utilization or VLLM_DEFAULT_UTILIZATION
    budget = share * gpu
    weights = BF16_BYTES_PER_PARAM * model.params_b
    kv = model.kv_kb_per_token * o.max_model_len / 2**20
    need = weights + kv + SERVER_OVERHEAD_GB
    per_device = math.ceil(servers / server_gpus)
    lines.append(
        f"  vLLM servers: {servers}{' (2N + 1: full finetuning)' if servers > 1 else ''} on {server_gpus} GPU(s), "
        f"{per_device} per GPU at gpu_memory_utilization {share:g} = {budget:.1f} GB each; each needs bf16 "
        f"weights {weights:.1f} + KV of one {o.max_model_len}-token sequence {kv:.1f} + {SERVER_OVERHEAD_GB:g} "
        f"= {need:.1f} GB"
    )
    if need > budget:
        problems.append(
            f"a vLLM server needs ~{need:.0f} GB but gpu_memory_utilization = {share:g} gives it {budget:.1f} GB: "
            f"raise {where}.gpu_memory_utilization to at least {math.ceil(need / gpu * 100) / 100:g}"
        )
    if per_device * share > MAX_UTILIZATION_PER_GPU:
        fit = max(1, int(MAX_UTILIZATION_PER_GPU // share))
        problems.append(
            f"{per_device} servers share a GPU at gpu_memory_utilization = {share:g} ({per_device * share:.2f} of "
            f"it): give the servers {math.ceil(servers / fit)} GPUs ({where}.server_num_gpus, or that many "
            f"devices in server_env's CUDA_VISIBLE_DEVICES), or lower gpu_memory_utilization"
        )

    # -- the GPUs in all
    train = _devices(o.train_devices)
    if train is not None:
        if train < g:
            problems.append(f"{where}.train_devices has {train} GPU(s) but each job needs num_gpus = {g}")
        jobs_at_once = train // g if g else 0
        lines.append(
            f"  GPUs: {server_gpus} for the servers + {train} for training ({jobs_at_once} job(s) at a time, "
            f"the rest wait in Ray's queue) = {server_gpus + train} x {gpu:g} GB"
        )
    else:
        lines.append(f"  GPUs: {server_gpus} for the servers + {g} per training job (Ray places them)")
    if problems:
        raise RecipeError("the memory plan does not fit:\n" + "\n".join(f"  - {p}" for p in problems))
    return [*lines, "  the plan fits"]
