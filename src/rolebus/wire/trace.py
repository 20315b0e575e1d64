"""W3C trace context (``traceparent``): a flow's follow-ups keep its trace id."""

from __future__ import annotations

import secrets

__all__ = ["child_traceparent", "new_traceparent"]


def new_traceparent() -> str:
    """A W3C trace context header for a new flow."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def child_traceparent(parent: str | None) -> str:
    """The same trace, a new span: what a follow-up of ``parent`` carries."""
    if not parent or parent.count("-") != 3:
        return new_traceparent()
    version, trace_id, _, flags = parent.split("-")
    return f"{version}-{trace_id}-{secrets.token_hex(8)}-{flags}"
