"""Training-file checks and upload bookkeeping for the OpenAI backend.

Both exist to avoid paying for mistakes: a training set OpenAI would reject is caught before any
upload (with the agent and role named, not a job id), and a file uploaded before a crash is reused
by the resumed run instead of being uploaded twice.

State that must outlive the process (uploads, pending batches) is kept as one small file per
record (:class:`RecordDir`): concurrent uploads or batches each write their own file, so none can
overwrite another's entry, and a kill leaves every record whole or absent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from agentsoc.atomic import write_atomic
from agentsoc.backend import FatalBackendError, TransientBackendError
from agentsoc.types import ChatExample, ModelRef

T = TypeVar("T")

#: OpenAI's documented minimum number of training examples per job.
MIN_EXAMPLES = 10
#: Per-example token limits for training (context lengths of the finetunable snapshots).
_TOKEN_LIMITS = {
    "gpt-3.5-turbo": 16_385,
    "gpt-4o-mini": 65_536,
    "gpt-4o": 65_536,
    "gpt-4.1": 65_536,
    "gpt-4.1-mini": 65_536,
    "gpt-4.1-nano": 65_536,
}
_DEFAULT_TOKEN_LIMIT = 16_385
_ROLES = {"system", "user", "assistant"}
#: Shutdown days of the finetunable families (OpenAI's deprecations page, reference/ecosystem.md
#: finding 1): after this day the model — and every model finetuned from it — answers 404.
SHUTDOWN_DATES = {
    "gpt-3.5-turbo": dt.date(2026, 10, 23),
    "gpt-4.1-nano": dt.date(2026, 10, 23),
    "gpt-4o": dt.date(2027, 1, 14),
    "gpt-4o-mini": dt.date(2027, 1, 14),
    "gpt-4.1": dt.date(2027, 1, 14),
    "gpt-4.1-mini": dt.date(2027, 1, 14),
}


def base_name(model: ModelRef) -> str:
    """``ft:gpt-4o-mini-2024-07-18:org::id`` → ``gpt-4o-mini-2024-07-18``."""
    return model.split(":")[1] if model.startswith("ft:") else model


def _family(model: ModelRef, table: Mapping[str, T]) -> T | None:
    """``table``'s entry for ``model``'s family: the longest key its base name starts with."""
    name = base_name(model)
    best = max((p for p in table if name.startswith(p)), key=len, default=None)
    return table[best] if best else None


def token_limit(model: ModelRef) -> int:
    """The per-example limit of ``model``'s family."""
    limit = _family(model, _TOKEN_LIMITS)
    return _DEFAULT_TOKEN_LIMIT if limit is None else limit


def shutdown_date(model: ModelRef) -> dt.date | None:
    """The day OpenAI shut (or shuts) down ``model``'s family, if it is in :data:`SHUTDOWN_DATES`."""
    return _family(model, SHUTDOWN_DATES)


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (~4 characters per token, OpenAI's rule of thumb)."""
    return len(text) // 4 + 1


def example_tokens(example: ChatExample) -> int:
    """Estimated tokens of one conversation, counting the per-message framing (~4 tokens)."""
    return sum(estimate_tokens(m.content) + 4 for m in example.messages) + 2


def describe(key: str, metadata: Mapping[str, str]) -> str:
    """``job <key> (iteration 1, agent 0, role critic)`` for error messages."""
    parts = [f"{k} {metadata[k]}" for k in ("iteration", "agent", "role") if k in metadata]
    return f"job {key}" + (f" ({', '.join(parts)})" if parts else "")


def validate(
    examples: Sequence[ChatExample], base: ModelRef, key: str, metadata: Mapping[str, str], *, weights: bool
) -> None:
    """Raise :class:`FatalBackendError` if OpenAI would reject this training set."""
    where = describe(key, metadata)
    if len(examples) < MIN_EXAMPLES:
        raise FatalBackendError(
            f"fine-tuning {where} on {base}: {len(examples)} training examples, OpenAI requires at least "
            f"{MIN_EXAMPLES}; raise selection.min_examples to {MIN_EXAMPLES} to skip such roles, or use more problems"
        )
    limit = token_limit(base)
    for i, ex in enumerate(examples):
        roles = [m.role for m in ex.messages]
        bad = [r for r in roles if r not in _ROLES]
        if bad:
            raise FatalBackendError(f"fine-tuning {where}: example {i} has an invalid role {bad[0]!r}")
        trainable = [m for m in ex.messages if m.role == "assistant" and m.weight != 0]
        if not trainable:
            raise FatalBackendError(f"fine-tuning {where}: example {i} has no assistant message to train on")
        if roles[-1] != "assistant":
            raise FatalBackendError(f"fine-tuning {where}: example {i} does not end with an assistant message")
        if weights and any(m.weight not in (None, 0, 1) for m in ex.messages):
            raise FatalBackendError(f"fine-tuning {where}: example {i} has a weight other than 0 or 1")
        tokens = example_tokens(ex)
        if tokens > limit:
            raise FatalBackendError(
                f"fine-tuning {where}: example {i} has about {tokens} tokens, over {base}'s limit of {limit}"
            )


def training_jsonl(examples: Sequence[ChatExample], *, weights: bool) -> bytes:
    """OpenAI chat fine-tuning JSONL; per-message ``weight`` only where the provider accepts it."""
    lines = []
    for ex in examples:
        data: dict[str, Any] = ex.to_openai()
        if not weights:
            for m in data["messages"]:
                m.pop("weight", None)
        lines.append(json.dumps(data, ensure_ascii=False, sort_keys=True))
    return ("\n".join(lines) + "\n").encode()


class RecordDir:
    """Records that must outlive the process, one small JSON file per key in one folder.

    Each record is written on its own, atomically (temp file + rename): there is no shared file to
    read, change and write back, so concurrent writers cannot lose each other's entries, and a kill
    leaves a record whole or absent.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def _file(self, key: str) -> Path:
        return self.path / f"{key_stem(key)}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        file = self._file(key)
        if not file.exists():
            return None
        data: dict[str, Any] = json.loads(file.read_text(encoding="utf-8"))
        return data if data.get("key") == key else None

    def put(self, key: str, data: Mapping[str, Any]) -> None:
        write_atomic(self._file(key), json.dumps({**data, "key": key}, indent=2, sort_keys=True))

    def delete(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def all(self) -> dict[str, dict[str, Any]]:
        """Every record, by key (temp files of an interrupted write end in ``.tmp`` and are skipped)."""
        out: dict[str, dict[str, Any]] = {}
        for file in sorted(self.path.glob("*.json")) if self.path.is_dir() else []:
            data = json.loads(file.read_text(encoding="utf-8"))
            out[str(data["key"])] = data
        return out


def load_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or ``{}`` if there is none (state files of earlier versions)."""
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload_name(key: str, digest: str) -> str:
    """The file name a training file is uploaded under: it names the job key and the content, so a
    file uploaded by a process killed before it recorded the upload is recognised in ``files.list``."""
    return f"agentsoc-{key_stem(key)}-{digest[:16]}.jsonl"


def key_stem(key: str) -> str:
    """A file-name stem for ``key``: readable, and with a hash that keeps two keys that sanitise (or
    truncate) to the same name apart."""
    return f"{safe_name(key)[:80]}-{content_hash(key.encode())[:12]}"


def safe_name(key: str) -> str:
    """A file name for ``key`` (``run/fp/iter-1/agent-0/generator`` → ``run_fp_iter-1_agent-0_generator``)."""
    return "".join(c if c.isalnum() or c in "-." else "_" for c in key)[:150]


def expect(obj: object, cls: type[T], call: str, model: str) -> T:
    """``obj`` if the SDK parsed the body into ``cls``; a body it could not parse (truncated JSON)
    comes back as something else and is a transient failure."""
    if not isinstance(obj, cls):
        raise TransientBackendError(f"openai {call} for model {model}: malformed response")
    return obj
