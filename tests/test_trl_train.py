"""TRL fine-tuning jobs (``python -m backends.trl_train JOB_DIR``).

The first real job runs as a subprocess, the way a launcher starts it, on the bundled model's
float32 transformers folder (the copy ``LoraTrainer.load()`` caches; built here once, ~1 min, if
missing) with a handful of examples and two steps. Later jobs call the same ``main()`` in this
process (the stack's imports cost ~8 CPU-seconds per interpreter). The mask and full-finetuning
checks use a tiny random Qwen2 with the bundled tokenizer (same chat template, seconds instead of
minutes). Skips cleanly without trl (``pip install trl``) or without the bundled model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentsoc.types import ChatExample, FinetuneSpec, Message
from backends.job_folder import RESULT_FILE, JobError, JobInput, write_inputs
from backends.training import EncodedSet, schedule
from backends.trl_train import check_binary_weights

pytest.importorskip("trl")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.torch, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj"}


#: a short system message replaces Qwen's default one (~20 tokens per example): faster tests
SYSTEM = Message(role="system", content="Answer briefly.")
MAX_LEN = 64


def chat(question: str, answer: str, weight: float | None = None) -> ChatExample:
    return ChatExample(
        messages=(
            SYSTEM,
            Message(role="user", content=question),
            Message(role="assistant", content=answer, weight=weight),
        )
    )


def job_examples() -> list[ChatExample]:
    """Four trainable examples (38-59 tokens; one truncated at MAX_LEN, one with a masked turn) and
    two that cannot train (no weighted turn; all of it beyond MAX_LEN)."""
    qa = [chat(f"What is {a}+{b}?", f"{a}+{b} = {a + b}. The answer is {a + b}.") for a, b in ((2, 3), (4, 5))]
    masked_turn = ChatExample(
        messages=(
            SYSTEM,
            Message(role="user", content="What is 7+8?"),
            Message(role="assistant", content="It is 16.", weight=0),
            Message(role="user", content="Check again."),
            Message(role="assistant", content="7+8 = 15. The answer is 15.", weight=1),
        )
    )
    long_answer = chat("What is 9+9?", "Let us count carefully. " * 10 + "The answer is 18.")
    no_target = chat("What is 1+1?", "It is 3.", weight=0)
    long_prompt = chat("Read this first. " * 40 + "What is 2+2?", "The answer is 4.")
    return [*qa, masked_turn, long_answer, no_target, long_prompt]


def run_job(job_dir: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "backends.trl_train", str(job_dir)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_here(job_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``main()`` in this process: its exit code and stderr (the environment it sets is restored)."""
    from backends.trl_train import main

    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM"):
        monkeypatch.delenv(key, raising=False)
    capsys.readouterr()
    code = main([str(job_dir)])
    return code, capsys.readouterr().err


def read_result(job_dir: Path) -> dict[str, Any]:
    return dict(json.loads((job_dir / "out" / RESULT_FILE).read_text()))


def encode(tokenizer_dir: Path, examples: list[ChatExample], max_len: int) -> EncodedSet:
    """What the job encodes, computed here with the job's own functions."""
    from backends.training import encode_examples, tokenizer_functions
    from backends.trl_train import load_tokenizer

    return encode_examples(examples, *tokenizer_functions(load_tokenizer(tokenizer_dir)), max_len)


def lora_tensors(peft_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return dict(load_file(str(peft_dir / "adapter_model.safetensors")))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def bundled_hf_dir() -> Path:
    """The float32 transformers copy of the bundled GGUF (made once, in a subprocess)."""
    from agentsoc.backend import FatalBackendError
    from backends import bundled
    from backends.hf import hf_copy

    try:
        return hf_copy(bundled.resolve_model_path(None, bundled.DEFAULT_MODEL))
    except FatalBackendError as exc:
        pytest.skip(f"the bundled model is not installed: {exc}")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, bundled_hf_dir: Path) -> Path:
    """A random 2-layer Qwen2 with the bundled tokenizer and chat template (trains in seconds)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny")
    config = AutoConfig.from_pretrained(str(bundled_hf_dir))
    for key, value in {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "layer_types": ["full_attention"] * 2,
        "max_window_layers": 2,
    }.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    auto_model: Any = AutoModelForCausalLM  # from_config is untyped
    auto_model.from_config(config).save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(bundled_hf_dir)).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_job(tmp_path_factory: pytest.TempPathFactory, bundled_hf_dir: Path) -> Path:
    """A real LoRA job on the bundled model: 4 trainable examples, batch 2, 1 epoch = 2 steps."""
    job_dir = tmp_path_factory.mktemp("lora-job")
    spec = FinetuneSpec(
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        lr_scheduler="constant",
        lora_r=8,
        lora_alpha=16,
        max_seq_len=MAX_LEN,
    )
    write_inputs(job_dir, JobInput(base_model=bundled_hf_dir), job_examples(), spec)
    done = run_job(job_dir)
    assert done.returncode == 0, done.stderr
    return job_dir


# --------------------------------------------------------------------------- no model needed


def test_spec_knobs_reach_the_trainer_config(tmp_path: Path) -> None:
    """The paper's open-model preset, as TRL sees it (TRL's own defaults differ: bf16 and gradient
    checkpointing on, lr 2e-5)."""
    from backends.trl_train import Placement, sft_config

    spec = FinetuneSpec(preset="paper-open-full", seed=7)
    place = Placement(device="cpu", bf16=False, gradient_checkpointing=False)
    job = JobInput(base_model=tmp_path)
    # 40 rows, batch 4, accumulation 4: 10 micro-batches = 3 optimizer steps an epoch, 6 in all
    args = sft_config(job, spec, place, tmp_path, schedule(40, spec))
    assert (args.learning_rate, args.num_train_epochs, args.max_steps) == (1e-5, 2, 6)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (4, 4)
    assert args.lr_scheduler_type == "cosine" and args.weight_decay == 0.0
    # the warmup is ours, a whole number, and transformers takes it as it is: ceil(0.03 x 6) = 1
    assert args.warmup_steps == 1 and args.get_warmup_steps(args.max_steps) == 1
    smoke = sft_config(job, spec, place, tmp_path, schedule(40, spec, max_steps=50))
    assert (smoke.max_steps, smoke.warmup_steps) == (50, 2)
    assert args.max_length == 2048 and args.seed == 7 and args.data_seed == 7
    assert not args.bf16 and not args.gradient_checkpointing and args.logging_steps == 1


def test_fractional_weights_are_refused() -> None:
    with pytest.raises(JobError, match="0 or 1"):
        check_binary_weights([chat("q", "a", weight=0.5)])
    check_binary_weights([chat("q", "a", weight=0), chat("q", "a", weight=1), chat("q", "a")])


# --------------------------------------------------------------------------- the loss mask (tiny model, in process)


def test_masked_tokens_get_no_loss(tiny_dir: Path, tmp_path: Path) -> None:
    """TRL's prepared labels are -100 exactly where our weight is 0, and the trainer's loss on a
    batch equals the weighted NLL computed by hand from the model's logits."""
    from backends.trl_train import Placement, build_trainer

    examples = job_examples()[:4]
    spec = FinetuneSpec(epochs=1, batch_size=4, learning_rate=1e-3, max_seq_len=MAX_LEN)
    encoded = encode(tiny_dir, examples, spec.max_seq_len)
    masked_turn = encoded.rows[2]
    assert 0 < sum(w > 0 for w in masked_turn.weights) < len(masked_turn.weights) // 2
    job = JobInput(base_model=tiny_dir, output_dir=tmp_path / "out", precision="fp32")
    place = Placement(device="cpu", bf16=False, gradient_checkpointing=False)
    from backends.trl_train import load_tokenizer

    trainer = build_trainer(job, tmp_path, spec, encoded, load_tokenizer(tiny_dir), place)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(encoded.rows))])
    width = batch["input_ids"].shape[1]
    weights = torch.zeros((len(encoded.rows), width))
    for i, row in enumerate(encoded.rows):
        weights[i, : len(row.weights)] = torch.tensor(row.weights)
        assert batch["input_ids"][i, : len(row.input_ids)].tolist() == row.input_ids
    assert torch.equal(batch["labels"] == -100, weights == 0)

    model = trainer.model
    model.eval()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(model, dict(batch)))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    by_hand = float((nll * weights[:, 1:]).sum() / weights[:, 1:].sum())
    unmasked = float((nll * batch["attention_mask"][:, 1:]).sum() / batch["attention_mask"][:, 1:].sum())
    assert trl_loss == pytest.approx(by_hand, rel=1e-4)
    assert abs(unmasked - by_hand) > 1e-3  # the mask makes a difference on this batch


# --------------------------------------------------------------------------- real jobs (subprocesses)


def test_lora_job_result_log_and_counts(lora_job: Path, bundled_hf_dir: Path) -> None:
    result = read_result(lora_job)
    assert result["method"] == "lora" and result["device"] == "cpu"
    assert result["steps"] == 2 and len(result["losses"]) == 2
    assert result["examples"] == 6 and result["examples_trained"] == 4
    assert (result["truncated"], result["dropped_too_long"], result["dropped_no_target"]) == (1, 1, 1)
    assert result["seconds"] > 0 and result["tokens_per_s"] > 0 and result["job_seconds"] >= result["seconds"]
    assert Path(result["output"]) == lora_job / "out" / "peft"
    # the labels the model received are exactly our mask: every weighted target, no other token
    encoded = encode(bundled_hf_dir, job_examples(), MAX_LEN)
    assert result["trained_tokens"] == sum(sum(w > 0 for w in row.weights[1:]) for row in encoded.rows)

    lines = [json.loads(line) for line in (lora_job / "out" / "train.log").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2]
    assert all(line["total"] == 2 and line["loss"] > 0 and line["elapsed_s"] > 0 for line in lines)


def test_lora_job_writes_a_servable_adapter_that_changes_the_model(lora_job: Path, bundled_hf_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    peft_dir = lora_job / "out" / "peft"
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and set(config["target_modules"]) <= TARGETS
    assert not config.get("modules_to_save")  # vLLM refuses adapters that carry full modules
    tensors = lora_tensors(peft_dir)
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_hf_dir))
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 4+5?"}], tokenize=False)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(str(bundled_hf_dir), dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(peft_dir))
        after = tuned(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-2


def test_a_finished_job_is_not_trained_again(lora_job: Path) -> None:
    before = (lora_job / "out" / RESULT_FILE).read_text()
    again = run_job(lora_job, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stderr
    assert (lora_job / "out" / RESULT_FILE).read_text() == before


def test_continued_job_starts_from_the_init_adapter(
    lora_job: Path,
    bundled_hf_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """One step at a vanishing learning rate: the output adapter is the input adapter (a fresh
    LoRA would have B = 0), and the first loss is the trained model's, lower than the base's."""
    first = lora_tensors(lora_job / "out" / "peft")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in first.items())
    spec = FinetuneSpec(epochs=1, batch_size=2, learning_rate=1e-12, lr_scheduler="constant", max_seq_len=MAX_LEN)
    job = JobInput(base_model=bundled_hf_dir, init_adapter=lora_job / "out" / "peft", max_steps=1)
    write_inputs(tmp_path, job, job_examples(), spec)
    code, err = run_here(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    result = read_result(tmp_path)
    assert result["steps"] == 1 and result["continued_from"] == str(lora_job / "out" / "peft")
    second = lora_tensors(tmp_path / "out" / "peft")
    assert second.keys() == first.keys()
    for key, value in first.items():
        assert torch.allclose(second[key], value, atol=1e-6), key
    # same seed and data -> same first batch; the continued model already fits it better
    assert result["losses"][0] < read_result(lora_job)["losses"][0]


def test_full_finetuning_writes_a_model_folder(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = FinetuneSpec(method="full", epochs=1, batch_size=2, learning_rate=1e-3, max_seq_len=MAX_LEN)
    write_inputs(tmp_path, JobInput(base_model=tiny_dir), job_examples()[:4], spec)
    code, err = run_here(tmp_path, monkeypatch, capsys)
    assert code == 0, err
    result = read_result(tmp_path)
    assert result["method"] == "full" and result["steps"] == 2
    model_dir = tmp_path / "out" / "model"
    assert Path(result["output"]) == model_dir and not (tmp_path / "out" / "peft").exists()
    assert AutoTokenizer.from_pretrained(str(model_dir)).chat_template
    tuned = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)


def test_no_trainable_example_is_one_clear_error(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    examples = [chat("What is 1+1?", "2", weight=0), chat("Read. " * 200, "4")]
    write_inputs(tmp_path, JobInput(base_model=tiny_dir), examples, FinetuneSpec(max_seq_len=32))
    code, err = run_here(tmp_path, monkeypatch, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    last = err.strip()
    assert "no trainable example" in last and str(tmp_path) in last
    assert "1 have no assistant message" in last and "1 have every trained token beyond max_seq_len 32" in last
    assert not (tmp_path / "out" / RESULT_FILE).exists()


def test_both_trainers_train_one_job_folder_the_same_way(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same folder through the CPU trainer and the TRL job: the same steps (3 trainable rows,
    accumulation 2 = 2 optimizer steps an epoch, the second taking the one row left, never one
    from the next epoch), the same warmup, the same trained tokens and counts."""
    from backends.hf import main as cpu_main

    spec = FinetuneSpec(
        epochs=2, batch_size=1, gradient_accumulation_steps=2, warmup_ratio=0.3, lr_scheduler="linear",
        learning_rate=1e-3, max_seq_len=MAX_LEN,
    )  # fmt: skip
    examples = job_examples()[1:]  # 3 trainable (one truncated, one with a masked turn) and 2 that are not
    results = {}
    for name in ("cpu", "trl"):
        write_inputs(tmp_path / name, JobInput(base_model=tiny_dir, precision="fp32"), examples, spec)
    results["trl"] = (run_here(tmp_path / "trl", monkeypatch, capsys), read_result(tmp_path / "trl"))
    results["cpu"] = ((cpu_main([str(tmp_path / "cpu")]), capsys.readouterr().err), read_result(tmp_path / "cpu"))
    for (code, err), _ in results.values():
        assert code == 0, err
    cpu, trl = results["cpu"][1], results["trl"][1]
    assert cpu["steps"] == trl["steps"] == schedule(3, spec).total == 4
    for key in ("trained_tokens", "examples", "examples_trained", "truncated", "dropped_too_long", "dropped_no_target"):
        assert cpu[key] == trl[key], key
    # warmup ceil(0.3 x 4) = 2 steps: the learning rate climbs to its peak at step 3, then decays linearly
    for name in ("cpu", "trl"):
        lrs = [json.loads(line)["lr"] for line in (tmp_path / name / "out" / "train.log").read_text().splitlines()]
        assert len(lrs) == 4 and lrs[0] < lrs[1] and max(lrs) == pytest.approx(1e-3), (name, lrs)
