"""Coalescing: the calls that arrive while one is being served are served together, as one batch."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """`await coalescer(item)` returns `run(batch)[i]` for the batch its item joined.

    One drain task at a time yields once (so that the calls the event loop has ready by then join),
    then runs every waiting item as one batch: one forward pass of a model, one Redis round trip. A
    lone call costs one extra turn of the event loop; under load the batch grows with the load.
    `run` returns one result or exception per item; an exception it raises goes to the whole batch.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R | BaseException]]]) -> None:
        self.run = run
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._draining = False

    async def __call__(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        if not self._draining:
            self._draining = True
            asyncio.ensure_future(self._drain())
        return await done

    async def _drain(self) -> None:
        try:
            while self._waiting:
                await asyncio.sleep(0)
                batch, self._waiting = self._waiting, []
                try:
                    results = await self.run([item for item, _ in batch])
                except Exception as e:  # noqa: BLE001 - every waiting call gets the error
                    results = [e] * len(batch)
                for (_, done), result in zip(batch, results, strict=True):
                    if done.cancelled():
                        continue
                    if isinstance(result, BaseException):
                        done.set_exception(result)
                    else:
                        done.set_result(result)
        finally:
            self._draining = False
