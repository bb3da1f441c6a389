"""The background thread a :class:`~logitstore.dataset.StoreDataset` reader decodes and collates
in, a few batches ahead, and the exit hook that stops every such thread still running."""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Iterator
from typing import Any

_LIVE: dict[threading.Thread, threading.Event] = {}
"""Prefetching threads still running, with the event that stops each."""


@atexit.register
def _stop_prefetching() -> None:
    """Let every prefetching thread finish the item in hand and end, before the interpreter
    does: a daemon thread still decoding then is stopped where it stands, which aborts the
    process when that is native code ("terminate called without an active exception")."""
    for stop in list(_LIVE.values()):
        stop.set()
    for thread in list(_LIVE):
        thread.join(timeout=60)


def _prefetched(source: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run ``source`` in a daemon thread, ``depth`` items ahead; re-raise its errors here.
    Closing the iterator stops the thread and waits for it (it ends after the item in hand)."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(entry: tuple[str, Any]) -> bool:
        """Queue ``entry`` unless the consumer stopped meanwhile (then say so)."""
        while not stop.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in source:
                if not offer(("item", item)):
                    return
            offer(("end", done))
        except BaseException as exc:  # forwarded to the consumer, which re-raises it
            offer(("error", exc))

    thread = threading.Thread(target=produce, daemon=True, name="logitstore-prefetch")
    _LIVE[thread] = stop
    thread.start()
    try:
        while True:
            kind, item = items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        if thread is not threading.current_thread():
            thread.join(timeout=60)
        _LIVE.pop(thread, None)
