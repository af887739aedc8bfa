"""The job folder every trainer reads and writes (``backends/job_folder.py``) and the step schedule
both trainers follow (``backends/training.py``). No torch: the trainers' own refusals are checked
before they import it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends.job_folder import (
    ERROR_FILE,
    RESULT_FILE,
    JobError,
    JobInput,
    JobResult,
    ProgressLog,
    failure_line,
    job_main,
    read_inputs,
    read_progress,
    read_result,
    run_job,
    start_output,
    write_inputs,
    write_result,
)
from backends.training import schedule

EXAMPLES = [
    ChatExample(
        messages=(
            Message(role="user", content="2+2?"),
            Message(role="assistant", content="5", weight=0),
            Message(role="assistant", content="4"),
        )
    )
]


def result(job: JobInput, job_dir: Path, **changes: object) -> JobResult:
    values: dict[str, object] = {
        "method": "lora",
        "output": str(job.out(job_dir) / "peft"),
        "steps": 2,
        "losses": [1.0, 0.5],
        "trained_tokens": 10,
        "seconds": 1.5,
        "examples": 3,
        "examples_trained": 2,
        "truncated": 1,
        "dropped_too_long": 0,
        "dropped_no_target": 1,
    }
    return JobResult.model_validate({**values, **changes})


# --------------------------------------------------------------------------- inputs and outputs


def test_inputs_round_trip_and_are_strict(tmp_path: Path) -> None:
    job = JobInput(base_model=Path("/models/base"), init_adapter=Path("prev/peft"), max_steps=3)
    spec = FinetuneSpec(seed=5, lora_r=4)
    write_inputs(tmp_path, job, EXAMPLES, spec)
    assert read_inputs(tmp_path) == (job, spec, EXAMPLES)  # weights survive, 0 included
    assert job.resolve(tmp_path, job.init_adapter or Path()) == tmp_path / "prev/peft"
    assert job.resolve(tmp_path, job.base_model) == Path("/models/base")
    (tmp_path / "job.json").write_text(json.dumps({"base_model": "/m", "learning_rate": 1}))
    with pytest.raises(JobError, match="learning_rate"):
        JobInput.read(tmp_path)


def test_a_bad_example_names_its_file_and_line(tmp_path: Path) -> None:
    write_inputs(tmp_path, JobInput(base_model=Path("/m")), EXAMPLES, FinetuneSpec())
    with (tmp_path / "examples.jsonl").open("a") as f:
        f.write('{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(JobError, match=r"examples\.jsonl:2: not a chat example"):
        read_inputs(tmp_path)
    (tmp_path / "spec.json").unlink()
    with pytest.raises(JobError, match=r"no spec\.json in"):
        read_inputs(tmp_path)


def test_a_result_exists_only_once_written_and_fills_the_job(tmp_path: Path) -> None:
    job = JobInput(base_model=Path("/m"))
    assert read_result(tmp_path) is None  # not even a job yet
    write_inputs(tmp_path, job, EXAMPLES, FinetuneSpec())
    assert read_result(tmp_path) is None
    done = result(job, tmp_path, device="cpu")
    assert write_result(tmp_path, job, done) == tmp_path / "out" / RESULT_FILE
    back = read_result(tmp_path)
    assert back == done and back is not None and back.model_extra == {"device": "cpu"}  # extras kept
    assert back.job_fields() == {
        "progress": 1.0,
        "trained_tokens": 10,
        "examples": 3,
        "truncated": 1,
        "dropped": 1,
        "losses": (1.0, 0.5),  # the curve the job line, the report and the run browser show
    }


def test_progress_comes_from_the_train_log(tmp_path: Path) -> None:
    job = JobInput(base_model=Path("/m"), output_dir=Path("elsewhere"))
    write_inputs(tmp_path, job, EXAMPLES, FinetuneSpec())
    assert read_progress(tmp_path) == (None, ())
    log = ProgressLog(tmp_path / "elsewhere", 0.0)
    for step in range(1, 8):
        log.step(step, 10, 1.0 / step, 1e-4)
    with (tmp_path / "elsewhere" / "train.log").open("a") as f:
        f.write('{"step": 8, "tot')  # a line being written right now
    progress, events = read_progress(tmp_path)
    assert progress == 0.7 and len(events) == 5 and events[-1] == "step 7/10 loss 0.1429"
    line = json.loads((tmp_path / "elsewhere" / "train.log").read_text().splitlines()[0])
    assert line["step"] == 1 and line["total"] == 10 and line["lr"] == 1e-4 and line["elapsed_s"] > 0


def test_a_fresh_output_folder_drops_a_crashed_attempt_but_never_the_job(tmp_path: Path) -> None:
    job = JobInput(base_model=Path("/m"))
    write_inputs(tmp_path, job, EXAMPLES, FinetuneSpec())
    (tmp_path / "out" / "peft").mkdir(parents=True)
    (tmp_path / "out" / "train.log").write_text("stale")
    out = start_output(tmp_path, job)
    assert out == tmp_path / "out" and list(out.iterdir()) == []
    with pytest.raises(JobError, match="folder of its own"):
        start_output(tmp_path, JobInput(base_model=Path("/m"), output_dir=Path(".")))
    assert (tmp_path / "job.json").is_file()


# --------------------------------------------------------------------------- running a job


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is how failure_line knows it without importing torch."""


def test_failure_lines_name_the_job_and_the_fix() -> None:
    code, line = failure_line("agentsoc-trl", Path("/jobs/a"), OutOfMemoryError("CUDA out of memory. Tried 2 GiB"))
    assert code == 3
    assert "/jobs/a" in line and "batch_size" in line and "lora_r" in line and "max_seq_len" in line
    assert "\n" not in line and line.startswith("agentsoc-trl: job /jobs/a: ")
    assert failure_line("p", Path("/jobs/a"), JobError("no trainable example"))[0] == 2
    assert failure_line("p", Path("/jobs/a"), ValueError("boom\nmore")) == (1, "p: job /jobs/a: ValueError: boom more")


def test_run_job_reports_each_outcome_once(tmp_path: Path) -> None:
    job = JobInput(base_model=Path("/m"))
    write_inputs(tmp_path, job, EXAMPLES, FinetuneSpec())
    calls: list[Path] = []

    def bad(job_dir: Path) -> None:
        calls.append(job_dir)
        raise JobError("nothing to train")

    assert run_job("t", tmp_path, bad) == (2, f"t: job {tmp_path}: nothing to train")
    assert not (tmp_path / ERROR_FILE).exists()  # bad input needs no traceback

    def crash(job_dir: Path) -> None:
        raise RuntimeError("boom")

    assert run_job("t", tmp_path, crash)[0] == 1
    assert "RuntimeError: boom" in (tmp_path / ERROR_FILE).read_text()

    def train(job_dir: Path) -> None:
        calls.append(job_dir)
        write_result(job_dir, job, result(job, job_dir))

    assert run_job("t", tmp_path, train) == (0, "")
    code, line = run_job("t", tmp_path, train)
    assert code == 0 and "already done" in line and calls == [tmp_path, tmp_path]  # not trained twice


def test_job_main_works_offline_and_says_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)
    seen: dict[str, str | None] = {}

    def train(job_dir: Path) -> None:
        seen["offline"] = os.environ.get("HF_HUB_OFFLINE")
        raise JobError("refused")

    assert job_main("t", train, [str(tmp_path)]) == 2
    assert seen["offline"] == "1"
    assert capsys.readouterr().err.splitlines()[-1] == f"t: job {tmp_path}: refused"


# --------------------------------------------------------------------------- what each trainer refuses


def test_the_cpu_trainer_refuses_what_it_cannot_train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from backends.hf import main

    cases = {
        "full": (JobInput(base_model=tmp_path), FinetuneSpec(method="full"), "LoRA adapters only"),
        "cuda": (JobInput(base_model=tmp_path, device="cuda"), FinetuneSpec(), "on the CPU"),
        "nobase": (JobInput(base_model=tmp_path / "nothing"), FinetuneSpec(), "neither a GGUF file nor"),
        "noinit": (JobInput(base_model=tmp_path, init_adapter=Path("x")), FinetuneSpec(), "not a PEFT adapter"),
    }
    for name, (job, spec, message) in cases.items():
        write_inputs(tmp_path / name, job, EXAMPLES, spec)
        capsys.readouterr()
        assert main([str(tmp_path / name)]) == 2, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)


def test_the_trl_job_refuses_a_gguf_twin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from backends.trl_train import main

    write_inputs(tmp_path, JobInput(base_model=tmp_path, serve_gguf=Path("m.gguf")), EXAMPLES, FinetuneSpec())
    assert main([str(tmp_path)]) == 2
    assert "serve_gguf is the CPU trainer's" in capsys.readouterr().err


# --------------------------------------------------------------------------- the schedule


def test_the_schedule_is_transformers_one() -> None:
    """Steps per epoch are ceil(micro-batches / accumulation) — the last step of an epoch takes what
    is left, it never borrows from the next epoch — and warmup is ceil(ratio x steps)."""
    spec = FinetuneSpec(batch_size=2, gradient_accumulation_steps=2, epochs=3, warmup_ratio=0.1)
    steps = schedule(5, spec)  # 3 micro-batches an epoch: windows of 2 and 1
    assert (steps.batches_per_epoch, steps.per_epoch, steps.total, steps.warmup) == (3, 2, 6, 1)
    assert [steps.window(k, 2) for k in range(steps.per_epoch)] == [2, 1]
    assert schedule(4, spec).window(1, 2) == 2
    assert schedule(5, spec, max_steps=9).total == 9  # max_steps overrides the epochs, as in transformers
    assert schedule(1, FinetuneSpec(warmup_ratio=0.5, epochs=3)).warmup == 2  # rounded up
    assert schedule(7, FinetuneSpec()).warmup == 0
    with pytest.raises(ValueError, match="at least one"):
        schedule(0, spec)
