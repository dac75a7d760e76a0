"""The worker loop: reap dead workers' jobs, claim the next queued job, supervise it; `python -m loralab.runner.worker`."""
from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from loralab.runner.executors import make_executor
from loralab.runner.hub import DEFAULT_HUB
from loralab.runner.queue import JobQueue, make_worker_id
from loralab.runner.supervisor import Supervisor
from loralab.settings import Settings, get_settings
from loralab.store.db import Database, open_database
from loralab.store.repo import Repo

log = logging.getLogger("loralab.worker")


class Worker:
    """One worker: runs one job at a time in a child process, until `stop` is set."""

    def __init__(self, db: Database, settings: Settings, *, worker_id: str | None = None,
                 notify: Callable[[str], None] | None = None, stop: threading.Event | None = None):
        self.settings = settings
        self.repo = Repo(db)
        self.worker_id = worker_id or make_worker_id()
        self.queue = JobQueue(self.repo, settings, self.worker_id)
        self.notify = notify or DEFAULT_HUB.publish
        self.stop = stop or threading.Event()
        self.executor = make_executor(settings)

    def run_once(self) -> str | None:
        """Reap expired leases, then claim and run one job; return its final status, or None when idle."""
        for item in self.queue.reap():
            log.warning("job %s lost its worker %s: now %s", item.job_id, item.owner, item.status)
            self.notify(item.job_id)
        problem = self.executor.unavailable()
        if problem:  # e.g. the Ray cluster is down: leave the jobs queued rather than fail them
            log.warning("worker %s claims no job: %s", self.worker_id, problem)
            return None
        if self.stop.is_set():  # shutting down: take no new job (the loop may have been past its check)
            return None
        claim = self.queue.claim()
        if claim is None:
            return None
        log.info("worker %s runs job %s attempt %d", self.worker_id, claim.job_id, claim.attempt)
        self.notify(claim.job_id)
        status = Supervisor(self.repo, self.queue, self.settings, claim, notify=self.notify, stop=self.stop,
                            executor=self.executor).run()
        log.info("job %s attempt %d ended: %s", claim.job_id, claim.attempt, status)
        return status

    def run(self) -> None:
        """Loop until stopped; an unexpected error is logged and the loop goes on (the lease protects the job)."""
        while not self.stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # keep the worker alive: a database blip must not kill it
                log.exception("worker %s: unexpected error", self.worker_id)
                ran = None
            if ran is None:
                self.stop.wait(self.settings.worker_poll_seconds)


class WorkerPool:
    """N worker threads sharing one database handle (used by `loralab serve --workers N`)."""

    def __init__(self, db: Database, settings: Settings, count: int, notify: Callable[[str], None] | None = None):
        self.stop = threading.Event()
        self.workers = [Worker(db, settings, notify=notify, stop=self.stop) for _ in range(count)]
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for worker in self.workers:
            thread = threading.Thread(target=worker.run, name=f"loralab-{worker.worker_id}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self, timeout: float | None = None) -> None:
        """Stop claiming; running jobs get SIGTERM, checkpoint and go back to the queue."""
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout)


def serve_worker(settings: Settings | None = None) -> None:
    """Run one worker in this process until SIGTERM/SIGINT (what `loralab worker` calls)."""
    settings = settings or get_settings()
    db = open_database(settings.resolved_database_url(), lease_seconds=settings.lease_seconds)
    worker = Worker(db, settings)

    def stop(signum, _frame) -> None:
        # The running job's engine gets SIGTERM, checkpoints within cancel_grace_seconds and goes back to the
        # queue ('interrupted'); another worker resumes it from that checkpoint.
        log.info("worker %s: %s received, handing its job back", worker.worker_id, signal.Signals(signum).name)
        worker.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    log.info("worker %s started on %s", worker.worker_id, db.engine.url.render_as_string(hide_password=True))
    try:
        worker.run()
    finally:
        db.dispose()


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    serve_worker()
    return 0


if __name__ == "__main__":
    sys.exit(main())
