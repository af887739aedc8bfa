"""Text ↔ tokens for the tinker backend: the base model's own chat template, from local files only.

A Tinker service samples and trains on token ids, so the client renders conversations itself. The
rendering must be the model's own (the template it was instruction-tuned with), and the training
masks must come from the very same rendering, so both go through one :class:`ChatCodec` built from a
Hugging Face tokenizer folder. ``TrainingClient.get_tokenizer()`` would download from the hub at run
time; here the tokenizer is a local folder or a model id already in the local HF cache
(``local_files_only``), so a run never downloads anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentsoc.backend import FatalBackendError
from agentsoc.types import ChatExample, Message
from backends.training import EncodedSet, Render, Tokenize, encode_examples, tokenizer_functions


def load_tokenizer(name_or_path: str) -> Any:
    """A fast transformers tokenizer from a folder or the local HF cache; one clear line if missing."""
    try:
        from transformers import AutoTokenizer  # lazily: only the tinker backend needs it
    except ImportError as e:  # pragma: no cover - the `tinker` extra brings transformers
        raise FatalBackendError(
            "tinker backend: needs transformers (pip install -e '.[tinker]' in the agentsoc checkout)"
        ) from e
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FatalBackendError(
            f"tinker backend: no tokenizer for {name_or_path!r} in local files (a folder, or the local HF cache); "
            "set backend.options.tokenizer to a folder with the base model's tokenizer files "
            "(e.g. `huggingface-cli download <model> --include 'tokenizer*'` once, beforehand)"
        ) from e
    if not getattr(tok, "is_fast", False):
        raise FatalBackendError(f"tinker backend: tokenizer {name_or_path!r} is not a fast tokenizer (needs offsets)")
    if not getattr(tok, "chat_template", None):
        raise FatalBackendError(f"tinker backend: tokenizer {name_or_path!r} has no chat template")
    return tok


@dataclass
class ChatCodec:
    """Render, tokenize and decode with one tokenizer; ``template_kwargs`` go to the chat template
    (e.g. ``enable_thinking = false`` for Qwen3)."""

    tokenizer: Any
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    stop_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _, self._tokenize = tokenizer_functions(self.tokenizer)
        if not self.stop_tokens:
            self.stop_tokens = end_of_turn(self.tokenizer)

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **dict(self.template_kwargs)
            )
        )

    @property
    def functions(self) -> tuple[Render, Tokenize]:
        return self.render, self._tokenize

    def prompt(self, messages: Sequence[Message]) -> list[int]:
        """The conversation rendered up to the assistant's turn, as token ids."""
        text = self.render([{"role": m.role, "content": m.content} for m in messages], True)
        return self._tokenize(text)[0]

    def decode(self, tokens: Sequence[int]) -> str:
        """A completion's text, its end-of-turn token left out."""
        cut = list(tokens)
        while cut and cut[-1] in self.stop_tokens:
            cut.pop()
        return str(self.tokenizer.decode(cut, skip_special_tokens=True))

    def encode(self, examples: Sequence[ChatExample], max_len: int) -> EncodedSet:
        return encode_examples(examples, self.render, self._tokenize, max_len)


def end_of_turn(tokenizer: Any) -> tuple[int, ...]:
    """The template's end-of-turn token(s): the tokenizer's EOS (Qwen's ``<|im_end|>``, Llama-3.1
    Instruct's ``<|eot_id|>``), plus ``<|eot_id|>``/``<|im_end|>`` where the vocabulary has them."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for name in ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>"):
        if name in vocab and int(vocab[name]) not in ids:
            ids.append(int(vocab[name]))
    if not ids:
        raise FatalBackendError(
            "tinker backend: the tokenizer names no end-of-turn token; set backend.options.stop_tokens"
        )
    return tuple(ids)
