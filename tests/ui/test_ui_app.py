"""UI without a browser: translations complete, language choice, and the mount leaving /api and /docs alone."""
from __future__ import annotations

import re

import pytest

pytest.importorskip("gradio")


def test_every_string_has_english_and_japanese():
    from loralab.ui.i18n import STRINGS

    for key, (en, ja) in STRINGS.items():
        if key.startswith("i."):  # English tooltips come from spec.py descriptions
            assert ja, key
            continue
        assert en and ja, key
        assert set(re.findall(r"{(\w+)", en)) == set(re.findall(r"{(\w+)", ja)), key


def test_japanese_strings_are_japanese():
    from loralab.ui.i18n import STRINGS

    same = {key for key, (en, ja) in STRINGS.items() if en == ja}
    # names that stay as they are in Japanese UIs
    assert same <= {"col.id", "col.row", "dash.gpu", "tr.lora", "f.top_p"}, same


def test_tooltips_follow_spec_descriptions():
    from loralab.spec import LoraSpec, TrainSpec
    from loralab.ui.i18n import field_info

    info = field_info(TrainSpec, "learning_rate")
    assert info("en") == TrainSpec.model_fields["learning_rate"].description
    assert "学習率" in info("ja")
    assert field_info(LoraSpec, "r")("en") == LoraSpec.model_fields["r"].description


@pytest.mark.parametrize(("header", "lang"), [
    ("ja-JP,ja;q=0.9,en-US;q=0.8", "ja"),
    ("en-US,en;q=0.9,ja;q=0.8", "en"),
    ("fr-FR,ja;q=0.5,en;q=0.4", "ja"),
    ("de-DE", "en"),
    ("", "en"),
    (None, "en"),
])
def test_pick_language(header, lang):
    from loralab.ui.i18n import pick_language

    assert pick_language(header) == lang


def test_formatting():
    from loralab.ui.i18n import format_bytes, format_count, format_seconds

    assert format_bytes(1536) == "1.5 KiB"
    assert format_count(134_515_008) == "134.5M"
    assert format_seconds(3725, "en") == "1h 02m"
    assert format_seconds(190, "ja") == "3分10秒"


@pytest.mark.timeout(300)
def test_mount_serves_ui_and_keeps_api(loralab_home):
    from fastapi.testclient import TestClient
    from starlette.routing import Mount

    from loralab.api.app import create_app
    from loralab.settings import get_settings
    from loralab.ui import mount_ui

    app = create_app(get_settings())
    if not any(isinstance(r, Mount) and r.path in ("", "/") for r in app.routes):
        mount_ui(app, app.state.services)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text
        assert client.get("/docs").status_code == 200
        assert client.get("/openapi.json").json()["info"]["title"] == "loralab"
        assert client.get("/api/datasets").status_code == 200
        config = client.get("/config").text
        assert "fonts.googleapis" not in config and "GoogleFont" not in config


@pytest.mark.timeout(300)
def test_ui_asks_for_the_api_token_when_one_is_configured(loralab_home, monkeypatch):
    """The token is the UI password; the session cookie is never SameSite=None; a session lapses."""
    from fastapi.testclient import TestClient

    from loralab.api.app import create_app
    from loralab.settings import get_settings
    from loralab.ui.app import gradio_app_of

    token = "s3cret-ui-token-0123456789"
    monkeypatch.setenv("LORALAB_API_TOKEN", token)
    monkeypatch.setenv("LORALAB_UI_SESSION_SECONDS", "3600")
    app = create_app(get_settings())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        assert client.get("/config").status_code == 401
        assert client.post("/login/", data={"username": "me", "password": "wrong"}).status_code >= 400
        login = client.post("/login/", data={"username": "me", "password": token})
        assert login.status_code == 200
        cookies = login.headers.get_list("set-cookie")
        assert cookies and all("samesite=lax" in c.lower() and "httponly" in c.lower() for c in cookies)
        assert not any("samesite=none" in c.lower() for c in cookies)
        assert client.get("/config").status_code == 200  # logged in
        sessions = gradio_app_of(app).tokens
        assert sessions.seconds == 3600 and len(sessions) == 1
        now = sessions.clock()
        sessions.clock = lambda: now + 3601  # an hour later: the login has lapsed
        assert client.get("/config").status_code == 401
        assert len(sessions) == 0


def test_monitor_links_a_finished_run_to_its_tracking(monkeypatch):
    from loralab.ui import monitor

    done = [{"type": "done", "tracking": {"tensorboard": {"logdir": "/runs/j/tensorboard",
                                                         "command": "tensorboard --logdir /runs/j/tensorboard"}}}]
    monkeypatch.setattr(monitor.jobs, "list_events", lambda svc, job_id, types=None: done)
    job = {"id": "job-1", "status": "succeeded", "progress": {"step": 2, "total_steps": 2, "percent": 100},
           "result_model_id": "ft-1"}
    lines = monitor.tracking_lines(None, job, "en")
    assert lines == ["Tracking (tensorboard): `tensorboard --logdir /runs/j/tensorboard`"]
    assert "tensorboard --logdir" in monitor.summary(job, "ja", lines)
    assert monitor.tracking_lines(None, {**job, "status": "running"}, "en") == []
