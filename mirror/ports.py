"""Port numbers written as text, read the same way wherever an address is parsed.

Flags, bootstrap specs, orchestrator answers and DHT records all carry ports as text. Only ASCII
digits count (``str.isdigit`` also accepts "²", which `int` refuses), and a number of more than
five digits is refused before it is converted, however long the text.
"""

from __future__ import annotations

MAX_PORT = 65535


def port_number(text: str, *, allow_zero: bool = False) -> int | None:
    """The port `text` names, 1-65535 (0 too with `allow_zero`: "pick a free one"), or None."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        return None
    port = int(text)
    return port if (allow_zero or port > 0) and port <= MAX_PORT else None
