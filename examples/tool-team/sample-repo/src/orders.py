"""The orders service of the sample repository."""


def list_orders(customer_id: str, cursor: str | None = None) -> list[dict[str, str]]:
    """Orders of a customer, newest first (a page at a time)."""
    return []
