"""The images for real, with Podman: an api and a worker container sharing one LORALAB_HOME, a dataset uploaded
over HTTP, the embedded model trained by the worker container, and the worker restarted mid-job: the job resumes
from its checkpoint and no step is lost. Skips when there is no podman or no image (build it first:
`podman build -f docker/Dockerfile -t localhost/loralab:cpu --format docker .`)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

IMAGE = os.environ.get("LORALAB_TEST_IMAGE", "localhost/loralab:cpu")
SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples"
MAX_STEPS = 6

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]


def podman(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, check=check, timeout=timeout)


@pytest.fixture(scope="module")
def engine_and_image():
    # Opt-in: the image holds the code it was built from, so the run says something only right after a build.
    if os.environ.get("LORALAB_TEST_CONTAINERS") != "1":
        pytest.skip("set LORALAB_TEST_CONTAINERS=1 after building the image from this tree (docs/deploy.md)")
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (apt-get install podman)")
    if podman("image", "exists", IMAGE, check=False).returncode != 0:
        pytest.skip(f"no image {IMAGE}: build it with podman build -f docker/Dockerfile -t {IMAGE} .")
    probe = podman("run", "--rm", IMAGE, "python", "-c", "print('ok')", check=False, timeout=120)
    if probe.stdout.strip() != "ok":
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[-300:]}")
    return IMAGE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def stack(engine_and_image, tmp_path):
    """Start the api container (published on 127.0.0.1) and give a function that starts a worker container."""
    tag = secrets.token_hex(4)
    home = tmp_path / "stack-home"
    home.mkdir()
    os.chown(home, 10001, 10001)  # the image's user, as the compose volume would be
    token = secrets.token_urlsafe(24)
    port = free_port()
    # Host networking: the containers reach the host's PostgreSQL (a new database on the test server when
    # LORALAB_TEST_DATABASE_URL is set, else SQLite in the shared home) and the api is reached on loopback.
    pg = os.environ.get("LORALAB_TEST_DATABASE_URL", "").replace("postgresql+psycopg://", "postgresql://")
    url = "sqlite:////data/loralab.db"
    if pg:
        import psycopg
        from sqlalchemy.engine import make_url

        database = f"stack_{tag}"
        with psycopg.connect(pg, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {database}")
        url = make_url(pg).set(database=database).render_as_string(hide_password=False).replace("localhost", "127.0.0.1")
    common = ["--network", "host", "-v", f"{home}:/data", "-e", f"LORALAB_DATABASE_URL={url}",
              "-e", "LORALAB_HEARTBEAT_SECONDS=1", "-e", "LORALAB_WORKER_POLL_SECONDS=0.5"]
    names = []

    def run(name: str, *command: str) -> str:
        full = f"loralab-test-{name}-{tag}"
        podman("run", "-d", "--name", full, *common, "-e", f"LORALAB_API_TOKEN={token}", IMAGE, *command)
        names.append(full)
        return full

    api = run("api", "serve", "--host", "0.0.0.0", "--port", str(port), "--workers", "0")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {token}"},
                          timeout=60)
    deadline = time.monotonic() + 300
    while True:
        try:
            if client.get("/api/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("api container never became healthy:\n" + podman("logs", api, check=False).stderr[-3000:])
        time.sleep(1)
    try:
        yield client, run, home
    finally:
        client.close()
        for name in reversed(names):
            podman("rm", "-f", "-t", "5", name, check=False)
        if pg:
            with psycopg.connect(pg, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {database} WITH (FORCE)")


def events(client: httpx.Client, job_id: str) -> list[dict]:
    """Every stored event of a finished job, from the SSE stream (it ends after the last)."""
    found = []
    with client.stream("GET", f"/api/training/jobs/{job_id}/events", timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                found.append(json.loads(line[len("data: "):]))
    return found


def test_train_through_a_worker_container_and_restart_it_mid_job(stack):
    client, run, home = stack
    upload = client.post("/api/datasets/upload",
                         files={"file": ("basic_qa.jsonl", (SAMPLES / "basic_qa.jsonl").read_bytes())})
    assert upload.status_code in (200, 201), upload.text
    job = client.post("/api/training/jobs", json={
        "dataset_id": upload.json()["id"], "max_steps": MAX_STEPS, "save_steps": 1, "per_device_train_batch_size": 1,
        "max_seq_length": 128, "model_name": "container"})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]

    worker = run("worker", "worker")
    # Wait for a checkpointed step, then restart the worker container (SIGTERM: checkpoint, back to the queue).
    deadline = time.monotonic() + 900
    while not [e for e in client.get(f"/api/training/jobs/{job_id}/metrics").json() if e["type"] == "step"]:
        assert client.get(f"/api/training/jobs/{job_id}").json()["status"] in ("queued", "running"), \
            podman("logs", worker, check=False).stderr[-3000:]
        assert time.monotonic() < deadline, "no training step within 15 minutes"
        time.sleep(1)
    podman("restart", "-t", "60", worker, timeout=180)

    deadline = time.monotonic() + 900
    while (status := client.get(f"/api/training/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, "job did not finish within 15 minutes of the restart"
        time.sleep(2)
    assert status["status"] == "succeeded", (status, podman("logs", worker, check=False).stderr[-3000:])
    assert status["attempt"] >= 2  # the restart really interrupted it

    stream = events(client, job_id)
    started = [e for e in stream if e["type"] == "started"]
    assert len(started) >= 2 and started[0]["resumed_from_step"] in (0, None)
    assert started[-1]["resumed_from_step"] >= 1  # resumed from a checkpoint, not from scratch
    steps = sorted({e["step"] for e in stream if e["type"] == "step"})
    assert steps == list(range(1, MAX_STEPS + 1))  # every step trained, none skipped
    assert stream[-1]["type"] == "done" and stream[-1]["total_steps"] == MAX_STEPS
    # The adapter is in the shared home, written by the worker container's user.
    model = client.get(f"/api/models/{status['result_model_id']}")
    assert model.status_code == 200 and model.json()["name"] == "container"
    adapters = list(home.glob("**/adapter_model.safetensors"))
    assert adapters and all(path.stat().st_uid == 10001 for path in adapters)
