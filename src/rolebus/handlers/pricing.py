"""What tokens cost: the role file's prices, else genai-prices' table, else unknown."""

from __future__ import annotations

import contextlib

from genai_prices import Usage as PriceUsage
from genai_prices import calc_price

from rolebus.team.handler_specs import ModelPrices

__all__ = ["cost_usd"]


def cost_usd(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    *,
    base_url: str | None,
    prices: ModelPrices | None,
) -> float | None:
    """US dollars for one call, or None when the model's price is not known."""
    if prices is not None:
        return (
            prompt_tokens * prices.input_per_mtok + completion_tokens * prices.output_per_mtok
        ) / 1_000_000
    usage = PriceUsage(input_tokens=prompt_tokens, output_tokens=completion_tokens)
    # By the provider the URL names, then by the model's name alone (a proxy such as
    # LiteLLM serves a hosted model under its own URL).
    for url in dict.fromkeys([base_url, None]):
        with contextlib.suppress(LookupError, ValueError):
            return float(calc_price(usage, model, provider_api_url=url).total_price)
    return None
