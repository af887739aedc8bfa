"""A trainer that keeps the job-folder contract without a model: ``python -m queue_trainer JOB_DIR``
(with this folder on ``PYTHONPATH``), for the tests of the local process queue (backends/local_jobs.py).

It reads the inputs the way real trainers do (:func:`backends.job_folder.read_inputs`), writes two
steps to ``train.log``, a file standing for the adapter, and ``result.json`` last — so the process
queue, adoption and exit-code handling are tested against a real process in milliseconds. The
spec's ``metadata["fake"]`` picks a misbehaviour: ``fail`` (a crash, exit 1), ``bad`` (bad input,
exit 2), ``hang`` (trains until killed), ``die`` (killed by SIGKILL, as by the OOM killer).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from backends.job_folder import JobError, JobResult, ProgressLog, job_main, read_inputs, start_output, write_result


def train(job_dir: Path) -> None:
    job, spec, examples = read_inputs(job_dir)
    mode = spec.metadata.get("fake")
    if mode == "bad":
        raise JobError("nothing to train (fake)")
    out = start_output(job_dir, job)
    log = ProgressLog(out, time.perf_counter())
    log.step(1, 2, 1.5, 1e-4)
    if mode == "fail":
        raise RuntimeError("boom")
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        (out / "hanging").write_text(str(os.getpid()))
        time.sleep(600)
    log.step(2, 2, 0.5, 1e-4)
    adapter = out / "adapter.gguf"
    adapter.write_text("fake adapter")
    result = JobResult(
        method="lora",
        output=str(out / "peft"),
        adapter_gguf=str(adapter),
        steps=2,
        losses=[1.5, 0.5],
        trained_tokens=42,
        seconds=0.0,
        examples=len(examples),
        examples_trained=len(examples),
        truncated=0,
        dropped_too_long=0,
        dropped_no_target=0,
        seed=spec.seed,
    )
    write_result(job_dir, job, result)


if __name__ == "__main__":
    raise SystemExit(job_main("fake-train", train))
