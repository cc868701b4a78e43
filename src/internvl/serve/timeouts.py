"""Awaiting with a time limit without losing a cancellation.

Python 3.11's `asyncio.wait_for` returns the inner result when the caller's cancel arrives in the same loop turn as
the inner completion (a resolver answering from a worker thread, say), so the cancel is dropped and the task runs on:
a disconnected client's image fetch, or the sibling of a failed image, would go on for its whole timeout.
`asyncio.timeout` (3.11+) has no such race; 3.10 has only `wait_for`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`await awaitable`, raising TimeoutError after `seconds`; a cancel of the caller always propagates (3.11+)."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)
