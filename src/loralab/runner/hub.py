"""In-process pub/sub: wakes live streams when a worker in this process stored new events for a job."""
from __future__ import annotations

import asyncio
import threading
from collections import defaultdict


class EventHub:
    """Subscribers wait per job id; publishers (worker threads) wake them. Other processes are seen by polling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._async: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = defaultdict(set)
        self._sync: dict[str, set[threading.Event]] = defaultdict(set)

    def publish(self, job_id: str) -> None:
        with self._lock:
            waiters = list(self._async.get(job_id, ()))
            events = list(self._sync.get(job_id, ()))
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the subscriber's loop is closed
                pass
        for event in events:
            event.set()

    async def wait(self, job_id: str, timeout: float) -> None:
        """Return when the job gets new events in this process, or after `timeout` seconds."""
        entry = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._async[job_id].add(entry)
        try:
            await asyncio.wait_for(entry[1].wait(), timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                self._async[job_id].discard(entry)
                if not self._async[job_id]:
                    del self._async[job_id]

    def wait_sync(self, job_id: str, timeout: float) -> None:
        """Blocking variant of `wait` for threads (the SSE generator, CLI followers)."""
        event = threading.Event()
        with self._lock:
            self._sync[job_id].add(event)
        try:
            event.wait(timeout)
        finally:
            with self._lock:
                self._sync[job_id].discard(event)
                if not self._sync[job_id]:
                    del self._sync[job_id]


DEFAULT_HUB = EventHub()
