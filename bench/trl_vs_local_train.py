"""Training throughput of a TRL job (``backends.trl_train``) vs the hand-written CPU loop
(``backends.hf.LoraTrainer.train``) on the bundled Qwen2.5-Coder-0.5B-Instruct.

Same examples (short arithmetic Q/A chats with a one-line working), same spec (LoRA r=8, batch 2,
1 epoch, lr 1e-3, constant schedule, no warmup, no weight decay — the hand loop's optimiser), same
threads, same precision rule (bf16 autocast where the CPU has native bf16), same float32
transformers copy of the GGUF. Each trainer runs in its own process, so its peak RSS is its own.
Trained tokens are counted the same way for both: targets at positions ≥ 1 whose weight is > 0.

    .venv/bin/python bench/trl_vs_local_train.py [--examples 40] [--threads 2]

Prints measured numbers only; the machine may be shared, so compare the two lines of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends import bundled
from backends.hf import LoraTrainer, TrainerOptions, hf_copy
from backends.job_folder import JobInput, write_inputs
from backends.training import usable_cpus

ROOT = Path(__file__).resolve().parents[1]


def examples(n: int) -> list[ChatExample]:
    """Short chats: a question, then a one-line working that ends in the answer."""
    out = []
    for i in range(n):
        a, b, c = 2 + i % 9, 3 + (i * 7) % 8, (i * 5) % 11
        answer = f"{a}*{b} = {a * b}, then {a * b}+{c} = {a * b + c}. The answer is {a * b + c}."
        out.append(
            ChatExample(
                messages=(
                    Message(role="user", content=f"What is {a}*{b}+{c}? State the answer at the end."),
                    Message(role="assistant", content=answer),
                )
            )
        )
    return out


def gguf_path() -> Path:
    return bundled.resolve_model_path(None, bundled.DEFAULT_MODEL)


def hf_dir() -> Path:
    """The float32 transformers copy of the bundled GGUF (made once)."""
    return hf_copy(gguf_path())


def spec() -> FinetuneSpec:
    """The hand loop's optimiser: constant lr, no warmup, no weight decay (the TRL job reads the same)."""
    return FinetuneSpec(
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        weight_decay=0.0,
        lora_r=8,
        lora_alpha=16,
        seed=0,
    )


def run_child(cmd: list[str]) -> tuple[float, float]:
    """Run a process to its end; its wall seconds and its own peak RSS in GB (``wait4`` rusage)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return wall, usage.ru_maxrss / 1e6  # Linux: kilobytes


def local_child(work: Path, threads: int) -> None:
    """Body of the hand-written-loop process: load, train, write the numbers."""
    data = [ChatExample.model_validate(json.loads(line)) for line in (work / "examples.json").read_text().splitlines()]
    trainer = LoraTrainer(TrainerOptions(model_path=gguf_path(), hf_dir=hf_dir(), threads=threads))
    start = time.perf_counter()
    trainer.load()
    load = time.perf_counter() - start
    cpu_start = time.process_time()
    result = trainer.train(data, spec(), work / "local")
    out = {
        "cpu_seconds": time.process_time() - cpu_start,
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "seconds": result.seconds,
        "load_seconds": load,
        "losses": result.losses,
    }
    (work / "local.json").write_text(json.dumps(out))


def line(name: str, res: dict[str, Any], wall: float, rss: float) -> str:
    tps = res["trained_tokens"] / res["seconds"]
    per_cpu = res["trained_tokens"] / res["cpu_seconds"]
    return (
        f"{name:<22} {res['steps']:>3} steps  {res['trained_tokens']:>5} trained tokens  train {res['seconds']:7.1f} s"
        f"  {tps:6.1f} tokens/s  {per_cpu:6.1f} tokens/CPU-s  load {res['load_seconds']:5.1f} s"
        f"  process {wall:6.1f} s  peak RSS {rss:5.2f} GB  loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--threads", type=int, default=usable_cpus())
    ap.add_argument("--child", help=argparse.SUPPRESS)  # internal: run the hand-written loop in this process
    args = ap.parse_args()
    if args.child:
        local_child(Path(args.child), args.threads)
        return
    base = hf_dir()
    data = examples(args.examples)
    work = Path(tempfile.mkdtemp(prefix="trl-vs-local-"))
    (work / "examples.json").write_text("\n".join(ex.model_dump_json() for ex in data))
    write_inputs(work / "trl", JobInput(base_model=base, threads=args.threads), data, spec())
    print(
        f"{len(data)} examples, LoRA r=8 on q/k/v/o, batch 2, 1 epoch, lr 1e-3, {args.threads} threads; "
        f"work dir {work}",
        flush=True,
    )
    wall_local, rss_local = run_child([sys.executable, __file__, "--child", str(work), "--threads", str(args.threads)])
    local = json.loads((work / "local.json").read_text())
    wall_trl, rss_trl = run_child([sys.executable, "-m", "backends.trl_train", str(work / "trl")])
    trl = json.loads((work / "trl" / "out" / "result.json").read_text())
    print(line("hf.LoraTrainer.train", local, wall_local, rss_local))
    print(line("trl_train (SFTTrainer)", trl, wall_trl, rss_trl))
    ratio = (trl["trained_tokens"] / trl["seconds"]) / (local["trained_tokens"] / local["seconds"])
    cpu_ratio = (trl["trained_tokens"] / trl["cpu_seconds"]) / (local["trained_tokens"] / local["cpu_seconds"])
    print(
        f"TRL / hand loop: {ratio:.2f}x training tokens/s (wall), {cpu_ratio:.2f}x tokens per CPU-second "
        f"(bf16 autocast: {trl['bf16']}; CPU-seconds count all threads and are steadier on a shared machine)"
    )


if __name__ == "__main__":
    main()
