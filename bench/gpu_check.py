"""The TRL job on a GPU: one LoRA job and one full-finetuning job on the bundled model's architecture,
printing training tokens/s and peak GPU memory.

Two steps, because the GPU machine has no network, holds only torch, transformers, peft and
accelerate, and takes at most 64 MiB with it:

    .venv/bin/python bench/gpu_check.py prepare [--python-version 3.11]   # here: bench/.gpu-check/
    bash bench/gpu_check.sh                                              # there (carry bench/.gpu-check)

``prepare`` writes the kit: the bundled model's config and tokenizer (no weights: 2.4 GB do not fit
the carry limit) and ``site.tar.xz``, every package the job imports that those four do not bring
(TRL, datasets with pyarrow and pandas, the core's small dependencies), installed for the GPU
machine's Python and stripped of tests, headers and Arrow Flight — ~35 MiB where the wheels are
67 MiB. ``gpu_check.sh`` unpacks it into a temporary folder on ``PYTHONPATH``; nothing is installed
into the machine's environment.

``run`` first imports everything the job needs (so a missing package fails here, before any GPU
work, with its name), then builds Qwen2.5-Coder-0.5B-Instruct's architecture with random weights
from the carried config: compute and memory per token are those of the bundled model, the loss
values mean nothing. Each job is ``python -m backends.trl_train`` exactly as the vllm backend's
Ray jobs run it. Without CUDA it stops with ``no CUDA device`` (exit 2) — tests/test_gpu_kit.py
checks it gets that far in a venv holding only the four packages.
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KIT = HERE / ".gpu-check"
SITE = "site.tar.xz"
#: the carry limit of the GPU machine
LIMIT_BYTES = 64 * 2**20
#: what the job imports beyond torch/transformers/peft/accelerate (and what they bring: numpy,
#: pydantic, httpx2, pyyaml, tqdm, jinja2): TRL and datasets with their own dependencies, and the
#: agentsoc core's small ones (importing ``agentsoc.types`` runs the package's ``__init__``)
PACKAGES = [
    "trl==1.16.0",
    "datasets==5.2.0",
    "pyarrow==26.0.1",
    "pandas==3.1.1",
    "python-dateutil",
    "six",
    "tzdata",
    "dill",
    "multiprocess",
    "xxhash",
    "tenacity",
    "tomli_w",
]
#: dropped from the unpacked site: never imported by a job (tests, C headers, Cython sources,
#: Arrow Flight's RPC libraries), ~120 MB of the 280
PRUNE_DIRS = ("pandas/tests", "pyarrow/tests", "pyarrow/include")
PRUNE_GLOBS = ("*.pyx", "*.pxd", "*.pxi", "pyarrow/*flight*", "pyarrow/_pyarrow_cpp_tests*")
#: the modules ``run`` imports before it looks for a GPU (backends.trl_train imports the rest lazily)
STACK = ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "pyarrow.parquet")


def prepare(python_version: str) -> None:
    """Write the kit: the bundled model's config and tokenizer, and the packed site-packages."""
    from backends import bundled
    from backends.hf import hf_copy

    shutil.rmtree(KIT, ignore_errors=True)
    model = KIT / "model"
    model.mkdir(parents=True)
    for f in hf_copy(bundled.resolve_model_path()).iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "complete":
            if f.name == "tokenizer.json":  # 7 MB of JSON; 1.5 MB gzipped
                with f.open("rb") as src, gzip.open(model / "tokenizer.json.gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            else:
                shutil.copy2(f, model / f.name)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:"]
        pip += ["--python-version", python_version, "--platform", "manylinux_2_28_x86_64", "--target", str(site)]
        subprocess.run([*pip, *PACKAGES], check=True)
        _prune(site)
        subprocess.run(["tar", "-C", str(site), "-cJf", str(KIT / SITE), "."], check=True, env=_xz_env())
    (KIT / "python-version").write_text(python_version + "\n")
    size = kit_size()
    print(f"kit at {KIT}: {size / 2**20:.1f} MiB for Python {python_version} (the device carries at most 64 MiB)")
    if size > LIMIT_BYTES:
        sys.exit(f"the kit is {size / 2**20:.1f} MiB, over the 64 MiB the GPU machine takes")


def _prune(site: Path) -> None:
    for d in PRUNE_DIRS:
        shutil.rmtree(site / d, ignore_errors=True)
    for pattern in PRUNE_GLOBS:
        for p in site.rglob(pattern) if "/" not in pattern else site.glob(pattern):
            p.unlink()
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)


def _xz_env() -> dict[str, str]:
    return {**os.environ, "XZ_OPT": "-6 -T0"}  # every core; -9 saves 2 MiB for three times the time


def kit_size() -> int:
    return sum(p.stat().st_size for p in KIT.rglob("*") if p.is_file())


def check_stack() -> Any:
    """Import everything the jobs need, naming what is missing; return torch."""
    missing = []
    for name in STACK:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing.append(f"{name} ({exc})")
    if missing:
        sys.exit(f"gpu check: cannot import {'; '.join(missing)} — was the kit unpacked (bash bench/gpu_check.sh)?")
    importlib.import_module("trl").SFTTrainer  # noqa: B018 - TRL's lazy module imports the trainer here
    importlib.import_module("backends.trl_train")
    importlib.import_module("agentsoc.tasks.arithmetic")
    return importlib.import_module("torch")


def run(examples: int, max_steps: int) -> None:
    """Random-weight model from the kit's config, then one LoRA job and one full job on CUDA."""
    torch = check_stack()
    print("gpu check: every import satisfied", flush=True)
    if not torch.cuda.is_available():
        print("gpu check: no CUDA device (torch sees none); nothing to measure here", flush=True)
        sys.exit(2)
    transformers: Any = importlib.import_module("transformers")

    from agentsoc.tasks import arithmetic
    from agentsoc.types import ChatExample, FinetuneSpec, Message
    from backends.job_folder import JobInput, write_inputs

    work = Path(tempfile.gettempdir()) / "agentsoc-gpu-check"
    shutil.rmtree(work, ignore_errors=True)
    base = work / "base"
    config = transformers.AutoConfig.from_pretrained(KIT / "model")
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(base)
    for f in (KIT / "model").iterdir():
        if f.name == "tokenizer.json.gz":
            with gzip.open(f, "rb") as src, (base / "tokenizer.json").open("wb") as dst:
                shutil.copyfileobj(src, dst)
        elif f.name != "config.json":
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
    prep = sub.add_parser("prepare")
    prep.add_argument(
        "--python-version",
        default=f"{sys.version_info.major}.{sys.version_info.minor}",
        help="the GPU machine's Python (the packed packages are built for it); default: this one",
    )
    r = sub.add_parser("run")
    r.add_argument("--examples", type=int, default=256)
    r.add_argument("--max-steps", type=int, default=30)
    args = p.parse_args()
    if args.step == "prepare":
        prepare(args.python_version)
    else:
        run(args.examples, args.max_steps)


if __name__ == "__main__":
    main()
