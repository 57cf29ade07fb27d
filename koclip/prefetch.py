"""Work done ahead on threads, consumed in order: decoding images while the model runs.

    with closing(prefetched(load, batches, workers=2, ahead=4)) as loaded:
        for batch in loaded:           # load(batches[0]), load(batches[1]), ... in order
            model(batch)

Decoding and resizing images release the GIL (Pillow, numpy), so a few threads
keep a model fed on a 2-core machine without the cost of processes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def prefetched(fn: Callable, items: Iterable, *, workers: int, ahead: int,
               name: str = "koclip-prefetch") -> Iterator:
    """fn(item) for each item, in order, computed on `workers` threads while up to `ahead` results
    wait ahead of the consumer.  An exception from fn is raised where its result is taken.  When the
    consumer stops (the generator is closed, or garbage-collected) the work not yet started is
    cancelled and the threads are joined."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix=name)
    todo = iter(items)
    pending: deque = deque()
    try:
        for item in todo:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(todo, _END)
            if nxt is not _END:
                pending.append(pool.submit(fn, nxt))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_END = object()
