"""The deterministic stand-in for a model behind :mod:`tests.fakes.fake_tinker`.

Nothing here learns anything. Every number is a hash of what it depends on, so a test can rely on:
the same (model, prompt, seed) gives the same tokens and logprobs; a different checkpoint (another
``tinker://`` path) gives different ones; the training loss of a token falls as the run takes optimizer
steps (``× 0.9`` per step) — enough to show a loop that trains, never a claim about real training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

#: token ids the default sampler draws from: low enough to decode with any real tokenizer
#: (Qwen, Llama), high enough to skip the special tokens at the bottom of most vocabularies
DEFAULT_VOCAB = range(1000, 9000)
#: how much a token's training loss shrinks per optimizer step of its run
LOSS_DECAY_PER_STEP = 0.9


def digest(*parts: object) -> int:
    """A stable 64-bit hash of ``parts`` (Python's ``hash`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def extend_context(context: int, token: int) -> int:
    """The rolling hash of a token prefix, one token longer (O(1) per token, not O(prefix))."""
    return digest(context, token)


def prefix_context(tokens: Sequence[int]) -> int:
    context = 0
    for token in tokens:
        context = extend_context(context, token)
    return context


def token_logprob(model_key: str, context: int, token: int) -> float:
    """log p(token | prefix) under the model named ``model_key``: in (-4.05, -0.05]."""
    return -(0.05 + (digest(model_key, context, token) % 4000) / 1000.0)


def prompt_logprobs(model_key: str, prompt: Sequence[int], last_n: int | None) -> list[float | None]:
    """Per prompt token; ``None`` at position 0 (no context) and before the last ``last_n``."""
    out: list[float | None] = [None] * len(prompt)
    first_scored = 1 if last_n is None else max(1, len(prompt) - last_n)
    context = 0
    for i, token in enumerate(prompt):
        if i >= first_scored:
            out[i] = token_logprob(model_key, context, token)
        context = extend_context(context, token)
    return out


def token_nll(base_model: str, context: int, target: int, step: int) -> float:
    """The training loss of one target token after ``step`` optimizer steps: in [0.5, 3.0) × 0.9^step."""
    return (0.5 + (digest(base_model, context, target) % 2500) / 1000.0) * LOSS_DECAY_PER_STEP**step


@dataclass(frozen=True)
class SampleCall:
    """What a sampler hook is asked: one completion of one prompt.

    ``seed`` is the request's seed; a fresh value per request when the request sent none (so two
    unseeded calls differ, as on the real service), and 0 at temperature 0 (greedy decoding ignores
    the seed). ``sample_index`` tells the ``num_samples`` completions of one request apart.
    """

    base_model: str
    model_path: str | None  #: the ``tinker://`` checkpoint sampled, None for the base model
    step: int | None  #: optimizer steps trained into that checkpoint, None for the base model
    prompt: tuple[int, ...]
    seed: int
    sample_index: int
    max_tokens: int | None
    temperature: float
    stop_tokens: tuple[int, ...]  #: the request's stop token ids (or the fake's EOS when it sent none)

    @property
    def model_key(self) -> str:
        """What the model's answers hang on: the checkpoint path, or the base model's name."""
        return self.model_path or self.base_model


#: a sampler hook: prompt (and everything else about the call) → completion token ids
Sampler = Callable[[SampleCall], Sequence[int]]


def default_sampler(call: SampleCall, vocab: range = DEFAULT_VOCAB) -> list[int]:
    """3–16 tokens of hash noise, ended by the first stop token (the model "finishing its turn")."""
    key = (call.model_key, call.prompt, call.seed, call.sample_index)
    length = 3 + digest(key, "length") % 14
    tokens = [vocab[digest(key, i) % len(vocab)] for i in range(length)]
    return tokens + list(call.stop_tokens[:1])


def text_sampler(
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    answer: Callable[[str, SampleCall], str],
) -> Sampler:
    """A sampler hook from a text-level ``answer(prompt_text, call)``: the prompt is decoded with the
    test's tokenizer, the answer encoded back and ended with the first stop token (end of turn)."""

    def sample(call: SampleCall) -> list[int]:
        return [*encode(answer(decode(call.prompt), call)), *call.stop_tokens[:1]]

    return sample
