"""The job queue as a worker sees it: claim atomically, renew the lease, requeue jobs of dead workers."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

from loralab.settings import Settings
from loralab.store.repo import Claim, Reaped, Repo


def make_worker_id() -> str:
    import secrets

    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class JobQueue:
    """A worker's handle on the jobs table; every write after `claim` is fenced by the Claim."""

    def __init__(self, repo: Repo, settings: Settings, owner: str):
        self.repo, self.settings, self.owner = repo, settings, owner

    def claim(self) -> Claim | None:
        return self.repo.claim_job(self.owner, self.settings.lease_seconds)

    def heartbeat(self, claim: Claim, **fields) -> bool:
        """Renew the lease; True when the job's cancel was requested. Raises LeaseLost when fenced out."""
        return self.repo.heartbeat(claim, self.settings.lease_seconds, **fields)

    def reap(self) -> list[Reaped]:
        """Requeue (or fail) jobs whose worker stopped heartbeating, killing their orphaned engine on this host."""
        reaped = self.repo.reap_expired(self.settings.max_attempts)
        for item in reaped:
            kill_orphan(item, self.settings.home / "runs" / item.job_id)
        return reaped


def kill_orphan(item: Reaped, run_dir: Path) -> bool:
    """SIGKILL the process group of a dead worker's engine if it runs on this host and is that job's engine."""
    if not item.child_pid or not item.owner or item.owner.split(":")[0] != socket.gethostname():
        return False
    try:
        cmdline = Path(f"/proc/{item.child_pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if str(run_dir) not in cmdline:  # the pid was reused by something else
        return False
    try:
        os.killpg(item.child_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
