"""One price table for hosted models, and the arithmetic that turns usage into dollars.

Prices change and third-party tables disagree (reference/ecosystem.md §2.3), so they live in one
editable table with the date they were taken; CHECK THEM against the provider's pricing page
before trusting an estimate. A model that is not in the table has no price: the functions return
``None`` and :func:`format_usd` prints "unknown" — never 0, which would read as "free".
"""

from __future__ import annotations

from dataclasses import dataclass

from agentsoc.types import ModelRef, Usage

#: When the table below was copied, and from where. Re-check before a paid run.
PRICES_TAKEN = "2026-11-25"
PRICES_NOTE = (
    f"prices taken {PRICES_TAKEN} from OpenAI's pricing page as mirrored by secondary sources; "
    "they must be checked before a paid run (edit agentsoc/pricing.py)"
)

#: The Batch API bills half the online price.
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Price:
    """US dollars per 1M tokens: base-model inference, training, and fine-tuned-model inference."""

    input: float
    output: float
    training: float | None = None
    ft_input: float | None = None
    ft_output: float | None = None


#: Dated snapshots; aliases below map the short names onto them.
PRICES: dict[str, Price] = {
    "gpt-3.5-turbo-0125": Price(input=0.50, output=1.50, training=8.00, ft_input=3.00, ft_output=6.00),
    "gpt-4o-mini-2024-07-18": Price(input=0.15, output=0.60, training=3.00, ft_input=0.30, ft_output=1.20),
    "gpt-4o-2024-08-06": Price(input=2.50, output=10.00, training=25.00, ft_input=3.75, ft_output=15.00),
    "gpt-4.1-2025-04-14": Price(input=2.00, output=8.00, training=25.00, ft_input=3.00, ft_output=12.00),
    "gpt-4.1-mini-2025-04-14": Price(input=0.40, output=1.60, training=5.00, ft_input=0.80, ft_output=3.20),
    "gpt-4.1-nano-2025-04-14": Price(input=0.10, output=0.40, training=1.50, ft_input=0.20, ft_output=0.80),
}

#: Tinker-API models (backends/tinker.py): per 1M tokens of prefill (``input``), sampling
#: (``output``) and training; a finetuned LoRA samples at its base model's rates (no deployment).
TINKER_PRICES_TAKEN = "2026-01"
TINKER_PRICES_NOTE = (
    f"Tinker prices: the {TINKER_PRICES_TAKEN} table as quoted in issue 15 (Qwen3-8B $0.13 prefill / $0.40 sample / "
    "$0.40 train per 1M tokens); Llama-3.1-8B is ASSUMED at Qwen3-8B's rates (same size, not verified); other "
    "providers of the API (Baseten) price differently: check before a paid run (edit agentsoc/pricing.py); "
    "prompt tokens bill as prefill, completion tokens as sampling, trained tokens as training"
)
_TINKER_8B = Price(input=0.13, output=0.40, training=0.40, ft_input=0.13, ft_output=0.40)
PRICES.update(
    {
        "Qwen/Qwen3-8B": _TINKER_8B,
        "Qwen/Qwen3-8B-Base": _TINKER_8B,
        "meta-llama/Llama-3.1-8B": _TINKER_8B,
        "meta-llama/Llama-3.1-8B-Instruct": _TINKER_8B,
    }
)

_ALIASES: dict[str, str] = {
    "gpt-3.5-turbo": "gpt-3.5-turbo-0125",
    "gpt-4o-mini": "gpt-4o-mini-2024-07-18",
    "gpt-4o": "gpt-4o-2024-08-06",
    "gpt-4.1": "gpt-4.1-2025-04-14",
    "gpt-4.1-mini": "gpt-4.1-mini-2025-04-14",
    "gpt-4.1-nano": "gpt-4.1-nano-2025-04-14",
}


def _lookup(model: ModelRef) -> tuple[Price | None, bool]:
    """The price row of ``model`` and whether it is a fine-tuned model (``ft:<base>:…``)."""
    finetuned = model.startswith("ft:")
    name = model.split(":")[1] if finetuned and model.count(":") >= 1 else model
    # a Tinker LoRA (``<base>+sampler:tinker://…``) is billed at its base model's rates
    name, tinker_lora, _ = name.partition("+sampler:")
    finetuned = finetuned or bool(tinker_lora)
    return PRICES.get(_ALIASES.get(name, name)), finetuned


def usage_cost(model: ModelRef, usage: Usage, *, batch: bool = False) -> float | None:
    """Dollars for ``usage`` on ``model``; fine-tuned models bill at their own rates."""
    price, finetuned = _lookup(model)
    if price is None:
        return None
    rate_in, rate_out = (price.ft_input, price.ft_output) if finetuned else (price.input, price.output)
    if rate_in is None or rate_out is None:
        return None
    cost = (usage.prompt_tokens * rate_in + usage.completion_tokens * rate_out) / 1e6
    return cost * BATCH_DISCOUNT if batch else cost


def training_cost(model: ModelRef, trained_tokens: int) -> float | None:
    """Dollars for a fine-tuning job; ``trained_tokens`` already counts every epoch
    (what OpenAI reports, and tokens-per-epoch × epochs for an estimate)."""
    price, _ = _lookup(model)
    if price is None or price.training is None:
        return None
    return trained_tokens * price.training / 1e6


def format_usd(amount: float | None) -> str:
    """``$1.23``, or "unknown" where a price is missing (so no one mistakes it for free)."""
    if amount is None:
        return "unknown"
    return f"${amount:,.2f}" if amount >= 0.01 or amount == 0 else f"${amount:.4f}"
