"""The Ray executor against a local Ray head this module starts (and stops): the same events, cancel, crash,
error and registry contract as local workers, for the fake engine and for the embedded model."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from service_fixtures import FAKE_ENGINE, SAMPLES, wait_for



def live(test):
    """A test against the local Ray head: needs the `ray` extra, takes a while."""
    return pytest.mark.ray(pytest.mark.slow(pytest.mark.timeout(900)(test)))


# A local Ray cluster owned by one process: ray.init() starts GCS, raylet, dashboard and job server; closing
# its stdin makes it call ray.shutdown(), which stops every process it started (no `ray stop`, which would kill
# every Ray process of this user on the machine).
HEAD_SCRIPT = """
import sys, ray
ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=int(sys.argv[1]),
         _temp_dir=sys.argv[2], object_store_memory=80 * 1024 * 1024, configure_logging=False, log_to_driver=False)
print("ready", flush=True)
sys.stdin.read()
ray.shutdown()
"""
PLANTED = {"LORALAB_API_TOKEN": "planted-api-token-0123456789", "HF_TOKEN": "hf_planted_secret",
           "AWS_SECRET_ACCESS_KEY": "planted-aws"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on 127.0.0.1 with token authentication (Ray's default), in a temp dir of its own."""
    pytest.importorskip("ray.job_submission")
    temp_dir = tempfile.mkdtemp(prefix="lr-ray-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    port, token = free_port(), os.urandom(24).hex()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORALAB_", "RAY_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([sys.executable, "-c", HEAD_SCRIPT, str(port), temp_dir], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        line = head.stdout.readline()
        assert line.strip() == "ready", f"the Ray head did not start (exit {head.poll()})"
        yield {"address": f"http://127.0.0.1:{port}", "token": token, "temp_dir": temp_dir}
    finally:
        head.stdin.close()
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        deadline = time.monotonic() + 30
        while processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.5)
        stray = processes_mentioning(temp_dir)
        for pid in stray:
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp_dir], check=False)
        assert not stray, f"Ray processes left behind after ray.shutdown(): {stray}"


@pytest.fixture
def home(loralab_home):
    scenario = loralab_home / "scenario.json"
    scenario.write_text("{}")
    return loralab_home


def worker_env(home: Path, ray_head: dict, *, fake: bool, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORALAB_", "RAY_"))}
    env.update(PLANTED)
    env.update({
        "LORALAB_HOME": str(home), "LORALAB_DATABASE_URL": f"sqlite:///{home / 'loralab.db'}",
        "LORALAB_EXECUTOR": "ray", "LORALAB_RAY_ADDRESS": ray_head["address"], "LORALAB_RAY_POLL_SECONDS": "0.2",
        "LORALAB_LEASE_SECONDS": "10", "LORALAB_HEARTBEAT_SECONDS": "0.5", "LORALAB_WORKER_POLL_SECONDS": "0.2",
        "LORALAB_TAIL_SECONDS": "0.1", "LORALAB_CANCEL_GRACE_SECONDS": "20",
        # Ray's own client settings: the worker talks to a cluster with token authentication
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"],
    })
    if fake:
        env["LORALAB_ENGINE_COMMAND"] = json.dumps([sys.executable, str(FAKE_ENGINE), "--scenario",
                                                    str(home / "scenario.json")])
    env.update(extra)
    return env


@pytest.fixture
def repo(home):
    from loralab.store.db import open_database
    from loralab.store.repo import Repo

    db = open_database(f"sqlite:///{home / 'loralab.db'}")
    yield Repo(db)
    db.dispose()


@pytest.fixture
def start_worker(home):
    """`python -m loralab.runner.worker` with the Ray executor, stopped with SIGTERM (as `loralab worker` is)."""
    procs = []

    def start(env):
        log = open(home / f"worker-{len(procs)}.log", "wb")
        procs.append((subprocess.Popen([sys.executable, "-m", "loralab.runner.worker"], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
        return procs[-1][0]

    yield start
    for proc, log in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert not processes_mentioning(str(home / "runs")), "an engine outlived its Ray job"


def queue_job(repo, spec: dict, name: str = "ray-model") -> str:
    job = repo.create_job(spec, None, name)
    repo.set_status(job.id, "queued")
    return job.id


def fake_spec(home: Path) -> dict:
    data = home / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    return {"base_model": "smollm2-135m-instruct", "method": "lora", "data": {"path": str(data)}, "max_steps": 5}


def set_scenario(home: Path, **fields) -> None:
    (home / "scenario.json").write_text(json.dumps(fields))


def ray_jobs_of(ray_head: dict, job_id: str) -> list:
    """The Ray jobs loralab submitted for `job_id`, read with Ray's own client (as an operator would)."""
    code = ("import json, sys; from ray.job_submission import JobSubmissionClient as C;"
            "jobs = C(sys.argv[1]).list_jobs();"
            "print(json.dumps([j.dict() for j in jobs if (j.metadata or {}).get('loralab_job_id') == sys.argv[2]],"
            " default=str))")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_head["token"]}
    out = subprocess.run([sys.executable, "-c", code, ray_head["address"], job_id], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout)


def status_of(repo, job_id: str) -> str:
    return repo.get_job(job_id).status


def finished(repo, job_id: str) -> bool:
    return status_of(repo, job_id) in ("succeeded", "failed", "cancelled")


# ---- the fake engine through Ray ------------------------------------------------------------------------------


@live
def test_fake_engine_job_succeeds_through_ray_with_the_allow_listed_env(ray_head, home, repo, start_worker):
    set_scenario(home, total_steps=4, step_seconds=0.05)
    job_id = queue_job(repo, fake_spec(home))
    start_worker(worker_env(home, ray_head, fake=True))
    wait_for(lambda: finished(repo, job_id), timeout=180)
    job = repo.get_job(job_id)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    events = repo.events_after(job_id)
    assert [e.type for e in events] == ["started", "step", "step", "step", "step", "done"]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5, 6]
    assert job.progress["percent"] == 100.0 and job.child_pid is None  # nothing local to reap
    model = repo.get_model(job.result_model_id)
    assert model.name == "ray-model" and model.job_id == job_id and model.metrics["total_steps"] == 4
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(model.path).iterdir()}
    run_dir = home / "runs" / job_id
    assert (run_dir / "stdout.log").exists() and (run_dir / "stderr.log").exists()
    [ray_job] = ray_jobs_of(ray_head, job_id)
    assert ray_job["status"] == "SUCCEEDED" and ray_job["metadata"]["loralab_attempt"] == "1"
    env_vars = ray_job["runtime_env"]["env_vars"]
    assert env_vars["LORALAB_HOME"] == str(home) and env_vars["RAY_JOB_STOP_WAIT_TIME_S"] == "20"
    shown = json.dumps(ray_job)
    for name, value in PLANTED.items():  # neither the runtime_env nor anything else Ray shows holds a secret
        assert value not in shown, name
    assert "LORALAB_DATABASE_URL" not in env_vars and "loralab.db" not in shown


@live
def test_cancel_through_ray_checkpoints_and_ends_cancelled(ray_head, home, repo, start_worker):
    set_scenario(home, total_steps=2000, step_seconds=0.05)
    job_id = queue_job(repo, fake_spec(home))
    start_worker(worker_env(home, ray_head, fake=True))
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 3, timeout=180)
    repo.request_cancel(job_id)
    wait_for(lambda: finished(repo, job_id), timeout=60)
    job = repo.get_job(job_id)
    assert job.status == "cancelled", (job.error_code, job.error_message)
    last = repo.events_after(job_id)[-1]
    assert last.type == "cancelled" and last.payload["checkpoint"]  # SIGTERM reached the engine: it checkpointed
    assert list((home / "runs" / job_id / "checkpoints").glob("checkpoint-*"))
    assert ray_jobs_of(ray_head, job_id)[0]["status"] == "STOPPED"


@live
def test_cancel_of_an_engine_ignoring_sigterm_ends_after_rays_grace(ray_head, home, repo, start_worker):
    set_scenario(home, total_steps=2000, step_seconds=0.05, ignore_sigterm=True)
    job_id = queue_job(repo, fake_spec(home))
    start_worker(worker_env(home, ray_head, fake=True, LORALAB_CANCEL_GRACE_SECONDS="1"))
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 2, timeout=180)
    repo.request_cancel(job_id)
    wait_for(lambda: finished(repo, job_id), timeout=60)
    assert status_of(repo, job_id) == "cancelled"
    assert repo.events_after(job_id)[-1].type == "cancelled"  # written by the supervisor: the engine was killed
    [ray_job] = ray_jobs_of(ray_head, job_id)
    assert ray_job["status"] == "STOPPED" and ray_job["runtime_env"]["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "1"


@live
def test_crash_and_error_through_ray_fail_like_local_ones(ray_head, home, repo, start_worker):
    set_scenario(home, total_steps=5, step_seconds=0.01, crash_at_step=3, crash_code=7)
    crash = queue_job(repo, fake_spec(home))
    start_worker(worker_env(home, ray_head, fake=True))
    wait_for(lambda: finished(repo, crash), timeout=180)
    job = repo.get_job(crash)
    assert job.status == "failed" and job.error_code == "engine_crashed"
    assert "code 7" in job.error_message and "Segmentation fault at step 3" in job.error_message
    assert str(home) not in job.error_message
    set_scenario(home, total_steps=5, step_seconds=0.01, error_at_step=2)
    error = queue_job(repo, fake_spec(home))
    wait_for(lambda: finished(repo, error), timeout=180)
    job = repo.get_job(error)
    assert job.status == "failed" and job.error_code == "out_of_memory" and "step 2" in job.error_message


@live
def test_worker_shutdown_requeues_a_ray_job_with_its_checkpoint(ray_head, home, repo, start_worker):
    set_scenario(home, total_steps=2000, step_seconds=0.05)
    job_id = queue_job(repo, fake_spec(home))
    worker = start_worker(worker_env(home, ray_head, fake=True))
    wait_for(lambda: (repo.get_job(job_id).progress.get("step") or 0) >= 3, timeout=180)
    worker.send_signal(signal.SIGTERM)
    worker.wait(60)
    job = repo.get_job(job_id)
    assert job.status == "queued" and job.attempt == 1
    assert repo.events_after(job_id)[-1].type == "interrupted"
    assert list((home / "runs" / job_id / "checkpoints").glob("checkpoint-*"))


# ---- the embedded model -----------------------------------------------------------------------------------------


@live
@pytest.mark.model
def test_ray_executor_trains_the_embedded_model_and_cancels_a_second_job(ray_head, home, repo, start_worker):
    from loralab.spec import DataSpec, TrainSpec

    def spec(max_steps: int) -> dict:
        return TrainSpec(data=DataSpec(path=str(SAMPLES / "basic_qa.jsonl")), max_steps=max_steps,
                         per_device_train_batch_size=1, max_seq_length=128, save_steps=0).model_dump(mode="json")

    first = queue_job(repo, spec(2), "ray-embedded")
    # A cancelled engine finishes its step before it checkpoints: on a loaded 2-core machine a step took up to
    # 80 s, so the grace (LORALAB_CANCEL_GRACE_SECONDS, also Ray's RAY_JOB_STOP_WAIT_TIME_S) is generous here.
    start_worker(worker_env(home, ray_head, fake=False, LORALAB_CANCEL_GRACE_SECONDS="600"))
    wait_for(lambda: finished(repo, first), timeout=600)
    job = repo.get_job(first)
    assert job.status == "succeeded", (job.error_code, job.error_message)
    types = [e.type for e in repo.events_after(first)]
    assert types[0] == "started" and types[-1] == "done" and types.count("step") == 2
    model = repo.get_model(job.result_model_id)
    assert model.name == "ray-embedded" and model.metrics["total_steps"] == 2
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in Path(model.path).iterdir()}

    second = queue_job(repo, spec(500), "ray-cancelled")
    wait_for(lambda: (repo.get_job(second).progress.get("step") or 0) >= 1, timeout=600)
    repo.request_cancel(second)
    wait_for(lambda: finished(repo, second), timeout=660)
    assert status_of(repo, second) == "cancelled"
    last = repo.events_after(second)[-1]
    assert last.type == "cancelled" and last.payload["checkpoint"]
    [checkpoint] = (home / "runs" / second / "checkpoints").glob("checkpoint-*")
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "trainer_state.json").is_file()


# ---- without a cluster ------------------------------------------------------------------------------------------


def test_entrypoint_quotes_every_word(tmp_path):
    from loralab.runner.executors import ray_entrypoint

    run_dir = tmp_path / "run $(touch pwned); `x` 'q'"
    cmd = [sys.executable, "-m", "loralab.engine.run", str(run_dir)]
    words = shlex.split(ray_entrypoint(cmd, run_dir))
    assert words[:3] == ["cd", str(run_dir), "&&"] and words[3:8] == ["exec", *cmd]
    assert words[8:] == [">>", str(run_dir / "stdout.log"), "2>>", str(run_dir / "stderr.log")]


def test_unreachable_cluster_leaves_jobs_queued(home, repo):
    import threading

    pytest.importorskip("ray.job_submission")
    from loralab.runner.worker import Worker
    from loralab.settings import Settings

    settings = Settings(home=home, database_url=f"sqlite:///{home / 'loralab.db'}", executor="ray",
                        ray_address=f"http://127.0.0.1:{free_port()}", worker_poll_seconds=0.1)
    job_id = queue_job(repo, fake_spec(home))
    worker = Worker(repo.db, settings, stop=threading.Event())
    problem = worker.executor.unavailable()
    assert problem and settings.ray_address in problem
    assert worker.run_once() is None
    assert status_of(repo, job_id) == "queued"


def test_local_workers_do_not_import_ray():
    code = ("import sys; from loralab.runner.worker import Worker; from loralab.runner.executors import make_executor;"
            "from loralab.settings import Settings; make_executor(Settings());"
            "print(any(m == 'ray' or m.startswith('ray.') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
