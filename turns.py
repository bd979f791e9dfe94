"""Bounded concurrency for expensive work: a few at a time per process; one more waits briefly
for a turn, then is answered 503 with Retry-After, so cheap requests keep their share."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from errors import Unavailable


@dataclass
class Turns:
    """`size` turns; a caller waits up to `wait_seconds` for one, then gets `busy` as a 503
    refused for `reason` (what operators count it as)."""

    size: int
    wait_seconds: float
    busy: str
    reason: str
    in_use: int = field(default=0, init=False)
    _free: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._free = asyncio.Semaphore(self.size)

    @asynccontextmanager
    async def take(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self.wait_seconds):
                await self._free.acquire()
        except TimeoutError:
            raise Unavailable(self.busy, self.reason) from None
        self.in_use += 1
        try:
            yield
        finally:
            self.in_use -= 1
            self._free.release()
