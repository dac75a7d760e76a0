"""A real `loralab serve` (uvicorn in a subprocess) for tests that need a live server: security, deployment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

SAMPLES = Path(__file__).resolve().parents[2] / "src" / "loralab" / "data" / "samples"
TOKEN = "test-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    """A running `loralab serve`: its base URL, home directory, process and log file."""

    url: str
    port: int
    home: Path
    process: subprocess.Popen
    log: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30), **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(home: Path, env: dict[str, str] | None = None, args: list[str] | None = None,
                 wait_seconds: float = 90) -> LiveServer:
    """Start `loralab serve` on a free loopback port and wait until /api/health answers."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORALAB_")}
    full_env.update({"LORALAB_HOME": str(home), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    log = home / f"server-{port}.log"
    home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-c", "from loralab.cli import app; app()", "serve", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "0", *(args or [])]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    server = LiveServer(f"http://127.0.0.1:{port}", port, home, process, log, full_env)
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.output()[-4000:]}")
        try:
            if httpx.get(f"{server.url}/api/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(server)
    raise RuntimeError(f"server did not answer within {wait_seconds} s:\n{server.output()[-4000:]}")


def stop_server(server: LiveServer) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
