"""The TRL job on a GPU: one LoRA job and one full-finetuning job on the bundled model's architecture,
printing training tokens/s and peak GPU memory.

Two steps, because the GPU machine has no network and takes at most 64 MiB with it:

    .venv/bin/python bench/gpu_check.py prepare     # here: bench/.gpu-check/ (model config and
                                                     # tokenizer, no weights; wheels of TRL and the
                                                     # packages it needs that the GPU machine lacks)
    bash bench/gpu_check.sh                          # there (carry bench/.gpu-check)

The GPU machine builds Qwen2.5-Coder-0.5B-Instruct's architecture with random weights from the
carried config (the 2.4 GB weights do not fit the carry limit): compute and memory per token are
those of the bundled model, the loss values mean nothing. Each job is ``python -m
backends.trl_train`` exactly as the vllm backend's Ray jobs run it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KIT = HERE / ".gpu-check"
#: what TRL needs beyond torch/transformers/peft/accelerate (on the GPU machine already)
WHEELS = ["trl==1.16.0", "datasets==5.2.0", "dill", "multiprocess", "xxhash"]


def prepare() -> None:
    """Write the kit: the bundled model's config and tokenizer, and a wheelhouse."""
    from backends import bundled
    from backends.hf import hf_copy

    hf = hf_copy(bundled.resolve_model_path())
    model = KIT / "model"
    model.mkdir(parents=True, exist_ok=True)
    for f in hf.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "complete":
            shutil.copy2(f, model / f.name)
    wheels = KIT / "wheels"
    wheels.mkdir(exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--no-deps"]
    subprocess.run([*pip, "-d", str(wheels), *WHEELS], check=True)
    size = sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())
    print(f"kit at {KIT}: {size / 2**20:.1f} MiB (the device carries at most 64 MiB; pyarrow is not included)")


def run(examples: int, max_steps: int) -> None:
    """Random-weight model from the kit's config, then one LoRA job and one full job on CUDA."""
    import importlib

    import torch

    transformers: Any = importlib.import_module("transformers")

    from agentsoc.tasks import arithmetic
    from agentsoc.types import ChatExample, FinetuneSpec, Message
    from backends.trl_train import JobInput, write_inputs

    assert torch.cuda.is_available(), "no CUDA device"
    work = Path("/tmp/agentsoc-gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    config = transformers.AutoConfig.from_pretrained(KIT / "model")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(base)
    for f in (KIT / "model").iterdir():
        if f.name != "config.json":
            shutil.copy2(f, base / f.name)
    task = arithmetic.create({"pattern": "a*b+c*d", "low": 0, "high": 10})
    data = [
        ChatExample(
            messages=(
                Message(role="user", content=task.prompts.round0.replace("{question}", p.question)),
                Message(role="assistant", content=f"{p.question} = {p.answer}. The answer is {p.answer}."),
            )
        )
        for p in task.load(0, examples, seed=0).test
    ]
    print(f"GPU: {torch.cuda.get_device_name(0)}; {examples} examples, at most {max_steps} steps per job")
    for method, spec in (
        ("lora", FinetuneSpec(method="lora", batch_size=8, epochs=1, learning_rate=1e-4, max_seq_len=512)),
        ("full", FinetuneSpec(preset="paper-open-full", batch_size=8, gradient_accumulation_steps=1, epochs=1)),
    ):
        job = work / method
        write_inputs(job, JobInput(base_model=base, device="cuda", max_steps=max_steps), data, spec)
        done = subprocess.run([sys.executable, "-m", "backends.trl_train", str(job)], capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{method}: FAILED ({done.returncode}): {done.stderr.strip()[-500:]}")
            continue
        r = json.loads((job / "out" / "result.json").read_text())
        print(
            f"{method:4s}: {r['steps']} steps, {r['trained_tokens']} trained tokens in {r['seconds']:.1f} s = "
            f"{r['tokens_per_s']} tokens/s; peak GPU memory {r['peak_gpu_memory_gb']} GB; bf16 {r['bf16']}; "
            f"model load {r['load_seconds']:.1f} s"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    sub.add_parser("prepare")
    r = sub.add_parser("run")
    r.add_argument("--examples", type=int, default=256)
    r.add_argument("--max-steps", type=int, default=30)
    args = p.parse_args()
    if args.step == "prepare":
        prepare()
    else:
        run(args.examples, args.max_steps)


if __name__ == "__main__":
    main()
