"""A Python tool that spends: each call adds a line to a ledger file."""

from __future__ import annotations

from pathlib import Path


def buy_credits(ledger: str, amount: int) -> str:
    """Buy model credits (it costs money)."""
    with Path(ledger).open("a", encoding="utf-8") as file:
        file.write(f"{amount}\n")
    return f"bought {amount} credits"
