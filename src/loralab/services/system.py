"""Host facts for the UI and support: CPUs, memory, disk, GPUs and library versions (torch imported lazily)."""
from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import Any

from loralab.services.context import Services


def system_info(svc: Services) -> dict[str, Any]:
    import psutil

    import loralab

    memory = psutil.virtual_memory()
    home = svc.settings.home
    disk = shutil.disk_usage(home if home.exists() else home.parent)
    info: dict[str, Any] = {
        "loralab": loralab.__version__, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "memory": {"total_bytes": memory.total, "available_bytes": memory.available},
        # The disk holding LORALAB_HOME; its absolute path is the server's business, not the client's.
        "disk": {"path": "LORALAB_HOME", "total_bytes": disk.total, "free_bytes": disk.free},
        "database": svc.db.engine.dialect.name,
    }
    info.update(_torch_info())
    info["serving"] = serving_info(svc)
    return info


def serving_info(svc: Services) -> dict[str, Any]:
    """How this server places models it serves: the settings, the rule's choice for this hardware (model size aside)
    or why it cannot honour them, and the placement of each model loaded now (paths relative to LORALAB_HOME)."""
    from loralab.engine.hardware import PlacementError, choose_inference_placement
    from loralab.engine.report import shown_path
    from loralab.services.inference import loaded_workers

    settings = svc.settings
    out: dict[str, Any] = {"device_setting": settings.inference_device,
                           "quantization_setting": settings.inference_quantization}
    try:
        chosen = choose_inference_placement(None, device=settings.inference_device,
                                            quantization=settings.inference_quantization)
        out.update(device=chosen.device, dtype=chosen.dtype, quantization=chosen.quantization, error=None)
    except PlacementError as exc:
        out.update(device=None, dtype=None, quantization=None, error=str(exc))
    out["loaded"] = [{"model": shown_path(worker.key, settings.home),
                      **(placement.describe() if (placement := getattr(worker, "placement", None)) else {})}
                     for worker in loaded_workers()]
    return out


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": None, "gpus": []}
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            free, total = torch.cuda.mem_get_info(index)
            gpus.append({"index": index, "name": props.name, "total_memory_bytes": total, "free_memory_bytes": free,
                         "capability": f"{props.major}.{props.minor}"})
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
            "gpus": gpus}
