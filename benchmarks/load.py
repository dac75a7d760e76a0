"""Load test: N concurrent clients mixing reads, uploads, SSE streams and generations while a job trains.

Run from the project root:  python benchmarks/load.py [--clients 50 --steps 40 --json out.json]

Starts `loralab serve --workers 1` (own process, 127.0.0.1, ephemeral port, throw-away LORALAB_HOME, an API token
set as a network deployment would), then:
1. idle: trains a LoRA job on the bundled `tech_qa` sample with nothing else running and records its tokens/s;
2. loaded: trains the same job again while `--clients` client threads hit the server until it ends: readers
   (GET datasets, jobs, a job, its metrics), uploaders (a small dataset each time), SSE followers (open the job's
   event stream with a ticket, read a few events, close) and generators (`/v1/chat/completions`, 8 tokens).
It prints per-kind request counts, errors, p50/p95 latencies and the job's tokens/s loaded against idle.
Every loop is bounded by the job's end and a hard deadline; only 127.0.0.1 is contacted.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

from serve import MODEL, _home  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "loralab" / "data" / "samples"
KINDS = ("read", "upload", "sse", "generate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, token: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALAB_")}
    env.update({"LORALAB_HOME": str(home), "LORALAB_API_TOKEN": token, "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT / "src")})
    log = open(home / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from loralab.cli import app; app()", "serve", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {home / 'server.log'}")
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def run_job(client: httpx.Client, dataset_id: str, steps: int) -> str:
    body = {"dataset_id": dataset_id, "base_model": MODEL, "max_steps": steps, "learning_rate": 2e-3,
            "per_device_train_batch_size": 4}
    response = client.post("/api/training/jobs", json=body)
    response.raise_for_status()
    return response.json()["id"]


def wait_job(client: httpx.Client, job_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get(f"/api/training/jobs/{job_id}")
        if response.status_code != 200:  # counted by the clients' figures, not here: poll again
            time.sleep(1)
            continue
        job = response.json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1)
    client.post(f"/api/training/jobs/{job_id}/cancel")  # the deadline ends the run: figures up to here
    return {"status": f"unfinished after {timeout:.0f} s", "id": job_id}


def job_tokens_per_s(client: httpx.Client, job_id: str) -> float:
    """The finished job's tokens/s from its `done` event (the event stream replays every event, then ends)."""
    with client.stream("GET", f"/api/training/jobs/{job_id}/events") as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event.get("type") == "done":
                    return float(event.get("tokens_per_s") or "nan")
    rates = [m["tokens_per_s"] for m in client.get(f"/api/training/jobs/{job_id}/metrics").json()
             if m.get("tokens_per_s")]  # a job stopped at the deadline: its steps' own figures
    return sorted(rates)[len(rates) // 2] if rates else float("nan")


class Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)

    def timed(self, kind: str, call) -> None:
        start = time.perf_counter()
        try:
            ok, detail = call()
        except httpx.HTTPError as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        elapsed = time.perf_counter() - start
        with self.lock:
            self.latencies[kind].append(elapsed)
            if not ok:
                self.errors[kind].append(detail)


def client_loop(kind: str, index: int, url: str, token: str, job_id: str, stop: threading.Event,
                rec: Recorder, deadline: float) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    upload = (SAMPLES / "basic_qa.jsonl").read_bytes()
    with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
        turn = 0
        while not stop.is_set() and time.monotonic() < deadline:
            turn += 1
            if kind == "read":
                path = ("/api/datasets", "/api/training/jobs", f"/api/training/jobs/{job_id}",
                        f"/api/training/jobs/{job_id}/metrics")[turn % 4]
                rec.timed(kind, lambda: _ok(client.get(path)))
                time.sleep(0.2)
            elif kind == "upload":
                rec.timed(kind, lambda: _ok(client.post(
                    "/api/datasets/upload", files={"file": ("load.jsonl", upload)},
                    data={"name": f"load-{index}"}), 201))
                time.sleep(1.0)
            elif kind == "sse":
                rec.timed(kind, lambda: _follow(client, job_id))
                time.sleep(0.5)
            else:
                rec.timed(kind, lambda: _ok(client.post("/v1/chat/completions", json={
                    "model": MODEL, "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Say hello number {index}-{turn}."}]})))


def _ok(response: httpx.Response, expected: int = 200) -> tuple[bool, str]:
    return response.status_code == expected, f"{response.status_code} {response.text[:160]}"


def _follow(client: httpx.Client, job_id: str) -> tuple[bool, str]:
    """Get a ticket, open the SSE stream with it, read up to 3 events (or the end), close."""
    ticket = client.post(f"/api/training/jobs/{job_id}/ticket")
    if ticket.status_code != 200:
        return False, f"ticket {ticket.status_code} {ticket.text[:160]}"
    params = {"ticket": ticket.json()["ticket"]}
    seen = 0
    with client.stream("GET", f"/api/training/jobs/{job_id}/events", params=params,
                       headers={"Authorization": ""}) as response:
        if response.status_code != 200:
            return False, f"events {response.status_code}"
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen += 1
                if seen >= 3:
                    break
    return seen > 0, "no events"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--steps", type=int, default=40, help="training steps of each job")
    parser.add_argument("--max-seconds", type=float, default=900, help="hard deadline of the loaded phase")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    mix = {"read": 0.6, "upload": 0.12, "sse": 0.16, "generate": 0.12}
    counts = {k: max(1, round(args.clients * share)) for k, share in mix.items()}
    counts["read"] += args.clients - sum(counts.values())
    print(f"load average {os.getloadavg()[0]:.2f}; clients {counts}")
    tmp = Path(tempfile.mkdtemp(prefix="loralab-load-"))
    token = secrets.token_urlsafe(24)
    proc, url = start_server(_home(tmp), token)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as admin:
            data = (SAMPLES / "tech_qa.jsonl").read_bytes()
            dataset_id = admin.post("/api/datasets/upload", files={"file": ("tech_qa.jsonl", data)}).json()["id"]
            warm = admin.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            warm.raise_for_status()  # the serving model is loaded before either phase
            idle_id = run_job(admin, dataset_id, args.steps)
            idle = wait_job(admin, idle_id, args.max_seconds)
            idle_rate = job_tokens_per_s(admin, idle_id)
            print(f"idle job {idle_id}: {idle['status']}, {idle_rate:.1f} tokens/s")
            loaded_id = run_job(admin, dataset_id, args.steps)
            rec, stop = Recorder(), threading.Event()
            deadline = time.monotonic() + args.max_seconds
            threads = [threading.Thread(target=client_loop, args=(kind, i, url, token, loaded_id, stop, rec, deadline),
                                        daemon=True)
                       for kind, n in counts.items() for i in range(n)]
            started = time.monotonic()
            for thread in threads:
                thread.start()
            loaded = wait_job(admin, loaded_id, args.max_seconds)
            stop.set()
            for thread in threads:
                thread.join(timeout=180)
            wall = time.monotonic() - started
            loaded_rate = job_tokens_per_s(admin, loaded_id)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    figures = {"clients": args.clients, "mix": counts, "wall_s": round(wall, 1),
               "idle_tokens_per_s": round(idle_rate, 1), "loaded_tokens_per_s": round(loaded_rate, 1),
               "loaded_vs_idle": round(loaded_rate / idle_rate, 3) if idle_rate else None,
               "idle_status": idle["status"], "loaded_status": loaded["status"], "kinds": {}}
    print(f"loaded job {loaded_id}: {loaded['status']}, {loaded_rate:.1f} tokens/s "
          f"({figures['loaded_vs_idle']} of idle) over {wall:.0f} s")
    print(f"{'kind':<10}{'requests':>10}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}")
    total_errors = 0
    for kind in KINDS:
        values = rec.latencies.get(kind, [])
        errors = rec.errors.get(kind, [])
        total_errors += len(errors)
        row = {"requests": len(values), "errors": len(errors), "p50_ms": round(percentile(values, 0.5) * 1000, 1),
               "p95_ms": round(percentile(values, 0.95) * 1000, 1), "first_errors": errors[:3]}
        figures["kinds"][kind] = row
        print(f"{kind:<10}{row['requests']:>10}{row['errors']:>8}{row['p50_ms']:>10}{row['p95_ms']:>10}")
        for error in errors[:3]:
            print(f"    {error}")
    figures["errors"] = total_errors
    print(f"errors: {total_errors}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    if total_errors or loaded["status"] != "succeeded" or idle["status"] != "succeeded":
        sys.exit(1)


if __name__ == "__main__":
    main()
