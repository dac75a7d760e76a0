"""llama.cpp as a CPU serving runtime: GGUF files built once, and llama.cpp's own server in a child process.

The server is llama.cpp's C++ server (continuous batching over `--parallel` slots) shipped prebuilt by the PyPI
package `xllamacpp`. It runs in a child process (`python -m loralab.engine.llamacpp`), so a crash in native code
or its signal handlers never reach the API process; it listens on 127.0.0.1 on a port the OS picks and answers only
requests carrying a random key that the parent hands it on stdin. When the parent goes away its stdin closes and
the child exits.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PACKAGE = "xllamacpp"
QUANTIZATIONS = ("f16", "q8_0")  # what export_gguf writes; both load in llama.cpp
START_TIMEOUT_S = 120.0
LOG_TAIL_BYTES = 4000
log = logging.getLogger(__name__)


class LlamaCppError(RuntimeError):
    """The llama.cpp runtime cannot serve this model (not installed, unsupported, failed to start)."""


def available() -> bool:
    """Whether the llama.cpp runtime is installed (`pip install 'loralab[llamacpp]'`)."""
    return importlib.util.find_spec(PACKAGE) is not None


def model_type(model_dir: str | os.PathLike[str]) -> str | None:
    """The transformers `model_type` of a model directory, read from config.json without loading anything."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def supports(model_dir: str | os.PathLike[str]) -> bool:
    """Whether loralab can write this model as a GGUF that llama.cpp runs (the GGUF writer's architectures)."""
    from loralab.engine.export_gguf import SUPPORTED_ARCHITECTURES

    return model_type(model_dir) in SUPPORTED_ARCHITECTURES


# ---- GGUF cache ------------------------------------------------------------------------------------------------

def build_gguf(source: str | os.PathLike[str], target: str | os.PathLike[str], quantization: str = "q8_0",
               base_model: str | None = None) -> Path:
    """Write `target` (a .gguf) from a model directory or a LoRA adapter merged into `base_model`, once.

    Concurrent callers (threads or processes) wait on a lock file and find it built; the file appears by rename,
    so a half-written GGUF is never loaded.
    """
    from loralab.engine.export import export_model

    if quantization not in QUANTIZATIONS:
        raise LlamaCppError(f"llama.cpp serving quantization must be one of {', '.join(QUANTIZATIONS)}, "
                            f"got {quantization!r}")
    target = Path(target)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(target.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            result = export_model(source, "gguf", staging / "out", quantization=quantization, base_model=base_model,
                                  name=target.stem)
            os.replace(result.gguf_file, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


# ---- the server child --------------------------------------------------------------------------------------------

class LlamaServer:
    """One llama.cpp server child serving one GGUF file; `url` and `key` reach it, `close()` stops it."""

    def __init__(self, gguf: str | os.PathLike[str], *, context: int, parallel: int, threads: int = 0,
                 env: dict[str, str] | None = None, log_file: str | os.PathLike[str] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S):
        self.gguf, self.context, self.parallel = Path(gguf), context, parallel
        self.key = secrets.token_urlsafe(32)
        self.log_file = Path(log_file) if log_file else self.gguf.with_suffix(".log")
        command = [sys.executable, "-m", "loralab.engine.llamacpp", "--model", str(self.gguf),
                   "--context", str(context), "--parallel", str(parallel), "--threads", str(threads)]
        with open(self.log_file, "wb") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                            env=env, start_new_session=True)
        try:
            self.url = self._handshake(start_timeout_s)
        except BaseException:
            self.close()
            raise

    def _handshake(self, timeout_s: float) -> str:
        """Send the key, read the address line; the child answers once the model is loaded and listening."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write((self.key + "\n").encode())
        self.process.stdin.flush()
        found: list[str] = []
        reader = threading.Thread(target=lambda: found.append(self.process.stdout.readline().decode()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        line = found[0].strip() if found else ""
        if not line:
            detail = "did not start in time" if reader.is_alive() else f"exited with code {self.process.poll()}"
            log.error("llama.cpp server for %s %s; its log ends with:\n%s", self.gguf.name, detail, self.log_tail())
            raise LlamaCppError(f"llama.cpp could not load {self.gguf.name}: the server {detail}")
        message = json.loads(line)
        if "error" in message:
            raise LlamaCppError(f"llama.cpp could not load {self.gguf.name}: {message['error']}")
        return message["url"]

    def log_tail(self) -> str:
        try:
            with open(self.log_file, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")[-LOG_TAIL_BYTES:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def close(self, timeout_s: float = 10.0) -> None:
        """Close the child's stdin (it exits), then terminate or kill it if it lingers."""
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        for action in (None, self.process.terminate, self.process.kill):
            if action is not None and self.process.poll() is None:
                with contextlib.suppress(OSError):
                    action()
            try:
                self.process.wait(timeout_s)
                break
            except subprocess.TimeoutExpired:
                continue
        if self.process.stdout is not None:
            self.process.stdout.close()


def request_body(prompt_ids: list[int], *, max_tokens: int, temperature: float, top_p: float, seed: int | None,
                 stop: tuple[str, ...] | list[str], repetition_penalty: float, frequency_penalty: float = 0.0,
                 presence_penalty: float = 0.0, penalty_tokens: int = 0, stream: bool = True) -> dict[str, Any]:
    """llama.cpp `/completion` settings that decode the way loralab's own sampler does.

    Temperature is applied before top-p (HF order; llama.cpp's default chain is the other way round), and
    llama.cpp's extra defaults (top-k 40, min-p 0.05, repeat window 64) are switched off. The prompt is token ids
    from loralab's tokenizer and chat template, so both runtimes see exactly the same input.
    """
    return {
        "prompt": list(prompt_ids), "n_predict": max_tokens, "stream": stream, "cache_prompt": True,
        "temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0, "typical_p": 1.0,
        "samplers": ["penalties", "temperature", "top_p"],
        "repeat_penalty": repetition_penalty, "repeat_last_n": penalty_tokens,
        "frequency_penalty": frequency_penalty, "presence_penalty": presence_penalty,
        "seed": seed if seed is not None else secrets.randbits(32), "stop": list(stop),
        "return_tokens": False, "n_probs": 0,
    }


def iter_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream (`data: {...}` lines)."""
    for line in lines:
        if line.startswith("data: "):
            payload = line[6:].strip()
            if payload and payload != "[DONE]":
                yield json.loads(payload)


# ---- child process entry ------------------------------------------------------------------------------------

def _serve(args: argparse.Namespace) -> int:
    key = sys.stdin.readline().strip()
    if not key:
        return 2
    out = sys.stdout
    try:
        import xllamacpp
    except ImportError:
        out.write(json.dumps({"error": "the llama.cpp runtime is not installed: pip install 'loralab[llamacpp]'"})
                  + "\n")
        out.flush()
        return 1
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.n_ctx = args.context
    params.n_parallel = args.parallel
    params.kv_unified = True  # slots share the whole context: one long request may use all of it
    params.cont_batching = True
    params.hostnames = ["127.0.0.1"]
    params.port = 0  # the OS picks a free port; the address goes back to the parent
    params.api_keys = [key]
    params.ui = False
    params.endpoint_slots = False
    params.endpoint_metrics = False
    params.n_predict = -1
    params.verbosity = 1
    if args.threads > 0:
        params.cpuparams.n_threads = args.threads
        params.cpuparams_batch.n_threads = args.threads
    started = time.monotonic()
    try:
        server = xllamacpp.Server(params)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        out.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        out.flush()
        return 1
    out.write(json.dumps({"url": server.listening_address, "load_s": round(time.monotonic() - started, 3)}) + "\n")
    out.flush()
    with contextlib.suppress(KeyboardInterrupt):
        while sys.stdin.buffer.read(1):  # EOF: the parent closed our stdin or went away
            pass
    del server
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one GGUF file with llama.cpp (started by loralab).")
    parser.add_argument("--model", required=True)
    parser.add_argument("--context", type=int, required=True)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    return _serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
