"""Run one claimed attempt: write spec.json, spawn the engine child, tail events.jsonl, heartbeat, cancel, finish."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.exc import DBAPIError

from loralab.engine.distributed import exit_code_from_events, rendezvous_problem, uses_torchrun
from loralab.runner.executors import EngineProcess, Executor, LocalExecutor
from loralab.runner.queue import JobQueue
from loralab.settings import Settings
from loralab.store.errors import LeaseLost
from loralab.store.paths import contain
from loralab.store.repo import TERMINAL_EVENTS, Claim, Repo, new_id

log = logging.getLogger("loralab.supervisor")
EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
STDERR_TAIL_BYTES = 4000
# Files of a run directory that are the run's record, not the trained model.
RUN_ONLY = {"events.jsonl", "metrics.jsonl", "stdout.log", "stderr.log", "checkpoints", "spec.json"}


def engine_command(settings: Settings, run_dir: Path, spec: dict[str, Any] | None = None) -> list[str]:
    """The engine's argv: torchrun when the spec asks for several processes, else the (configurable) engine."""
    from loralab.engine.distributed import launch_command

    if spec and uses_torchrun(spec):
        return launch_command(spec, run_dir)  # [python, -m, torch.distributed.run, ..., -m, loralab.engine.run, RUN_DIR]
    base = list(settings.engine_command) if settings.engine_command else [sys.executable, "-m", "loralab.engine.run"]
    return [*base, str(run_dir)]


# The engine child gets only what it needs from the worker's environment: never the API token, the database URL
# or cloud credentials. Names kept as they are:
ENV_NAMES = {
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "PYTHONPATH", "PYTHONHOME",
    "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE", "PYTHONWARNINGS", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD",
    "MALLOC_CONF", "XDG_CACHE_HOME", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "USE_HUB_KERNELS",
    "MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK", "GROUP_RANK",
    "LORALAB_HOME", "LORALAB_ALLOCATOR", "LORALAB_INFERENCE_QUANTIZATION",
}
# ... and every name with one of these prefixes: locale, GPU runtimes, thread pools, Hugging Face (tokens excepted,
# see HUB_TOKENS), experiment tracking (its keys are for the engine: it reports to MLflow/W&B itself).
ENV_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "NCCL_", "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "TRITON_", "OMP_", "MKL_",
                "KMP_", "OPENBLAS_", "GOMP_", "ROCM_", "HIP_", "HSA_", "GLOO_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_",
                "TOKENIZERS_", "TENSORBOARD_", "MLFLOW_", "WANDB_")
# Hub tokens go only to a job whose base model is a hub id (the one case where the engine downloads with them).
HUB_TOKENS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
# The judge's endpoint and key go only to an evaluation that asks for the judge.
JUDGE_NAMES = ("LORALAB_JUDGE_URL", "LORALAB_JUDGE_MODEL", "LORALAB_JUDGE_API_KEY")


def _needs_hub(spec: dict[str, Any]) -> bool:
    name = str(spec.get("base_model") or "")
    return "/" in name and not name.startswith(("/", ".", "~")) and not Path(name).exists()


def engine_env(spec: dict[str, Any] | None = None, settings: Settings | None = None,
               environ: dict[str, str] | None = None) -> dict[str, str]:
    """The engine process's environment: an allow-list of this one, on jemalloc when it is installed."""
    from loralab.engine.hardware import allocator_env

    environ = dict(os.environ if environ is None else environ)
    spec = spec or {}
    env = {k: v for k, v in environ.items() if k in ENV_NAMES or k.startswith(ENV_PREFIXES)}
    for name in HUB_TOKENS:
        env.pop(name, None)
        if name in environ and _needs_hub(spec):
            env[name] = environ[name]
    if spec.get("kind") == "evaluation" and spec.get("judge"):
        env.update({k: environ[k] for k in JUDGE_NAMES if k in environ})
        if settings is not None:  # settings given to the worker directly (not from the environment)
            for field, name in zip(("judge_url", "judge_model", "judge_api_key"), JUDGE_NAMES):
                if getattr(settings, field, None) and name not in env:
                    env[name] = str(getattr(settings, field))
    if settings is not None:
        env["LORALAB_HOME"] = str(settings.home)
        env["LORALAB_INFERENCE_QUANTIZATION"] = settings.inference_quantization  # how evaluations load models
    try:
        extra = allocator_env(environ)
    except ValueError as exc:
        log.warning("%s; the engine runs on the system allocator", exc)
        extra = {}
    return {**env, **extra}


def shown_path(text: str, home: Path) -> str:
    """`text` with the server's absolute home directory written as LORALAB_HOME (errors never show server paths)."""
    for root in {str(home), str(Path(home).resolve())}:
        if root and root != "/":
            text = text.replace(root.rstrip("/"), "LORALAB_HOME")
    return text


def _shown(value: Any, home: Path) -> Any:
    if isinstance(value, str):
        return shown_path(value, home)
    if isinstance(value, dict):
        return {k: _shown(v, home) for k, v in value.items()}
    if isinstance(value, list):
        return [_shown(v, home) for v in value]
    return value


class EventTail:
    """Reads complete new lines of events.jsonl; seq = 1-based line number, so a resumed attempt skips stored lines."""

    def __init__(self, path: Path, lines_seen: int):
        self.path, self.offset, self.line_no, self.skip = path, 0, 0, lines_seen

    def read(self) -> list[tuple[int, dict[str, Any]]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        out = []
        for raw in chunk[: end + 1].splitlines():
            self.line_no += 1
            if self.line_no <= self.skip:
                continue
            try:
                event = json.loads(raw)
                if not isinstance(event, dict):
                    raise ValueError("not an object")
            except ValueError:
                event = {"type": "log", "level": "warning", "time": time.time(),
                         "message": f"unreadable event line: {raw[:200].decode(errors='replace')}"}
            out.append((self.line_no, event))
        return out


def progress_of(events: list[tuple[int, dict[str, Any]]], current: dict[str, Any]) -> dict[str, Any] | None:
    """The job's progress fields after these events, or None when nothing changed."""
    progress, changed = dict(current), False
    for _, event in events:
        kind = event.get("type")
        if kind == "started":
            progress.update(total_steps=event.get("total_steps"), step=event.get("resumed_from_step") or 0)
        elif kind == "step":
            progress.update({k: event.get(k) for k in ("step", "total_steps", "loss", "eta_s", "epoch")})
        elif kind == "progress":  # an evaluation: one per answer generated, then the scoring stages
            progress.update({k: event[k] for k in ("step", "total_steps", "eta_s", "stage", "model") if k in event})
        elif kind == "done":
            progress.update(eta_s=0, step=event.get("total_steps", progress.get("step")))
        else:
            continue
        changed = True
        total, step = progress.get("total_steps"), progress.get("step")
        progress["percent"] = round(100.0 * step / total, 1) if total and step is not None else None
    return progress if changed else None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def stderr_tail(run_dir: Path) -> str:
    path = run_dir / "stderr.log"
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, path.stat().st_size - STDERR_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


class Supervisor:
    """Drives one attempt of one job from spawn to a final, fenced status."""

    def __init__(self, repo: Repo, queue: JobQueue, settings: Settings, claim: Claim,
                 notify: Callable[[str], None] = lambda job_id: None, stop: threading.Event | None = None,
                 executor: Executor | None = None):
        self.repo, self.queue, self.settings, self.claim, self.notify = repo, queue, settings, claim, notify
        self.executor = executor or LocalExecutor()
        self.stop = stop or threading.Event()
        self.run_dir = contain(settings.home / "runs", claim.job_id)
        self.proc: EngineProcess | None = None
        self.last_error: dict[str, Any] | None = None
        self.done_event: dict[str, Any] | None = None
        self.shutting_down = False
        self.pending: list[tuple[int, dict[str, Any]]] = []  # closing events, committed with the final status
        self.unsaved: list[tuple[int, dict[str, Any]]] = []
        self.progress_dirty = False
        self.saw: set[str] = set()
        self.progress: dict[str, Any] = {}
        self.timed_out = False

    def run(self) -> str:
        """Run the attempt; return the job's final status ('queued' when handed back on shutdown, 'lost' if fenced out)."""
        try:
            return self._run()
        except LeaseLost:
            self._kill(signal.SIGKILL)  # another worker owns the job now: our child must not write any more
            return "lost"

    def _run(self) -> str:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / "spec.json", self.claim.spec)
        events_path = self.run_dir / "events.jsonl"
        if events_path.exists() and events_path.stat().st_size and not events_path.read_bytes().endswith(b"\n"):
            with open(events_path, "ab") as fh:  # a killed engine left half a line: close it so ours parse
                fh.write(b"\n")
        tail = EventTail(events_path, self.repo.events_seen(self.claim.job_id))
        self.queue.heartbeat(self.claim, run_dir=str(self.run_dir))
        problem = rendezvous_problem(self.claim.spec, self.settings.distributed_hosts)
        if problem:  # a row written before this check existed at job creation, or settings changed since
            return self._finish("failed", error=problem.to_dict(), event={"type": "error", **problem.to_dict()})
        try:
            self._spawn()
        except OSError as exc:
            return self._finish("failed", error={"code": "engine_not_started", "param": None,
                                                 "message": shown_path(f"could not start the engine: {exc}",
                                                                       self.settings.home)})
        self.queue.heartbeat(self.claim, child_pid=self.proc.pid)
        next_beat, kill_at, cancelling, db_down_since = 0.0, None, False, None
        time_limit = time.monotonic() + self.settings.max_job_seconds
        while True:
            rc = self.proc.poll()
            self._store(tail.read())
            if rc is not None:
                break
            now = time.monotonic()
            try:
                self._flush()
                if now >= next_beat:
                    if self.queue.heartbeat(self.claim) and not cancelling:
                        cancelling, kill_at = True, now + self.settings.cancel_grace_seconds
                        self._kill(signal.SIGTERM)
                    next_beat = now + self.settings.heartbeat_seconds
                db_down_since = None
            except DBAPIError as exc:
                # A database blip must not kill hours of training; past the lease the job is someone else's.
                db_down_since = db_down_since or now
                log.warning("job %s: database unavailable (%s); retrying", self.claim.job_id, exc.__class__.__name__)
                if now - db_down_since > self.settings.lease_seconds:
                    raise LeaseLost(f"database unreachable for more than {self.settings.lease_seconds}s") from exc
            if now >= time_limit and not (cancelling or self.shutting_down or self.timed_out):
                # Over the wall-clock limit: SIGTERM makes the engine checkpoint, then the job fails (checkpoint kept).
                self.timed_out, kill_at = True, now + self.settings.cancel_grace_seconds
                self._kill(signal.SIGTERM)
            if self.stop.is_set() and not (cancelling or self.shutting_down or self.timed_out):
                self.shutting_down, kill_at = True, now + self.settings.cancel_grace_seconds
                self._kill(signal.SIGTERM)
            if kill_at is not None and now >= kill_at:
                self._kill(signal.SIGKILL)
                kill_at = None
            time.sleep(self.settings.tail_seconds)
        self._store(tail.read())
        # torchrun turns a rank's exit 3 into 1; Ray reports a stopped job without the engine's exit code
        if uses_torchrun(self.claim.spec) or not self.proc.exact_exit_code:
            rc = exit_code_from_events(rc, self.saw)
        return self._retrying(lambda: self._outcome(rc, cancelling, self.shutting_down))

    def _retrying(self, action):
        """Run a final database write, retrying through a short outage (up to the lease length)."""
        deadline = time.monotonic() + self.settings.lease_seconds
        while True:
            try:
                return action()
            except DBAPIError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(min(1.0, self.settings.heartbeat_seconds))

    def _spawn(self) -> None:
        cmd = engine_command(self.settings, self.run_dir, self.claim.spec)
        self.proc = self.executor.start(cmd, self.run_dir, engine_env(self.claim.spec, self.settings),
                                        job_id=self.claim.job_id, attempt=self.claim.attempt, spec=self.claim.spec)

    def _kill(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)

    def _store(self, events: list[tuple[int, dict[str, Any]]]) -> None:
        if not events:
            return
        events = [(seq, _shown(event, self.settings.home)) for seq, event in events]
        for _, event in events:
            if (self.shutting_down or self.timed_out) and event.get("type") == "cancelled":
                # Stopped because this worker shuts down, not by the user: the job goes on elsewhere.
                event["type"] = "interrupted"
            if event.get("type") == "started":  # which worker ran this attempt (workers on several hosts)
                event.setdefault("worker", self.claim.owner)
            self.saw.add(event.get("type"))
            if event.get("type") == "error":
                self.last_error = event
            elif event.get("type") == "done":
                self.done_event = event
        progress = progress_of(events, self.progress)
        if progress:
            self.progress, self.progress_dirty = progress, True
        # A closing event (done/error/cancelled) is held back and committed with the final status, so a client
        # that sees it can already read the job's outcome (result_model_id, error).
        cut = 0 if self.pending else next(
            (i for i, (_, e) in enumerate(events) if e.get("type") in TERMINAL_EVENTS), len(events))
        self.pending.extend(events[cut:])
        self.unsaved.extend(events[:cut])

    def _flush(self) -> None:
        """Store tailed events not stored yet (kept for the next try when the database is down)."""
        if self.unsaved or self.progress_dirty:
            self.repo.append_events(self.claim, self.unsaved, self.progress if self.progress_dirty else None)
            self.unsaved, self.progress_dirty = [], False
            self.notify(self.claim.job_id)

    def _outcome(self, rc: int, cancelling: bool, shutting_down: bool) -> str:
        if rc == EXIT_OK:
            return self._succeed()
        if self.timed_out and not (rc == EXIT_ERROR and self.last_error):
            limit = self.settings.max_job_seconds
            error = {"code": "time_limit_exceeded", "param": None, "message": (
                f"the job ran longer than its limit of {limit:g} s (LORALAB_MAX_JOB_SECONDS) and was stopped; "
                f"its last checkpoint is kept in LORALAB_HOME/runs/{self.claim.job_id}/checkpoints: resume it, "
                "or lower max_steps / num_train_epochs")}
            return self._finish("failed", error=error, event={"type": "error", **error})
        if rc == EXIT_ERROR and self.last_error:
            err = self.last_error  # already shown with LORALAB_HOME for absolute paths (see _store)
            return self._finish("failed", error={"code": err.get("code") or "engine_error",
                                                 "message": err.get("message") or "the engine reported an error",
                                                 "param": err.get("param")})
        if cancelling and (rc == EXIT_CANCELLED or rc < 0):
            event = None if "cancelled" in self.saw else {"type": "cancelled", "step": self.progress.get("step"),
                                                           "checkpoint": None}
            return self._finish("cancelled", event=event)
        interrupted = rc == EXIT_CANCELLED and self.claim.attempt < self.settings.max_attempts
        if (shutting_down and (rc == EXIT_CANCELLED or rc < 0)) or interrupted:
            # Stopped from outside (worker or host shutting down): checkpointed, so the job goes back to the queue.
            for _, event in self.pending:
                if event.get("type") == "cancelled":
                    event["type"] = "interrupted"
            self.unsaved.extend(self.pending)
            self._flush()
            self.repo.release_job(self.claim)
            self.notify(self.claim.job_id)
            return "queued"
        tail = stderr_tail(self.run_dir)
        message = shown_path(f"the training process exited unexpectedly with code {rc}"
                             + (" (killed by signal %d)" % -rc if rc < 0 else "")
                             + f"; see {self.run_dir / 'stderr.log'}. Last output:\n{tail[-2000:]}",
                             self.settings.home)
        error = {"code": "engine_crashed", "message": message, "param": None}
        return self._finish("failed", error=error, event={"type": "error", **error})

    def _succeed(self) -> str:
        if self.claim.spec.get("kind") in ("evaluation", "export"):  # their results are files, not a model
            return self._finish("succeeded")
        summary = self._read_summary()
        model_id = new_id("ft")
        target = contain(self.settings.home / "registry", model_id)
        try:
            try:
                self._copy_artifacts(target)
            except OSError as exc:  # disk full, permissions: fail now (not at the lease's end, then retrain)
                shutil.rmtree(target, ignore_errors=True)
                shutil.rmtree(target.with_name(f".{target.name}.tmp"), ignore_errors=True)
                reason = exc.strerror or exc.__class__.__name__
                error = {"code": "registry_copy_failed", "param": None, "message": (
                    f"training finished but its files could not be copied into the model registry ({reason}); "
                    f"they are kept in LORALAB_HOME/runs/{self.claim.job_id}: free disk space (or fix permissions "
                    "of LORALAB_HOME/registry) and run the job again")}
                log.warning("job %s: registry copy failed: %s", self.claim.job_id, exc)
                for _, event in self.pending:  # the engine's `done` is not the job's end any more: the error is
                    if event.get("type") == "done":
                        event.update(type="log", level="info", message="training finished")
                return self._finish("failed", error=error, event={"type": "error", **error})
            spec = self.claim.spec
            model = dict(id=model_id, name=self.claim.model_name, base_model=spec.get("base_model", ""),
                         method=spec.get("method", "lora"), dataset_id=self.claim.dataset_id, job_id=self.claim.job_id,
                         lineage={"base_model": spec.get("base_model"), "dataset_id": self.claim.dataset_id,
                                  "job_id": self.claim.job_id, "run_dir": str(self.run_dir),
                                  "attempt": self.claim.attempt},
                         spec=spec, metrics=summary, path=str(target))
            return self._finish("succeeded", model=model)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise

    def _read_summary(self) -> dict[str, Any]:
        try:
            return json.loads((self.run_dir / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):  # summary.json missing: the done event carries the same fields
            return {k: v for k, v in (self.done_event or {}).items() if k not in ("type", "time")}

    def _copy_artifacts(self, target: Path) -> None:
        """Hard-link (or copy) the final model files into the registry; the run directory keeps its checkpoints."""
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for item in self.run_dir.iterdir():
            if item.name in RUN_ONLY or item.name.startswith("."):
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, copy_function=_link_or_copy)
            else:
                _link_or_copy(item, tmp / item.name)
        write_json_atomic(tmp / "spec.json", self.claim.spec)
        os.replace(tmp, target)

    def _finish(self, status: str, **fields: Any) -> str:
        self._flush()
        self.repo.finish_job(self.claim, status, events=self.pending, **fields)
        self.notify(self.claim.job_id)
        return status


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
