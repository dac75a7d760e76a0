"""Serving throughput: generated tokens/s of the OpenAI-compatible API for 1 client and for N concurrent clients.

Run from the project root:  python benchmarks/serve.py [--clients 8 --requests 3 --max-tokens 64 --json out.json]
Starts `loralab serve`'s app (uvicorn, own process, 127.0.0.1, ephemeral port, throw-away LORALAB_HOME), warms it
up, then times greedy chat completions from 1 client and from N client threads; prints both and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
TARGET_RATIO = 3.0
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a rainbow forms, step by step.",
    "Describe a walk through a forest in autumn.",
    "List ten tips for learning a new language, with a sentence on each.",
    "Explain what LoRA fine-tuning is to a beginner.",
    "Write a letter to a friend about your summer holiday.",
    "Describe how bread is made, from flour to loaf.",
    "Tell me about the history of the bicycle.",
]


def _load() -> float:
    return os.getloadavg()[0]


def _home(tmp: Path) -> Path:
    """A fresh LORALAB_HOME whose models/ links an already converted embedded model when one exists."""
    home = tmp / "home"
    (home / "models").mkdir(parents=True)
    for root in (Path(os.environ.get("LORALAB_TEST_MODELS", Path.home() / ".cache" / "loralab-test-models")),
                 Path.home() / ".loralab" / "models"):
        if (root / MODEL / "config.json").is_file():
            (home / "models" / MODEL).symlink_to(root / MODEL, target_is_directory=True)
            break
    return home


def start_server(home: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    """uvicorn on 127.0.0.1:0 in a child process; returns it and its /v1 base URL."""
    env = {**os.environ, "LORALAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    env.pop("LORALAB_API_TOKEN", None)
    env.pop("LORALAB_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "loralab.api.app:create_app", "--host", "127.0.0.1",
         "--port", "0", "--log-level", "info", "--no-access-log"],
        env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: list[str] = []

    def read():
        for line in proc.stderr:
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line, re.IGNORECASE)
            if match and not found:
                found.append(match.group(1))
            elif "error" in line.lower():
                sys.stderr.write(line)

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 60
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        time.sleep(0.05)
    return proc, found[0] + "/v1"


def ask(client: httpx.Client, url: str, prompt: str, max_tokens: int) -> int:
    """One greedy chat completion; returns the completion tokens the server reports."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0}
    response = client.post(f"{url}/chat/completions", json=body, timeout=600)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"]


def run_clients(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads each sending `requests` completions back to back; aggregate generated tokens/s."""
    tokens = [0] * clients
    latencies: list[float] = []
    barrier = threading.Barrier(clients)
    errors: list[BaseException] = []

    def work(i: int):
        with httpx.Client() as client:
            barrier.wait()
            try:
                for r in range(requests):
                    started = time.perf_counter()
                    tokens[i] += ask(client, url, PROMPTS[(i + r) % len(PROMPTS)], max_tokens)
                    latencies.append(time.perf_counter() - started)
            except BaseException as exc:  # reported after the run
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise SystemExit(f"requests failed: {errors[0]!r}")
    return {"clients": clients, "requests": clients * requests, "tokens": sum(tokens), "seconds": round(wall, 3),
            "tokens_per_s": round(sum(tokens) / wall, 2),
            "mean_latency_s": round(sum(latencies) / len(latencies), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the second measurement")
    parser.add_argument("--requests", type=int, default=3, help="requests each client sends, back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="measure even when the load average is above 2")
    args = parser.parse_args()

    load_before = _load()
    if load_before > 2 and not args.force:
        raise SystemExit(f"load average {load_before:.2f} > 2: figures would be noise (use --force to run anyway)")
    tmp = Path(tempfile.mkdtemp(prefix="loralab-serve-bench-"))
    proc, url = start_server(_home(tmp), args.threads)
    try:
        with httpx.Client() as client:
            t0 = time.perf_counter()
            ask(client, url, "Hello!", 4)  # loads (and if needed converts) the model
            load_seconds = time.perf_counter() - t0
        run_clients(url, args.clients, 1, 8)  # warm-up of batched shapes
        single = run_clients(url, 1, args.requests, args.max_tokens)
        multi = run_clients(url, args.clients, args.requests, args.max_tokens)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = multi["tokens_per_s"] / single["tokens_per_s"]
    result = {"model": MODEL, "max_tokens": args.max_tokens, "first_request_s": round(load_seconds, 2),
              "single": single, "concurrent": multi, "ratio": round(ratio, 2), "target_ratio": TARGET_RATIO,
              "threads": args.threads, "load_before": round(load_before, 2), "load_after": round(_load(), 2), "cpus": os.cpu_count()}
    print(f"model {MODEL}, max_tokens {args.max_tokens}, greedy, server threads {args.threads or 'default'}; "
          f"load {load_before:.2f} -> {_load():.2f} on {os.cpu_count()} CPUs")
    for label, row in (("1 client", single), (f"{args.clients} clients", multi)):
        print(f"{label:>11}: {row['tokens_per_s']:8.1f} tokens/s  ({row['tokens']} tokens, {row['requests']} "
              f"requests, {row['seconds']:.1f} s, mean latency {row['mean_latency_s']:.2f} s)")
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"      ratio: {ratio:.2f}x ({verdict} the >= {TARGET_RATIO:.0f}x target)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
