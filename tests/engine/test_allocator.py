"""Engine processes start on jemalloc when it is installed; the setting is checked; glibc's heap can be trimmed."""
from __future__ import annotations

import subprocess
import sys

import pytest

from loralab.engine import hardware
from loralab.engine.hardware import allocator_env, release_free_heap
from loralab.runner.supervisor import engine_env

needs_jemalloc = pytest.mark.skipif(not sys.platform.startswith("linux") or hardware.jemalloc_path() is None,
                                    reason="libjemalloc2 not installed (make browser installs it)")


def test_system_allocator_and_bad_setting():
    assert allocator_env({"LORALAB_ALLOCATOR": "system"}) == {}
    with pytest.raises(ValueError, match="LORALAB_ALLOCATOR must be auto, system or jemalloc"):
        allocator_env({"LORALAB_ALLOCATOR": "tcmalloc"})


def test_jemalloc_asked_for_but_missing_says_how_to_install(monkeypatch):
    monkeypatch.setattr(hardware, "jemalloc_path", lambda: None)
    monkeypatch.setattr(sys, "platform", "linux")
    assert allocator_env({}) == {}  # auto: the system allocator, silently
    with pytest.raises(ValueError, match="apt-get install libjemalloc2"):
        allocator_env({"LORALAB_ALLOCATOR": "jemalloc"})


@needs_jemalloc
def test_engine_process_runs_torch_on_jemalloc(monkeypatch):
    monkeypatch.delenv("LORALAB_ALLOCATOR", raising=False)
    monkeypatch.setenv("LD_PRELOAD", "")
    env = engine_env()
    assert "jemalloc" in env["LD_PRELOAD"] and env["MALLOC_CONF"] == hardware.JEMALLOC_CONF
    assert allocator_env({"LD_PRELOAD": env["LD_PRELOAD"]}) == {}  # never preloaded twice
    code = ("import torch\n"
            "x = torch.randn(64, 64, requires_grad=True)\n"
            "(x @ x).sum().backward()\n"
            "maps = open('/proc/self/maps').read()\n"
            "print('jemalloc' in maps, float(x.grad.abs().sum()) > 0)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
    monkeypatch.setenv("LORALAB_ALLOCATOR", "system")
    assert "jemalloc" not in engine_env().get("LD_PRELOAD", "")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_release_free_heap_on_glibc():
    assert release_free_heap() is True
