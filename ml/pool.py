"""Independent, deterministic pieces of work (training runs) spread over spawned worker processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


def pool_map(fn: Callable[..., Any], args: list[tuple[Any, ...]], workers: int) -> Iterator[Any]:
    """fn(*a) for each a, in order: here, or in `workers` spawned processes sharing the CPU threads (each
    gets threads // workers, so a run's numbers depend on the seed and that thread count only)."""
    if workers <= 1 or len(args) <= 1:
        yield from (fn(*a) for a in args)
        return
    import torch.multiprocessing as mp

    threads = max(1, torch.get_num_threads() // workers)
    with mp.get_context("spawn").Pool(min(workers, len(args)), torch.set_num_threads, (threads,)) as pool:
        yield from pool.imap(_star, [(fn, a) for a in args])  # in order, each as soon as it is done


def _star(fn_args: tuple[Callable[..., Any], tuple[Any, ...]]) -> Any:
    fn, args = fn_args
    return fn(*args)
