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


@dataclass(frozen=True)
class Gpu:
    """One CUDA device as the placement rules see it (tests pass made-up inventories)."""

    index: int
    bf16: bool  # native bf16 (compute capability >= 8.0, or ROCm)
    free_bytes: int | None = None  # None: not measured (training's rule does not need it)
    total_bytes: int | None = None
    name: str = ""


def probe_gpus(memory: bool = True) -> list[Gpu]:
    """The CUDA devices of this machine; `memory=False` skips `mem_get_info`, which opens a context on every GPU."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free = total = None
        if memory:
            free, total = (int(x) for x in torch.cuda.mem_get_info(index))
        gpus.append(Gpu(index, bool(torch.version.hip) or props.major >= 8, free, total, props.name))
    return gpus


def mps_available() -> bool:
    import torch

    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def pick_device(device: str, gpus: list[Gpu], mps: bool) -> str:
    """'auto' -> CUDA when a GPU is present, else Apple's MPS, else the CPU; an absent device asked for is an error."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}")
    if device == "auto":
        return "cuda" if gpus else "mps" if mps else "cpu"
    if device == "cuda" and not gpus:
        raise ValueError("device='cuda' was asked for but no CUDA GPU is available; use device='auto' or 'cpu'")
    if device == "mps" and not mps:
        raise ValueError("device='mps' was asked for but Apple's MPS backend is not available; use 'auto' or 'cpu'")
    return device


def pick_precision(device: str, precision: str, gpus: list[Gpu]) -> str:
    """bf16 on GPUs that all support it natively, else fp16; fp32 elsewhere (bf16/fp16 on a CPU is refused)."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "auto":
        if device == "cuda":
            # Pre-Ampere GPUs (V100, T4) only emulate bf16, many times slower than their fp16.
            return "bf16" if gpus and all(g.bf16 for g in gpus) else "fp16"
        # Autocast to bf16/fp16 on a CPU without native support is emulated and many times slower.
        return "fp32"
    if device == "cpu" and precision != "fp32":
        raise ValueError(
            f"precision={precision!r} on the CPU would be emulated and very slow; use precision='fp32' or 'auto'"
        )
    return precision


def choose_placement(device: str = "auto", precision: str = "auto", gpus: list[Gpu] | None = None,
                     mps: bool | None = None) -> Placement:
    """Pick device and precision: bf16 (or fp16) on capable GPUs, fp32 on CPUs without native bf16."""
    import torch

    gpus = probe_gpus(memory=False) if gpus is None else gpus
    mps = mps_available() if mps is None else mps
    device = pick_device(device, gpus, mps)
    precision = pick_precision(device, precision, gpus)
    threads = physical_cores() if device == "cpu" else torch.get_num_threads()
    return Placement(device, precision, threads)


# ---- inference placement: serving, generate, evaluation ------------------------------------------------------

GiB = 1 << 30
# What a GPU keeps free beyond the weights: the CUDA context, the batching decoder's KV cache and activations.
INFERENCE_RESERVE_BYTES = 1 * GiB
INFERENCE_RESERVE_FRACTION = 0.10  # of the GPU's free memory, on top of the fixed reserve
# bitsandbytes NF4 with double quantisation: 4 bits a weight + ~0.13 bits of scales; embeddings, the LM head
# and norms stay in the compute dtype.
NF4_BYTES_PER_PARAM = 0.52


class PlacementError(ValueError):
    """A device, precision or quantisation this machine cannot honour for a model; the message says what to change."""


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts of a model, read from its safetensors headers or counted from its config."""

    params: int
    unquantized_params: int = 0  # embeddings, LM head, norms: bitsandbytes leaves them in the compute dtype

    def weights_bytes(self, dtype: str, quantization: str | None = None) -> int:
        width = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
        if quantization == "4bit":
            rest = min(self.unquantized_params, self.params)
            return int((self.params - rest) * NF4_BYTES_PER_PARAM + rest * width)
        return self.params * width


@dataclass(frozen=True)
class InferencePlacement:
    """Where and how a model is loaded to generate: device type, dtype, accelerate device map, quantisation, why."""

    device: str  # "cpu", "cuda" or "mps"
    dtype: str  # "fp32", "bf16" or "fp16" (the compute dtype when quantised)
    device_map: str | dict | None  # None: model.to(device); {"": i}: all on GPU i; "auto": layers spread over GPUs
    quantization: str | None  # None or "4bit" (bitsandbytes NF4)
    reason: str
    max_memory: dict | None = None  # per-GPU bound for device_map="auto" (leaves room for the KV cache)
    weights_bytes: int | None = None  # estimated weight memory in this placement (None: size unknown)

    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    def describe(self) -> dict:
        """JSON-ready facts for events, summaries and /api/system-info."""
        if isinstance(self.device_map, dict):
            gpus = sorted({v for v in self.device_map.values() if isinstance(v, int)})
        else:
            gpus = sorted(self.max_memory or {}) if self.device_map == "auto" else []
        return {"device": self.device, "dtype": self.dtype, "quantization": self.quantization,
                "device_map": "auto" if self.device_map == "auto" else None if self.device_map is None else "single",
                "gpus": gpus, "weights_bytes": self.weights_bytes, "reason": self.reason}


def _usable_bytes(gpu: Gpu) -> int:
    free = gpu.free_bytes if gpu.free_bytes is not None else (gpu.total_bytes or 0)
    return max(0, int(free - INFERENCE_RESERVE_BYTES - INFERENCE_RESERVE_FRACTION * free))


def _gib(n: int | float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_inference_placement(size: ModelSize | None, device: str = "auto", precision: str = "auto",
                               quantization: str | None = None, gpus: list[Gpu] | None = None,
                               mps: bool | None = None, bitsandbytes: bool | None = None,
                               cpu_available_bytes: int | None = None) -> InferencePlacement:
    """Where to load a model to generate with, by training's rule (CUDA in bf16 else fp16; else MPS; else CPU fp32).

    On CUDA the weights go whole onto the GPU with the most free memory when they fit it (after a reserve for the
    KV cache), else across GPUs with accelerate's device_map="auto". `quantization="4bit"` loads NF4 weights
    (bitsandbytes, as QLoRA training) and needs CUDA. A model that fits no GPU, nor all of them together, is refused
    with the sizes and what to change: there is no silent CPU fallback when GPUs are present (a 7B-32B model in fp32
    on a CPU fills the RAM of most servers and answers a token every few seconds); LORALAB_INFERENCE_DEVICE=cpu asks
    for the CPU explicitly. On the CPU a model larger than the available memory is refused too. `gpus`, `mps`,
    `bitsandbytes` and `cpu_available_bytes` are probed when None (tests pass made-up machines).
    """
    if quantization in ("none", ""):
        quantization = None
    if quantization not in (None, "4bit"):
        raise PlacementError(f"quantization must be none or 4bit, got {quantization!r}")
    gpus = probe_gpus(memory=True) if gpus is None else gpus
    mps = mps_available() if mps is None else mps
    try:
        kind = pick_device(device, gpus, mps)
        dtype = pick_precision(kind, precision, gpus)
    except ValueError as exc:
        raise PlacementError(str(exc)) from None
    if quantization == "4bit":
        if kind != "cuda":
            raise PlacementError(
                "4-bit loading needs a CUDA GPU (bitsandbytes' NF4 kernels)"
                + (f"; device={device!r} was asked for" if device != "auto" else "; this machine has none")
                + ": turn 4-bit off (LORALAB_INFERENCE_QUANTIZATION=none, or drop --load-in-4bit)")
        if bitsandbytes is None:
            import importlib.util

            bitsandbytes = importlib.util.find_spec("bitsandbytes") is not None
        if not bitsandbytes:
            raise PlacementError("4-bit loading needs the bitsandbytes package: pip install bitsandbytes")
        if dtype == "fp32":
            dtype = "bf16" if all(g.bf16 for g in gpus) else "fp16"  # NF4 computes in a 16-bit dtype
    weights = size.weights_bytes(dtype, quantization) if size is not None else None
    label = f"{dtype}" + (" 4-bit NF4" if quantization else "")

    if kind != "cuda":
        if kind == "cpu" and weights is not None:
            if cpu_available_bytes is None:
                cpu_available_bytes = available_memory_bytes("cpu")
            if weights > cpu_available_bytes:
                raise PlacementError(
                    f"the model needs about {_gib(weights)} in {dtype} on the CPU and {_gib(cpu_available_bytes)} of "
                    "memory is available: use a smaller model" + (", or a GPU server" if not gpus else
                                                                  ", or serve it on the GPUs (device auto or cuda)"))
        why = "no CUDA GPU" if not gpus and device == "auto" else f"device={device!r}"
        return InferencePlacement(kind, dtype, None, None, f"{kind} {dtype} ({why})", None, weights)

    if weights is None:  # size unknown: the whole model on the GPU with the most free memory
        best = max(gpus, key=lambda g: (g.free_bytes or 0, -g.index))
        return InferencePlacement("cuda", dtype, {"": best.index}, quantization,
                                  f"cuda:{best.index} {label} (model size unknown)", None, None)
    usable = {g.index: _usable_bytes(g) for g in gpus}
    best = max(gpus, key=lambda g: (usable[g.index], -g.index))
    if weights <= usable[best.index]:
        return InferencePlacement("cuda", dtype, {"": best.index}, quantization,
                                  f"cuda:{best.index} {label}: {_gib(weights)} of weights fit its "
                                  f"{_gib(usable[best.index])} usable", None, weights)
    total = sum(usable.values())
    if len(gpus) > 1 and weights <= total:
        spread = {i: b for i, b in usable.items() if b > 0}
        return InferencePlacement("cuda", dtype, "auto", quantization,
                                  f"{len(spread)} GPUs {label} (device_map auto): {_gib(weights)} of weights exceed "
                                  f"one GPU's {_gib(usable[best.index])} usable", spread, weights)
    fix = []
    if quantization is None and size is not None:
        small = size.weights_bytes("bf16" if all(g.bf16 for g in gpus) else "fp16", "4bit")
        if small <= total:
            fix.append(f"load it in 4-bit (LORALAB_INFERENCE_QUANTIZATION=4bit or --load-in-4bit: about {_gib(small)})")
    fix += ["use a smaller model or more GPUs",
            "or run it on the CPU (LORALAB_INFERENCE_DEVICE=cpu or --device cpu; slow)"]
    raise PlacementError(
        f"the model needs about {_gib(weights)} in {label} but the {len(gpus)} GPU(s) have {_gib(total)} usable "
        f"(free memory minus a reserve for the KV cache): " + ", ".join(fix))


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
