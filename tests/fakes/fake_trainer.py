"""Stands in for ``python -m backends.trl_train JOB_DIR`` in the simulated cluster test.

A test points ``backend.options.job_python`` at a shim that runs this file with a placements file
first and then the arguments the backend gives the interpreter (``-m backends.trl_train JOB_DIR``).
It records where Ray placed it — the devices Ray gave it (``CUDA_VISIBLE_DEVICES``), its working
directory, where our code was imported from (Ray's ``py_modules`` copy, not the driver's tree) —
holds its "GPU" for ``FAKE_TRAIN_S`` seconds and writes a fake PEFT adapter and ``result.json``
through the job folder contract, so the run goes on. Real training is covered by
tests/test_vllm_e2e.py and tests/test_trl_train.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fakes.fake_vllm


def main() -> int:
    placements, module, job_dir = Path(sys.argv[1]), sys.argv[3], Path(sys.argv[4]).resolve()
    assert sys.argv[2] == "-m" and module == "backends.trl_train", sys.argv
    from backends import job_folder  # from the job's runtime_env (py_modules)

    started = time.time()
    job = job_folder.JobInput.read(job_dir)
    out = job_folder.start_output(job_dir, job)
    time.sleep(float(os.environ.get("FAKE_TRAIN_S", "3")))
    from fakes.fake_vllm import write_adapter

    peft = write_adapter(out / "peft", "mock:0.9")
    record = {
        "job_dir": str(job_dir),
        "devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "cwd": os.getcwd(),
        "code": job_folder.__file__,
        "start": started,
        "end": time.time(),
        "pid": os.getpid(),
    }
    with placements.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(record) + "\n")
    n = len(job_folder.read_examples(job_dir / job_folder.EXAMPLES_FILE))
    result = job_folder.JobResult(
        method="lora",
        output=str(peft),
        steps=1,
        losses=[1.0],
        trained_tokens=10 * n,
        seconds=0.1,
        examples=n,
        examples_trained=n,
        truncated=0,
        dropped_too_long=0,
        dropped_no_target=0,
    )
    job_folder.write_result(job_dir, job, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
