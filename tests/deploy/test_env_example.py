"""`.env.example` is generated from the settings: the committed file must equal the generated text."""
from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from loralab.cli import app
from loralab.settings import COMPOSE_VARIABLES, Settings, env_example

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^(# )?(LORALAB_[A-Z0-9_]+)=(.*)$")


def test_committed_env_example_is_generated():
    committed = (ROOT / ".env.example").read_text(encoding="utf-8")
    assert committed == env_example(), (
        ".env.example is out of date: run `loralab config env-example > .env.example` and commit it")


def test_cli_prints_the_same_text():
    result = CliRunner().invoke(app, ["config", "env-example"])
    assert result.exit_code == 0, result.output
    assert result.output == env_example()


def test_every_setting_and_compose_variable_once_with_its_default():
    found = {}
    for line in env_example().splitlines():
        match = LINE.match(line)
        if match:
            assert match.group(2) not in found, f"{match.group(2)} listed twice"
            found[match.group(2)] = (match.group(1) is None, match.group(3))
    expected = {f"LORALAB_{name.upper()}" for name in Settings.model_fields} | {n for n, _, _ in COMPOSE_VARIABLES}
    assert set(found) == expected
    # Only what compose.yaml requires is left uncommented (and empty, so an unedited copy fails loudly).
    required = {name for name, (active, _) in found.items() if active}
    assert required == {"LORALAB_API_TOKEN", "LORALAB_POSTGRES_PASSWORD"}
    assert all(found[name][1] == "" for name in required)
    assert found["LORALAB_MAX_UPLOAD_BYTES"] == (False, str(100 * 1024 * 1024))
    assert found["LORALAB_HUB_ACCESS"] == (False, "false")
    assert found["LORALAB_HOME"] == (False, "~/.loralab")
    assert found["LORALAB_ALLOWED_HOSTS"] == (False, "")


def test_each_entry_has_its_description():
    text = env_example()
    for name, field in Settings.model_fields.items():
        first_words = " ".join((field.description or "").split()[:4])
        block = text.split(f"LORALAB_{name.upper()}=")[0].rsplit("\n\n", 1)[-1]
        assert first_words and first_words in " ".join(block.replace("#", " ").split()), name


def test_defaults_shown_are_what_settings_read(monkeypatch, tmp_path):
    """Uncommenting a default line changes nothing: each value parses back to the setting's own default."""
    for key in [k for k in __import__("os").environ if k.startswith("LORALAB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    defaults = Settings()
    for line in env_example().splitlines():
        match = LINE.match(line)
        name = match and match.group(2)
        if not match or not match.group(1) or not match.group(3) or name[len("LORALAB_"):].lower() not in Settings.model_fields:
            continue
        monkeypatch.setenv(name, match.group(3).replace("~", str(tmp_path), 1))
        field = name[len("LORALAB_"):].lower()
        assert getattr(Settings(), field) == getattr(defaults, field), name
        monkeypatch.delenv(name)


def test_text_does_not_depend_on_the_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert env_example() == (ROOT / ".env.example").read_text(encoding="utf-8")
