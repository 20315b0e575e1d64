"""A Python tool: typed parameters are the schema the model sees."""

from __future__ import annotations

import json
import time
from pathlib import Path

LEDGER = Path(__file__).resolve().parent / "credits.jsonl"


def buy_credits(amount_usd: float, reason: str) -> str:
    """Buy model credits for the team (it costs money: the CTO approves first)."""
    with LEDGER.open("a", encoding="utf-8") as ledger:
        ledger.write(json.dumps({"usd": amount_usd, "reason": reason, "at": time.time()}) + "\n")
    return f"bought ${amount_usd:.2f} of credits"
