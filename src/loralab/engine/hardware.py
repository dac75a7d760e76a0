"""Device, precision and thread choices made from the hardware actually present."""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu", "cuda" or "mps"
    dtype: str  # "fp32", "bf16" or "fp16": the training compute precision
    threads: int


def physical_cores() -> int:
    """Cores available to this process (affinity-aware); hyper-threads don't speed up matmul."""
    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or 1
    except Exception:  # psutil missing or unsupported platform
        cores = os.cpu_count() or 1
    try:
        cores = min(cores, len(os.sched_getaffinity(0)))
    except AttributeError:
        pass
    return max(1, cores)


def choose_placement(device: str = "auto", precision: str = "auto") -> Placement:
    """Pick device and precision: bf16 (or fp16) on capable GPUs, fp32 on CPUs without native bf16."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'")
    if precision == "auto":
        if device == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            # Autocast to bf16/fp16 on a CPU without native support is emulated and many times slower.
            precision = "fp32"
    if device == "cpu" and precision != "fp32":
        raise ValueError(
            f"precision={precision!r} on the CPU would be emulated and very slow; use precision='fp32' or 'auto'"
        )
    threads = physical_cores() if device == "cpu" else torch.get_num_threads()
    return Placement(device, precision, threads)


def apply_threads(placement: Placement) -> None:
    import torch

    if placement.device == "cpu":
        torch.set_num_threads(placement.threads)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def available_memory_bytes(device: str = "cpu") -> int:
    import psutil

    if device == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return int(free)
    return int(psutil.virtual_memory().available)



def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`); False where there is no glibc.

    glibc keeps freed memory for reuse. Between training pieces of different sizes the kept holes do
    not fit the next piece's tensors, so resident memory grows past what is alive (~150 MB on SmolLM2
    at 512 tokens). Trimming before every piece costs ~10% of the speed (the pages fault in again);
    the engine trims only before a piece larger than any before it, where the peak is made.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


# jemalloc for engine processes: on SmolLM2 (LoRA, 512-token pieces) glibc's heap held 150-250 MB of
# freed memory at the peak that its next pieces could not reuse (peak RSS 1.60-1.67 GB); jemalloc's
# size classes and page decay gave 1.51-1.54 GB at the same speed (within this machine's noise).
JEMALLOC_CONF = "dirty_decay_ms:1000,muzzy_decay_ms:0"


def jemalloc_path() -> str | None:
    """The jemalloc shared library (Debian: libjemalloc2), or None."""
    import ctypes.util
    import glob

    for pattern in ("/usr/lib/*-linux-gnu/libjemalloc.so.2", "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2",
                    "/usr/local/lib/libjemalloc.so.2"):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    name = ctypes.util.find_library("jemalloc")
    return name or None


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment additions that start an engine process on jemalloc; {} when absent or not wanted.

    LORALAB_ALLOCATOR=system keeps the C library's malloc; =jemalloc requires jemalloc (an error when missing).
    """
    import sys

    environ = os.environ if environ is None else environ
    choice = environ.get("LORALAB_ALLOCATOR", "auto").strip().lower()
    if choice not in ("auto", "system", "jemalloc"):
        raise ValueError(f"LORALAB_ALLOCATOR must be auto, system or jemalloc, got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return {}
    path = jemalloc_path()
    if path is None:
        if choice == "jemalloc":
            raise ValueError("LORALAB_ALLOCATOR=jemalloc but libjemalloc.so.2 was not found "
                             "(Debian/Ubuntu: apt-get install libjemalloc2)")
        return {}
    preload = environ.get("LD_PRELOAD", "")
    if "jemalloc" in preload:
        return {}
    return {"LD_PRELOAD": f"{path} {preload}".strip(), "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}
