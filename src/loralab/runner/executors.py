"""Where the engine command runs: a local child process (default) or a job on an existing Ray cluster.

The Supervisor drives one attempt through this interface only (start, poll, send_signal), so events, cancel,
requeue and the registry stay one code path. Ray is imported only when the Ray executor is selected
(`LORALAB_EXECUTOR=ray`, extra `loralab[ray]`).
"""
from __future__ import annotations

import logging
import math
import secrets
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

from loralab.settings import Settings

log = logging.getLogger("loralab.executors")


class EngineProcess(Protocol):
    """One running engine command; `poll` never blocks for long (the supervisor heartbeats between calls)."""

    pid: int | None  # a local process group to reap after a worker crash, None when it runs elsewhere
    # False when a stop is reported without the engine's own exit code: the supervisor then reads the code from the
    # run's events (a `cancelled` event means it checkpointed and exited 3).
    exact_exit_code: bool

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


class Executor(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why no job can be started now (the worker then claims nothing), or None."""

    def start(self, cmd: list[str], run_dir: Path, env: dict[str, str], *, job_id: str, attempt: int,
              spec: dict[str, Any]) -> EngineProcess:
        """Start the engine command; raises OSError when it cannot be started."""


class LocalProcess:
    """The engine as a child process of the worker, in its own process group."""

    exact_exit_code = True

    def __init__(self, popen: subprocess.Popen):
        self.popen, self.pid = popen, popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def send_signal(self, sig: int) -> None:
        import os

        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)  # the group: torchrun ranks and anything else the engine forked
            except ProcessLookupError:
                pass


class LocalExecutor:
    name = "local"

    def unavailable(self) -> str | None:
        return None

    def start(self, cmd: list[str], run_dir: Path, env: dict[str, str], *, job_id: str, attempt: int,
              spec: dict[str, Any]) -> LocalProcess:
        with open(run_dir / "stdout.log", "ab") as out, open(run_dir / "stderr.log", "ab") as err:
            # Own process group: cancel signals reach the engine and anything it forks (torchrun ranks).
            return LocalProcess(subprocess.Popen(cmd, cwd=run_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                                 start_new_session=True, close_fds=True, env=env))


# ---- Ray -------------------------------------------------------------------------------------------------------

# Never put into a Ray job's runtime_env: Ray stores it and shows it to anyone who can list the cluster's jobs
# (dashboard, `ray job list`). Ray nodes that need them get them from their own environment.
RAY_SECRET_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "LORALAB_JUDGE_API_KEY")
UNREACHABLE_SECONDS = 120.0  # the cluster unreachable this long: the attempt is lost
META_JOB, META_ATTEMPT = "loralab_job_id", "loralab_attempt"


def ray_entrypoint(cmd: list[str], run_dir: Path) -> str:
    """The shell line Ray runs (it always uses a shell): the engine in RUN_DIR, its output in RUN_DIR's logs.

    `exec` makes the engine the process Ray signals; every word is quoted, nothing from a request is run as shell.
    """
    quote = shlex.quote
    return (f"cd {quote(str(run_dir))} && exec {shlex.join(cmd)} "
            f">> {quote(str(run_dir / 'stdout.log'))} 2>> {quote(str(run_dir / 'stderr.log'))}")


def ray_runtime_env(env: dict[str, str], grace_seconds: float) -> dict[str, Any]:
    """The job's runtime_env: the engine's allow-listed environment without secrets, and Ray's stop grace.

    `ray job stop` sends SIGTERM, then SIGKILL after RAY_JOB_STOP_WAIT_TIME_S (3 s by default), read from the job
    supervisor's environment, which runtime_env env_vars set: the engine gets the same time to checkpoint as
    a local one (LORALAB_CANCEL_GRACE_SECONDS).
    """
    env_vars = {k: v for k, v in env.items() if k not in RAY_SECRET_NAMES}
    env_vars["RAY_JOB_STOP_WAIT_TIME_S"] = str(max(1, math.ceil(grace_seconds)))
    return {"env_vars": env_vars}


def _client_class(timeout_seconds: float):
    from ray.job_submission import JobSubmissionClient

    class Client(JobSubmissionClient):
        """Ray's client with a timeout on every request (Ray's own has none)."""

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", timeout_seconds)
            return super()._do_request(method, endpoint, **kwargs)

    return Client


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"[:500]


class RayJob:
    """One engine command submitted as a Ray job; states polled at most every `poll_seconds`."""

    exact_exit_code = False  # STOPPED carries no exit code
    pid = None

    def __init__(self, executor: RayExecutor, submission_id: str, run_dir: Path):
        self.executor, self.submission_id, self.run_dir = executor, submission_id, run_dir
        self.next_poll, self.failing_since = 0.0, None
        self.stop_wanted = self.stop_sent = False
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        now = time.monotonic()
        if now < self.next_poll:
            return None
        self.next_poll = now + self.executor.settings.ray_poll_seconds
        if self.stop_wanted and not self.stop_sent:
            self._send_stop()
        try:
            info = self.executor.client().get_job_info(self.submission_id)
        except Exception as exc:  # connection refused, timeout, 5xx: the job itself may still be running
            self.executor.forget_client()
            self.failing_since = self.failing_since or now
            if now - self.failing_since < UNREACHABLE_SECONDS:
                log.warning("ray job %s: status unavailable (%s); retrying", self.submission_id, _short(exc))
                return None
            return self._end(-signal.SIGKILL, f"lost contact with the Ray cluster for {UNREACHABLE_SECONDS:g} s "
                             f"({_short(exc)}); the Ray job {self.submission_id} may still be running")
        self.failing_since = None
        status = str(getattr(info.status, "value", info.status))
        if status in ("PENDING", "RUNNING"):
            return None
        if status == "SUCCEEDED":
            return self._end(0)
        if status == "STOPPED":
            # Ray signalled the engine (SIGTERM, then SIGKILL after the grace) and keeps no exit code.
            note = None if self.stop_wanted else f"the Ray job {self.submission_id} was stopped outside loralab"
            return self._end(-signal.SIGTERM, note)
        if info.driver_exit_code is not None:  # the engine ran and exited: its own code (1 error, 3 cancelled...)
            return self._end(int(info.driver_exit_code))
        # FAILED before or around the engine: runtime_env setup, its node or job supervisor died (its watcher then
        # SIGKILLs the engine's process group).
        return self._end(-signal.SIGKILL, f"the Ray job {self.submission_id} failed: {info.message or 'no message'}")

    def _end(self, code: int, note: str | None = None) -> int:
        if note:  # stderr.log is where the supervisor looks for a crash's last output
            try:
                with open(self.run_dir / "stderr.log", "a", encoding="utf-8") as fh:
                    fh.write(f"[loralab ray executor] {note}\n")
            except OSError:
                pass
        self.returncode = code
        return code

    def send_signal(self, sig: int) -> None:
        """Any stop request becomes `ray job stop` (SIGTERM, SIGKILL after the grace: Ray offers no direct kill)."""
        if self.returncode is None and not self.stop_sent:
            self.stop_wanted = True
            self._send_stop()

    def _send_stop(self) -> None:
        try:
            self.executor.client().stop_job(self.submission_id)
            self.stop_sent = True
        except Exception as exc:  # asked again at the next poll
            self.executor.forget_client()
            log.warning("ray job %s: stop request failed (%s); retrying", self.submission_id, _short(exc))


class RayExecutor:
    """Runs each attempt as a Ray job (Ray's job submission API) on a cluster that shares LORALAB_HOME."""

    name = "ray"

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None

    def client(self):
        if self._client is None:
            # Ray's client reads its token from Ray's own variables (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN or
            # RAY_AUTH_TOKEN_PATH): the worker needs them when the cluster has token authentication on.
            # A hung job server must not stall the supervisor past its lease: requests time out well before it.
            timeout = max(1.0, min(10.0, self.settings.lease_seconds / 3))
            self._client = _client_class(timeout)(self.settings.ray_address)
        return self._client

    def forget_client(self) -> None:
        self._client = None

    def unavailable(self) -> str | None:
        try:
            self.client()
        except ImportError:
            return "the Ray executor needs Ray's job submission client: pip install 'loralab[ray]'"
        except Exception as exc:
            self.forget_client()
            return f"the Ray cluster at {self.settings.ray_address} is not reachable ({_short(exc)})"
        return None

    def start(self, cmd: list[str], run_dir: Path, env: dict[str, str], *, job_id: str, attempt: int,
              spec: dict[str, Any]) -> RayJob:
        from loralab.engine.distributed import uses_torchrun

        dropped = sorted(k for k in env if k in RAY_SECRET_NAMES)
        if dropped:
            log.warning("job %s: %s not passed to Ray (Ray shows a job's runtime_env); give the Ray nodes these "
                        "variables in their own environment", job_id, ", ".join(dropped))
        gpus = self.settings.ray_num_gpus
        if gpus and uses_torchrun(spec):
            gpus *= int((spec.get("distributed") or {}).get("nproc_per_node") or 1)
        submission_id = f"loralab-{job_id}-{attempt}-{secrets.token_hex(3)}"
        try:
            self._stop_earlier_attempts(job_id)
            self.client().submit_job(
                entrypoint=ray_entrypoint(cmd, run_dir), submission_id=submission_id,
                runtime_env=ray_runtime_env(env, self.settings.cancel_grace_seconds),
                metadata={META_JOB: job_id, META_ATTEMPT: str(attempt)},
                entrypoint_num_cpus=self.settings.ray_num_cpus or None, entrypoint_num_gpus=gpus or None)
        except Exception as exc:
            self.forget_client()
            raise OSError(f"the Ray cluster at {self.settings.ray_address} did not accept the job "
                          f"({_short(exc)})") from exc
        log.info("job %s attempt %d submitted to Ray as %s", job_id, attempt, submission_id)
        return RayJob(self, submission_id, run_dir)

    def _stop_earlier_attempts(self, job_id: str) -> None:
        """Stop Ray jobs of earlier attempts still running (their worker died) and wait for them to end.

        Two engines must never write the same run directory; a dead worker's local engine is killed by the reaper,
        a Ray one is stopped here, by the next worker that claims the job.
        """
        client = self.client()
        mine = [j for j in client.list_jobs() if (j.metadata or {}).get(META_JOB) == job_id
                and str(getattr(j.status, "value", j.status)) in ("PENDING", "RUNNING")]
        for job in mine:
            log.warning("job %s: stopping the Ray job %s of an earlier attempt", job_id, job.submission_id)
            client.stop_job(job.submission_id)
        deadline = time.monotonic() + self.settings.cancel_grace_seconds + 30
        for job in mine:
            while time.monotonic() < deadline:
                status = client.get_job_status(job.submission_id)
                if str(getattr(status, "value", status)) not in ("PENDING", "RUNNING"):
                    break
                time.sleep(0.5)
            else:
                raise RuntimeError(f"the Ray job {job.submission_id} of an earlier attempt did not stop")


def make_executor(settings: Settings) -> Executor:
    """The executor named by LORALAB_EXECUTOR."""
    if settings.executor == "ray":
        return RayExecutor(settings)
    return LocalExecutor()
