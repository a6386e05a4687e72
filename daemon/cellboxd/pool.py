"""The warm pool: sandboxes made ahead of time, each with one kernel started and waiting.

Settings (`pool`) say how many to keep ready per backend and image. `createSandbox` takes one
when the request fits (see `SandboxManager.create`), and the pool makes a new one in the
background. A sandbox leaves the pool once and for all when it is taken; one whose kernel died
while it waited is thrown away, not handed out. The pool is emptied when the daemon stops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from cellbox import types as t
from cellboxd.backends.base import Key

log = logging.getLogger(__name__)

_RETRY_FIRST = 1.0  # seconds before making a pooled sandbox again after a failure, doubling
_RETRY_MAX = 60.0

S = TypeVar("S")


class WarmPool(Generic[S]):
    """Ready sandboxes by key; `make` makes one for a key, `discard` destroys one."""

    def __init__(
        self,
        make: Callable[[Key], Awaitable[S]],
        discard: Callable[[S], Awaitable[None]],
        usable: Callable[[S], bool],
    ) -> None:
        self._make = make
        self._discard = discard
        self._usable = usable
        self._sizes: dict[Key, int] = {}
        self._ready: dict[Key, collections.deque[S]] = {}
        self._fillers: dict[Key, asyncio.Task[None]] = {}
        self._discarding: set[asyncio.Future[None]] = set()
        self._closed = False

    def configure(self, sizes: dict[Key, int]) -> None:
        """Sets how many to keep ready per key, and starts making them."""
        self._sizes = {key: size for key, size in sizes.items() if size > 0}
        for key in self._sizes:
            self._ready.setdefault(key, collections.deque())
            self._fill(key)

    def take(self, key: Key) -> S | None:
        """A ready sandbox for `key`, now out of the pool for good; None when none is ready."""
        ready = self._ready.get(key)
        found = None
        while ready:
            candidate = ready.popleft()
            if self._usable(candidate):
                found = candidate
                break
            self._throw_away(key, candidate)
        if key in self._sizes:
            self._fill(key)
        return found

    def evict(self, key: Key, sandbox: S) -> None:
        """Throws away a ready sandbox that became unusable (its kernel died), and makes another."""
        ready = self._ready.get(key)
        if ready is None or sandbox not in ready:
            return
        ready.remove(sandbox)
        self._throw_away(key, sandbox)
        self._fill(key)

    def status(self) -> list[t.PoolStatus]:
        return [
            t.PoolStatus(backend, size, len(self._ready.get((backend, image), ())), image)
            for (backend, image), size in self._sizes.items()
        ]

    async def close(self) -> None:
        """Stops making sandboxes and destroys the ready ones."""
        self._closed = True
        fillers = list(self._fillers.values())
        for task in fillers:
            task.cancel()
        await asyncio.gather(*fillers, return_exceptions=True)
        ready = [sandbox for queue in self._ready.values() for sandbox in queue]
        self._ready.clear()
        await asyncio.gather(
            *(self._discard(sandbox) for sandbox in ready), *self._discarding, return_exceptions=True
        )

    def _fill(self, key: Key) -> None:
        if self._closed or key in self._fillers:
            return
        task = asyncio.create_task(self._filler(key), name=f"pool-{key[0]}-{key[1]}")
        self._fillers[key] = task
        task.add_done_callback(lambda _: self._fillers.pop(key, None))

    async def _filler(self, key: Key) -> None:
        """Makes sandboxes one at a time until `key` has its count; retries after failures."""
        delay = _RETRY_FIRST
        ready = self._ready[key]
        while len(ready) < self._sizes.get(key, 0):
            try:
                sandbox = await self._make(key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("warm pool: cannot make a %s sandbox (%s); again in %g s", key[0], exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            if self._closed:  # closed while it was being made
                await self._discard(sandbox)
                return
            ready.append(sandbox)
            delay = _RETRY_FIRST
            log.info("warm pool: %s sandboxes ready %d/%d", key[0], len(ready), self._sizes[key])

    def _throw_away(self, key: Key, sandbox: S) -> None:
        log.info("warm pool: dropped a %s sandbox whose kernel died while it waited", key[0])
        task = asyncio.ensure_future(self._discard(sandbox))
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)
