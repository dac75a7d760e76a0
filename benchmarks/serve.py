"""Serving throughput: generated tokens/s of the OpenAI-compatible API for 1 client and for N concurrent clients.

Run from the project root:  python benchmarks/serve.py [--runtime generate,transformers,llamacpp --clients 8
                                                        --requests 3 --max-tokens 64 --json out.json]
`generate` is Hugging Face `model.generate` (fp32, batch 1, greedy) in this process: the reference. `transformers`
and `llamacpp` start `loralab serve`'s app (uvicorn, own process, 127.0.0.1, ephemeral port, throw-away
LORALAB_HOME) with LORALAB_SERVING_RUNTIME set to that runtime, warm it up, then time greedy chat completions from
1 client and from N client threads. All runtimes run in one invocation, on the same prompts, and the ratios are
printed: llama.cpp single stream / generate, and each runtime's N-client aggregate / its own single stream.
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
TARGET_RATIO = 3.0  # N clients' aggregate / one client, for the best runtime
TARGET_LLAMACPP = 4.0  # llama.cpp single stream / HF generate (fp32, batch 1)
RUNTIMES = ("generate", "transformers", "llamacpp")
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


def start_server(home: Path, threads: int | None, runtime: str = "transformers") -> tuple[subprocess.Popen, str]:
    """uvicorn on 127.0.0.1:0 in a child process serving with `runtime`; returns it and its /v1 base URL."""
    env = {**os.environ, "LORALAB_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"),
           "LORALAB_SERVING_RUNTIME": runtime}
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


def measure_generate(home: Path, requests: int, max_tokens: int, threads: int | None) -> dict:
    """HF `model.generate`, fp32, batch 1, greedy, on the first prompts (loading excluded): the reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    path = home / "models" / MODEL
    if not (path / "config.json").is_file():
        from loralab.engine.models import resolve_base_model

        os.environ["LORALAB_HOME"] = str(home)
        path = Path(resolve_base_model(MODEL).path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens, seconds = 0, 0.0
    for r in range(requests + 1):  # the first run warms up
        ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[r % len(PROMPTS)]}],
                                            add_generation_prompt=True, return_tensors="pt", return_dict=True)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
        if r:
            seconds += time.perf_counter() - started
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    del model
    return {"clients": 1, "requests": requests, "tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 2), "mean_latency_s": round(seconds / requests, 3)}


def measure_server(home: Path, runtime: str, args) -> dict:
    """One server with `runtime`: first request (load/build), warm-up, 1 client, then N clients."""
    proc, url = start_server(home, args.threads, runtime)
    try:
        with httpx.Client() as client:
            t0 = time.perf_counter()
            ask(client, url, "Hello!", 4)  # loads (and if needed converts or writes the GGUF of) the model
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
    return {"first_request_s": round(load_seconds, 2), "single": single, "concurrent": multi,
            "ratio": round(multi["tokens_per_s"] / single["tokens_per_s"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default=",".join(RUNTIMES),
                        help=f"comma-separated runtimes to measure, of {', '.join(RUNTIMES)} (default: all)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients in the second measurement")
    parser.add_argument("--requests", type=int, default=3, help="requests each client sends, back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--threads", type=int, help="torch threads in the server (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="measure even when the load average is above 2")
    args = parser.parse_args()
    runtimes = [r.strip() for r in args.runtime.split(",") if r.strip()]
    if not runtimes or set(runtimes) - set(RUNTIMES):
        raise SystemExit(f"--runtime takes a comma-separated list of {', '.join(RUNTIMES)}")

    load_before = _load()
    if load_before > 2 and not args.force:
        raise SystemExit(f"load average {load_before:.2f} > 2: figures would be noise (use --force to run anyway)")
    tmp = Path(tempfile.mkdtemp(prefix="loralab-serve-bench-"))
    figures: dict[str, dict] = {}
    try:
        home = _home(tmp)
        for runtime in runtimes:
            if runtime == "generate":
                figures[runtime] = {"single": measure_generate(home, args.requests, args.max_tokens, args.threads)}
            else:
                figures[runtime] = measure_server(home, runtime, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = _load()
    print(f"model {MODEL}, max_tokens {args.max_tokens}, greedy, threads {args.threads or 'default'}; "
          f"load {load_before:.2f} -> {load_after:.2f} on {os.cpu_count()} CPUs")
    for runtime, row in figures.items():
        rows = [("1 client", row["single"])] + ([(f"{args.clients} clients", row["concurrent"])]
                                                 if "concurrent" in row else [])
        for label, one in rows:
            print(f"{runtime:>12} {label:>11}: {one['tokens_per_s']:8.1f} tokens/s  ({one['tokens']} tokens, "
                  f"{one['requests']} requests, {one['seconds']:.1f} s, mean latency {one['mean_latency_s']:.2f} s)")
    result = {"model": MODEL, "max_tokens": args.max_tokens, "clients": args.clients, "runtimes": figures,
              "threads": args.threads, "load_before": round(load_before, 2), "load_after": round(load_after, 2),
              "cpus": os.cpu_count()}
    for runtime, row in figures.items():
        if "ratio" in row:
            print(f"{runtime:>12} {args.clients} clients / 1 client: {row['ratio']:.2f}x")
    if "llamacpp" in figures and "generate" in figures:
        speedup = figures["llamacpp"]["single"]["tokens_per_s"] / figures["generate"]["single"]["tokens_per_s"]
        result["llamacpp_vs_generate"] = round(speedup, 2)
        verdict = "meets" if speedup >= TARGET_LLAMACPP else "misses"
        print(f"llama.cpp 1 client / HF generate fp32 batch 1: {speedup:.2f}x ({verdict} the >= "
              f"{TARGET_LLAMACPP:.0f}x target)")
    served = {k: v for k, v in figures.items() if "concurrent" in v}
    if served:
        best = max(served, key=lambda k: served[k]["concurrent"]["tokens_per_s"])
        ratio = served[best]["ratio"]
        verdict = "meets" if ratio >= TARGET_RATIO else "misses"
        result["best"] = best
        print(f"best at {args.clients} clients: {best}, {ratio:.2f}x its own single stream ({verdict} the >= "
              f"{TARGET_RATIO:.0f}x target)")
        if "transformers" in served and best != "transformers":
            versus = served[best]["concurrent"]["tokens_per_s"] / served["transformers"]["concurrent"]["tokens_per_s"]
            result["best_vs_transformers_concurrent"] = round(versus, 2)
            print(f"best at {args.clients} clients / the transformers batcher at {args.clients} clients: {versus:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
