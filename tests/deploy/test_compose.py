"""compose.yaml: valid against the Compose Specification's JSON schema, and wired as docs/deploy.md says."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from loralab.settings import COMPOSE_VARIABLES, Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((Path(__file__).parent / "compose-spec.json").read_text(encoding="utf-8"))
VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
LORALAB_SERVICES = ("api", "worker", "worker-gpu")
ENV = {"LORALAB_API_TOKEN": "t" * 32, "LORALAB_POSTGRES_PASSWORD": "pw-123"}


def raw() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} in every string (what `docker compose config` does)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise LookupError(f"required variable {name} is missing a value: {arg}")
        return arg if op == ":-" else ""
    return VARIABLE.sub(one, value)


def rendered(env: dict[str, str] | None = None) -> dict:
    return interpolate(raw(), ENV if env is None else env)


def validate(document: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(document)


def test_schema_is_the_compose_specification():
    assert SCHEMA["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(SCHEMA)


def test_compose_file_is_valid_as_written_and_interpolated():
    validate(raw())
    validate(rendered())
    validate(rendered({**ENV, "LORALAB_PUBLISH_ADDRESS": "0.0.0.0", "LORALAB_GPU_COUNT": "2"}))


@pytest.mark.parametrize("mutate", [
    lambda d: d["services"]["api"].update(portz=["8000:8000"]),
    lambda d: d["services"]["worker"].update(restart=["always"]),
    lambda d: d["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0].pop("capabilities"),
], ids=["unknown-key", "wrong-type", "device-without-capabilities"])
def test_validation_catches_mistakes(mutate):
    document = copy.deepcopy(raw())
    mutate(document)
    with pytest.raises(jsonschema.ValidationError):
        validate(document)


def test_every_variable_is_documented_in_env_example():
    used = set(VARIABLE.findall((ROOT / "compose.yaml").read_text(encoding="utf-8")))
    names = {name for name, _, _ in used}
    documented = {name for name, _, _ in COMPOSE_VARIABLES} | {f"LORALAB_{n.upper()}" for n in Settings.model_fields}
    assert names <= documented, names - documented
    assert {name for name, _, _ in COMPOSE_VARIABLES} <= names, "a compose variable in settings.py is unused"
    defaults = {name: default for name, default, _ in COMPOSE_VARIABLES}
    for name, op, arg in used:
        if op == ":-":
            assert defaults[name] == arg, f"{name}: compose.yaml says {arg}, .env.example says {defaults[name]}"
        else:
            assert op == ":?" and defaults.get(name, "") == "", name


def test_secrets_are_required():
    for name in ("LORALAB_API_TOKEN", "LORALAB_POSTGRES_PASSWORD"):
        with pytest.raises(LookupError, match=name):
            rendered({key: value for key, value in ENV.items() if key != name})
    api = rendered()["services"]["api"]
    assert api["environment"]["LORALAB_API_TOKEN"] == ENV["LORALAB_API_TOKEN"]


def test_api_binds_all_interfaces_in_the_container_but_publishes_on_loopback():
    api = rendered()["services"]["api"]
    assert api["command"] == ["serve", "--host", "0.0.0.0", "--port", "8000", "--workers", "0"]
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    moved = rendered({**ENV, "LORALAB_PUBLISH_ADDRESS": "0.0.0.0", "LORALAB_PORT": "9000"})["services"]["api"]
    assert moved["ports"] == ["0.0.0.0:9000:8000"]
    assert "/api/health" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["db"]["condition"] == "service_healthy"


def test_services_share_home_and_database():
    document = rendered()
    url = f"postgresql://loralab:{ENV['LORALAB_POSTGRES_PASSWORD']}@db:5432/loralab"
    for name in LORALAB_SERVICES:
        service = document["services"][name]
        assert service["volumes"] == ["home:/data"], name
        assert service["environment"]["LORALAB_HOME"] == "/data", name
        assert service["environment"]["LORALAB_DATABASE_URL"] == url, name
        assert service["env_file"] == [{"path": ".env", "required": False}], name
    db = document["services"]["db"]
    assert db["environment"]["POSTGRES_PASSWORD"] == ENV["LORALAB_POSTGRES_PASSWORD"]
    assert db["volumes"] == ["db:/var/lib/postgresql/data"] and "pg_isready" in db["healthcheck"]["test"]
    assert set(document["volumes"]) == {"home", "db"}


def test_workers_scale_and_the_gpu_profile_reserves_nvidia_devices():
    services = rendered()["services"]
    for name in ("worker", "worker-gpu"):
        worker = services[name]
        assert worker["command"] == ["worker"] and "ports" not in worker and "container_name" not in worker
        assert worker["depends_on"]["api"]["condition"] == "service_healthy"
        assert worker["healthcheck"] == {"disable": True}
        grace = int(worker["stop_grace_period"].rstrip("s"))
        assert grace > Settings.model_fields["cancel_grace_seconds"].default + 5
    assert "profiles" not in services["worker"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["TORCH_FLAVOR"] == "cuda" and gpu["build"]["args"]["BASE_IMAGE"].startswith("nvidia/cuda:")
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    api = services["api"]
    assert int(api["stop_grace_period"].rstrip("s")) > Settings.model_fields["shutdown_timeout_seconds"].default
