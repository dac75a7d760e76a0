"""An engine whose worker dies must not train on as an orphan: it gets SIGTERM (checkpoint, exit 3)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

CHILD = """
import signal, sys, time
from pathlib import Path
from loralab.engine.distributed import die_with_parent
out = Path(sys.argv[1])
signal.signal(signal.SIGTERM, lambda *_: (out.write_text("sigterm"), sys.exit(3)))
die_with_parent(signal.SIGTERM)
out.write_text("ready")
time.sleep(60)
"""
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]])
print(child.pid, flush=True)
time.sleep(60)
"""


def test_engine_gets_sigterm_when_its_worker_is_killed(tmp_path: Path):
    marker = tmp_path / "child.txt"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 60
    while (marker.read_text() if marker.exists() else "") != "ready":
        assert time.monotonic() < deadline, "child never started"
        time.sleep(0.05)
    parent.kill()  # the worker dies without a word (SIGKILL, OOM killer)
    parent.wait()
    while marker.read_text() != "sigterm":
        assert time.monotonic() < deadline, "the orphaned child never got SIGTERM"
        time.sleep(0.05)
    for _ in range(200):  # the child exits by itself (its handler exits 3)
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child did not exit after SIGTERM")


def test_engine_entry_point_asks_for_sigterm_on_parent_death(monkeypatch, tmp_path: Path):
    from loralab.engine import distributed, run

    asked = []
    monkeypatch.setattr(distributed, "die_with_parent", lambda sig=None: asked.append(sig))
    monkeypatch.setattr(run, "execute", lambda *a, **k: 0)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert run.main([str(tmp_path)]) == 0
    assert asked == [signal.SIGTERM]
