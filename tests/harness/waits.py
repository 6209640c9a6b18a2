"""Waiting in a test for something other tasks make true, without sleeping for it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the other tasks until `condition` holds (bounded, so a regression fails)."""
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0)
