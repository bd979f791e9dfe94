"""Retrying with capped exponential backoff: the one loop with which the API, the worker and the
CLI wait for the database or Redis to come back."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# Told of each failure that will be retried: the error, failures so far, seconds until the next try.
OnRetry = Callable[[Exception, int, float], Awaitable[None]]


@dataclass(frozen=True)
class Backoff:
    """Waits between attempts: `first` seconds after the first failure, doubling up to `cap`."""

    first: float
    cap: float

    def delay(self, failures: int) -> float:
        """The wait after the `failures`-th failure in a row (counting from 1)."""
        return min(self.first * 2.0 ** (failures - 1), self.cap)

    async def retry(
        self,
        attempt: Callable[[], Awaitable[T]],
        *,
        retryable: Callable[[Exception], bool],
        on_retry: OnRetry,
        budget_seconds: float | None = None,
    ) -> T:
        """`attempt`'s result, trying again after each failure `retryable` accepts. With a budget,
        the last try starts when the budget is spent and its failure is raised; without one, this
        tries for as long as it takes."""
        deadline = None if budget_seconds is None else time.monotonic() + budget_seconds
        failures = 0
        while True:
            try:
                return await attempt()
            except Exception as error:
                left = None if deadline is None else deadline - time.monotonic()
                if not retryable(error) or (left is not None and left <= 0):
                    raise
                failures += 1
                delay = self.delay(failures) if left is None else min(self.delay(failures), left)
                await on_retry(error, failures, delay)
                await asyncio.sleep(delay)
